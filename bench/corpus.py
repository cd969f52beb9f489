"""Speech with known text for the engine benchmarks: espeak-ng sentences in several voices, and jfk.flac.

- `speech_file(folder, seconds)`: one 16 kHz WAV of at least `seconds`: jfk.flac first, then the
  sentences of `HARVARD` (60) in turn, the voice changing every 7 sentences (5 voices), so a sentence
  comes back only in another voice. Returns the path, the exact text spoken and a line
  that says what it is.
- `speech_clips(folder, count, seconds)`: `count` distinct short WAVs (voice and sentences differ
  from one to the next), each at least `seconds` long, with their texts.
- `write_long_opus(path, seconds, placements)`: hours of a quiet noise floor with jfk spoken at known
  moments, encoded straight to 16 kHz mono Opus (24 kbit/s) a minute at a time, so a 10-hour file
  takes about 100 MB of disk and never exists as WAV (1.15 GB).

espeak-ng renders each (voice, sentence) once per process; a missing espeak-ng raises RuntimeError
saying how to install it.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy
from daemon_helpers import write_wav  # tests/: bench/run.py puts tests/ on the path
from media import speech_in_noise

RATE = 16000
# (voice, words per minute): male and female, American, British and Scottish accents.
VOICES = (("en-us", 165), ("en-gb", 150), ("en+f3", 170), ("en-gb-scotland", 155), ("en-us+m3", 140))
# Harvard sentences (IEEE 1969, lists 1 to 6), public domain: phonetically balanced, known text.
HARVARD = (
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
    "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.",
    "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.",
    "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.",
    "The girl at the booth sold fifty bonds.",
    "The small pup gnawed a hole in the sock.",
    "The fish twisted and turned on the bent hook.",
    "Press the pants and sew a button on the vest.",
    "The swan dive was far short of perfect.",
    "The beauty of the view stunned the young boy.",
    "Two blue fish swam in the tank.",
    "Her purse was full of useless trash.",
    "The colt reared and threw the tall rider.",
    "It snowed, rained, and hailed the same morning.",
    "Read verse out loud for pleasure.",
    "The wide road shimmered in the hot sun.",
    "The lazy cow lay in the cool grass.",
    "Lift the square stone over the fence.",
    "The rope will bind the seven books at once.",
    "Hop over the fence and plunge in.",
    "The friendly gang left the drug store.",
    "Mesh wire keeps chicks inside.",
    "The frosty air passed through the coat.",
    "The crooked maze failed to fool the mouse.",
    "Adding fast leads to wrong sums.",
    "The show was a flop from the very start.",
    "A saw is a tool used for making boards.",
    "The wagon moved on well oiled wheels.",
    "March the soldiers past the next hill.",
    "A cup of sugar makes sweet fudge.",
    "Place a rosebush near the porch steps.",
    "Both lost their lives in the raging storm.",
    "We talked of the side show in the circus.",
    "Use a pencil to write the first draft.",
    "He ran half way to the hardware store.",
    "The clock struck to mark the third period.",
    "A small creek cut across the field.",
    "Cars and busses stalled in snow drifts.",
    "The set of china hit the floor with a crash.",
    "This is a grand season for hikes on the road.",
    "The dune rose from the edge of the water.",
    "Those words were the cue for the actor to leave.",
    "A yacht slid around the point into the bay.",
    "The two met while playing on the sand.",
    "The ink stain dried on the finished page.",
)
PER_BLOCK = 7               # sentences one voice reads before the next voice takes over
SENTENCE_GAP = 0.35         # seconds of silence between sentences (beside espeak-ng's own)
BLOCK_GAP = 1.0             # and between voices

_RENDERED: dict[tuple[str, str], numpy.ndarray] = {}


@dataclass(frozen=True)
class Speech:
    """A WAV with the text spoken in it."""

    path: Path
    text: str
    seconds: float
    what: str


def _decode_16k(source) -> numpy.ndarray:
    """Any audio PyAV opens (a path or a file object) as 16 kHz mono int16 samples."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
    pieces = []
    with av.open(source) as container:
        for frame in container.decode(audio=0):
            pieces.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
    pieces.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
    return numpy.concatenate(pieces)


def jfk() -> tuple[numpy.ndarray, str]:
    """jfk.flac's samples at 16 kHz and its reference text."""
    from common import JFK, JFK_TEXT

    return _decode_16k(str(JFK)), " ".join(JFK_TEXT.read_text().split())


def espeak(voice: str, speed: int, text: str) -> numpy.ndarray:
    """`text` spoken by espeak-ng's `voice` at `speed` words a minute, as 16 kHz int16 samples."""
    key = (f"{voice}@{speed}", text)
    if key not in _RENDERED:
        if shutil.which("espeak-ng") is None:
            raise RuntimeError("espeak-ng is not installed: apt-get install espeak-ng (the benchmark's speech corpus)")
        completed = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-g", "6", "--stdout", text],
                                   check=True, capture_output=True, timeout=120)
        _RENDERED[key] = _decode_16k(io.BytesIO(completed.stdout))
    return _RENDERED[key]


def _silence(seconds: float) -> numpy.ndarray:
    return numpy.zeros(int(seconds * RATE), dtype=numpy.int16)


def speech_file(folder: Path, seconds: float, name: str = "speech") -> Speech:
    """jfk.flac, then Harvard sentences, the voice changing every PER_BLOCK sentences, until the audio is
    at least `seconds` long; written to folder/<name>.wav."""
    samples, text = jfk()
    pieces, texts = [samples, _silence(BLOCK_GAP)], [text]
    total, count = (len(samples) + int(BLOCK_GAP * RATE)) / RATE, 0
    while total < seconds:
        block = count // PER_BLOCK
        voice, speed = VOICES[block % len(VOICES)]
        sentence = HARVARD[count % len(HARVARD)]
        gap = _silence(BLOCK_GAP if count % PER_BLOCK == PER_BLOCK - 1 else SENTENCE_GAP)
        pieces += [espeak(voice, speed, sentence), gap]
        texts.append(sentence)
        total += (len(pieces[-2]) + len(gap)) / RATE
        count += 1
    audio = numpy.concatenate(pieces)
    what = (f"{len(audio) / RATE / 60:.1f} min: jfk.flac (22 words) then {count} Harvard sentences read by espeak-ng, "
            f"the voice changing every {PER_BLOCK} ({min(len(VOICES), -(-count // PER_BLOCK))} voices), "
            f"{sum(len(t.split()) for t in texts)} words")
    return Speech(write_wav(folder / f"{name}.wav", audio), " ".join(texts), len(audio) / RATE, what)


def speech_clips(folder: Path, count: int, seconds: float) -> list[Speech]:
    """`count` distinct WAVs of at least `seconds` each: clip i is voice i mod 5 reading sentences from
    where clip i-1 stopped, one sentence at a time until the clip is long enough."""
    clips = []
    cursor = 0
    for index in range(count):
        voice, speed = VOICES[index % len(VOICES)]
        pieces, texts, total = [], [], 0.0
        while total < seconds:
            sentence = HARVARD[cursor % len(HARVARD)]
            cursor += 1
            pieces += [espeak(voice, speed, sentence), _silence(SENTENCE_GAP)]
            texts.append(sentence)
            total = sum(len(piece) for piece in pieces) / RATE
        audio = numpy.concatenate(pieces)
        clips.append(Speech(write_wav(folder / f"clip-{index:02d}.wav", audio), " ".join(texts), len(audio) / RATE,
                            f"{voice}, {len(texts)} sentences"))
    return clips


def write_long_opus(path: Path, seconds: float, placements: list[float], bitrate_kbps: int = 24) -> Path:
    """`seconds` of a quiet noise floor (about -68 dBFS, not digital zeros: hours of exact silence are no
    recording) with jfk starting at each of `placements`, as 16 kHz mono Opus in Ogg, encoded a minute
    at a time (the way tests/test_engine_long.py builds its WAV)."""
    speech, _ = jfk()
    time_base = Fraction(1, RATE)
    with av.open(str(path), mode="w", format="ogg", options={"fflags": "+bitexact"}) as output:
        encoder = output.add_stream("libopus", rate=RATE, options={"application": "audio", "compression_level": "0",
                                                                   "frame_duration": "60"})
        encoder.layout, encoder.format, encoder.bit_rate, encoder.time_base = "mono", "s16", bitrate_kbps * 1000, time_base
        for begin, block in speech_in_noise(speech, seconds, placements, RATE):
            frame = av.AudioFrame.from_ndarray(block.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = RATE, begin, time_base
            for packet in encoder.encode(frame):
                output.mux(packet)
        for packet in encoder.encode(None):
            output.mux(packet)
    return path
