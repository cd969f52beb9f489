"""Subtitles show the TXT's words however whisper split them into timed pieces (issue 22, item 1):
a piece without a leading space (`-shirt`, `.5`, `'s`, `.`) continues the word before it, in SRT and
WebVTT, in whisper-cli's `-ml` segments, and on the real engine's output."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from sshd import skip_or_fail
from test_subtitles import assert_within, parse_srt, validate_webvtt, words_of
from whisperdrop.daemon.outbox import render_txt
from whisperdrop.outputs import subtitles
from whisperdrop.outputs import whisper_cpp
from whisperdrop.outputs.subtitles import Limits

# espeak-ng says this at 140 words a minute; tiny.en writes "t-shirt", "ex-wife", "self-employed",
# "3.5" and "www.eu.example.com" as a word and its continuations ("-shirt", ".5", ".com"...).
SPOKEN = "I'll email the T-shirt to my ex-wife, she's self-employed. Version 3.5 is at www.example.com."


def timed(pieces: list[str], start: float = 0.0) -> dict:
    """One segment of `pieces` timed 0.3 s apart, its text the pieces joined as whisper joins them."""
    words = [{"start": round(start + 0.3 * index, 3), "end": round(start + 0.3 * index + 0.25, 3), "word": piece,
              "probability": 0.9} for index, piece in enumerate(pieces)]
    return {"start": start, "end": words[-1]["end"], "text": "".join(pieces), "words": words}


# A hand-made Result with every kind of continuation: a hyphen, an apostrophe, a lone full stop, a
# decimal point, a piece with no leading space at all, and a segment whose first piece has no space.
HAND_MADE = {"language": "en", "segments": [
    timed([" The", " whisper", "-drop", " daemon", " is", " Kennedy", "'s", " quick", "-round", " fox", "."]),
    timed([" Version", " 3", ".5", " costs", " 2", ",000", " dollars", " at", " www", ".example", ".com", "."], 4.0),
    timed(["Then", " it", " is", " self", "-employed", "!"], 8.0),
]}


def cue_texts(result: dict, limits: Limits = Limits()) -> tuple[list[list[str]], list[list[str]]]:
    """The cues' lines of the SRT and of the (validated) VTT rendered from `result`."""
    srt = parse_srt(subtitles.render_srt(result, limits))
    vtt = validate_webvtt(subtitles.render_vtt(result, limits))
    for cues in (srt, vtt):
        assert_within(cues, limits)
    return srt, vtt


def test_hand_made_continuations_keep_the_txts_words():
    """SRT and VTT cues of a Result whose words include `-drop`, `'s`, `.` and unspaced pieces show
    exactly the TXT's words, at the default limits and at one short line per cue."""
    txt_words = render_txt(HAND_MADE).split()
    assert "whisper-drop" in txt_words and "Kennedy's" in txt_words and "fox." in txt_words
    for limits in (Limits(), Limits(16, 1, 3.0, 0.5)):
        for cues in cue_texts(HAND_MADE, limits):
            assert words_of(cues) == txt_words, limits


def test_a_lone_full_stop_still_ends_the_cue():
    """A sentence's full stop timed as a piece of its own still ends the cue there."""
    result = {"language": "en", "segments": [timed([" One", " fox", ".", " Two", " foxes", "."])]}
    assert [cue.lines for cue in subtitles.cues(result)] == [("One fox.",), ("Two foxes.",)]


def test_language_without_spaces_is_not_spaced_out():
    """Chinese pieces (whisper splits it at characters, with no spaces) are shown as written, unspaced."""
    result = {"language": "zh", "segments": [timed([" 我们", "今天", "去", "公园", "。", " OK", "。"])]}
    srt, vtt = cue_texts(result)
    for cues in (srt, vtt):
        assert "".join("".join(lines) for _, _, lines in cues) == "我们今天去公园。OK。"


def test_whisper_cli_max_len_never_cuts_inside_a_word():
    """`whisper-cli -ml N` cuts segments only between the TXT's words: `whisper-drop` stays whole."""
    segments = whisper_cpp.segments_of(HAND_MADE, max_len=10)
    texts = [segment.text for segment in segments]
    assert "".join(texts) == "".join(segment["text"] for segment in HAND_MADE["segments"])
    assert all(text[:1] == " " or text.startswith("Then") for text in texts), texts
    assert " whisper-drop" in texts and " Kennedy's" in texts


def test_api_srt_and_vtt_keep_the_txts_words():
    """The API's SRT and VTT (OpenAI's response_format, /asr's output) show the TXT's words too."""
    from whisperdrop.daemon.api import formats

    txt_words = render_txt(HAND_MADE).split()
    srt, _ = formats.openai(HAND_MADE, "srt", [], "transcribe", Limits(), {})
    vtt, _ = formats.asr(HAND_MADE, "vtt", Limits())
    assert words_of(parse_srt(srt)) == txt_words and words_of(validate_webvtt(vtt)) == txt_words


@pytest.fixture(scope="module")
def spoken_result(tmp_path_factory) -> dict:
    """tiny.en's Result, with word timestamps, of espeak-ng saying SPOKEN."""
    if shutil.which("espeak-ng") is None:
        skip_or_fail("espeak-ng is not installed (it speaks the hyphenated words)")
    from whisperdrop.engine.engine import Engine
    from whisperdrop.shared.spool import TranscribeOptions

    wav = tmp_path_factory.mktemp("spoken") / "hyphens.wav"
    subprocess.run(["espeak-ng", "-s", "140", "-w", str(wav), SPOKEN], check=True, capture_output=True, timeout=120)
    return Engine(max_models=1).transcribe(wav, TranscribeOptions(word_timestamps=True), device="cpu")


def test_real_engine_continuations_keep_the_txts_words(spoken_result):
    """On tiny.en's own output, whose words include continuations such as `-shirt` and `.5`, the SRT
    and VTT cues show exactly the TXT's words (and the VTT validates)."""
    pieces = [word["word"] for segment in spoken_result["segments"] for word in segment["words"]]
    continuations = [piece for piece in pieces[1:] if not piece[:1].isspace()]
    assert len(continuations) >= 2 and any(piece.startswith("-") for piece in continuations), pieces
    txt_words = render_txt(spoken_result).split()
    for limits in (Limits(), Limits(24, 1, 3.0, 0.5)):  # 24: no word is cut for being wider than a line
        for cues in cue_texts(spoken_result, limits):
            assert words_of(cues) == txt_words, limits
