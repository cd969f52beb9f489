"""Subtitles: a Result's words grouped into cues people can read, written as SRT or WebVTT.

`cues(result, limits)` turns the segments of a Result into `Cue`s of at most `limits.max_lines` lines
of `limits.max_line_chars` characters, on screen for at most `limits.max_cue_seconds`. Whisper's
segments are not cues: a batched segment runs up to 30 s, far more than anyone reads at once. So
cues are cut from the word timestamps, after the pieces whisper timed are joined into the words of
the segment's text (`outputs.words`: `" t"` and `"-shirt"` are one word, `t-shirt`), so the cues
show the same words as the TXT:

1. The words are first cut into phrases at the breaks that always end a cue: a sentence end (`.`,
   `?`, `!`, `…`), a silence of at least `limits.pause_seconds` between two words, and the end of a
   whisper segment.
2. A phrase that does not fit one cue is split where the split costs least (a dynamic programme over
   its words): after a comma, semicolon, colon or dash before elsewhere, at a longer silence before a
   shorter one, into as few cues as fit, avoiding cues under 40 % of a full one.
3. A cue's lines: the fewest that hold it, as even as they can be, broken after a clause mark when
   that costs little evenness.

A segment without word timestamps (`word_timestamps: false`) gets estimated ones, its time shared
out over its words by their length, and goes through the same steps: segment-level cues wrapped to
the same limits. A word longer than a line is cut into line-sized pieces, and a word (or cue) that
lasts longer than `max_cue_seconds` is shown for `max_cue_seconds`. Empty text makes no cue, so no
cue is ever empty. The Result itself (its JSON) is never changed.

`render_srt` and `render_vtt` write the cues; WebVTT cue text is escaped (`&`, `<`, `>`), so
"R&D", "<b>" and "-->" in a transcript never break the file. Pure functions: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

from whisperdrop.outputs.words import word_groups
from whisperdrop.shared.config_schema import SCHEMA

_DEFAULTS = SCHEMA["subtitles"]

SENTENCE_END = re.compile(r"[.?!…。？！][\"'”’)\]]*$")
NOT_SENTENCE_END = re.compile(r"^(mr|mrs|ms|dr|prof|st|vs|e\.g|i\.e)\.$", re.IGNORECASE)
CLAUSE_END = re.compile(r"([,;:、，；：]|[-–—])[\"'”’)\]]*$")

# Costs the split chooses by (in units of one extra cue): a split inside a clause costs most, one at a
# clause mark least; a longer silence makes a split cheaper; a cue much shorter than a full one costs.
_COST_PER_CUE = 1.0
_COST_MID_CLAUSE = 1.0
_COST_AT_CLAUSE = 0.2
_SHORT_CUE_FRACTION = 0.4  # of one cue's capacity in characters
_COST_LINE_MID_CLAUSE = 0.25  # a line break inside a clause, against the squared slack of the lines


@dataclass(frozen=True)
class Limits:
    """How big a cue may be. The defaults are the config schema's (`subtitles.*`)."""

    max_line_chars: int = _DEFAULTS["max_line_chars"].default
    max_lines: int = _DEFAULTS["max_lines"].default
    max_cue_seconds: float = _DEFAULTS["max_cue_seconds"].default
    pause_seconds: float = _DEFAULTS["pause_seconds"].default

    @classmethod
    def from_config(cls, section: Any) -> Limits:
        """The limits from the config's `subtitles` section (a mapping with the four keys)."""
        return cls(
            max_line_chars=int(section["max_line_chars"]),
            max_lines=int(section["max_lines"]),
            max_cue_seconds=float(section["max_cue_seconds"]),
            pause_seconds=float(section["pause_seconds"]),
        )


@dataclass(frozen=True)
class Cue:
    """One subtitle: on screen from `start` to `end` (seconds), its `lines` of text (never empty)."""

    start: float
    end: float
    lines: tuple[str, ...]


@dataclass(frozen=True)
class _Token:
    """A word as the cue builder sees it: `text` without surrounding space; `glued` when it follows
    the previous token without a space (a piece of a word cut to fit a line, or the next character in
    a language written without spaces); `inside_word` when a break before it would cut a word (the
    pieces cut to fit a line)."""

    text: str
    start: float
    end: float
    glued: bool = False
    inside_word: bool = False
    segment_end: bool = False  # the last word of a whisper segment


def cues(result: dict, limits: Limits = Limits()) -> list[Cue]:
    """The cues for `result`'s segments (see the module docstring); in time order, never overlapping."""
    tokens = list(_tokens(result.get("segments") or [], limits, result.get("language")))
    made: list[Cue] = []
    for phrase in _phrases(tokens, limits):
        for start, end in _split(phrase, limits):
            made.append(_cue(phrase[start:end], limits))
    return _ordered(made, limits)


def render_srt(result: dict, limits: Limits = Limits()) -> str:
    """SubRip text: numbered cues, `HH:MM:SS,mmm --> HH:MM:SS,mmm`, lines as they are."""
    blocks = []
    for number, cue in enumerate(cues(result, limits), start=1):
        span = f"{_timestamp(cue.start, ',')} --> {_timestamp(cue.end, ',')}"
        blocks.append(f"{number}\n{span}\n" + "\n".join(cue.lines) + "\n")
    return "\n".join(blocks)


def render_vtt(result: dict, limits: Limits = Limits()) -> str:
    """WebVTT text: the header, then cues with `HH:MM:SS.mmm --> HH:MM:SS.mmm` and escaped lines."""
    blocks = ["WEBVTT\n"]
    for cue in cues(result, limits):
        span = f"{_timestamp(cue.start, '.')} --> {_timestamp(cue.end, '.')}"
        blocks.append(f"{span}\n" + "\n".join(escape_vtt(line) for line in cue.lines) + "\n")
    return "\n".join(blocks)


def escape_vtt(text: str) -> str:
    """`text` safe as WebVTT cue text: `&`, `<` and `>` as character references (so no `-->`)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _timestamp(seconds: float, separator: str) -> str:
    milliseconds = max(0, round(seconds * 1000))
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    secs, milliseconds = divmod(milliseconds, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{milliseconds:03d}"


def _tokens(segments: Iterable[dict], limits: Limits, language: str | None = None) -> Iterable[_Token]:
    """Every word of every segment as tokens, the pieces whisper timed joined into the words of the
    segment's text (`words.word_groups`), words longer than a line cut into pieces; a segment without
    word timestamps gets its time shared out over its words by their length."""
    for segment in segments:
        words, before = [], " "
        for group in word_groups(list(segment.get("words") or []), language):
            text = "".join(str(word.get("word") or "") for word in group)
            if text.strip():
                # Only in a language written without spaces does a group follow the one before unspaced.
                glued = not (before[-1:].isspace() or text[:1].isspace())
                words.append((" ".join(text.split()), float(group[0]["start"]), float(group[-1]["end"]), glued))
            before = text or before
        if not words:
            words = [(text, start, end, False) for text, start, end in _estimated_words(segment)]
        for index, (text, start, end, glued) in enumerate(words):
            pieces = _pieces(text, limits.max_line_chars)
            last = index == len(words) - 1
            for number, piece in enumerate(pieces):
                share = (end - start) / len(pieces)
                yield _Token(piece, start + number * share, start + (number + 1) * share,
                             glued=glued or number > 0, inside_word=number > 0,
                             segment_end=last and number == len(pieces) - 1)


def _estimated_words(segment: dict) -> list[tuple[str, float, float]]:
    """The words of a segment with no word timestamps, its duration shared by their length (+1 each)."""
    words = str(segment.get("text") or "").split()
    if not words:
        return []
    start, end = float(segment["start"]), float(segment["end"])
    weights = [len(word) + 1 for word in words]
    per_weight = max(0.0, end - start) / sum(weights)
    estimated, at = [], start
    for word, weight in zip(words, weights):
        estimated.append((word, at, at + weight * per_weight))
        at += weight * per_weight
    return estimated


def _pieces(word: str, width: int) -> list[str]:
    """`word` cut into pieces of at most `width` characters (one piece when it fits)."""
    return [word[index:index + width] for index in range(0, len(word), width)] or [word]


def _phrases(tokens: list[_Token], limits: Limits) -> Iterable[list[_Token]]:
    """Runs of tokens between hard breaks: sentence ends, pauses, ends of segments."""
    phrase: list[_Token] = []
    for index, token in enumerate(tokens):
        phrase.append(token)
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        if following is None or following.inside_word:
            continue
        if (token.segment_end or _sentence_end(token.text)
                or following.start - token.end >= limits.pause_seconds):
            yield phrase
            phrase = []
    if phrase:
        yield phrase


def _sentence_end(word: str) -> bool:
    """Whether `word` ends a sentence: a full stop, question or exclamation mark, not "Dr." or "e.g."."""
    return bool(SENTENCE_END.search(word)) and not NOT_SENTENCE_END.match(word)


def _line_count(tokens: list[_Token], width: int) -> int:
    """Lines that a greedy fill of `width` characters needs (greedy needs the fewest)."""
    lines, length = 1, 0
    for token in tokens:
        added = len(token.text) + (0 if token.glued or length == 0 else 1)
        if length and length + added > width:
            lines, length = lines + 1, len(token.text)
        else:
            length += added
    return lines


def _fits(tokens: list[_Token], limits: Limits) -> bool:
    if len(tokens) == 1:
        return True  # a piece is never wider than a line; its time is capped in `_cue`
    return (tokens[-1].end - tokens[0].start <= limits.max_cue_seconds
            and _line_count(tokens, limits.max_line_chars) <= limits.max_lines)


def _split(phrase: list[_Token], limits: Limits) -> list[tuple[int, int]]:
    """The cheapest cut of `phrase` into cues that fit, as (start, end) index pairs.

    best[end] is the least cost of cutting phrase[:end]; a cue phrase[start:end] costs one cue, plus
    what the break after it costs (nothing at the phrase's end), plus a penalty when it is short."""
    count = len(phrase)
    capacity = limits.max_line_chars * limits.max_lines
    best = [0.0] + [float("inf")] * count
    choice = [0] * (count + 1)
    for start in range(count):
        if best[start] == float("inf"):
            continue
        chars = -1
        for end in range(start + 1, count + 1):
            token = phrase[end - 1]
            chars += len(token.text) + (0 if token.glued else 1)
            if not _fits(phrase[start:end], limits):
                break
            cost = best[start] + _COST_PER_CUE + (_break_cost(phrase, end, limits) if end < count else 0.0)
            if chars < _SHORT_CUE_FRACTION * capacity:
                cost += (_SHORT_CUE_FRACTION * capacity - chars) / capacity
            if cost < best[end]:
                best[end], choice[end] = cost, start
    spans, end = [], count
    while end > 0:
        spans.append((choice[end], end))
        end = choice[end]
    return spans[::-1]


def _break_cost(phrase: list[_Token], end: int, limits: Limits) -> float:
    """What a cut between phrase[end - 1] and phrase[end] costs: less at a clause mark or a silence."""
    before, after = phrase[end - 1], phrase[end]
    if after.inside_word:
        return 2 * _COST_MID_CLAUSE  # inside a word cut to fit: only when nothing else fits
    cost = _COST_AT_CLAUSE if CLAUSE_END.search(before.text) else _COST_MID_CLAUSE
    silence = max(0.0, after.start - before.end)
    return cost * (1.0 - min(silence / limits.pause_seconds, 1.0) * 0.5)


def _cue(tokens: list[_Token], limits: Limits) -> Cue:
    start = tokens[0].start
    end = min(max(tokens[-1].end, start), start + limits.max_cue_seconds)
    return Cue(start, end, tuple(_wrap(tokens, limits.max_line_chars)))


def _wrap(tokens: list[_Token], width: int) -> list[str]:
    """The tokens as the fewest lines of at most `width` characters: of the ways to break them, the
    one with the most even lines (least sum of squared slack), a break after a clause mark preferred."""
    count = len(tokens)
    lines_needed = _line_count(tokens, width)
    infinity = float("inf")
    # best[lines][start]: least cost of laying tokens[start:] out as exactly `lines` lines.
    best = [[infinity] * (count + 1) for _ in range(lines_needed + 1)]
    cut = [[count] * (count + 1) for _ in range(lines_needed + 1)]
    best[0][count] = 0.0
    for lines in range(1, lines_needed + 1):
        for start in range(count - 1, -1, -1):
            length = -1
            for end in range(start + 1, count + 1):
                length += len(tokens[end - 1].text) + (0 if tokens[end - 1].glued and end - 1 > start else 1)
                if length > width:
                    break
                cost = ((width - length) / width) ** 2 + best[lines - 1][end]
                if end < count:
                    cost += 0.0 if CLAUSE_END.search(tokens[end - 1].text) else _COST_LINE_MID_CLAUSE
                if cost < best[lines][start]:
                    best[lines][start], cut[lines][start] = cost, end
    out, start, lines = [], 0, lines_needed
    while start < count:
        end = cut[lines][start]
        out.append("".join(("" if index == start or tokens[index].glued else " ") + tokens[index].text
                           for index in range(start, end)))
        start, lines = end, lines - 1
    return out


def _ordered(made: list[Cue], limits: Limits) -> list[Cue]:
    """The cues rounded to milliseconds, each starting no earlier than the previous one ends, at least
    1 ms and at most `max_cue_seconds` long, so players and validators accept the timing."""
    ordered: list[Cue] = []
    previous_end = 0.0
    longest = max(0.001, round(limits.max_cue_seconds, 3))
    for cue in made:
        start = max(round(cue.start, 3), previous_end)
        end = round(min(max(cue.end, start + 0.001), start + longest), 3)
        ordered.append(Cue(start, end, cue.lines))
        previous_end = end
    return ordered
