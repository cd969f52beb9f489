"""A job's segments put together from its decoded chunks: in order, never overlapping, never repeated.

Batched decoding gives a job's segments chunk by chunk, out of order (speech a batch missed is decoded
again in a later batch), and the same audio can be decoded twice: a stretch queued again after
missed speech lies inside a segment of the chunk it came from, a chunk reused from a checkpoint and
decoded again repeats its segments, and a segment split where a chunk's pieces meet can end a few
milliseconds after the next one starts. `assemble(segments, encode)` makes of them what a Result
holds: sorted by time, each starting no earlier than the one before it ends, no text twice.

Segments that overlap are settled word by word. Two words that overlap by more than half the
shorter one claim the same speech: the one the model was surer of stays (the earlier on a tie).
Two that overlap by less follow one another (times mapped through two pieces of a chunk): the first
ends where the second starts. The words left make the segments again, each run of one segment's
words a segment with that segment's figures. A segment without words (word timestamps off) counts
as one word. A segment that says what another already says over the same time is dropped first.

Imports nothing beyond the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

SLIGHT = 0.5   # words overlapping by up to this share of the shorter one's length are one after the other, not the same


def assemble(segments: list[dict], encode: Callable[[str], list[int]]) -> list[dict]:
    """`segments` (dicts with start, end, text, tokens and words, in any order) as a Result's segments:
    sorted, none overlapping another, none repeated. A segment that lost some of its words gets the
    text of the words it kept and `encode(text)` for its tokens. Returns new dicts; ids are the caller's."""
    ordered = sorted(segments, key=lambda segment: (segment["start"], segment["end"]))
    assembled: list[dict] = []
    cluster: list[dict] = []
    reach = float("-inf")
    for segment in ordered:
        if cluster and segment["start"] >= reach:
            assembled += _settle(cluster, encode)
            cluster = []
        cluster.append(segment)
        reach = max(reach, segment["end"]) if len(cluster) > 1 else segment["end"]
    if cluster:
        assembled += _settle(cluster, encode)
    return assembled


@dataclass
class _Unit:
    """A word of a segment (or a segment without words, whole) in a cluster: its times, how sure the
    model was of it, the segment it came from (`owner`, an index) and the word (None: the whole segment)."""

    start: float
    end: float
    surety: float
    owner: int
    word: dict | None


def _settle(cluster: list[dict], encode: Callable[[str], list[int]]) -> list[dict]:
    """Segments that overlap one another (a chain of them, sorted) as segments that do not."""
    if len(cluster) == 1:
        return [dict(cluster[0])]
    kept: list[dict] = []
    for segment in cluster:  # the same text over the same time: a copy
        if not any(_same(segment["text"], other["text"]) and segment["start"] < other["end"] for other in kept):
            kept.append(segment)
    units = []
    for owner, segment in enumerate(kept):
        if segment.get("words"):
            units += [_Unit(word["start"], word["end"], word.get("probability", 0.0), owner, word) for word in segment["words"]]
        else:
            units.append(_Unit(segment["start"], segment["end"], 0.0, owner, None))
    units.sort(key=lambda unit: (unit.start, unit.end, unit.owner))
    chosen: list[_Unit] = []
    for unit in units:
        previous = chosen[-1] if chosen else None
        if previous is None or unit.start >= previous.end:
            chosen.append(unit)
        elif previous.end - unit.start <= SLIGHT * min(previous.end - previous.start, unit.end - unit.start):
            _clip(previous, unit.start)  # times mapped through two pieces of a chunk: a few milliseconds
            chosen.append(unit)
        elif unit.surety > previous.surety:  # the same speech decoded twice: the surer word stays
            chosen[-1] = unit
    runs: list[list[_Unit]] = []
    for unit in chosen:
        if runs and runs[-1][0].owner == unit.owner and unit.word is not None and runs[-1][0].word is not None:
            runs[-1].append(unit)
        else:
            runs.append([unit])
    result: list[dict] = []
    for run in runs:
        owner = kept[run[0].owner]
        if run[0].word is None:
            result.append(dict(owner, start=run[0].start, end=run[0].end))
            continue
        words = [unit.word for unit in run]
        if [word["word"] for word in words] == [word["word"] for word in owner["words"]]:  # whole: its text and
            # tokens, spanning its words only (a segment's own span may reach past them)
            result.append(dict(owner, start=words[0]["start"], end=words[-1]["end"], words=words))
            continue
        text = "".join(word["word"] for word in words)
        result.append(dict(owner, start=words[0]["start"], end=words[-1]["end"], text=text, tokens=encode(text),
                           words=words))
    return result


def _clip(unit: _Unit, end: float) -> None:
    """End `unit` (and its word, copied) at `end`."""
    unit.end = end
    if unit.word is not None:
        unit.word = dict(unit.word, end=end)


def _same(text: str, other: str) -> bool:
    """Whether two texts say the same words (case, spaces and punctuation aside)."""
    def bare(value: str) -> list[str]:
        return "".join(character.lower() if character.isalnum() else " " for character in value).split()

    return bare(text) == bare(other)
