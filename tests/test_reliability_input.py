"""Reliability under hostile input and a full disk: a real daemon (local route, tiny.en) must lose
nothing, keep its memory bounded, and never transcribe a mix of two versions of a file.

The basic hostile inputs (zero bytes, text named .mp3, truncated mp4, no audio stream, awkward names,
a symlink) are in tests/test_daemon.py. Figures (hash time, peak RSS) are printed; run with `-s` to
see them. Peak RSS is the daemon's VmHWM from /proc/PID/status: the local engine runs in its threads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy
import pytest

from daemon_helpers import Daemon, jfk_pcm, jfk_reference, normalise, word_error_rate, write_speech_wav, write_variant_wav, write_wav
from media import make_silence_wav
from sshd import skip_or_fail

GiB = 1 << 30
PEAK_RSS_LIMIT_MB = 400


class ProductBug(AssertionError):
    """An assertion that pins a known product bug (see the xfail reason); other assertions stay strict."""


class PeakMemoryExceeded(AssertionError):
    """The daemon's peak RSS went over the bound."""


def peak_rss_mb(daemon: Daemon) -> float:
    """The daemon process's peak resident set (VmHWM) in MiB."""
    for line in Path(f"/proc/{daemon.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def move_in(daemon: Daemon, staged: Path, relative: str) -> Path:
    """Rename a file written elsewhere on the same file system into the inbox (one atomic step)."""
    target = daemon.inbox / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, target)
    return target


def event_for(daemon: Daemon, name: str, **fields) -> dict | None:
    return next((event for event in daemon.events() if event.get("event") == name
                 and all(event.get(key) == value for key, value in fields.items())), None)


def wait_event(daemon: Daemon, name: str, timeout: float = 120, **fields) -> dict:
    daemon.wait_for(lambda: event_for(daemon, name, **fields) is not None, timeout=timeout,
                    what=f"{name} {fields}")
    return event_for(daemon, name, **fields)


def wait_json(daemon: Daemon, relative: str, timeout: float = 180) -> dict:
    path = daemon.outbox / relative
    daemon.wait_for(path.exists, timeout=timeout, what=f"outbox/{relative}")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    (root / "staging").mkdir()
    running = Daemon(root).start()
    try:
        yield running
        assert running.stop(timeout=30) == 0
    finally:
        running.kill()


# -- a 2 GB sparse file ------------------------------------------------------------------------------


def test_two_gb_sparse_file_without_audio_fails_cleanly(daemon):
    """A 2 GB sparse file of zeros named big.mp4 goes to failed/ as not-media, hashed in 1 MiB chunks (memory bounded)."""
    staged = daemon.root / "staging" / "big.mp4"
    with open(staged, "wb") as stream:
        stream.truncate(2 * GiB)
    move_in(daemon, staged, "big.mp4")
    record_path = daemon.failed / "big.mp4.error.json"
    # A move is link, fsync, unlink: wait until the source has left the inbox too.
    daemon.wait_for(lambda: record_path.exists() and (daemon.failed / "big.mp4").exists()
                    and not (daemon.inbox / "big.mp4").exists(), timeout=300, what="failed/big.mp4, and the inbox without it")
    record = json.loads(record_path.read_text())
    assert record["kind"] == "media" and record["path"] == "big.mp4"
    assert (daemon.failed / "big.mp4").stat().st_size == 2 * GiB
    assert not (daemon.inbox / "big.mp4").exists() and not (daemon.outbox / "big.json").exists()
    intake = event_for(daemon, "stage.intake", path="big.mp4")
    peak = peak_rss_mb(daemon)
    print(f"\n2 GiB sparse: hash_s={intake['hash_s']} peak_rss_mb={peak:.0f} error={record['error'][:120]!r}")
    assert peak < PEAK_RSS_LIMIT_MB, f"peak RSS {peak:.0f} MiB"


# -- many audio streams ------------------------------------------------------------------------------


def make_many_streams(dest: Path, streams: int = 50) -> Path:
    """A Matroska file with `streams` PCM audio streams: stream 0 is jfk, every other one silence."""
    speech = jfk_pcm()
    silence = numpy.zeros_like(speech)
    with av.open(str(dest), mode="w", format="matroska") as output:
        encoders = []
        for _ in range(streams):
            encoder = output.add_stream("pcm_s16le", rate=16000)
            encoder.layout = "mono"
            encoders.append(encoder)
        step = 16000
        for offset in range(0, len(speech), step):
            for index, encoder in enumerate(encoders):
                samples = (speech if index == 0 else silence)[offset:offset + step]
                frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
                frame.sample_rate = 16000
                frame.pts = offset
                frame.time_base = Fraction(1, 16000)
                for packet in encoder.encode(frame):
                    output.mux(packet)
        for encoder in encoders:
            for packet in encoder.encode(None):
                output.mux(packet)
    return dest


def test_fifty_audio_streams_uses_the_first(daemon):
    """A file with 50 audio streams is transcribed from its first audio stream (jfk; the others are silence)."""
    staged = make_many_streams(daemon.root / "staging" / "fifty.mkv")
    with av.open(str(staged)) as container:
        assert len(container.streams.audio) == 50
    move_in(daemon, staged, "fifty.mkv")
    result = wait_json(daemon, "fifty.json")
    assert word_error_rate(jfk_reference(), result["text"]) <= 0.10
    assert abs(result["duration"] - len(jfk_pcm()) / 16000) < 0.5
    daemon.wait_for(lambda: (daemon.archive / "fifty.mkv").exists(), what="archived")


# -- a file replaced while it is being worked on -----------------------------------------------------
#
# Correct behaviour: the version that ends up in the inbox gets its own transcript, under its stem,
# and the source recorded in that transcript (sha256) is the file that is archived. A transcript is
# never of a mix, and a job's cached Result (keyed by the sha256 of the bytes hashed at intake)
# describes those bytes, so dropping the old version again later gives the old version's words.

def test_file_replaced_between_intake_and_extraction(tmp_path):
    """A file replaced after intake, before extraction, gives the new version's transcript, and the old
    bytes dropped again get the old words. The pipeline is driven one stage at a time (`advance`), so the
    replacement lands exactly between the two stages on any machine, fast or slow."""
    import asyncio

    from test_pipeline_units import pipeline_for

    pipeline = pipeline_for(tmp_path)
    scheduled: list[str] = []
    pipeline.intake.schedule = scheduled.append  # no background task: this test is the loop
    staging, folder = tmp_path / "staging", tmp_path / "inbox" / "replace"
    staging.mkdir()
    folder.mkdir()
    old = write_variant_wav(staging / "old.wav", 80)
    old_bytes = old.read_bytes()
    new = write_speech_wav(staging / "new.wav", 0, 3.0)  # "And so my fellow Americans": a different transcript
    new_bytes = new.read_bytes()
    x = folder / "x.wav"

    async def take_and_finish(path: Path):
        await pipeline.take(path)
        job = pipeline.ledger.job(scheduled[-1])
        while job is not None and job.stage not in ("done", "failed"):
            job = await pipeline.advance(job)
        return job

    async def scenario():
        try:
            os.replace(old, x)
            await pipeline.take(x)
            old_job = pipeline.ledger.job(scheduled[-1])
            os.replace(new, x)  # replaced after intake, before extraction
            old_job = await pipeline.advance(old_job)  # extract finds another version: the source is dropped
            assert old_job.stage == "new" and pipeline.ledger.sources_of(old_job.job_id) == []
            assert await pipeline.advance(old_job) is None  # a job with no source left is forgotten
            done = await take_and_finish(x)  # the watcher takes the new version as a job of its own
            assert done.stage == "done" and done.job_id != old_job.job_id
            (staging / "again.wav").write_bytes(old_bytes)
            os.replace(staging / "again.wav", folder / "again.wav")
            assert (await take_and_finish(folder / "again.wav")).stage == "done"
        finally:
            await pipeline.drain(5.0)
            pipeline.close()

    asyncio.run(scenario())
    result = json.loads((tmp_path / "outbox" / "replace" / "x.json").read_text())
    assert (tmp_path / "archive" / "replace" / "x.wav").read_bytes() == new_bytes
    assert result["source"]["sha256"] == hashlib.sha256(new_bytes).hexdigest()
    assert len(normalise(result["text"])) < 10, result["text"]  # the 3-second version's words
    again = json.loads((tmp_path / "outbox" / "replace" / "again.json").read_text())
    assert again["source"]["sha256"] == hashlib.sha256(old_bytes).hexdigest()
    assert word_error_rate(jfk_reference(), again["text"]) <= 0.10, again["text"]  # the old bytes' own words


@pytest.mark.slow
def test_file_replaced_while_it_is_transcribed(tmp_path):
    """A file replaced while its old version is transcribed is not archived under the old transcript; the new version is transcribed."""
    # settle_seconds 10: the old job finishes before the watcher takes the new version.
    daemon = Daemon(tmp_path, watch={"settle_seconds": 10.0, "rescan_seconds": 5.0})
    staging = tmp_path / "staging"
    old = write_variant_wav(staging / "old.wav", 81)
    new = write_speech_wav(staging / "new.wav", 1, 3.0)
    new_sha = sha256_of(new)
    try:
        daemon.start()
        move_in(daemon, old, "x.wav")
        wait_event(daemon, "stage.extract", path="x.wav", timeout=180)
        move_in(daemon, new, "x.wav")
        daemon.wait_for(lambda: not (daemon.inbox / "x.wav").exists(), timeout=240, what="x.wav leaves the inbox")
        # The job that moved it out logs stage.outbox once its outputs and the move are done: the
        # inbox is empty, so there is nothing left to take.
        wait_event(daemon, "stage.outbox", path="x.wav")
        assert daemon.stop(timeout=30) == 0
    finally:
        daemon.kill()
    archived = daemon.archive / "x.wav"
    transcripts = [json.loads(path.read_text()) for path in daemon.outputs()]
    of_new = [result for result in transcripts if result["source"]["sha256"] == new_sha]
    if archived.exists() and sha256_of(archived) == new_sha and not of_new:
        raise ProductBug("the new version was archived without being transcribed; x.json holds the old words")
    assert of_new and len(normalise(of_new[0]["text"])) < 10
    for result in transcripts:  # each transcript names the bytes it was made from
        assert result["source"]["path"] == "x.wav"


# -- a 10-hour (here: half-hour) silent WAV -----------------------------------------------------------

# 10 h takes about 9 minutes here (extraction alone runs at about 100x real time on silence), more
# than this file's budget; half an hour already shows whether memory grows with the duration.
LONG_SILENCE_HOURS = float(os.environ.get("WHISPERDROP_TEST_SILENCE_HOURS", "0.5"))
LONG_SILENCE_BUG = (
    "engine: faster-whisper's decode_audio holds the whole file in memory (int16 buffer, then float32: "
    "measured peak RSS 738 MB for 0.5 h, 1.1 GB for 1 h of audio), so memory grows with the duration; see the report for the diff"
)


@pytest.mark.slow
def test_long_silent_wav_gives_an_empty_transcript_with_bounded_memory(tmp_path):
    """A half-hour silent WAV (10 h with WHISPERDROP_TEST_SILENCE_HOURS=10) gives an empty transcript, no error, and peak RSS < 400 MB."""
    daemon = Daemon(tmp_path)
    seconds = LONG_SILENCE_HOURS * 3600
    staged = make_silence_wav(tmp_path / "staging.wav", seconds)  # real zeros, written a minute at a time
    try:
        daemon.start()
        started = time.monotonic()
        move_in(daemon, staged, "silence.wav")
        result = wait_json(daemon, "silence.json", timeout=max(300, seconds / 10))
        elapsed = time.monotonic() - started
        peak = peak_rss_mb(daemon)
        assert daemon.stop(timeout=30) == 0
    finally:
        daemon.kill()
    print(f"\n{LONG_SILENCE_HOURS} h of silence: {elapsed:.0f} s end to end, timings={result['timings']}, "
          f"peak_rss_mb={peak:.0f}")
    assert len(normalise(result["text"])) <= 3, result["text"]
    assert abs(result["duration"] - seconds) < 2
    assert daemon.count("job.retry") == 0 and daemon.count("job.failed") == 0
    assert (daemon.archive / "silence.wav").exists()
    if peak >= PEAK_RSS_LIMIT_MB:
        raise PeakMemoryExceeded(f"peak RSS {peak:.0f} MiB for {LONG_SILENCE_HOURS} h of audio")


# -- 1000 files at once ------------------------------------------------------------------------------


def write_tone_wav(path: Path, index: int) -> Path:
    """About 1 s: 0.5 s of silence, then 0.5 s of a tone at 200 + index Hz (distinct bytes per index)."""
    rate = 16000
    times = numpy.arange(rate // 2) / rate
    tone = (8000 * numpy.sin(2 * math.pi * (200 + index) * times)).astype(numpy.int16)
    return write_wav(path, numpy.concatenate([numpy.zeros(rate // 2, dtype=numpy.int16), tone]))


@pytest.mark.slow
def test_thousand_files_dropped_at_once_all_finish_with_bounded_memory(tmp_path):
    """1000 one-second WAVs renamed into the inbox at once all give a transcript and are archived; peak RSS < 400 MB."""
    count = 1000
    daemon = Daemon(tmp_path)
    staging = tmp_path / "staging"
    staging.mkdir()
    staged = [write_tone_wav(staging / f"f{index:04d}.wav", index) for index in range(count)]
    try:
        daemon.start()
        started = time.monotonic()
        for path in staged:
            move_in(daemon, path, f"many/{path.name}")
        daemon.wait_for(lambda: len(list((daemon.archive / "many").glob("*.wav"))) == count
                        if (daemon.archive / "many").exists() else False, timeout=900, what=f"{count} archived")
        elapsed = time.monotonic() - started
        peak = peak_rss_mb(daemon)
        assert daemon.stop(timeout=30) == 0
    finally:
        daemon.kill()
    print(f"\n{count} files: {elapsed:.0f} s ({count / elapsed:.1f} files/s), peak_rss_mb={peak:.0f}")
    results = [json.loads(path.read_text()) for path in daemon.outputs()]
    assert len(results) == count and len({result["job_id"] for result in results}) == count
    assert list((daemon.inbox / "many").iterdir()) == [] and list(daemon.failed.rglob("*")) == []
    assert daemon.count("job.retry") == 0 and daemon.count("stage.transcribe") == count
    assert peak < PEAK_RSS_LIMIT_MB, f"peak RSS {peak:.0f} MiB"


# -- disk full in the outbox -------------------------------------------------------------------------


@pytest.mark.needs_root
def test_full_outbox_keeps_the_source_says_so_and_recovers(tmp_path):
    """With a full outbox (64 KB tmpfs) the job is retried with a disk-full hint, the source stays, and it finishes once space returns."""
    if os.geteuid() != 0:
        skip_or_fail("needs root to mount a small tmpfs outbox")
    daemon = Daemon(tmp_path)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(daemon.outbox)], check=True)
    try:
        filler = daemon.outbox / ".filler"
        with open(filler, "wb", buffering=0) as stream:
            try:
                while True:
                    stream.write(b"\0" * 4096)
            except OSError as error:
                assert error.errno == 28  # ENOSPC: the outbox is full
        daemon.start()
        write_variant_wav(tmp_path / "staging" / "full.wav", 90)
        move_in(daemon, tmp_path / "staging" / "full.wav", "full.wav")
        retry = wait_event(daemon, "job.retry", timeout=180)
        assert retry["stage"] == "transcribed" and "No space left on device" in retry["error"]
        assert "disk is full" in retry["hint"] and "stays in the inbox" in retry["hint"]
        assert retry["retry_in_s"] == 5.0
        assert (daemon.inbox / "full.wav").exists()
        assert [path.name for path in daemon.outbox.iterdir()] == [".filler"]  # no partial output, no .tmp
        filler.unlink()  # space returns: the next retry (5 s later) finishes the job
        result = wait_json(daemon, "full.json", timeout=120)
        assert word_error_rate(jfk_reference(), result["text"]) <= 0.10
        daemon.wait_for(lambda: (daemon.archive / "full.wav").exists() and not (daemon.inbox / "full.wav").exists(),
                        what="archived, out of the inbox")
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        subprocess.run(["umount", str(daemon.outbox)], check=False)
