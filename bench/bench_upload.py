"""Upload: whisperdrop's Host.upload against OpenSSH scp and rsync, same bytes, same sshd, same cipher.

Two links: loopback (64 MiB; 16 MiB with --quick) and a 20 Mbit/s token-bucket (tbf) veth link into a
network namespace where sshd listens (16 MiB; 4 MiB with --quick). Random bytes, so nothing compresses.
What each figure includes:

- scp and rsync: the whole command (process start, SSH handshake, authentication, transfer, exit);
  aes128-gcm@openssh.com, Compression=no, the sshd's own known_hosts, BatchMode. rsync runs over ssh
  with --whole-file into a fresh name each run (no basis file, so no delta work).
- Host.upload, new connection: a fresh Host per run, connect + SFTP + upload (to .part, fsync, rename)
  + close; like scp, the handshake is in the time. Host.upload also fsyncs, which scp does not.
- Host.upload, reused connection: the daemon's steady state (one connection for every job); the
  connection is opened before the clock starts.

Runs alternate between the methods so a burst of load from other processes hits them all alike.
Needs root (sshd, network namespaces): without it the rows say "not measured".
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from common import Context, Row, ratio, root_problem, skipped
from whisperdrop.daemon import transfer
from whisperdrop.shared import log

SECTION = "upload"
CIPHER = "aes128-gcm@openssh.com"
LINK_MBIT = 20


def _ssh_options(server) -> list[str]:
    return ["-i", str(server.client_key), "-c", CIPHER, "-o", f"UserKnownHostsFile={server.known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "Compression=no",
            "-o", "ConnectTimeout=10"]


def _scp(server, path: Path, run: int) -> float:
    target = server.spool / f"scp-{run}.bin"
    command = ["scp", "-q", "-P", str(server.port), *_ssh_options(server), str(path),
               f"{server.user}@{server.host}:{target}"]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    seconds = time.perf_counter() - started
    target.unlink()
    return seconds


def _rsync(server, path: Path, run: int) -> float:
    target = server.spool / f"rsync-{run}.bin"
    ssh = " ".join(["ssh", "-p", str(server.port), *_ssh_options(server)])
    command = ["rsync", "--whole-file", "-e", ssh, str(path), f"{server.user}@{server.host}:{target}"]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    seconds = time.perf_counter() - started
    target.unlink()
    return seconds


def _new_host(server) -> transfer.Host:
    return transfer.Host(server.host_settings(), connect_timeout=10, keepalive_interval=15)


async def _host_fresh(server, path: Path, size: int, sha256: str, run: int) -> float:
    job = hashlib.sha256(f"fresh{run}{time.time()}".encode()).hexdigest()
    started = time.perf_counter()
    host = _new_host(server)
    try:
        stats = await host.upload(job, path, size=size, sha256=sha256)
    finally:
        await host.close()
    seconds = time.perf_counter() - started
    if stats.bytes_sent != size:
        raise AssertionError(f"Host.upload sent {stats.bytes_sent} of {size} bytes")
    (server.spool / "incoming" / f"{job}.opus").unlink()
    return seconds


async def _host_reused(host: transfer.Host, server, path: Path, size: int, sha256: str, run: int) -> float:
    job = hashlib.sha256(f"reused{run}{time.time()}".encode()).hexdigest()
    started = time.perf_counter()
    stats = await host.upload(job, path, size=size, sha256=sha256)
    seconds = time.perf_counter() - started
    if stats.bytes_sent != size:
        raise AssertionError(f"Host.upload sent {stats.bytes_sent} of {size} bytes")
    (server.spool / "incoming" / f"{job}.opus").unlink()
    return seconds


def _measure(server, path: Path, repeats: int) -> dict[str, list[float]]:
    """Seconds per run for each method, runs interleaved."""
    size = path.stat().st_size
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    times: dict[str, list[float]] = {"scp": [], "rsync": [], "fresh": [], "reused": []}

    async def main() -> None:
        warm = _new_host(server)
        await warm.connect()
        await warm.ensure_spool()
        try:
            for run in range(repeats):
                times["scp"].append(_scp(server, path, run))
                times["fresh"].append(await _host_fresh(server, path, size, sha256, run))
                if shutil.which("rsync"):
                    times["rsync"].append(_rsync(server, path, run))
                times["reused"].append(await _host_reused(warm, server, path, size, sha256, run))
        finally:
            await warm.close()

    asyncio.run(main())
    return times


def _rows(link: str, times: dict[str, list[float]], size: int, goal_ratio: bool, link_mbit: float | None) -> list[Row]:
    mib = size / 1048576

    def rate(name: str) -> float | None:
        return mib / statistics.median(times[name]) if times[name] else None

    scp, rsync, fresh, reused = rate("scp"), rate("rsync"), rate("fresh"), rate("reused")
    runs = {name: [round(mib / seconds, 1) for seconds in values] for name, values in times.items()}
    rows = []
    for name, value, label in (("fresh", fresh, "new connection each run"), ("reused", reused, "reused connection")):
        goal = ">= 0.9x scp" if goal_ratio and name == "fresh" else ""
        rows.append(Row(SECTION, f"{link}, {mib:.0f} MiB, Host.upload ({label})", round(value, 2), "MiB/s",
                        round(scp, 2), f"scp {CIPHER.split('@')[0]}", ratio(value, scp), goal,
                        (ratio(value, scp) >= 0.9) if goal else None, runs=runs[name]))
    if rsync is not None:
        rows.append(Row(SECTION, f"{link}, {mib:.0f} MiB, Host.upload (new connection each run) vs rsync over ssh",
                        round(fresh, 2), "MiB/s", round(rsync, 2), "rsync --whole-file", ratio(fresh, rsync),
                        runs=runs["rsync"]))
    else:
        rows.append(skipped(SECTION, f"{link}, rsync", "rsync is not installed"))
    if link_mbit is not None:
        capacity = link_mbit * 1e6 / 8 / 1048576  # MiB/s
        for name, value in (("new connection each run", fresh), ("reused connection", reused)):
            utilisation = 100 * value / capacity
            rows.append(Row(SECTION, f"{link}, link utilisation, Host.upload ({name})", round(utilisation, 1), "%",
                            round(100 * scp / capacity, 1), "scp's utilisation", ratio(value, scp),
                            ">= 90% of the link", utilisation >= 90,
                            note=f"(throughput / {link_mbit:g} Mbit/s; the handshake is inside the new-connection "
                                 f"figure; SSH+TCP framing (~3%) counts against every method)"))
    return rows


def run(context: Context) -> list[Row]:
    problem = root_problem()
    if problem or shutil.which("scp") is None:
        return [skipped(SECTION, "Host.upload vs scp/rsync", problem or "needs OpenSSH scp")]
    from netns import NetNamespace
    from sshd import SSHServer

    log.configure(level="warning")
    scratch = context.scratch / SECTION
    scratch.mkdir()
    rows: list[Row] = []

    size = (16 if context.quick else 64) * 1048576
    path = scratch / "loopback.bin"
    path.write_bytes(os.urandom(size))
    server = SSHServer()
    try:
        server.start()
        rows += _rows("loopback", _measure(server, path, context.repeats), size, True, None)
    finally:
        server.cleanup()
        path.unlink()

    size = (4 if context.quick else 16) * 1048576
    path = scratch / "tbf.bin"
    path.write_bytes(os.urandom(size))
    namespace = NetNamespace()
    server = None
    try:
        try:
            namespace.create()
            namespace.shape(rate=f"{LINK_MBIT}mbit")
        except (subprocess.CalledProcessError, OSError) as error:
            detail = getattr(error, "stderr", b"") or b""
            return rows + [skipped(SECTION, f"{LINK_MBIT} Mbit/s tbf link", f"cannot build a shaped namespace: {error} {detail.decode(errors='replace').strip()}")]
        server = SSHServer(host=namespace.inner_address, port=22, netns=namespace.name)
        server.start()
        rows += _rows(f"{LINK_MBIT} Mbit/s tbf", _measure(server, path, context.repeats), size, False, LINK_MBIT)
    finally:
        if server is not None:
            server.cleanup()
        namespace.cleanup()
        path.unlink()
    return rows
