"""Checks on what a transcription gave, shared by the engine and end-to-end tests (issue 30).

- `assert_segments_in_order(segments)`: the invariant every Result keeps on every route: its segments
  are in order, never overlap and never repeat.
- `missing_words(reference, text)`: the words of `reference` that `text` does not hold, each as often
  as it is missing (case and punctuation aside): what a test on speech with pauses asserts is empty.
"""

from __future__ import annotations

import collections
from typing import Any, Iterable


def _field(segment: Any, name: str) -> Any:
    return segment[name] if isinstance(segment, dict) else getattr(segment, name)


def assert_segments_in_order(segments: Iterable[Any], what: str = "") -> None:
    """Each segment (a dict, or an object such as the OpenAI SDK's, with start, end and text) ends no
    earlier than it starts and starts no earlier than the one before it ends, and no two say the same
    text over the same times. Raises AssertionError naming the segments at fault (and `what`)."""
    previous = None
    seen: dict[tuple, int] = {}
    for index, segment in enumerate(segments):
        start, end, text = (_field(segment, name) for name in ("start", "end", "text"))
        where = f"{what}: segment {index} ({start}-{end} {text!r})"
        assert start <= end, f"{where} ends before it starts"
        if previous is not None:
            assert start >= previous[1], f"{where} starts before segment {index - 1} ({previous[0]}-{previous[1]} {previous[2]!r}) ends"
        key = (round(float(start), 3), round(float(end), 3), " ".join(str(text).split()).lower())
        assert key not in seen, f"{where} repeats segment {seen[key]}"
        seen[key] = index
        previous = (start, end, text)


def _words(text: str) -> list[str]:
    return "".join(character.lower() if character.isalnum() or character == "'" else " " for character in text).split()


def missing_words(reference: str, text: str) -> list[str]:
    """The words of `reference` missing from `text`, counted: 'ask' said 25 times and heard 24 times is one 'ask'."""
    return sorted((collections.Counter(_words(reference)) - collections.Counter(_words(text))).elements())
