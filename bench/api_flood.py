"""The HTTP API under a flood of half-open connections (issue 27): figures before and after, measured
in one run.

    python bench/api_flood.py --baseline /work/main        # a checkout of the code to compare with
    python bench/api_flood.py                               # this tree only

For each tree the daemon (`python -m whisperdrop run` from that tree, with api.token set) starts with
an open-file limit of 1,024 (soft and hard: systemd's default soft limit, with no room to raise it),
then `--connections` sockets each send `GET /health HTTP/1.1\\r\\nHost: x\\r\\n` and never finish the
head, and are held for `--seconds`. During the flood a file is dropped into the inbox and, after 2 s,
an authorized `GET /health` is timed. Printed per tree: the flood's sockets connected, the most
sockets the daemon held (from /proc/<pid>/fd), the flood's sockets still open at the end, the
authorized request's status and seconds, the log lines and bytes written during the flood, and
whether the dropped file was transcribed within 120 s of the flood's end. Then, against a token-less
daemon of the same tree: the cross-site upload's status and the files it wrote, and whether the
answer to a 3-byte raw PCM upload names the state folder.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import httpx  # noqa: E402

from daemon_helpers import Daemon, write_variant_wav  # noqa: E402
from hostile import HalfOpenFlood, raise_open_file_limit  # noqa: E402

TOKEN = "bench-flood-token"
HERE = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def daemon_sockets(pid: int) -> int:
    """The sockets process `pid` holds open now."""
    count = 0
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                count += 1
        except OSError:
            continue
    return count


def measure(tree: Path, connections: int, seconds: float, scratch: Path) -> dict:
    """One flood against the daemon of `tree`; the figures (see the module's doc)."""
    port = free_port()
    scratch.mkdir(parents=True, exist_ok=True)
    daemon = Daemon(scratch, api={"listen": f"127.0.0.1:{port}", "token": TOKEN})
    daemon.start(env={"PYTHONPATH": str(tree)}, open_files=(1024, 1024))
    figures: dict = {"tree": str(tree)}
    flood = HalfOpenFlood(("127.0.0.1", port), connections)
    most = [0]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            most[0] = max(most[0], daemon_sockets(daemon.process.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        mark = daemon.log_path.stat().st_size
        started = time.monotonic()
        sampler.start()
        figures["connected"] = flood.open(timeout=min(60.0, seconds))
        staged = write_variant_wav(scratch / "staging" / "during-flood.wav", 5)
        os.rename(staged, daemon.inbox / "during-flood.wav")
        time.sleep(2.0)
        asked = time.monotonic()
        try:
            answer = httpx.get(f"http://127.0.0.1:{port}/health", headers={"Authorization": f"Bearer {TOKEN}"},
                               timeout=30.0)
            figures["authorized_status"] = answer.status_code
        except httpx.HTTPError as error:
            figures["authorized_status"] = type(error).__name__
        figures["authorized_seconds"] = round(time.monotonic() - asked, 3)
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))
        figures["flood_still_open"] = flood.held()
        sampling.set()
        sampler.join()
        figures["daemon_sockets_most"] = most[0]
        written = daemon.log_path.read_bytes()[mark:]
        figures["log_lines"] = written.count(b"\n")
        figures["log_bytes"] = len(written)
        figures["flood_seconds"] = round(time.monotonic() - started, 1)
    finally:
        sampling.set()
        flood.close()
    try:
        daemon.wait_for(lambda: (daemon.outbox / "during-flood.json").exists(), timeout=120, what="the dropped file")
        figures["dropped_file_transcribed"] = True
    except AssertionError:
        figures["dropped_file_transcribed"] = False
    daemon.stop()
    daemon.kill()
    return figures


def probe(tree: Path, scratch: Path) -> dict:
    """The issue's other probes against a token-less daemon of `tree` on loopback: the cross-site
    upload (Host and Origin attacker.example) and the 3-byte raw PCM upload, whose answer named the
    state folder."""
    port = free_port()
    daemon = Daemon(scratch, api={"listen": f"127.0.0.1:{port}"})
    daemon.start(env={"PYTHONPATH": str(tree)})
    try:
        wav = write_variant_wav(scratch / "cross-site.wav", 1)
        with open(wav, "rb") as stream:
            cross = httpx.post(f"http://127.0.0.1:{port}/asr", params={"output": "txt"},
                               headers={"Host": "attacker.example", "Origin": "http://attacker.example"},
                               files={"audio_file": ("cross-site.wav", stream)}, timeout=300)
        short = httpx.post(f"http://127.0.0.1:{port}/asr", params={"encode": "false"},
                           files={"audio_file": ("x.pcm", b"\x01\x02\x03")}, timeout=300)
        written = sorted(path.name for path in (daemon.outbox / "api").glob("cross-site*")) \
            if (daemon.outbox / "api").exists() else []
        return {"cross_site_status": cross.status_code, "cross_site_files": len(written),
                "three_bytes_status": short.status_code, "state_path_in_answer": str(scratch / "state") in short.text}
    finally:
        daemon.stop()
        daemon.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="a checkout of the code to compare with (e.g. main's worktree)")
    parser.add_argument("--connections", type=int, default=1100)
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the flood is held")
    args = parser.parse_args()
    if not raise_open_file_limit(args.connections + 300):
        sys.exit(f"this process needs an open-file hard limit of {args.connections + 300} for its sockets")
    trees = ([Path(args.baseline).resolve()] if args.baseline else []) + [HERE]
    rows = []
    for tree in trees:
        with tempfile.TemporaryDirectory(prefix="wd-flood-") as scratch:
            print(f"# flood against {tree} ...", file=sys.stderr, flush=True)
            row = measure(tree, args.connections, args.seconds, Path(scratch) / "flood")
        with tempfile.TemporaryDirectory(prefix="wd-probe-") as scratch:
            row.update(probe(tree, Path(scratch)))
        rows.append(row)
    keys = ["connected", "daemon_sockets_most", "flood_still_open", "authorized_status", "authorized_seconds",
            "log_lines", "log_bytes", "dropped_file_transcribed", "flood_seconds", "cross_site_status",
            "cross_site_files", "three_bytes_status", "state_path_in_answer"]
    print("| tree | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for row in rows:
        print(f"| {row['tree']} | " + " | ".join(str(row.get(key)) for key in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
