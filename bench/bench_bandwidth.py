"""Bandwidth: bytes on the wire per hour of audio at the Opus bitrate, and what it costs in word errors.

Bytes: the .opus that extract() writes at the default bitrate against the same audio as 16 kHz 16-bit
WAV (what HTTP transcription servers are commonly sent) and against the source file, per hour of audio.
Word error rate: jfk.flac and generated speech (espeak-ng, several voices, known sentences) transcribed
at 8-32 kbit/s against the lossless source itself, same engine and model (tiny.en, CPU).
"""

from __future__ import annotations

import shutil
import subprocess
import wave
from pathlib import Path

import av
import jiwer

from common import JFK, JFK_TEXT, Context, Row, ratio, skipped
from corpus import HARVARD, VOICES
from daemon_helpers import normalise
from whisperdrop.daemon.extract import extract
from whisperdrop.engine.engine import Engine
from whisperdrop.shared import config
from whisperdrop.shared.spool import TranscribeOptions

SECTION = "bandwidth"
BITRATES = (8, 12, 16, 24, 32)
SENTENCES = HARVARD[:30]  # lists 1 to 3, as measured before bench/corpus.py held the sentences


def _bitrate_default() -> int:
    """The shipped default bitrate (config schema), so the table follows the code."""
    for section in config.defaults().values():
        if isinstance(section, dict) and "bitrate_kbps" in section:
            return int(section["bitrate_kbps"])
    raise LookupError("no bitrate_kbps in the config defaults")


def _espeak_corpus(scratch: Path, quick: bool) -> list[tuple[Path, str]]:
    """One WAV per voice (espeak-ng's 22.05 kHz output), each a run of sentences; with its text."""
    voices = VOICES[:2] if quick else VOICES
    per_voice = 4 if quick else 12
    clips = []
    for index, (voice, speed) in enumerate(voices):
        start = (index * 7) % len(SENTENCES)
        chosen = [SENTENCES[(start + offset) % len(SENTENCES)] for offset in range(per_voice)]
        text = " ".join(chosen)
        path = scratch / f"espeak-{voice.replace('+', '_')}.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-g", "6", "-w", str(path), text],
                       check=True, capture_output=True, timeout=120)
        clips.append((path, text))
    return clips


def _duration(path: Path) -> float:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return samples / stream.rate


def _write_wav16k(source: Path, dest: Path) -> Path:
    """`source`'s audio as 16 kHz 16-bit mono WAV: what an HTTP transcription server is usually sent."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=16000)
    with av.open(str(source)) as container, wave.open(str(dest), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(16000)
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                writer.writeframes(out.to_ndarray().tobytes())
        for out in resampler.resample(None):
            writer.writeframes(out.to_ndarray().tobytes())
    return dest


def _wer(references: list[str], hypotheses: list[str]) -> float:
    """Corpus word error rate in percent (errors over all reference words)."""
    return 100.0 * jiwer.wer([" ".join(normalise(text)) for text in references],
                             [" ".join(normalise(text)) for text in hypotheses])


def run(context: Context) -> list[Row]:
    rows: list[Row] = []
    scratch = context.scratch / SECTION
    scratch.mkdir()
    default = _bitrate_default()
    corpora: dict[str, list[tuple[Path, str]]] = {"jfk.flac": [(JFK, JFK_TEXT.read_text().strip())]}
    if shutil.which("espeak-ng"):
        corpora["espeak-ng"] = _espeak_corpus(scratch, context.quick)
    else:
        rows.append(skipped(SECTION, "word error rate, generated speech", "espeak-ng is not installed"))

    # Bytes per hour of audio: every clip of every corpus together, at the default bitrate.
    audio_s = opus_bytes = wav_bytes = source_bytes = 0.0
    for clips in corpora.values():
        for index, (path, _) in enumerate(clips):
            encoded = extract(path, scratch / f"bytes-{path.stem}.opus", default)
            wav = _write_wav16k(path, scratch / f"bytes-{path.stem}.wav")
            audio_s += encoded.duration
            opus_bytes += encoded.bytes_out
            wav_bytes += wav.stat().st_size
            source_bytes += path.stat().st_size
    per_hour = 3600.0 / audio_s / 1e6
    opus_mb, wav_mb, source_mb = opus_bytes * per_hour, wav_bytes * per_hour, source_bytes * per_hour
    deterministic = "1 run: byte counts are deterministic"
    rows.append(Row(SECTION, f"MB per hour of audio, Opus {default} kbit/s vs 16 kHz 16-bit WAV", round(opus_mb, 2),
                    "MB/h", round(wav_mb, 1), "WAV 16 kHz", ratio(opus_mb, wav_mb), "<= 0.10x (>= 10x smaller)",
                    opus_mb * 10 <= wav_mb, note=f"({wav_mb / opus_mb:.1f}x smaller; {audio_s:.0f} s of speech; {deterministic})"))
    rows.append(Row(SECTION, f"MB per hour of audio, Opus {default} kbit/s vs source files", round(opus_mb, 2), "MB/h",
                    round(source_mb, 1), "jfk.flac + espeak WAV", ratio(opus_mb, source_mb),
                    note=f"({source_mb / opus_mb:.1f}x smaller; {deterministic})"))

    # Word error rate per bitrate against the lossless source, same engine, model and options.
    engine = Engine()
    options = TranscribeOptions(word_timestamps=False)  # words do not change the text; skipping them saves time

    def transcribe(path: Path) -> str:
        return engine.transcribe(path, options, device="cpu")["text"]

    verdicts: dict[int, bool] = {}
    for corpus, clips in corpora.items():
        references = [text for _, text in clips]
        lossless = _wer(references, [transcribe(path) for path, _ in clips])
        for kbps in BITRATES:
            hypotheses = []
            for path, _ in clips:
                encoded = extract(path, scratch / f"{path.stem}-{kbps}.opus", kbps)
                hypotheses.append(transcribe(encoded.path))
            wer = _wer(references, hypotheses)
            within = wer - lossless <= 1.0
            verdicts[kbps] = verdicts.get(kbps, True) and within
            is_default = kbps == default
            rows.append(Row(
                SECTION, f"word error rate, {corpus}, Opus {kbps} kbit/s{' (default)' if is_default else ''}",
                round(wer, 2), "%", round(lossless, 2), "lossless source", ratio(wer, lossless),
                "<= lossless + 1 point" if is_default else "", within if is_default else None,
                note=f"({wer - lossless:+.2f} points; {len(references)} clip(s), "
                     f"{sum(len(normalise(text)) for text in references)} words; tiny.en CPU beam 5; "
                     "1 run: decoding is deterministic)"))
    good = [kbps for kbps in BITRATES if verdicts.get(kbps)]
    lowest = min(good) if good else None
    if lowest is None:
        choice = f"no bitrate tried stays within 1 point of lossless on every corpus; keep {default} kbit/s and look again"
    else:
        margin = [kbps for kbps in BITRATES if kbps > lowest and verdicts.get(kbps)]
        choice = (f"lowest bitrate within 1 point of lossless on every corpus: {lowest} kbit/s; default {default} kbit/s "
                  f"{'is' if verdicts.get(default) else 'is NOT'} within 1 point "
                  f"({'a step of margin above the lowest for noisy real recordings, still ' if default > lowest and default in margin else ''}"
                  f"{wav_mb / opus_mb:.0f}x smaller than 16 kHz WAV)")
    rows.append(Row(SECTION, "default bitrate choice", f"{default} kbit/s", note=f"({choice})",
                    met=bool(verdicts.get(default)) and opus_mb * 10 <= wav_mb,
                    goal=">= 10x smaller than WAV and within 1 WER point"))
    return rows
