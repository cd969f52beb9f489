"""A 10-hour recording on the CPU: the batched engine's memory stays bounded and every word lands where it was said.

The WAV is generated a minute at a time: a quiet noise floor, with jfk.flac spoken at a few known places (one of
them across a 30 s decoding block boundary). The engine runs in a child process, which reports its
own peak RSS (VmHWM), so the figure is the engine's and not the test runner's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import pytest
from daemon_helpers import jfk_pcm, jfk_reference, word_error_rate
from media import speech_in_noise
from transcripts import assert_segments_in_order

HOURS = float(os.environ.get("WHISPERDROP_TEST_LONG_HOURS", "10"))
PEAK_RSS_LIMIT_MB = 600
RATE = 16000

CHILD = """
import json, sys
from whisperdrop.engine.engine import Engine
from whisperdrop.shared.spool import TranscribeOptions
result = Engine().transcribe(sys.argv[1], TranscribeOptions(), batch_size=8)
status = open("/proc/self/status").read()
peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024
json.dump({"result": result, "peak_rss_mb": peak}, open(sys.argv[2], "w"))
"""


def write_long_wav(path: Path, seconds: float, placements: list[float]) -> Path:
    """`seconds` of a quiet noise floor at 16 kHz with jfk starting at each of `placements`, written a
    minute at a time. Not digital zeros: hours of exact silence are no recording, and leave Silero's
    state deaf to quiet words that follow them."""
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(RATE)
        for _begin, block in speech_in_noise(jfk_pcm(), seconds, placements, RATE):
            writer.writeframesraw(block.tobytes())
    return path


@pytest.mark.slow
def test_ten_hours_on_cpu_in_bounded_memory_with_every_word_in_place(tmp_path):
    """10 h of mostly silence: peak RSS under 600 MB, timestamps monotonic, each jfk transcribed where it was spoken."""
    seconds = HOURS * 3600
    placements = [10.0, seconds * 0.25 - 5.0, seconds * 0.5 + 17.0, seconds * 0.75, seconds - 20.0]
    placements[1] = (placements[1] // 30) * 30 + 25.0  # spoken across a 30 s block boundary
    wav = write_long_wav(tmp_path / "long.wav", seconds, placements)
    out = tmp_path / "out.json"
    completed = subprocess.run([sys.executable, "-c", CHILD, str(wav), str(out)], capture_output=True, text=True,
                               timeout=max(900, seconds / 20))
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(out.read_text())
    result, peak = report["result"], report["peak_rss_mb"]
    print(f"\n{HOURS} h: peak_rss_mb={peak:.0f} timings={result['timings']} segments={len(result['segments'])}")
    assert abs(result["duration"] - seconds) < 1
    assert word_error_rate(" ".join([jfk_reference()] * len(placements)), result["text"]) <= 0.10
    words = [word for segment in result["segments"] for word in segment["words"]]
    assert_segments_in_order(result["segments"], f"{HOURS} h")
    assert [word["start"] for word in words] == sorted(word["start"] for word in words)
    for start in placements:
        spoken = [word for word in words if start - 1.0 <= word["start"] <= start + 12.0]
        assert word_error_rate(jfk_reference(), "".join(word["word"] for word in spoken)) <= 0.10, start
    assert peak < PEAK_RSS_LIMIT_MB, f"peak RSS {peak:.0f} MiB for {HOURS} h of audio"
