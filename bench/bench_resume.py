"""Resume: bytes sent again after the connection is cut at 25, 50 and 75 % of an upload.

The in-process asyncssh fault server (tests/faultserver.py) drops the connection once the cut point's
bytes have reached its disk; a second Host.upload call (the daemon's retry, same Host, which reconnects)
finishes the job. Bytes on the wire = what the server stored before the cut (requests in flight at the
cut are lost and not counted) + the second call's bytes_sent. Re-sent = that - the file's size; the
baseline is the part not yet sent at the cut. Goal: re-sent overhead <= 2 MiB. Loopback, no root needed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import statistics
from pathlib import Path

from common import Context, Row, ratio
from whisperdrop.daemon import connection, transfer
from whisperdrop.shared import log

SECTION = "resume"
CUTS = (0.25, 0.50, 0.75)
MIB = 1048576


async def _one(scratch: Path, path: Path, size: int, sha256: str, cut: int, run: int) -> dict:
    from faultserver import FaultServer
    from sshd import keygen

    base = scratch / f"cut{cut}-{run}"
    (base / "root" / "spool").mkdir(parents=True)
    client_key = keygen(base / "client", "bench-client")
    async with FaultServer(base / "root", client_key.with_suffix(".pub"), drop_after=cut) as server:
        known_hosts = server.write_known_hosts(base / "known_hosts")
        host = transfer.Host({"name": "faulty", "host": server.host, "port": server.port, "user": "root",
                              "key": str(client_key), "known_hosts": str(known_hosts), "spool": "/spool"},
                             connect_timeout=10, keepalive_interval=15)
        try:
            job = hashlib.sha256(f"resume{cut}{run}".encode()).hexdigest()
            await host.ensure_spool()
            try:
                await host.upload(job, path, size=size, sha256=sha256)
                raise AssertionError(f"the fault server did not drop the upload at {cut} bytes")
            except connection.HostError as error:
                if not error.transient:
                    raise
            stored_before = server.bytes_written
            stats = await host.upload(job, path, size=size, sha256=sha256)
        finally:
            await host.close()
        uploaded = (base / "root" / "spool" / "incoming" / f"{job}.opus").read_bytes()
        if hashlib.sha256(uploaded).hexdigest() != sha256:
            raise AssertionError("the resumed upload does not match the source")
    return {"stored_before": stored_before, "second": stats.bytes_sent, "resumed_from": stats.resumed_from}


def run(context: Context) -> list[Row]:
    log.configure(level="error")
    scratch = context.scratch / SECTION
    scratch.mkdir()
    size = (4 if context.quick else 16) * MIB
    path = scratch / "audio.bin"
    path.write_bytes(os.urandom(size))
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    rows = []
    for fraction in CUTS:
        cut = int(size * fraction)
        results = [asyncio.run(_one(scratch, path, size, sha256, cut, run)) for run in range(context.repeats)]
        second = statistics.median(result["second"] for result in results)
        not_sent = statistics.median(size - result["stored_before"] for result in results)
        resent = [result["stored_before"] + result["second"] - size for result in results]
        overhead = statistics.median(resent)
        rows.append(Row(
            SECTION, f"{size // MIB} MiB upload cut at {fraction:.0%}: bytes sent by the second call",
            round(second / MIB, 3), "MiB", round(not_sent / MIB, 3), "part not yet sent", ratio(second, not_sent),
            "<= not yet sent + 2 MiB", overhead <= 2 * MIB,
            note=f"(re-sent {overhead / MIB:.2f} MiB = stored before the cut + second call - size; "
                 f"resumed from {statistics.median(r['resumed_from'] for r in results) / MIB:.2f} MiB)",
            runs=[round(value / MIB, 3) for value in resent]))
    path.unlink()
    return rows
