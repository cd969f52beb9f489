"""Upload throughput: Host.upload against OpenSSH scp, same file, same sshd, loopback.

Starts a throwaway sshd (tests/sshd.py; needs root and openssh-server), writes SIZE_MB of random
bytes, uploads it `--runs` times each way and prints the median MiB/s of each and the ratio: once
over the daemon's reused connection, once with a new connection per run (what scp pays).

    .venv/bin/python bench/upload_vs_scp.py [--size-mb 50] [--runs 3] [--cipher aes128-gcm@openssh.com]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from sshd import SSHServer  # noqa: E402

from whisperdrop import log  # noqa: E402
from whisperdrop.daemon import transfer  # noqa: E402


async def host_upload(server: SSHServer, path: Path, size: int, sha256: str, runs: int) -> list[float]:
    host = transfer.Host(server.host_settings(), connect_timeout=10, keepalive_interval=15)
    await host.connect()
    await host.ensure_spool()
    seconds = []
    for run in range(runs):
        job = hashlib.sha256(f"bench{run}".encode()).hexdigest()
        started = time.perf_counter()
        stats = await host.upload(job, path, size=size, sha256=sha256)
        seconds.append(time.perf_counter() - started)
        assert stats.bytes_sent == size, stats
        await host.cleanup(job)
    await host.close()
    return seconds


async def host_upload_cold(server: SSHServer, path: Path, size: int, sha256: str, runs: int) -> list[float]:
    """Like scp: each run opens its own connection (handshake included in the time)."""
    seconds = []
    for run in range(runs):
        job = hashlib.sha256(f"cold{run}".encode()).hexdigest()
        started = time.perf_counter()
        host = transfer.Host(server.host_settings(), connect_timeout=10, keepalive_interval=15)
        await host.upload(job, path, size=size, sha256=sha256)
        await host.close()
        seconds.append(time.perf_counter() - started)
        host = transfer.Host(server.host_settings(), connect_timeout=10, keepalive_interval=15)
        await host.cleanup(job)
        await host.close()
    return seconds


def scp_upload(server: SSHServer, path: Path, runs: int, cipher: str) -> list[float]:
    seconds = []
    target = server.spool / "scp.bin"
    for _ in range(runs):
        command = ["scp", "-q", "-P", str(server.port), "-i", str(server.client_key), "-c", cipher,
                   "-o", f"UserKnownHostsFile={server.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                   "-o", "BatchMode=yes", str(path), f"root@{server.host}:{target}"]
        started = time.perf_counter()
        subprocess.run(command, check=True)
        seconds.append(time.perf_counter() - started)
        target.unlink()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cipher", default="aes128-gcm@openssh.com", help="cipher for scp (Host picks AES-GCM)")
    arguments = parser.parse_args()
    log.configure(level="warning")
    workdir = Path(tempfile.mkdtemp(prefix="wd-bench-"))
    try:
        data = os.urandom(arguments.size_mb * 1024 * 1024)
        path = workdir / "audio.bin"
        path.write_bytes(data)
        size, sha256 = len(data), hashlib.sha256(data).hexdigest()
        with SSHServer() as server:
            scp_seconds = scp_upload(server, path, arguments.runs, arguments.cipher)
            host_seconds = asyncio.run(host_upload(server, path, size, sha256, arguments.runs))
            cold_seconds = asyncio.run(host_upload_cold(server, path, size, sha256, arguments.runs))
        mib = size / 1048576
        scp_rate = mib / statistics.median(scp_seconds)
        host_rate = mib / statistics.median(host_seconds)
        print(f"file: {mib:.0f} MiB random, loopback, runs: {arguments.runs} (median)")
        print(f"scp ({arguments.cipher}): {scp_rate:8.1f} MiB/s  {[round(s, 3) for s in scp_seconds]} s")
        print(f"Host.upload (block {transfer.BLOCK_SIZE // 1024} KiB, window {transfer.WINDOW}): "
              f"{host_rate:8.1f} MiB/s  {[round(s, 3) for s in host_seconds]} s")
        cold_rate = mib / statistics.median(cold_seconds)
        print(f"Host.upload, new connection each run (like scp): "
              f"{cold_rate:8.1f} MiB/s  {[round(s, 3) for s in cold_seconds]} s")
        print(f"ratio Host.upload / scp: {host_rate / scp_rate:.2f}x reused connection, "
              f"{cold_rate / scp_rate:.2f}x new connection each run")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
