"""Run the real daemon (`python -m whisperdrop run`) as a subprocess and read its JSON log lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import av
import numpy
import yaml

from media import JFK, JFK_TEXT

REPO = Path(__file__).resolve().parents[1]


def json_lines(path: Path) -> list[dict]:
    """The lines of `path` that are whole JSON: a log's events, a checkpoint's batches (a kill -9 or a
    writer still at work may have left the last line torn; it is skipped)."""
    found = []
    for line in Path(path).read_bytes().splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found


def normalise(text: str) -> list[str]:
    cleaned = "".join(character.lower() if character.isalnum() or character.isspace() else " " for character in text)
    return cleaned.split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    import jiwer

    return jiwer.wer(" ".join(normalise(reference)), " ".join(normalise(hypothesis)))


def jfk_reference() -> str:
    return JFK_TEXT.read_text().strip()


_PCM: numpy.ndarray | None = None


def jfk_pcm() -> numpy.ndarray:
    """jfk.flac decoded once to 16 kHz mono int16 samples."""
    global _PCM
    if _PCM is None:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=16000)
        chunks = []
        with av.open(str(JFK)) as container:
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
        _PCM = numpy.concatenate(chunks)
    return _PCM


def write_variant_wav(path: Path, index: int) -> Path:
    """jfk as a 16 kHz WAV with `index` tenths of a second of leading silence: distinct bytes, same words."""
    return write_wav(path, numpy.concatenate([numpy.zeros(1600 * index, dtype=numpy.int16), jfk_pcm()]))


def write_wav(path: Path, samples: numpy.ndarray) -> Path:
    """16 kHz mono 16-bit samples to a WAV file at `path` (folders made as needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(16000)
        writer.writeframes(samples.tobytes())
    return path


class Daemon:
    """A whisperdrop daemon in a temporary folder with its own config; logs go to `log_path`."""

    def __init__(self, root: Path, **overrides):
        self.root = root
        self.config_path = root / "config.yaml"
        settings = {
            "watch": {"settle_seconds": 0.5, "rescan_seconds": 5.0},
            "logging": {"format": "json"},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(settings.get(key), dict):
                settings[key].update(value)
            else:
                settings[key] = value
        self.config_path.write_text(yaml.safe_dump(settings))
        for name in ("inbox", "outbox", "archive", "failed", "state"):
            (root / name).mkdir(exist_ok=True)
        self.inbox, self.outbox = root / "inbox", root / "outbox"
        self.archive, self.failed = root / "archive", root / "failed"
        self.log_path = root / "daemon.log"
        self.process: subprocess.Popen | None = None
        self.runs = 0

    def start(self, wait_ready: bool = True, env: dict | None = None,
              open_files: tuple[int, int] | None = None) -> "Daemon":
        """Start the daemon; `open_files`: its (soft, hard) RLIMIT_NOFILE, as systemd's LimitNOFILE= sets it."""
        self.runs += 1
        self._mark = self.log_path.stat().st_size if self.log_path.exists() else 0
        stream = open(self.log_path, "ab")

        def limits() -> None:
            if open_files is not None:
                import resource

                resource.setrlimit(resource.RLIMIT_NOFILE, open_files)

        self.process = subprocess.Popen(
            [sys.executable, "-m", "whisperdrop", "run", "-c", str(self.config_path)],
            stdout=stream, stderr=subprocess.STDOUT, cwd=self.root, env={**os.environ, **(env or {})},
            preexec_fn=limits if open_files is not None else None,
        )
        stream.close()
        if wait_ready:
            self.wait_for(lambda: any(event["event"] == "daemon.ready" for event in self.events(since_start=True)),
                          timeout=60, what="daemon.ready")
        return self

    def events(self, since_start: bool = False) -> list[dict]:
        if not self.log_path.exists():
            return []
        data = self.log_path.read_bytes()
        if since_start:
            data = data[self._mark:]
        events = []
        for line in data.decode("utf-8", "replace").splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                events.append({"event": "non-json", "line": line})
        return events

    def wait_for(self, predicate, timeout: float = 60, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"daemon exited ({self.process.returncode}) before {what}:\n{self.tail()}")
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 15) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def outputs(self, suffix: str = ".json") -> list[Path]:
        return sorted(path for path in self.outbox.rglob(f"*{suffix}") if not path.name.startswith("."))

    def count(self, event: str) -> int:
        return sum(1 for item in self.events() if item.get("event") == event)


def write_speech_wav(path: Path, index: int, seconds: float) -> Path:
    """jfk as a 16 kHz WAV cut (or repeated) to `seconds` of speech after `index` hundredths of a second
    of leading silence: distinct bytes per index, short or long clips on demand."""
    speech = jfk_pcm()
    wanted = int(seconds * 16000)
    repeats = -(-wanted // len(speech))
    return write_wav(path, numpy.concatenate([numpy.zeros(160 * index, dtype=numpy.int16),
                                              numpy.tile(speech, repeats)[:wanted]]))


def speech_at(path: Path, placements: list[float], seconds: float) -> Path:
    """A WAV of `seconds` of silence with jfk (11 s) starting at each of `placements` (seconds)."""
    samples = numpy.zeros(int(seconds * 16000), dtype=numpy.int16)
    speech = jfk_pcm()
    for start in placements:
        begin = int(start * 16000)
        samples[begin:begin + len(speech)] = speech[: len(samples) - begin]
    return write_wav(path, samples)


def wait_failed(daemon: Daemon, relative: str, timeout: float = 90) -> dict:
    """Wait until `relative` has moved from the inbox to failed/ beside its error record; the record.

    A move is link, fsync, unlink, so the source is looked for in both places."""
    record = daemon.failed / (relative + ".error.json")
    daemon.wait_for(lambda: record.exists() and (daemon.failed / relative).exists()
                    and not (daemon.inbox / relative).exists(), timeout=timeout, what=f"failed/{relative}")
    return json.loads(record.read_text())
