"""Routing's pure parts, driven with a fake clock: runner liveness from heartbeats, host load, the
choice of hosts for a job and what happens when none serves it."""

from __future__ import annotations

from whisperdrop.daemon.health import RunnerWatch, backoff, candidates, load, when_none_served

MAX_AGE = 60.0


def beat(name: str = "gpu0", updated_at: float = 1000.0, **more) -> dict:
    return {"name": name, "state": "idle", "updated_at": updated_at, "heartbeat_seconds": 5.0, **more}


def test_a_changing_heartbeat_is_alive_whatever_its_clock_says():
    """A runner whose clock is an hour behind ours is alive as long as its heartbeat keeps changing."""
    watch = RunnerWatch(MAX_AGE)
    wall = 1_000_000.0
    watch.observe([beat(updated_at=wall - 3600)], now=0.0, wall_now=wall)
    assert watch.fresh(0.0) == [] and watch.confirm_wait(0.0) == 10.0  # unconfirmed: read again after 2 beats
    watch.observe([beat(updated_at=wall - 3595)], now=10.0, wall_now=wall + 10)
    assert [item["name"] for item in watch.fresh(10.0)] == ["gpu0"]
    assert watch.fresh(10.0 + MAX_AGE) != [] and watch.fresh(10.0 + MAX_AGE + 1) == []


def test_a_frozen_heartbeat_dies_after_max_age_of_our_clock_even_if_it_claims_the_future():
    """A heartbeat stamped in the future (clock ahead) that never changes counts for max_age from first sight, no longer."""
    watch = RunnerWatch(MAX_AGE)
    watch.observe([beat(updated_at=5000.0)], now=100.0, wall_now=1000.0)
    assert watch.fresh(100.0) != []
    watch.observe([beat(updated_at=5000.0)], now=100.0 + MAX_AGE + 1, wall_now=1061.0)
    assert watch.fresh(100.0 + MAX_AGE + 1) == []
    assert "unchanged for 61 s" in watch.why_none(100.0 + MAX_AGE + 1)


def test_a_stopped_runner_is_no_runner():
    """A heartbeat that says `stopped` is never alive, however recent, and the reason says so."""
    watch = RunnerWatch(MAX_AGE)
    watch.observe([beat(state="stopped", updated_at=999.0)], now=0.0, wall_now=1000.0)
    assert watch.fresh(0.0) == [] and watch.confirm_wait(0.0) == 0.0
    assert "gpu0 stopped" in watch.why_none(0.0)
    watch.observe([beat(state="starting", updated_at=1010.0)], now=10.0, wall_now=1010.0)  # restarted
    assert watch.fresh(10.0) != []


def test_no_heartbeat_and_vanished_heartbeats():
    """With no heartbeat file the reason says none was ever written; a removed heartbeat is forgotten."""
    watch = RunnerWatch(MAX_AGE)
    watch.observe([], now=0.0, wall_now=1000.0)
    assert watch.why_none(0.0).startswith("no runner has ever written")
    watch.observe([beat("a", 999.0), beat("b", 999.0)], now=1.0, wall_now=1000.0)
    assert len(watch.fresh(1.0)) == 2
    watch.observe([beat("b", 999.0)], now=2.0, wall_now=1001.0)
    assert [item["name"] for item in watch.fresh(2.0)] == ["b"]


def test_load_prefers_short_queues_on_fast_hosts():
    """A host's load is its queue (plus our jobs there) over its runners' measured speed."""
    fast = [beat(queue_length=4, audio_seconds_done=400.0, transcribe_seconds_done=10.0)]
    slow = [beat(queue_length=1)]
    assert load(fast, in_flight=0) == 0.1 and load(slow, in_flight=1) == 2.0
    assert load([], in_flight=0) == 0.0


def test_the_route_is_a_pure_choice_of_job_health_and_policy():
    """Short audio goes local under auto; a job already on a host stays there; otherwise healthy hosts by load."""
    healthy = [("slow", 2.0), ("fast", 0.5)]
    assert candidates(provider="auto", duration=3.0, local_below=10.0, resumed=None, healthy=healthy) == (
        [], "short audio: 3.0 s is below remote.local_below_seconds (10 s)")
    assert candidates(provider="remote", duration=3.0, local_below=10.0, resumed=None, healthy=healthy) == (
        ["fast", "slow"], None)
    assert candidates(provider="auto", duration=3.0, local_below=10.0, resumed="slow", healthy=[]) == (["slow"], None)
    assert candidates(provider="auto", duration=60.0, local_below=0.0, resumed=None, healthy=[]) == ([], None)


def test_when_no_host_serves_auto_falls_back_and_remote_waits():
    """With no host served: auto goes local with every reason; remote waits for the next probe, 1 s to retry_max."""
    reasons = ["a: down", "b: no live runner"]
    assert when_none_served(provider="auto", reasons=reasons, next_probe_s=3.0, retry_max=300.0) == (
        "local", "a: down; b: no live runner")
    assert when_none_served(provider="auto", reasons=[], next_probe_s=None, retry_max=300.0) == (
        "local", "no GPU host is configured")
    assert when_none_served(provider="remote", reasons=reasons, next_probe_s=42.0, retry_max=30.0) == ("wait", 30.0)
    assert when_none_served(provider="remote", reasons=reasons, next_probe_s=-5.0, retry_max=30.0) == ("wait", 1.0)
    assert when_none_served(provider="remote", reasons=reasons, next_probe_s=None, retry_max=30.0) == ("wait", 5.0)


def test_one_back_off_doubles_to_its_cap():
    """The back-off shared by host probes and job retries doubles from its start and stops at its cap."""
    assert [backoff(failures, 5.0, 30.0) for failures in range(0, 6)] == [5.0, 5.0, 10.0, 20.0, 30.0, 30.0]
