"""The extraction stage on real media made with PyAV from the shared jfk sample (no mocks)."""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import av
import pytest

from media import (
    CONTAINERS,
    JFK,
    JFK_SECONDS,
    VIDEO_CONTAINERS,
    concat_speech,
    make_clip,
    make_silence_wav,
    make_text_as_mp3,
    make_truncated_mp4,
    make_video_without_audio,
)
from sshd import skip_or_fail
from whisperdrop.daemon.extract import OPUS, SAMPLE_RATE, Extracted, MediaError, OpusSettings, extract
from whisperdrop.engine.engine import Cancelled

REPO = Path(__file__).resolve().parents[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    """Temporary files left in `folder`."""
    return sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """jfk in every container, and with a video stream in the video containers (made once)."""
    folder = tmp_path_factory.mktemp("clips")
    made = {name: make_clip(folder / f"jfk.{name}", name) for name in CONTAINERS}
    for name in VIDEO_CONTAINERS:
        made[f"{name}+video"] = make_clip(folder / f"jfk-video.{name}", name, video=True)
    return made


@pytest.fixture(scope="module")
def speech_mp4(tmp_path_factory) -> Path:
    """Two minutes of speech in an mp4 with a video stream."""
    return concat_speech(tmp_path_factory.mktemp("speech") / "two-minutes.mp4", 120)


@pytest.mark.parametrize("name", list(CONTAINERS) + [f"{name}+video" for name in VIDEO_CONTAINERS])
def test_every_container_becomes_16k_mono_opus_in_ogg(clips, tmp_path, name):
    """Each container (with or without video) yields an Ogg Opus file, mono, 16 kHz input, of jfk's 11 s."""
    source = clips[name]
    dest = tmp_path / "out.opus"
    result = extract(source, dest)

    assert isinstance(result, Extracted)
    assert result.path == dest and dest.is_file()
    assert abs(result.duration - JFK_SECONDS) < 0.1
    assert result.bytes_in == source.stat().st_size
    assert result.bytes_out == dest.stat().st_size
    assert result.sha256 == sha256(dest)
    assert result.seconds > 0
    assert result.source_codec and result.source_container
    with av.open(str(dest)) as output:
        assert output.format.name == "ogg"
        (stream,) = output.streams
        assert stream.type == "audio" and stream.codec_context.name == "opus"
        assert stream.channels == 1
        assert stream.rate in (SAMPLE_RATE, 48000)  # FFmpeg's opus decoder always reports 48 kHz
        assert abs(output.duration / 1_000_000 - JFK_SECONDS) < 0.1
        decoded = sum(frame.samples for frame in output.decode(stream)) / stream.rate
        assert abs(decoded - JFK_SECONDS) < 0.1
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("name", VIDEO_CONTAINERS)
def test_video_container_uses_the_audio_stream(clips, name):
    """In a file whose first stream is video, the first audio stream is the one taken, and reported by index."""
    result = extract(clips[f"{name}+video"], clips[f"{name}+video"].parent / f"{name}-video.opus")
    with av.open(str(clips[f"{name}+video"])) as source:
        assert source.streams[0].type == "video"
        assert result.stream_index == source.streams.audio[0].index == 1
        assert result.source_codec == source.streams.audio[0].codec_context.name


def test_reports_source_codec_and_container(clips, tmp_path):
    """The result names the source's audio decoder and demuxer as PyAV does."""
    result = extract(clips["mp3"], tmp_path / "out.opus")
    assert result.source_codec in ("mp3", "mp3float")
    assert result.source_container == "mp3"
    assert result.stream_index == 0


@pytest.mark.parametrize("kbps", [12, 24, 48])
def test_output_size_follows_bitrate(speech_mp4, tmp_path, kbps):
    """The Opus file's size is within 10 % of bitrate times duration."""
    result = extract(speech_mp4, tmp_path / "out.opus", bitrate_kbps=kbps)
    expected = kbps * 1000 / 8 * result.duration
    assert abs(result.bytes_out - expected) / expected < 0.10, (result.bytes_out, expected)


def test_duration_counts_samples_of_a_long_clip(speech_mp4, tmp_path):
    """Duration comes from the decoded samples: two minutes of source give 120 s within 0.1 s."""
    result = extract(speech_mp4, tmp_path / "out.opus")
    assert abs(result.duration - 120) < 0.1


def test_source_is_left_unchanged(clips, tmp_path):
    """Extraction only reads the source: its bytes and modification time are the same afterwards."""
    source = clips["mp4+video"]
    before = (sha256(source), source.stat().st_mtime_ns, source.stat().st_size)
    extract(source, tmp_path / "out.opus")
    assert (sha256(source), source.stat().st_mtime_ns, source.stat().st_size) == before


def test_existing_destination_is_replaced_whole(clips, tmp_path):
    """A dest that already exists is replaced by the new file in one rename."""
    dest = tmp_path / "out.opus"
    dest.write_bytes(b"stale")
    result = extract(clips["flac"], dest)
    assert dest.read_bytes()[:4] == b"OggS"
    assert sha256(dest) == result.sha256
    assert leftovers(tmp_path) == []


def ogg_serials(path: Path) -> set[int]:
    """The stream serial numbers of every Ogg page in `path` (bytes 14-17 of each page header)."""
    data = path.read_bytes()
    serials, offset = set(), 0
    while offset < len(data):
        assert data[offset:offset + 4] == b"OggS", offset
        segments = data[offset + 26]
        body = sum(data[offset + 27:offset + 27 + segments])
        serials.add(int.from_bytes(data[offset + 14:offset + 18], "little"))
        offset += 27 + segments + body
    return serials


@pytest.mark.parametrize("name", ["flac", "mp3", "mp4+video"])
def test_same_source_twice_gives_the_same_bytes(clips, tmp_path, name):
    """Extracting one source twice writes byte-identical files: the Ogg serial is fixed, not random,
    so a re-extracted file can resume an upload of the earlier one."""
    first = extract(clips[name], tmp_path / "first.opus")
    second = extract(clips[name], tmp_path / "second.opus")
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.sha256 == second.sha256
    assert ogg_serials(first.path) == ogg_serials(second.path) == {0}


def test_encoder_settings_reach_libopus(clips, tmp_path):
    """Other Opus settings (the benchmark's earlier voip at complexity 10) give another encoding of the
    same audio, which decodes to the same length; the default is the measured choice."""
    assert OPUS == OpusSettings(application="audio", complexity=0, frame_ms=60)
    chosen = extract(clips["flac"], tmp_path / "chosen.opus")
    earlier = extract(clips["flac"], tmp_path / "earlier.opus", opus=OpusSettings("voip", 10, 60))
    assert chosen.sha256 != earlier.sha256
    for result in (chosen, earlier):
        with av.open(str(result.path)) as container:
            samples = sum(frame.samples for frame in container.decode(audio=0))
        assert abs(samples / 48000 - JFK_SECONDS) < 0.1  # libopus decodes at 48 kHz


# --- sources that are not usable media: MediaError, naming the file --------------------------------


def check_media_error(error: MediaError, source: Path, reason_part: str, dest_folder: Path) -> None:
    assert error.path == source
    assert reason_part in error.reason
    assert error.hint
    assert str(source) in str(error) and error.reason in str(error) and error.hint in str(error)
    assert not (dest_folder / "out.opus").exists()
    assert leftovers(dest_folder) == []


def test_empty_file_is_a_media_error(tmp_path):
    """A zero-byte file raises MediaError saying the file is empty."""
    source = tmp_path / "empty.mp4"
    source.touch()
    with pytest.raises(MediaError) as caught:
        extract(source, tmp_path / "out.opus")
    check_media_error(caught.value, source, "file is empty", tmp_path)


def test_text_named_mp3_is_a_media_error(tmp_path):
    """A text file named .mp3 raises MediaError quoting PyAV's error."""
    source = make_text_as_mp3(tmp_path / "notes.mp3")
    with pytest.raises(MediaError) as caught:
        extract(source, tmp_path / "out.opus")
    check_media_error(caught.value, source, "not an audio or video file PyAV can read", tmp_path)
    assert "(PyAV: Invalid data found when processing input)" in caught.value.reason
    assert "Errno" not in caught.value.reason


def test_video_without_audio_is_a_media_error(tmp_path):
    """A video-only file raises MediaError that lists the streams it does have."""
    source = make_video_without_audio(tmp_path / "silent-film.mp4")
    with pytest.raises(MediaError) as caught:
        extract(source, tmp_path / "out.opus")
    check_media_error(caught.value, source, "has no audio stream", tmp_path)
    assert "video h264" in caught.value.reason


def test_truncated_mp4_is_a_media_error(tmp_path):
    """An mp4 cut in half (moov atom lost) raises MediaError quoting PyAV's error."""
    source = make_truncated_mp4(tmp_path / "cut.mp4")
    with pytest.raises(MediaError) as caught:
        extract(source, tmp_path / "out.opus")
    check_media_error(caught.value, source, "not an audio or video file PyAV can read", tmp_path)


def test_audio_with_no_samples_is_a_media_error(tmp_path):
    """A valid WAV holding zero samples raises MediaError saying it decoded to no audio."""
    source = make_silence_wav(tmp_path / "nothing.wav", 0)
    with pytest.raises(MediaError) as caught:
        extract(source, tmp_path / "out.opus")
    check_media_error(caught.value, source, "decoded to no audio samples", tmp_path)


def test_cut_off_audio_keeps_what_decoded(clips, tmp_path):
    """An mp3 cut mid-way yields the audio before the cut, as ffmpeg does, rather than failing."""
    source = tmp_path / "cut.mp3"
    data = clips["mp3"].read_bytes()
    source.write_bytes(data[: len(data) // 2])
    result = extract(source, tmp_path / "out.opus")
    assert 4.0 < result.duration < 7.0


def test_media_error_survives_pickling(tmp_path):
    """A MediaError crosses a process boundary (executor) with its path, reason and hint."""
    error = MediaError(tmp_path / "x.mp3", "file is empty (0 bytes)", "copy it again")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.path, copy.reason, copy.hint, str(copy)) == (error.path, error.reason, error.hint, str(error))


# --- failures that are not the source's fault: OSError, never MediaError ---------------------------


def test_full_disk_raises_oserror_and_leaves_no_temp(clips, tmp_path):
    """A write failing with ENOSPC (the temp file is /dev/full) raises OSError, not MediaError, and the temp is removed."""
    if not os.path.exists("/dev/full"):
        skip_or_fail("no /dev/full on this system")
    dest = tmp_path / "out.opus"
    os.symlink("/dev/full", tmp_path / "out.opus.tmp")
    with pytest.raises(OSError) as caught:
        extract(clips["flac"], dest)
    assert not isinstance(caught.value, MediaError)
    assert caught.value.errno == errno.ENOSPC
    assert not dest.exists() and not os.path.lexists(tmp_path / "out.opus.tmp")


def test_file_size_limit_raises_oserror_and_leaves_no_temp(speech_mp4, tmp_path):
    """A write refused part-way (RLIMIT_FSIZE, EFBIG) raises OSError from extract and no temp file is left."""
    script = textwrap.dedent(
        """
        import resource, signal, sys
        from pathlib import Path
        from whisperdrop.daemon.extract import extract, MediaError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
        try:
            extract(Path(sys.argv[1]), Path(sys.argv[2]))
        except MediaError as error:
            print("MediaError", error)
        except OSError as error:
            print("OSError", error.errno)
        """
    )
    dest = tmp_path / "out.opus"
    completed = subprocess.run(
        [sys.executable, "-c", script, str(speech_mp4), str(dest)],
        capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["OSError", str(errno.EFBIG)]
    assert not dest.exists() and leftovers(tmp_path) == []


def test_missing_destination_folder_raises_oserror(clips, tmp_path):
    """A destination folder that does not exist raises FileNotFoundError (an OSError), not MediaError."""
    with pytest.raises(FileNotFoundError):
        extract(clips["flac"], tmp_path / "no-such-folder" / "out.opus")


def test_vanished_source_raises_file_not_found(tmp_path):
    """A source that is gone raises FileNotFoundError as is, so the caller does not mark it failed."""
    with pytest.raises(FileNotFoundError):
        extract(tmp_path / "gone.mp4", tmp_path / "out.opus")
    assert leftovers(tmp_path) == []


# --- cancel and progress ---------------------------------------------------------------------------


def test_cancel_mid_way_raises_cancelled_and_leaves_nothing(speech_mp4, tmp_path):
    """Setting the cancel event during extraction raises Cancelled and leaves neither dest nor temp."""
    cancel = threading.Event()
    seen: list[float] = []

    def progress(done: float) -> None:
        seen.append(done)
        cancel.set()

    with pytest.raises(Cancelled):
        extract(speech_mp4, tmp_path / "out.opus", cancel=cancel, progress=progress)
    assert len(seen) == 1
    assert not (tmp_path / "out.opus").exists() and leftovers(tmp_path) == []


def test_cancel_set_before_start_writes_nothing(clips, tmp_path):
    """An already-set cancel event raises Cancelled before any audio is written."""
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        extract(clips["wav"], tmp_path / "out.opus", cancel=cancel)
    assert list(tmp_path.iterdir()) == []


def test_progress_reports_every_few_seconds(speech_mp4, tmp_path):
    """progress gets increasing done-seconds about every 5 s of audio, not every packet."""
    seen: list[float] = []
    result = extract(speech_mp4, tmp_path / "out.opus", progress=seen.append)
    assert 20 <= len(seen) <= 25
    assert seen == sorted(seen)
    assert all(4.5 <= later - earlier <= 6.0 for earlier, later in zip(seen, seen[1:]))
    assert seen[-1] <= result.duration


# --- memory ------------------------------------------------------------------------------------------


MEMORY_PROBE = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path
    from whisperdrop.daemon.extract import extract
    extract(Path(sys.argv[1]), Path(sys.argv[3]))  # warm: codec libraries loaded
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = extract(Path(sys.argv[2]), Path(sys.argv[3]))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) / 1024, result.duration)
    """
)


@pytest.mark.parametrize("minutes", [10, pytest.param(60, marks=pytest.mark.slow)])
def test_memory_stays_flat_on_long_input(tmp_path, minutes):
    """Extracting a long 48 kHz WAV grows peak RSS by under 10 MiB (holding its 16 kHz output alone would take 19 MiB per 10 min)."""
    source = make_silence_wav(tmp_path / "long.wav", minutes * 60, rate=48000)
    completed = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(JFK), str(source), str(tmp_path / "out.opus")],
        capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert completed.returncode == 0, completed.stderr
    growth_mib, duration = map(float, completed.stdout.split())
    assert duration == minutes * 60
    assert growth_mib < 10, f"peak RSS grew {growth_mib:.1f} MiB"
