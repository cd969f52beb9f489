"""Issue 29's pure parts, driven with a fake clock: when a fallback on the CPU goes back to a GPU host
(the estimate and the choice), where a local run stops for a hand-back (a checkpoint boundary), what
the Result says, what the ledger counts and what `status` shows of a host that is down."""

from __future__ import annotations

import io
import threading

import pytest

from whisperdrop.outputs import result as results
from whisperdrop.cli.report import print_status
from whisperdrop.daemon import handback
from whisperdrop.daemon.handback import Speeds, choose, queued_audio, remote_estimate
from whisperdrop.daemon.ledger import Ledger
from whisperdrop.daemon.local import LocalRun
from whisperdrop.daemon.metrics import render_metrics
from whisperdrop.daemon.status import _host_status


class Clock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Saves:
    """Stands in for a checkpoint.Checkpoint: only what LocalRun reads (`saved`, `resumed_s`)."""

    def __init__(self, resumed_s: float = 0.0):
        self.saved, self.resumed_s = 0, resumed_s


def beat(**figures) -> dict:
    return {"name": "gpu0", "state": "idle", "queue_length": 0, "current": None, **figures}


def test_the_host_estimate_is_upload_queue_and_transcription_at_its_measured_speed():
    """A host's estimate: overhead, upload at the measured link speed, and the audio ahead plus the
    job's at the speed its runners measured (heartbeats first, then its done jobs, then real time)."""
    fast = [beat(audio_seconds_done=1000.0, transcribe_seconds_done=20.0, jobs_done=10)]  # 0.02 s per audio s
    idle = remote_estimate(600.0, 2_000_000, fast, 0, (0.5, 1e6))
    assert idle == pytest.approx(handback.REMOTE_OVERHEAD_S + 2.0 + 600.0 * 0.02)
    busy = [beat(audio_seconds_done=1000.0, transcribe_seconds_done=20.0, jobs_done=10, queue_length=3,
                 current={"duration_s": 300.0, "done_s": 100.0})]
    assert queued_audio(busy, 0, 600.0) == 200.0 + 3 * 100.0  # what is left of the current one, the queue at 100 s each
    assert remote_estimate(600.0, 2_000_000, busy, 0, (None, 1e6)) == pytest.approx(idle + 500.0 * 0.02)
    fresh = [beat()]  # a runner that has done nothing yet: the host's done jobs say, else real time
    assert remote_estimate(600.0, 0, fresh, 0, (0.1, None)) == pytest.approx(handback.REMOTE_OVERHEAD_S + 60.0)
    assert remote_estimate(600.0, 0, fresh, 0) == pytest.approx(handback.REMOTE_OVERHEAD_S + 600.0)
    assert remote_estimate(60.0, int(handback.UNMEASURED_LINK_BYTES_S), [], 2) == pytest.approx(
        handback.REMOTE_OVERHEAD_S + 1.0 + (2 * 60.0 + 60.0))  # our two jobs there count as its queue


def test_a_job_goes_back_only_when_the_host_finishes_it_sooner_by_the_margin():
    """The cheapest host is chosen when the local time left exceeds its estimate by the margin and
    by MIN_GAIN_S; an unknown local time never hands back; margin 0 hands back whenever one is healthy."""
    estimates = {"slow": 100.0, "fast": 40.0}
    assert choose(61.0, estimates, 1.5) == "fast"
    assert choose(59.0, estimates, 1.5) is None  # not 1.5 times the estimate
    assert choose(14.0, {"fast": 5.0}, 1.5) is None  # 2.8 times, but saves under MIN_GAIN_S
    assert choose(None, estimates, 1.5) is None
    assert choose(None, estimates, 0) == "fast" and choose(0.0, estimates, 0) == "fast"
    assert choose(1000.0, {}, 1.5) is None


def test_a_local_run_measures_its_speed_and_what_it_has_left():
    """A run's seconds per audio second come from its progress since it started (past what its
    checkpoint held); before any progress the given rate is used; a queued run needs all its audio."""
    clock = Clock()
    run = LocalRun(threading.Event(), 600.0, monotonic=clock)
    assert run.remaining(clock(), None) is None and run.remaining(clock(), 0.5) == 300.0  # queued
    run.started(Saves(resumed_s=100.0), batched=True)
    clock.now += 50.0
    assert run.real_time_factor() is None and run.remaining(clock(), 0.5) == 250.0  # 500 s left at the given rate
    run.report(200.0, 600.0)  # 100 s of audio in 50 s
    assert run.real_time_factor() == 0.5
    clock.now += 10.0
    assert run.remaining(clock(), 2.0) == pytest.approx(400.0 * 0.5 - 10.0)
    assert run.figures(clock()) == {"local_s": 60.0, "done_s": 200.0, "duration_s": 600.0}


def test_a_hand_back_stops_a_run_only_at_a_checkpoint_boundary():
    """The engine's cancel: a stop at once; a hand-back at once for batched decoding (it looks only
    between saved batches and while reading audio), at the next saved window for sequential decoding,
    and at once before the engine started."""
    stop = threading.Event()
    batched = LocalRun(stop, 60.0)
    batched.started(Saves(), batched=True)
    assert not batched.is_set()
    batched.hand_back()
    assert batched.is_set()

    checkpoint = Saves()
    sequential = LocalRun(stop, 600.0)
    sequential.started(checkpoint, batched=False)
    checkpoint.saved = 2
    sequential.hand_back()
    assert not sequential.is_set()  # the window in progress is not thrown away
    checkpoint.saved = 3
    assert sequential.is_set()

    waiting = LocalRun(stop, 600.0)
    waiting.hand_back()
    assert waiting.is_set()
    stopped = LocalRun(stop, 600.0)
    stop.set()
    assert stopped.is_set()


def test_the_result_says_where_a_fallback_went_and_how_far_it_got_here():
    """`returned_to` names the host, the seconds on the CPU and the share done; a host that failed
    again is said, with the resume; both fields appear only for a job that was handed back."""
    served = {"host": "gpu1", "local_s": 340.2, "done_s": 108.0, "duration_s": 600.0, "outcome": "served"}
    assert results.returned_to([served]) == "gpu1 after 340 s local, 18% done"
    failed = {**served, "outcome": "failed: gpu1: no live runner"}
    assert results.returned_to([failed, served]) == (
        "gpu1 after 340 s local, 18% done; it failed there, resumed locally from 18% (gpu1: no live runner); "
        "then gpu1 after 340 s local, 18% done")
    made = {"text": "x", "segments": [], "timings": {}}
    document = results.transcribed(made, job_id="j", route="remote", host="gpu1", fallback_reason="gpu1: down",
                                   timings={}, transfer={}, handbacks=[served])
    assert document["returned_to"] == "gpu1 after 340 s local, 18% done" and document["handbacks"] == [served]
    plain = results.transcribed(made, job_id="j", route="remote", host="gpu1", fallback_reason=None,
                                timings={}, transfer={})
    assert "returned_to" not in plain and "handbacks" not in plain
    assert handback.settle([{"host": "gpu1"}], "served") == [{"host": "gpu1", "outcome": "served"}]
    assert handback.settle([served], "failed: x") == [served]  # an outcome once given stays


def test_the_ledger_keeps_hand_backs_and_the_speeds_the_estimate_needs(tmp_path):
    """The jobs table holds each job's hand-backs; done jobs give the hand-back counts by outcome (in
    the metrics file too, beside each host's probes) and the measured speeds per route and host."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    try:
        for index, (route, host, entries) in enumerate([
                ("remote", "gpu1", [{"host": "gpu1", "outcome": "served"}]),
                ("local", None, [{"host": "gpu1", "outcome": "failed: gpu1: down"}]),
                ("remote", "gpu1", None)]):
            job_id = f"job{index}"
            ledger.create_job(job_id, "sha", 1, {})
            ledger.update_job(job_id, stage="done", route=route, host=host, duration=100.0, handbacks=entries,
                              timings={"transcribe_s": 5.0 if route == "remote" else 50.0, "upload_s": 1.0},
                              transfer={"bytes": 1_000_000})
        assert ledger.job("job0").handbacks == [{"host": "gpu1", "outcome": "served"}]
        assert ledger.handback_counts() == {"served": 1, "failed": 1}
        speeds = Speeds.of(ledger.route_speeds())
        assert speeds.local == 0.5 and speeds.hosts == {"gpu1": (0.05, 1_000_000.0)}
        text = render_metrics(ledger, {"hosts": [{"name": "gpu1", "up": False, "failures": 2, "probes": 7}]})
        assert 'whisperdrop_handbacks_total{outcome="served"} 1.0' in text
        assert 'whisperdrop_handbacks_total{outcome="failed"} 1.0' in text
        assert 'whisperdrop_host_probes_total{host="gpu1"} 7.0' in text
    finally:
        ledger.close()


def test_status_shows_a_down_hosts_back_off_and_when_it_is_probed():
    """A down host's entry gives its back-off, when routing tries it again, the last probe and when
    the next may look, and who looks (the hand-back watch of the jobs on the CPU, or the next job)."""
    now = 1000.0
    host = {"name": "gpu1", "up": False, "failures": 3, "last_error": "refused", "down_until": now + 12.0,
            "backoff_s": 20.0, "probes": 4, "probed_at": now - 3.0, "probe_ok": False, "next_probe_at": now + 2.0,
            "in_flight": 0, "runners": []}
    watched = _host_status("gpu1", host, now, {"watching": 1, "hand_back": True}, now)
    assert (watched["backoff_s"], watched["retry_in_s"], watched["probed_ago_s"], watched["next_probe_in_s"]) == \
        (20.0, 12.0, 3.0, 2.0)
    assert "hand-back watch of the 1 job" in watched["probe_when"]
    idle = _host_status("gpu1", host, now, {"watching": 0, "hand_back": True}, now)
    assert "next job that would fall back" in idle["probe_when"]
    assert "backoff_s" not in _host_status("gpu1", {**host, "up": True}, now, {}, now)
    out = io.StringIO()
    print_status({"daemon": {"running": True, "pid": 1, "uptime_s": 5.0}, "inbox_files": 0, "pending_sources": 0,
                  "stages": {}, "queue_length": 0, "provider": "auto", "ledger_updated_age_s": None, "active": [],
                  "hosts": [watched], "hosts_snapshot_age_s": 1.0, "recent_errors": []}, out)
    assert ("back-off 20 s, tried again in 12 s; probed 3 s ago: still down; next probe in 2 s, by the "
            "hand-back watch of the 1 job(s) on the CPU") in out.getvalue()
