"""Subtitles: cues cut from word timestamps within the line, line-count and duration limits; SRT and
strict WebVTT; the segment-level fallback; the configured limits."""

from __future__ import annotations

import html
import random
import re

import pytest

from media import JFK
from whisperdrop.outputs import subtitles
from whisperdrop.outputs.subtitles import Limits
from whisperdrop.shared import config

# Harvard sentences (IEEE 1969, public domain) and a few longer ones that must be split.
SENTENCES = (
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "Yes.",
    "The box was thrown beside the parked truck, and the hogs were fed chopped corn and garbage, "
    "while four hours of steady work faced us and a large size in stockings is hard to sell.",
    "When the sun rose over the hills the boy was there, a rod in his hand to catch pink salmon in the "
    "clear spring that is the source of the huge river; nobody else was awake yet.",
    "Kick the ball straight and follow through.",
    "Did the small pup gnaw a hole in the sock?",
    "Mr. Smith, Dr. Jones and the R&D team met at noon.",
)


def synthetic_result(minutes: float, seed: int = 11, with_words: bool = True) -> dict:
    """A Result of `minutes` of speech shaped like a batched transcription: 20-30 s segments of
    sentences, words 0.15-0.6 s long, short gaps between words and longer ones between some sentences."""
    generator = random.Random(seed)
    segments, words, at, segment_start = [], [], 0.5, 0.5
    total = minutes * 60
    while at < total:
        sentence = generator.choice(SENTENCES)
        for word in sentence.split():
            length = generator.uniform(0.15, 0.6)
            words.append({"start": round(at, 3), "end": round(at + length, 3), "word": " " + word,
                          "probability": 0.9})
            at += length + generator.choice((0.0, 0.02, 0.05, 0.1, 0.3))
        at += generator.choice((0.05, 0.2, 0.8, 1.5))
        if words and (words[-1]["end"] - segment_start >= generator.uniform(20, 30) or at >= total):
            segments.append({"id": len(segments) + 1, "start": round(segment_start, 3), "end": words[-1]["end"],
                             "text": "".join(word["word"] for word in words),
                             "words": words if with_words else []})
            words, segment_start = [], at
    return {"text": "".join(segment["text"] for segment in segments), "segments": segments}


def parse_srt(text: str) -> list[tuple[float, float, list[str]]]:
    """(start, end, lines) of every cue; fails on anything that is not well-formed SubRip."""
    assert text.endswith("\n") and "\r" not in text
    cues = []
    for number, block in enumerate(text.rstrip("\n").split("\n\n"), start=1):
        lines = block.split("\n")
        assert lines[0] == str(number), block
        match = re.fullmatch(r"(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)", lines[1])
        assert match, block
        hours, minutes, seconds, millis, *end = (int(part) for part in match.groups())
        start = hours * 3600 + minutes * 60 + seconds + millis / 1000
        stop = end[0] * 3600 + end[1] * 60 + end[2] + end[3] / 1000
        assert lines[2:] and all(line.strip() for line in lines[2:]), block
        cues.append((start, stop, lines[2:]))
    return cues


_TIMESTAMP = r"(?:(\d{2,}):)?([0-5]\d):([0-5]\d)\.(\d{3})"
_REFERENCE = re.compile(r"&(amp|lt|gt|lrm|rlm|nbsp|#\d+|#[xX][0-9a-fA-F]+);")


def _seconds(groups) -> float:
    hours, minutes, seconds, millis = groups
    return int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds) + int(millis) / 1000


def validate_webvtt(text: str) -> list[tuple[float, float, list[str]]]:
    """A strict WebVTT check (W3C WebVTT, plain cue text only); returns (start, end, unescaped lines).

    Fails unless: the file is "WEBVTT" alone, or starts with "WEBVTT" and a blank line; blocks are separated by one blank
    line; every cue has an optional identifier without "-->", a timing line `start --> end` with
    valid timestamps, end after start, starts in order; one or more non-blank text lines with no
    "-->", no "<" (our cues carry no markup) and every "&" starting a character reference."""
    if text == "WEBVTT\n":
        return []  # a file with no cues
    assert text.startswith("WEBVTT\n\n"), text[:20]
    assert "\r" not in text and "\x00" not in text and text.endswith("\n")
    body = text[len("WEBVTT\n\n"):]
    cues, previous_start = [], 0.0
    for block in body.rstrip("\n").split("\n\n"):
        lines = block.split("\n")
        assert all(lines), f"blank line inside a block: {block!r}"
        if "-->" not in lines[0]:
            lines = lines[1:]  # an identifier
        assert lines, block
        timing = re.fullmatch(rf"{_TIMESTAMP}[ \t]+-->[ \t]+{_TIMESTAMP}(?:[ \t]+\S.*)?", lines[0])
        assert timing, f"bad timing line: {lines[0]!r}"
        start, end = _seconds(timing.groups()[:4]), _seconds(timing.groups()[4:8])
        assert end > start, lines[0]
        assert start >= previous_start, lines[0]
        previous_start = start
        payload = lines[1:]
        assert payload, f"empty cue: {block!r}"
        for line in payload:
            assert line.strip(), block
            assert "-->" not in line and "<" not in line, line
            assert all(_REFERENCE.match(line, match.start()) for match in re.finditer("&", line)), line
        cues.append((start, end, [html.unescape(line) for line in payload]))
    return cues


def words_of(cues) -> list[str]:
    return " ".join(" ".join(lines) for _, _, lines in cues).split()


def assert_within(cues, limits: Limits) -> None:
    previous_end = 0.0
    for start, end, lines in cues:
        assert 1 <= len(lines) <= limits.max_lines, lines
        assert all(0 < len(line) <= limits.max_line_chars for line in lines), lines
        assert 0 < end - start <= limits.max_cue_seconds + 1e-9, (start, end, lines)
        assert start >= previous_end - 1e-9, (start, previous_end)
        previous_end = end


def test_eight_minutes_of_words_make_readable_srt_cues():
    """Every SRT cue of an 8-minute transcript (30 s segments) has at most 2 lines of 42 characters
    and lasts at most 7 s, cues do not overlap, and every word is shown once, in order."""
    result = synthetic_result(8.0)
    assert result["segments"][-1]["end"] >= 8 * 60 - 5 and max(
        segment["end"] - segment["start"] for segment in result["segments"]) > 20
    cues = parse_srt(subtitles.render_srt(result))
    assert_within(cues, Limits())
    assert words_of(cues) == result["text"].split()
    assert len(cues) > len(result["segments"]) * 3


def test_cues_end_at_sentence_ends_and_pauses():
    """A sentence end, a pause of `pause_seconds` or more, and a segment's end always end a cue."""
    result = synthetic_result(4.0, seed=3)
    words = [word for segment in result["segments"] for word in segment["words"]]
    last_of_segment = {id(segment["words"][-1]) for segment in result["segments"]}
    cues = subtitles.cues(result)
    ends = {round(cue.end, 3) for cue in cues}
    for word, following in zip(words, words[1:]):
        sentence_end = re.search(r"[.?!]$", word["word"]) and word["word"].strip() not in ("Mr.", "Dr.")
        pause = following["start"] - word["end"] >= Limits().pause_seconds
        if sentence_end or pause or id(word) in last_of_segment:
            assert word["end"] in ends, word


def test_long_sentence_splits_after_a_comma():
    """A sentence too long for one cue is split after its comma, not in the middle of a clause."""
    text = "And so, my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
    words, at = [], 0.3
    for word in text.split():
        words.append({"start": round(at, 3), "end": round(at + 0.3, 3), "word": " " + word})
        at += 0.35
    cues = subtitles.cues({"segments": [{"start": 0.3, "end": at, "text": text, "words": words}]})
    assert [" ".join(cue.lines) for cue in cues] == [
        "And so, my fellow Americans, ask not what your country can do for you,",
        "ask what you can do for your country.",
    ]
    assert cues[0].lines == ("And so, my fellow Americans,", "ask not what your country can do for you,")


def test_without_word_timestamps_segments_are_wrapped_to_the_same_limits():
    """Segments with no words give cues inside each segment's time, within the same limits, with
    every word kept."""
    result = synthetic_result(3.0, seed=5, with_words=False)
    cues = parse_srt(subtitles.render_srt(result))
    assert_within(cues, Limits())
    assert words_of(cues) == result["text"].split()
    for start, end, _ in cues:
        assert any(segment["start"] - 1e-3 <= start and end <= segment["end"] + 1e-3 for segment in result["segments"])


def test_vtt_escapes_markup_and_validates():
    """A VTT with "R&D", "<b>" and "-->" in the text validates, and shows exactly that text."""
    text = " R&D said <b>bold</b> things --> and A&B <i> agreed."
    words, at = [], 1.0
    for word in text.split():
        words.append({"start": at, "end": at + 0.4, "word": " " + word})
        at += 0.5
    result = {"segments": [{"start": 1.0, "end": at, "text": text, "words": words},
                           {"start": at + 1, "end": at + 3, "text": " Fallback R&D <b> --> text.", "words": []}]}
    vtt = subtitles.render_vtt(result)
    assert "R&amp;D" in vtt and "&lt;b&gt;" in vtt and "--&gt;" in vtt
    cues = validate_webvtt(vtt)
    assert words_of(cues) == (text + " Fallback R&D <b> --> text.").split()


def test_no_empty_cues():
    """Blank segments and blank words make no cue; a word that lasts far too long is cut to the limit."""
    result = {"segments": [
        {"start": 0.0, "end": 2.0, "text": "   ", "words": []},
        {"start": 2.0, "end": 3.0, "text": " ", "words": [{"start": 2.0, "end": 3.0, "word": " "}]},
        {"start": 3.0, "end": 20.0, "text": " Hmm.", "words": [{"start": 3.0, "end": 20.0, "word": " Hmm."}]},
        {"start": 20.0, "end": 20.0, "text": " Instant.", "words": []},
    ]}
    cues = validate_webvtt(subtitles.render_vtt(result))
    assert [lines for _, _, lines in cues] == [["Hmm."], ["Instant."]]
    assert cues[0][:2] == (3.0, 10.0)
    assert subtitles.render_srt({"segments": []}) == ""
    assert validate_webvtt(subtitles.render_vtt({"segments": []})) == []


def test_word_longer_than_a_line_is_cut_to_fit():
    """A word longer than a line is shown in line-sized pieces, never as an overlong line."""
    url = "https://example.org/" + "a" * 90
    result = {"segments": [{"start": 0.0, "end": 4.0, "text": f" See {url} now.", "words": []}]}
    cues = parse_srt(subtitles.render_srt(result))
    assert_within(cues, Limits())
    assert "".join("".join(lines) for _, _, lines in cues).replace(" ", "") == f"See{url}now."


def test_configured_limits_are_honoured():
    """Other limits from the config (one line of 20 characters, 3 s) are kept just the same."""
    limits = Limits.from_config({"max_line_chars": 20, "max_lines": 1, "max_cue_seconds": 3, "pause_seconds": 0.25})
    result = synthetic_result(2.0, seed=7)
    cues = parse_srt(subtitles.render_srt(result, limits))
    assert_within(cues, limits)
    assert words_of(cues) == result["text"].split()


def test_default_limits_are_the_config_defaults():
    """Limits() and the shipped config's `subtitles` section are the same limits."""
    assert Limits.from_config(config.defaults()["subtitles"]) == Limits() == Limits(42, 2, 7.0, 0.5)


def test_real_transcript_of_jfk_makes_valid_subtitles():
    """tiny.en's transcript of jfk.flac, with word timestamps, gives SRT and VTT cues within the limits
    that show every word of the transcript."""
    from whisperdrop.engine.engine import Engine
    from whisperdrop.shared.spool import TranscribeOptions

    result = Engine(max_models=1).transcribe(JFK, TranscribeOptions(word_timestamps=True), device="cpu")
    assert all(segment["words"] for segment in result["segments"])
    srt = parse_srt(subtitles.render_srt(result))
    vtt = validate_webvtt(subtitles.render_vtt(result))
    for cues in (srt, vtt):
        assert_within(cues, Limits())
        assert words_of(cues) == result["text"].split()
    assert len(srt) >= 2  # 11 s of speech, two sentences' worth: more than one cue


def test_configured_limits_reach_the_files_transcribe_writes(tmp_path):
    """`whisperdrop transcribe` with `subtitles:` limits in its config writes SRT and VTT cues within
    those limits (the daemon's delivery takes the same `outbox.Limits.from_config`)."""
    import subprocess
    import sys

    (tmp_path / "config.yaml").write_text(
        "subtitles:\n  max_line_chars: 18\n  max_lines: 1\n  max_cue_seconds: 2.5\n  pause_seconds: 0.5\n")
    done = subprocess.run([sys.executable, "-m", "whisperdrop", "transcribe", str(JFK), "-o", str(tmp_path / "out")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    limits = Limits(18, 1, 2.5, 0.5)
    srt = parse_srt((tmp_path / "out" / "jfk.srt").read_text())
    vtt = validate_webvtt((tmp_path / "out" / "jfk.vtt").read_text())
    for cues in (srt, vtt):
        assert_within(cues, limits)
        assert len(cues) >= 4


@pytest.mark.parametrize("separator", [",", "."])
def test_timestamps_past_an_hour(separator):
    """Times past an hour are written HH:MM:SS with milliseconds, in each format's separator."""
    result = {"segments": [{"start": 3661.25, "end": 3662.0, "text": " General Kenobi.", "words": []}]}
    rendered = subtitles.render_srt(result) if separator == "," else subtitles.render_vtt(result)
    assert f"01:01:01{separator}250 --> 01:01:02{separator}000\nGeneral Kenobi.\n" in rendered
