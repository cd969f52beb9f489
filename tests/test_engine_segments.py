"""How batched decoding puts a job's segments together (whisperdrop.engine.segments, issue 30).

The segments are the kinds batched decoding gives: a chunk's segments, the segments of speech it
missed decoded again later (lying inside one of the chunk's), a chunk decoded twice, a segment split
where a chunk's pieces meet. Plain dicts: no model is loaded here.
"""

from __future__ import annotations

from transcripts import assert_segments_in_order

from whisperdrop.engine.segments import assemble


def encode(text: str) -> list[int]:
    return [len(word) for word in text.split()]  # a stand-in tokenizer: the tokens follow the text


def segment(*words: tuple[float, float, str, float], **figures) -> dict:
    """A segment of (start, end, word, probability) words, spanning them, with `figures` beside."""
    listed = [{"start": start, "end": end, "word": word, "probability": probability}
              for start, end, word, probability in words]
    text = "".join(word["word"] for word in listed)
    return {"start": listed[0]["start"], "end": listed[-1]["end"], "text": text, "tokens": encode(text),
            "words": listed, **figures}


def test_a_chunk_decoded_twice_leaves_one_copy():
    """The same segments twice (a chunk decoded again, reused from a checkpoint and decoded anew) come out once."""
    first = segment((1.0, 1.5, " Thank", 0.9), (1.5, 2.0, " you.", 0.9))
    later = segment((4.0, 4.5, " Bye.", 0.9))
    result = assemble([later, first, dict(first), dict(later)], encode)
    assert [item["text"] for item in result] == [" Thank you.", " Bye."]
    assert_segments_in_order(result)


def test_speech_decoded_again_inside_a_segment_splits_it_around_what_was_missed():
    """A stretch a chunk's words skipped, decoded again later, lies inside the chunk's segment (its words
    before and after it): the segment is split around it, in order, nothing lost and nothing twice."""
    outer = segment((19.9, 20.4, " yeah,", 0.6), (20.4, 20.9, " yeah,", 0.6), (24.9, 25.5, " yeah.", 0.6), seek=1990, temperature=0.0)
    inner = segment((21.5, 21.8, " Roger,", 0.9), (21.8, 22.2, " copy.", 0.9), seek=2150, temperature=0.0)
    result = assemble([inner, outer], encode)
    assert [(item["start"], item["end"], item["text"]) for item in result] == [
        (19.9, 20.9, " yeah, yeah,"), (21.5, 22.2, " Roger, copy."), (24.9, 25.5, " yeah.")]
    assert result[0]["seek"] == 1990 and result[0]["tokens"] == encode(" yeah, yeah,")  # the outer one's figures
    assert_segments_in_order(result)


def test_a_word_two_decodings_give_the_same_time_is_kept_once_the_surer_one():
    """Where a stretch decoded again overlaps words of the segment around it, the word the model was
    surer of stays (the other goes), and no segment starts before the one before it ends."""
    outer = segment((10.0, 10.5, " we", 0.9), (10.5, 11.0, " go", 0.3), (13.0, 13.5, " now.", 0.9))
    inner = segment((10.6, 11.2, " ago", 0.8), (11.2, 11.8, " then", 0.8))
    result = assemble([outer, inner], encode)
    assert [item["text"] for item in result] == [" we", " ago then", " now."]
    assert_segments_in_order(result)


def test_segments_split_where_pieces_meet_do_not_overlap_by_milliseconds():
    """Two segments whose boundary words overlap by a few milliseconds (times mapped through two pieces)
    come out one after the other, every word kept: the first ends where the second starts."""
    left = segment((5.0, 5.4, " one", 0.9), (5.4, 6.02, " two", 0.7))
    right = segment((6.0, 6.5, " three", 0.95))
    result = assemble([right, left], encode)
    assert_segments_in_order(result)
    assert [(item["text"], item["end"]) for item in result] == [(" one two", 6.0), (" three", 6.5)]
    assert result[0]["words"][-1]["end"] == 6.0 and left["words"][-1]["end"] == 6.02  # a copy, the input untouched


def test_segments_without_words_repeat_once_and_do_not_overlap():
    """With word timestamps off a segment counts as one word: a copy goes, of two that overlap much the
    later one goes (as sure as the first), and of two that overlap a little the first ends where the second starts."""
    plain = [{"start": 0.0, "end": 4.0, "text": " Hello there.", "tokens": [1], "words": []},
             {"start": 0.0, "end": 4.0, "text": " Hello there.", "tokens": [1], "words": []},
             {"start": 1.0, "end": 6.0, "text": " General.", "tokens": [2], "words": []},
             {"start": 5.8, "end": 8.0, "text": " Kenobi.", "tokens": [3], "words": []}]
    result = assemble(plain, encode)
    assert [(item["start"], item["end"], item["text"]) for item in result] == [
        (0.0, 4.0, " Hello there."), (5.8, 8.0, " Kenobi.")]
    result = assemble([plain[0], {**plain[3], "start": 3.8}], encode)
    assert [(item["start"], item["end"]) for item in result] == [(0.0, 3.8), (3.8, 8.0)]
    assert_segments_in_order(result)


def test_segments_that_keep_apart_are_left_as_they_are():
    """Segments in order with no overlap come out unchanged, sorted (chunks finish out of order)."""
    items = [segment((float(index), index + 0.5, f" w{index}", 0.9), seek=index) for index in (3, 0, 2, 1)]
    result = assemble(items, encode)
    assert result == sorted(items, key=lambda item: item["start"])
