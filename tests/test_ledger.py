"""The ledger: stages survive reopening, sources map to jobs, unfinished jobs are listed for recovery."""

from whisperdrop.daemon.ledger import Ledger

JOB = "a" * 64


def test_stage_changes_survive_a_reopen(tmp_path):
    """A job's stage, figures and sources are read back the same after the ledger is closed and reopened."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ledger.create_job(JOB, "b" * 64, 100, {"model": "m"})
    source = ledger.add_source("sub/a.wav", JOB, 100, 123, settle_s=2.0)
    ledger.update_job(JOB, stage="extracted", timings={"extract_s": 0.5}, duration=11.0)
    ledger.close()
    reopened = Ledger(tmp_path / "ledger.sqlite3")
    job = reopened.job(JOB)
    assert (job.stage, job.timings, job.duration, job.options) == ("extracted", {"extract_s": 0.5}, 11.0, {"model": "m"})
    assert [item.id for item in reopened.sources_of(JOB)] == [source.id]
    assert reopened.pending_source("sub/a.wav").job_id == JOB
    assert [item.job_id for item in reopened.unfinished_jobs()] == [JOB]


def test_create_job_is_idempotent_and_finishing_stamps_time(tmp_path):
    """Creating a job twice returns the first; reaching done stamps finished_at and leaves the unfinished list."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    first = ledger.create_job(JOB, "b" * 64, 100, {}, now=1.0)
    ledger.update_job(JOB, stage="transcribed")
    assert ledger.create_job(JOB, "c" * 64, 5, {}).created_at == first.created_at
    ledger.update_job(JOB, stage="done", now=50.0)
    assert ledger.job(JOB).finished_at == 50.0 and ledger.unfinished_jobs() == []


def test_delete_job_forgets_its_sources(tmp_path):
    """Deleting a job removes it and its sources."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ledger.create_job(JOB, "b" * 64, 100, {})
    ledger.add_source("x.wav", JOB, 1, 1, 0.0)
    ledger.delete_job(JOB)
    assert ledger.job(JOB) is None and ledger.pending_source("x.wav") is None


def test_a_job_and_its_source_are_committed_together(tmp_path):
    """Inside a transaction a reader (status, another process) sees neither the new job nor its
    source; after it, both; a transaction that raises leaves nothing behind. CI once caught status
    showing a job with no source, read between the two commits."""
    path = tmp_path / "ledger.sqlite3"
    writer = Ledger(path)
    reader = Ledger(path, readonly=True)
    with writer.transaction():
        writer.create_job(JOB, "b" * 64, 100, {})
        with reader.transaction():
            assert reader.unfinished_jobs() == []
        writer.add_source("a.wav", JOB, 100, 1, 0.0)
    with reader.transaction():
        assert [job.job_id for job in reader.unfinished_jobs()] == [JOB] and reader.first_source(JOB) == "a.wav"
    other = "c" * 64
    try:
        with writer.transaction():
            writer.create_job(other, "d" * 64, 5, {})
            raise OSError("disk full")
    except OSError:
        pass
    assert writer.job(other) is None and reader.job(other) is None
