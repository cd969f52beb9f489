"""The runner with jobs in several languages queued at once, on bundled:base: one language per batch,
each Result in its own language (tiny.en would label both `en`)."""

from __future__ import annotations

import pytest

from daemon_helpers import word_error_rate
from media import SPOKEN
from test_runner import engine, no_leaked_threads, read, settings, spool, submit  # noqa: F401  (fixtures)
from whisperdrop.daemon.extract import extract
from whisperdrop.engine import batched
from whisperdrop.gpu_runner import Runner
from whisperdrop.shared.spool import TranscribeOptions


@pytest.fixture
def languages_of_batches(monkeypatch) -> list[tuple[str, int]]:
    """(language, chunks) of every batch the engine decodes."""
    seen: list[tuple[str, int]] = []
    original = batched.BatchDecoder.decode

    def decode(self, chunks):
        seen.append((self.tokenizer.language_code, len(chunks)))
        return original(self, chunks)

    monkeypatch.setattr(batched.BatchDecoder, "decode", decode)
    return seen


def test_german_and_english_jobs_queued_at_once_each_keep_their_language(spool, engine, clips, base_model, tmp_path,
                                                                       languages_of_batches):
    """A German, an English and a second German job queued together for a runner with batch size 8:
    no batch mixes languages, both German jobs share theirs, and each Result has its own language and text."""
    options = TranscribeOptions(model=base_model)
    audio = {code: extract(clips[code], tmp_path / f"{code}.opus").path.read_bytes() for code in ("de", "en")}
    jobs = {"de": submit(spool, audio["de"], tag="de", options=options),
            "en": submit(spool, audio["en"], tag="en", options=options),
            "de-again": submit(spool, audio["de"], tag="de-again", options=options)}
    runner = Runner(settings(spool, model=base_model, batch_size=8, max_jobs_per_batch=8), engine=engine)
    while runner.step():
        pass
    for tag, job in jobs.items():
        result = read(spool / "results" / f"{job}.json")
        code = tag.split("-")[0]
        assert result["language"] == code and result["language_probability"] > 0.8, tag
        assert word_error_rate(SPOKEN[code], result["text"]) < 0.35, result["text"]
    assert {language for language, _ in languages_of_batches} == {"de", "en"}
    assert ("de", 2) in languages_of_batches   # the two German jobs in one batch, the English one apart
