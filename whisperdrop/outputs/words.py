"""A segment's timed words grouped into the words a reader sees, however whisper split them.

Whisper times pieces, not words: a piece that carries no leading space continues the word before it
(`" t"` then `"-shirt"`, `" 3"` then `".5"`, `" it"` then `"'s"`), so the segment's text is the pieces
joined with nothing between them. `word_groups` gives back, per segment, the runs of pieces that make
one word of that text, so whatever shows words one by one (subtitle cues, whisper-cli's `-ml`
segments) shows the same words as the TXT.

Languages written without spaces (whisper splits their text at character boundaries, see
faster-whisper's `Tokenizer.split_to_word_tokens`) keep each piece as its own group: there a piece
without a leading space is the next character, and a line may break before it.
"""

from __future__ import annotations

# The languages faster-whisper splits into words at unicode boundaries rather than at spaces.
WRITTEN_WITHOUT_SPACES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})


def written_without_spaces(language: str | None) -> bool:
    """Whether `language` (a Whisper code, or None) is written without spaces between words."""
    return (language or "") in WRITTEN_WITHOUT_SPACES


def word_groups(words: list[dict], language: str | None = None) -> list[list[dict]]:
    """`words` (one segment's word dicts, each with a `word` string) as runs that each make one
    word of the segment's text: a piece starts a new run when its text begins with whitespace, when
    it is the segment's first, or when the run before it holds only whitespace; otherwise it joins
    the run before it. For a language written without spaces, every piece is a run of its own.
    Returns the same dicts, in order, grouped; nothing is dropped or changed."""
    groups: list[list[dict]] = []
    for word in words:
        text = str(word.get("word") or "")
        starts_word = (not groups or written_without_spaces(language) or text[:1].isspace()
                       or not "".join(str(piece.get("word") or "") for piece in groups[-1]).strip())
        if starts_word:
            groups.append([word])
        else:
            groups[-1].append(word)
    return groups
