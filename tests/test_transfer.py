"""whisperdrop.daemon.transfer (and its connection) against a real OpenSSH sshd, an in-process fault server and a shaped,
cut network namespace."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path

import asyncssh
import pytest

from faultserver import FaultServer, HungServer
from sshd import keygen, known_hosts_line
from whisperdrop.daemon import connection, transfer
from whisperdrop.daemon.connection import AuthError, HostError, HostKeyError
from whisperdrop.daemon.transfer import Host
from whisperdrop.shared import spool

JOB = hashlib.sha256(b"job one").hexdigest()
OTHER_JOB = hashlib.sha256(b"job two").hexdigest()
MiB = 1024 * 1024

pytestmark = pytest.mark.timeout(120)


def run(coroutine):
    """Run one test coroutine in a fresh event loop."""
    return asyncio.run(coroutine)


def make_audio(directory: Path, size: int, name: str = "audio.opus") -> tuple[Path, bytes, str]:
    data = os.urandom(size)
    path = directory / name
    path.write_bytes(data)
    return path, data, hashlib.sha256(data).hexdigest()


def host_for(settings: dict, **timeouts) -> Host:
    timeouts = {"connect_timeout": 5.0, "keepalive_interval": 5.0, **timeouts}
    return Host(settings, **timeouts)


def job_document(job: str, size: int = 1, sha256: str = "0" * 64) -> dict:
    return spool.make_job_document(job, spool.TranscribeOptions(), size, sha256, 1.0, "talk.mp4", time.time())


def result_document(job: str) -> dict:
    return {"schema": spool.RESULT_SCHEMA, "job_id": job, "text": "hello",
            "segments": [{"start": 0.0, "end": 1.0, "text": "hello"}]}


# -- pure parts -------------------------------------------------------------------------------------


def test_resume_offset_starts_a_block_aligned_margin_below_the_part():
    """The resume offset is the .part size less WINDOW blocks, rounded down to a block, never negative."""
    block = transfer.block_size_for(10 * MiB)
    margin = transfer.WINDOW * block
    assert transfer.resume_offset(0, 10 * MiB) == 0
    assert transfer.resume_offset(margin - 1, 10 * MiB) == 0
    assert transfer.resume_offset(margin + 3 * block + 5, 10 * MiB) == 3 * block
    assert transfer.resume_offset(11 * MiB, 10 * MiB) == 0  # larger than the audio: start again


def test_block_size_scales_with_the_file():
    """Small uploads use small blocks so a cut one resumes above zero; large ones use the largest block."""
    two_minutes_of_opus = 360 * 1024
    assert transfer.block_size_for(two_minutes_of_opus) == transfer.MIN_BLOCK_SIZE
    assert transfer.resume_offset(two_minutes_of_opus // 2, two_minutes_of_opus) > 0
    assert transfer.block_size_for(1 << 30) == transfer.BLOCK_SIZE


def test_remote_paths_carry_only_job_ids():
    """Layout rejects anything but a 64-hex job id, so no source file name ever reaches a remote path."""
    layout = spool.Layout("spool")
    for bad in ("talk.mp4", "../../etc/passwd", JOB.upper(), JOB[:-1], JOB + "/x"):
        with pytest.raises(spool.ProtocolError):
            layout.audio_part(bad)
    assert all(JOB in path and "talk" not in path for path in layout.job_files(JOB))


def test_aes_gcm_is_preferred():
    """AES-GCM leads the cipher list, with asyncssh's other ciphers kept as fallbacks."""
    algorithms = connection.encryption_algs()
    assert algorithms[0] == "aes128-gcm@openssh.com"
    assert "chacha20-poly1305@openssh.com" in algorithms and "aes256-ctr" in algorithms


# -- real sshd ------------------------------------------------------------------------------------


@pytest.mark.needs_sshd
def test_upload_lands_complete_audio_without_part(sshd, tmp_path):
    """An upload leaves incoming/<id>.opus with identical bytes and no .part, and reports a fresh start."""
    path, data, sha256 = make_audio(tmp_path, 3 * MiB + 12345)
    seen: list[tuple[int, int]] = []

    async def scenario():
        host = host_for(sshd.host_settings())
        try:
            await host.ensure_spool()
            stats = await host.upload(JOB, path, size=len(data), sha256=sha256,
                                      progress=lambda done, total: seen.append((done, total)))
            again = await host.upload(JOB, path, size=len(data), sha256=sha256)
        finally:
            await host.close()
        return stats, again

    stats, again = run(scenario())
    incoming = sshd.spool / "incoming"
    assert (incoming / f"{JOB}.opus").read_bytes() == data
    assert sorted(os.listdir(incoming)) == [f"{JOB}.opus"]
    assert (stats.bytes_sent, stats.resumed_from, stats.audio_bytes) == (len(data), 0, len(data))
    assert seen[-1] == (len(data), len(data)) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert (again.bytes_sent, again.resumed_from) == (0, len(data))  # complete audio already there: skipped


@pytest.mark.needs_sshd
def test_upload_resumes_from_an_existing_part(sshd, tmp_path):
    """A .part left by an earlier attempt is resumed a safety margin below its size; one larger than the audio restarts from 0."""
    size = 6 * MiB
    path, data, sha256 = make_audio(tmp_path, size)
    incoming = sshd.spool / "incoming"
    incoming.mkdir()
    part = incoming / f"{JOB}.opus.part"
    part.write_bytes(data[: 4 * MiB + 777])
    (incoming / f"{OTHER_JOB}.opus.part").write_bytes(b"x" * (size + 10))

    async def scenario():
        host = host_for(sshd.host_settings())
        try:
            resumed = await host.upload(JOB, path, size=size, sha256=sha256)
            restarted = await host.upload(OTHER_JOB, path, size=size, sha256=sha256)
        finally:
            await host.close()
        return resumed, restarted

    resumed, restarted = run(scenario())
    assert resumed.resumed_from == transfer.resume_offset(4 * MiB + 777, size) > 0
    assert resumed.bytes_sent == size - resumed.resumed_from
    assert (restarted.resumed_from, restarted.bytes_sent) == (0, size)
    assert (incoming / f"{JOB}.opus").read_bytes() == data
    assert (incoming / f"{OTHER_JOB}.opus").read_bytes() == data
    assert not part.exists()


@pytest.mark.needs_sshd
def test_parallel_uploads_share_one_connection(sshd, tmp_path):
    """Several uploads in flight on one Host (one connection, separate file handles) all land intact."""
    files = [make_audio(tmp_path, 2 * MiB + index, f"a{index}.opus") for index in range(4)]
    jobs = [hashlib.sha256(str(index).encode()).hexdigest() for index in range(4)]

    async def scenario():
        host = host_for(sshd.host_settings())
        try:
            await host.ensure_spool()
            await asyncio.gather(*(host.upload(job, path, size=len(data), sha256=sha)
                                   for job, (path, data, sha) in zip(jobs, files)))
            return host._connection
        finally:
            await host.close()

    run(scenario())
    for job, (_path, data, _sha) in zip(jobs, files):
        assert (sshd.spool / "incoming" / f"{job}.opus").read_bytes() == data


@pytest.mark.needs_sshd
def test_submit_writes_job_document_by_rename(sshd):
    """submit() leaves jobs/<id>.json with the document and no .tmp beside it."""
    document = job_document(JOB)

    async def scenario():
        host = host_for(sshd.host_settings())
        try:
            await host.ensure_spool()
            await host.submit(document)
        finally:
            await host.close()

    run(scenario())
    jobs = sshd.spool / "jobs"
    assert os.listdir(jobs) == [f"{JOB}.json"]
    assert spool.parse_job(json.loads((jobs / f"{JOB}.json").read_text()), JOB).job_id == JOB


@pytest.mark.needs_sshd
def test_state_follows_the_job_through_the_spool(sshd):
    """state() reports missing, queued, running (with progress), done and failed as the files appear."""
    root = sshd.spool

    async def scenario():
        host = host_for(sshd.host_settings())
        seen = []
        try:
            await host.ensure_spool()
            seen.append(await host.state(JOB))
            await host.submit(job_document(JOB))
            seen.append(await host.state(JOB))
            os.rename(root / "jobs" / f"{JOB}.json", root / "work" / f"{JOB}.json")
            seen.append(await host.state(JOB))
            (root / "progress" / f"{JOB}.json").write_text('{"done_s": 3.0, "duration_s": 10.0}')
            seen.append(await host.state(JOB))
            (root / "results" / f"{JOB}.json").write_text(json.dumps(result_document(JOB)))
            os.unlink(root / "work" / f"{JOB}.json")
            seen.append(await host.state(JOB))
            (root / "failed" / f"{OTHER_JOB}.json").write_text('{"kind": "corrupt", "message": "x", "retryable": false}')
            seen.append(await host.state(OTHER_JOB))
        finally:
            await host.close()
        return seen

    assert run(scenario()) == [
        ("missing", None), ("queued", None), ("running", None),
        ("running", {"done_s": 3.0, "duration_s": 10.0}), ("done", None),
        ("failed", {"kind": "corrupt", "message": "x", "retryable": False}),
    ]


@pytest.mark.needs_sshd
def test_fetch_result_is_atomic_and_checked(sshd, tmp_path):
    """fetch_result() writes dest via a renamed .tmp and returns the Result; a Result for another job leaves dest untouched."""
    results = sshd.spool / "results"
    results.mkdir()
    (results / f"{JOB}.json").write_text(json.dumps(result_document(JOB)))
    (results / f"{OTHER_JOB}.json").write_text(json.dumps(result_document(JOB)))
    dest, other_dest = tmp_path / "result.json", tmp_path / "other.json"

    async def scenario():
        host = host_for(sshd.host_settings())
        try:
            document = await host.fetch_result(JOB, dest)
            with pytest.raises(spool.ProtocolError):
                await host.fetch_result(OTHER_JOB, other_dest)
        finally:
            await host.close()
        return document

    document = run(scenario())
    assert document["text"] == "hello" and json.loads(dest.read_text()) == document
    assert sorted(os.listdir(tmp_path)) == ["result.json"]  # no .tmp, no wrong Result


@pytest.mark.needs_sshd
def test_heartbeats_skip_unparsable_files(sshd):
    """heartbeats() returns the JSON objects in runners/ and skips files that are not."""
    runners = sshd.spool / "runners"
    runners.mkdir()
    (runners / "gpu0.json").write_text('{"host": "gpu", "pid": 1}')
    (runners / "gpu1.json").write_text("{half")
    (runners / "gpu2.json.tmp").write_text('{"host": "tmp"}')

    async def scenario():
        host = host_for(sshd.host_settings())
        try:
            return await host.heartbeats()
        finally:
            await host.close()

    assert run(scenario()) == [{"host": "gpu", "pid": 1}]


@pytest.mark.needs_sshd
def test_cleanup_removes_every_job_file(sshd):
    """cleanup() removes every file Layout.job_files lists, and missing files are no error."""
    layout = spool.Layout(str(sshd.spool))
    for name in spool.DIRECTORIES:
        (sshd.spool / name).mkdir()
    for path in layout.job_files(JOB):
        Path(path).write_text("x")
    keep = Path(layout.audio(OTHER_JOB))
    keep.write_text("other job")

    async def scenario():
        host = host_for(sshd.host_settings())
        try:
            await host.cleanup(JOB)
            await host.cleanup(JOB)
        finally:
            await host.close()

    run(scenario())
    assert not any(Path(path).exists() for path in layout.job_files(JOB))
    assert keep.exists()


@pytest.mark.needs_sshd
def test_unknown_host_key_is_refused_and_never_added(sshd, tmp_path):
    """A host missing from known_hosts raises HostKeyError naming the host and the ssh-keyscan fix, and known_hosts stays unchanged."""
    other = keygen(tmp_path / "other_host", "other")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(known_hosts_line("192.0.2.7", 22, other.with_suffix(".pub")))
    before = known_hosts.read_bytes()

    async def scenario():
        host = host_for(sshd.host_settings(known_hosts=str(known_hosts)))
        try:
            await host.connect()
        finally:
            await host.close()

    with pytest.raises(HostKeyError) as caught:
        run(scenario())
    error = caught.value
    assert error.host == "testhost" and error.transient is False
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1" in error.hint and str(known_hosts) in error.hint
    assert "SHA256:" in error.hint  # the offered fingerprint, to verify out of band
    assert known_hosts.read_bytes() == before


@pytest.mark.needs_sshd
def test_changed_host_key_is_refused(sshd, tmp_path):
    """A known_hosts entry with a different key for the host raises HostKeyError saying the key changed and how to remove the old line."""
    other = keygen(tmp_path / "other_host", "other")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(known_hosts_line("127.0.0.1", sshd.port, other.with_suffix(".pub")))

    async def scenario():
        host = host_for(sshd.host_settings(known_hosts=str(known_hosts)))
        await host.connect()

    with pytest.raises(HostKeyError) as caught:
        run(scenario())
    assert "changed" in caught.value.hint and f"ssh-keygen -R '[127.0.0.1]:{sshd.port}'" in caught.value.hint


@pytest.mark.needs_sshd
def test_missing_known_hosts_file_is_a_host_key_error(sshd, tmp_path):
    """A known_hosts path that does not exist raises HostKeyError (never a silent accept) with the command that creates it."""
    missing = tmp_path / "nope" / "known_hosts"

    async def scenario():
        await host_for(sshd.host_settings(known_hosts=str(missing))).connect()

    with pytest.raises(HostKeyError) as caught:
        run(scenario())
    assert str(missing) in str(caught.value) and "ssh-keyscan" in caught.value.hint
    assert not missing.exists()


@pytest.mark.needs_sshd
def test_missing_or_refused_key_is_an_auth_error(sshd, tmp_path):
    """A key file that does not exist, or a key the host does not accept, raises a permanent AuthError naming the key."""
    missing = tmp_path / "no_such_key"
    stranger = keygen(tmp_path / "stranger", "stranger")

    async def connect(key: Path):
        host = host_for(sshd.host_settings(key=str(key)))
        try:
            await host.connect()
        finally:
            await host.close()

    with pytest.raises(AuthError) as caught:
        run(connect(missing))
    assert str(missing) in str(caught.value) and caught.value.transient is False
    with pytest.raises(AuthError) as caught:
        run(connect(stranger))
    assert caught.value.operation == "connect" and "authorized_keys" in caught.value.hint


def test_hung_server_times_out_within_connect_timeout(tmp_path):
    """A server that accepts TCP and never answers raises a transient HostError that names connect_timeout as what ran out."""

    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")

    async def scenario():
        async with HungServer() as hung:
            host = host_for({"name": "hung", "host": hung.host, "port": hung.port, "known_hosts": str(known_hosts),
                             "spool": "spool"}, connect_timeout=1.0)
            with pytest.raises(HostError) as caught:
                await asyncio.wait_for(host.connect(), 60)  # a hang is a TimeoutError here, not a HostError
            return caught.value

    error = run(scenario())
    assert error.transient is True and error.host == "hung"
    assert error.operation == "connect" and "within 1 s" in str(error), str(error)


# -- fault injection --------------------------------------------------------------------------------


@pytest.fixture
def client_key(tmp_path):
    return keygen(tmp_path / "client", "client")


def fault_settings(server: FaultServer, client_key: Path, tmp_path: Path) -> dict:
    return {"name": "faulty", "host": server.host, "port": server.port, "key": str(client_key),
            "known_hosts": str(server.write_known_hosts(tmp_path / "known_hosts")), "spool": "spool"}


def test_dropped_connection_mid_upload_resumes(tmp_path, client_key):
    """A connection dropped halfway raises a transient HostError; the next call reconnects, resumes from the .part and lands identical bytes."""
    size = 16 * MiB
    path, data, sha256 = make_audio(tmp_path, size)
    root = tmp_path / "server"
    root.mkdir()

    async def scenario():
        async with FaultServer(root, client_key.with_suffix(".pub"), drop_after=size // 2) as server:
            host = host_for(fault_settings(server, client_key, tmp_path))
            try:
                await host.ensure_spool()
                with pytest.raises(HostError) as caught:
                    await host.upload(JOB, path, size=size, sha256=sha256)
                stats = await host.upload(JOB, path, size=size, sha256=sha256)
            finally:
                await host.close()
            return caught.value, stats, server.bytes_written, server.faults.drops

    error, stats, server_bytes, drops = run(scenario())
    assert drops == 1 and error.transient is True and error.operation == "upload"
    assert stats.resumed_from > 0 and stats.resumed_from <= size // 2
    assert stats.bytes_sent == size - stats.resumed_from
    # Re-sent at most: WINDOW blocks of margin plus the rounding down to a block, within 2 MiB.
    block = transfer.block_size_for(size)
    assert (transfer.WINDOW + 1) * block <= 2 * MiB
    assert server_bytes <= size + (transfer.WINDOW + 1) * block
    assert (root / "spool" / "incoming" / f"{JOB}.opus").read_bytes() == data
    assert not (root / "spool" / "incoming" / f"{JOB}.opus.part").exists()


def test_disk_full_is_transient_with_host_and_cause(tmp_path, client_key):
    """A write refused with SFTP Failure (disk full) raises a transient HostError naming the host, the cause and 'free space'."""
    path, _data, sha256 = make_audio(tmp_path, 4 * MiB)
    root = tmp_path / "server"
    root.mkdir()

    async def scenario():
        async with FaultServer(root, client_key.with_suffix(".pub"), fail_after=MiB) as server:
            host = host_for(fault_settings(server, client_key, tmp_path))
            try:
                await host.ensure_spool()
                with pytest.raises(HostError) as caught:
                    await host.upload(JOB, path, size=4 * MiB, sha256=sha256)
                # The connection survives a refused write: the next call goes on with the same one.
                connection = host._connection
                await host.upload(JOB, path, size=4 * MiB, sha256=sha256)
                assert host._connection is connection
            finally:
                await host.close()
            return caught.value

    error = run(scenario())
    assert error.transient is True and error.host == "faulty"
    assert "No space left on device" in str(error) and "faulty" in str(error) and "free space" in error.hint


# -- chrooted SFTP-only account ---------------------------------------------------------------------


@pytest.mark.needs_sshd
@pytest.mark.needs_root
def test_chrooted_sftp_only_account_uploads_and_cannot_run_commands(chroot_sshd, tmp_path):
    """A chrooted ForceCommand internal-sftp account receives uploads into its spool, and any command gets only sftp's refusal."""
    path, data, sha256 = make_audio(tmp_path, 2 * MiB)
    server = chroot_sshd

    async def scenario():
        host = host_for(server.host_settings())
        try:
            await host.ensure_spool()
            await host.upload(JOB, path, size=len(data), sha256=sha256)
            await host.submit(job_document(JOB, len(data), sha256))
        finally:
            await host.close()
        async with asyncssh.connect(server.host, port=server.port, username=server.user,
                                    client_keys=[str(server.client_key)], known_hosts=str(server.known_hosts)) as connection:
            result = await asyncio.wait_for(connection.run("id", check=False), 10)
            with pytest.raises(asyncssh.ChannelOpenError):
                await asyncio.wait_for(connection.open_connection("127.0.0.1", server.port), 10)
        return result

    result = run(scenario())
    assert (server.spool / "incoming" / f"{JOB}.opus").read_bytes() == data
    assert (server.spool / "jobs" / f"{JOB}.json").exists()
    # OpenSSH's internal-sftp answers any exec request with this line and exit status 1.
    assert result.exit_status == 1 and "allows sftp connections only" in result.stdout
    assert "uid=" not in result.stdout


# -- shaped and cut link ----------------------------------------------------------------------------


async def wait_reachable(address: str, port: int, timeout: float = 60) -> None:
    """Return once a TCP connection to address:port opens (a restored link passes packets again)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), 5)
        except (OSError, asyncio.TimeoutError):
            assert time.monotonic() < deadline, f"{address}:{port} still unreachable {timeout} s after the link came back"
            await asyncio.sleep(0.2)
            continue
        writer.close()
        await writer.wait_closed()
        return


@pytest.mark.slow
@pytest.mark.needs_root
@pytest.mark.needs_sshd
def test_cut_link_mid_upload_then_resume_over_shaped_link(netns_sshd, tmp_path):
    """Over a 20 Mbit/s link cut mid-upload, the upload fails transient once keepalives lapse, and after the link returns the next call resumes and completes."""
    namespace, server = netns_sshd
    namespace.shape("20mbit")
    size = 8 * MiB  # about 3.4 s at 20 Mbit/s
    path, data, sha256 = make_audio(tmp_path, size)

    async def scenario():
        host = host_for(server.host_settings(), connect_timeout=5.0, keepalive_interval=1.0, operation_timeout=4.0)
        cut = asyncio.Event()

        def progress(done: int, total: int) -> None:
            if done >= total // 2 and not cut.is_set():
                namespace.cut()
                cut.set()

        try:
            await host.ensure_spool()
            with pytest.raises(HostError) as caught:  # a hang is a TimeoutError here, not a HostError
                await asyncio.wait_for(host.upload(JOB, path, size=size, sha256=sha256, progress=progress), 60)
            namespace.restore()
            await wait_reachable(server.host, server.port)
            stats = await host.upload(JOB, path, size=size, sha256=sha256)
        finally:
            namespace.restore()
            await host.close()
        return caught.value, stats

    error, stats = run(scenario())
    assert error.transient is True and error.operation == "upload"
    assert stats.resumed_from > 0 and stats.bytes_sent < size
    assert (server.spool / "incoming" / f"{JOB}.opus").read_bytes() == data
