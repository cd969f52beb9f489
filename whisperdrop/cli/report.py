"""The `status`, `stats` and `doctor` subcommands: their options, and the text they print.

The figures come from `daemon.status` and the checks from `daemon.doctor`; this module only
parses options, prints (text or --json) and chooses the exit status.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import sys
from dataclasses import asdict
from typing import Any, TextIO

from whisperdrop.daemon.doctor import DOCTOR_TIMEOUT_S, Check, doctor
from whisperdrop.daemon.status import NoLedger, collect_stats, collect_status, format_age
from whisperdrop.shared import log

COMMANDS = (("status", "jobs by stage, hosts and recent errors"),
            ("stats", "throughput, error rate, stage times, cost of local against remote"),
            ("doctor", "check the set-up end to end and say how to fix what is wrong"))


def parse_duration(text: str) -> float:
    """'90s', '15m', '24h', '7d', '2w' or a number of seconds -> seconds. Raises argparse.ArgumentTypeError."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a duration like 90s, 15m, 24h or 7d")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    return float(match.group(1)) * unit


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def slurm_state(slurm: dict) -> str:
    """A Slurm runner's word on a job, for a person: "queued in Slurm (job 1234, reason Resources)"."""
    state, job = str(slurm.get("state") or "unknown"), slurm.get("job_id")
    reason = slurm.get("reason")
    detail = f"job {job}" + (f", reason {reason}" if reason and reason != "None" else "")
    if state == "PENDING":
        return f"queued in Slurm ({detail})"
    if state in ("RUNNING", "CONFIGURING", "COMPLETING"):
        return f"{state.lower()} in Slurm ({detail})"
    return f"in Slurm, {state} ({detail})"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def print_status(data: dict, out: TextIO = sys.stdout) -> None:
    """Print collect_status's dict as text: the daemon, the inbox, stages, queue, jobs in progress,
    hosts, last errors."""
    daemon = data["daemon"]
    if daemon["running"]:
        uptime = f", up {format_age(daemon['uptime_s'])}" if daemon["uptime_s"] is not None else ""
        print(f"daemon: running, pid {daemon['pid']}{uptime}", file=out)
    else:
        last = f" (last ran as pid {daemon['pid']})" if daemon["pid"] else " (it has not run with this state_dir)"
        print(f"daemon: NOT running{last}; nothing is taken from the inbox until it starts "
              "(systemctl start whisperdrop, or whisperdrop run)", file=out)
    if data["inbox_files"] is None:
        print("inbox: cannot be read by this user", file=out)
    else:
        print(f"inbox: {data['inbox_files']} file(s), {data['pending_sources']} of them taken", file=out)
    stages = "  ".join(f"{stage} {count}" for stage, count in data["stages"].items())
    print(f"jobs by stage: {stages}", file=out)
    change = data["ledger_updated_age_s"]
    print(f"queue: {data['queue_length']} unfinished job(s); provider {data['provider']}; "
          + (f"last ledger change {format_age(change)} ago" if change is not None else "no job yet"), file=out)
    if data["active"]:
        print("\nin progress:" if daemon["running"] else "\nunfinished (they resume when the daemon starts):", file=out)
        for job in data["active"]:
            progress = job["progress"]
            where = f" on {job['host']}" if job["host"] else ""
            line = (f"  {job['job_id'][:12]}  {job['stage']:<10} upload {_percent(progress['upload']):>4}  "
                    f"transcribe {_percent(progress['transcribe']):>4}{where}  {job['source'] or ''}")
            slurm = progress.get("slurm")
            if slurm and progress["transcribe"] is None:
                line += "  " + slurm_state(slurm)
            if job["retry_in_s"] is not None:
                line += f"  (attempt {job['attempts']}, retry in {job['retry_in_s']:.0f} s)"
            print(line, file=out)
    if data["hosts"]:
        seen = data["hosts_snapshot_age_s"]
        print("\nGPU hosts" + (f" (as the daemon last saw them, {format_age(seen)} ago):" if seen is not None
                               else ":"), file=out)
        for host in data["hosts"]:
            _print_host(host, out)
    if data["recent_errors"]:
        print("\nlast errors:", file=out)
        for error in data["recent_errors"]:
            print(f"  {error['job_id'][:12]} ({error['stage']}, {error['source'] or '?'}): {error['error']}", file=out)


def _print_host(host: dict, out: TextIO) -> None:
    if host["up"] is None:
        print(f"  {host['name']}: {host['note']}", file=out)
        return
    state = "up" if host["up"] else f"DOWN after {host['failures']} failure(s): {host['last_error']}"
    print(f"  {host['name']}: {state}; queue {host['queue_length']}, {host['in_flight']} in flight from here", file=out)
    if not host["up"] and "probe_when" in host:
        print(f"    {_probe_line(host)}", file=out)
    for runner in host["runners"]:
        current = runner["current"] or {}
        doing = f", working on {str(current.get('job_id'))[:12]}" if current.get("job_id") else ", idle"
        device = " ".join(str(part) for part in (runner["device"], runner["gpu"]) if part)
        print(f"    runner {runner['name']}: {device or 'device unknown'}, model {runner['model']}, "
              f"queue {runner['queue_length']}{doing}, heartbeat {format_age(runner['heartbeat_age_s'])} old", file=out)


def _probe_line(host: dict) -> str:
    """A down host's back-off and probes, for people: e.g. `back-off 40 s, tried again in 12 s; probed
    3 s ago: still down; next probe in 2 s, by the hand-back watch of the 1 job(s) on the CPU`."""
    parts = []
    if host.get("backoff_s"):
        retry = host.get("retry_in_s")
        parts.append(f"back-off {host['backoff_s']:.0f} s" + (f", tried again in {retry:.0f} s" if retry else ""))
    if host.get("probed_ago_s") is not None:
        parts.append(f"probed {format_age(host['probed_ago_s'])} ago: " + ("back" if host.get("probe_ok") else "still down"))
    next_in = host.get("next_probe_in_s")
    parts.append(("next probe " + (f"in {next_in:.0f} s, " if next_in else "now, ") if next_in is not None
                  else "next probe ") + str(host["probe_when"]))
    return "; ".join(parts)


def print_stats(data: dict, out: TextIO = sys.stdout) -> None:
    """Print collect_stats's dict as text: counts, fallbacks, stage times, routes, bytes and cost.

    Without GPU hosts (none configured, or provider `local`) and no remote job in the window, one
    line says so instead of the remote route, bytes sent, GPU cost and fallback rows, all zeros."""
    rate = "-" if data["error_rate"] is None else f"{100 * data['error_rate']:.1f}%"
    print(f"last {format_age(data['since_s'])}: {data['done']} done, {data['failed']} failed, error rate {rate}",
          file=out)
    cpu_only = not data.get("gpu_hosts") and not data["routes"]["remote"]["jobs"] and not data["fallbacks"]
    if cpu_only:
        why = ("transcription.provider is local" if data.get("provider") == "local"
               else "none is configured in remote.hosts; docs/gpu-host.md sets one up")
        print(f"GPU hosts: none in use ({why}), so every job runs on this machine's CPU", file=out)
    elif data["fallbacks"]:
        print(f"fallbacks to the local CPU: {data['fallbacks_total']}", file=out)
        for label, entry in sorted(data["fallbacks"].items(), key=lambda item: -item[1]["count"]):
            print(f"  {label}: {entry['count']}  (e.g. {entry['example'][:120]})", file=out)
    else:
        print("fallbacks to the local CPU: none", file=out)
    handbacks = data.get("handbacks") or {}
    if any(handbacks.values()):
        print(f"handed back from the CPU to a GPU host: {handbacks.get('served', 0)} finished there, "
              f"{handbacks.get('failed', 0)} back on the CPU after the host failed again", file=out)
    print("stage times (p50 / p95 over done jobs):", file=out)
    for stage, figures in data["stage_times"].items():
        if figures["count"]:
            print(f"  {stage:<11} {_seconds(figures['p50_s']):>10} / {_seconds(figures['p95_s']):>10}  "
                  f"({figures['count']} job(s))", file=out)
    for route, figures in data["routes"].items():
        if cpu_only and route == "remote":
            continue
        rtf = "-" if figures["real_time_factor"] is None else f"{figures['real_time_factor']:.3f}"
        print(f"{route}: {figures['jobs']} job(s), {figures['audio_s']:.1f} s of audio in "
              f"{figures['transcribe_s']:.1f} s, real-time factor {rtf}", file=out)
    if cpu_only:
        return
    sent = data["bytes"]
    ratio = "-" if sent["ratio"] is None else f"{100 * sent['ratio']:.1f}% of the source"
    print(f"bytes sent to GPU hosts: {sent['sent']} for {sent['source']} source bytes ({ratio})", file=out)
    cost = data["cost"]
    if cost["note"]:
        print(f"cost: {cost['gpu_seconds']:.1f} GPU seconds; CPU equivalent: {cost['note']}", file=out)
    else:
        speedup = f", {cost['speedup']:.1f}x faster" if cost["speedup"] else ""
        print(f"cost: {cost['gpu_seconds']:.1f} GPU seconds for {cost['remote_audio_s']:.1f} s of audio; the local "
              f"CPU would have taken {cost['cpu_seconds_equivalent']:.1f} s (local real-time factor "
              f"{cost['local_real_time_factor']:.3f} with {cost['local_model']}, measured over "
              f"{cost['local_jobs_measured']} job(s)){speedup}", file=out)


def print_doctor(checks: list[Check], out: TextIO = sys.stdout) -> None:
    """Print one line per check (ok or FAIL, with the fix under a failure) and the verdict."""
    for check in checks:
        mark = "ok  " if check.ok else "FAIL"
        print(f"{mark}  {check.subject}: {check.step}: {check.detail}", file=out)
        if not check.ok and check.fix:
            print(f"      fix: {check.fix}", file=out)
    failed = [check for check in checks if not check.ok]
    print(f"\n{len(failed)} problem(s)" if failed else "\neverything looks right", file=out)


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    """Add the options of subcommand `name` (status, stats or doctor) to its parser."""
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    if name == "stats":
        parser.add_argument("--since", type=parse_duration, default=parse_duration("24h"), metavar="DURATION",
                            help="window of finished jobs: 90s, 15m, 24h, 7d (default: 24h)")
    if name == "doctor":
        parser.add_argument("--timeout", type=float, default=DOCTOR_TIMEOUT_S, metavar="SECONDS",
                            help=f"timeout of each network step (default: {DOCTOR_TIMEOUT_S:g})")


def run(name: str, args: argparse.Namespace, config: Any) -> int:
    """Run subcommand `name` with its parsed `args`; prints the report on stdout and returns the exit
    status (0 fine, 1 a problem found, 2 cannot tell: no ledger, or an unreadable one)."""
    # SSH and engine events go to stderr, only when they matter; stdout is the report (or its JSON).
    log.configure(level="debug" if getattr(args, "verbose", False) else "error", fmt="console", stream=sys.stderr)
    if name == "doctor":
        checks = doctor(config, timeout=args.timeout)
        if args.json:
            print(json.dumps([asdict(check) for check in checks], indent=2))
        else:
            print_doctor(checks)
        return 0 if all(check.ok for check in checks) else 1
    try:
        data = collect_status(config) if name == "status" else collect_stats(config, args.since)
    except NoLedger as error:
        print(f"whisperdrop {name}: {error}", file=sys.stderr)
        return 2
    except sqlite3.Error as error:
        print(f"whisperdrop {name}: cannot read the ledger: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    elif name == "status":
        print_status(data)
    else:
        print_stats(data)
    return 0
