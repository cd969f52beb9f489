"""The Slurm backend: a runner on a login node hands spool jobs to a real one-node Slurm.

Unit cases pin the batch script and the sbatch arguments (no shell, only checked ids and quoted
values). The rest run a real munged + slurmctld + slurmd (tests/slurm_cluster.py, with a fake GPU)
and the Slurm runner as a subprocess on a spool; jobs come from the daemon over a real sshd, or are
put into the spool as the daemon puts them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from daemon_helpers import jfk_reference, word_error_rate, write_variant_wav
from media import JFK
from slurm_cluster import SlurmCluster
from test_remote import remote_daemon, result_of

from whisperdrop.daemon.extract import extract
from whisperdrop.gpu_runner.slurm import MAX_ATTEMPTS, SlurmRunner
from whisperdrop.gpu_runner.slurm_commands import batch_script, sbatch_arguments
from whisperdrop.gpu_runner.slurm_task import placement_from
from whisperdrop.shared.spool import ProtocolError, TranscribeOptions, dumps, make_job_document

TINY = TranscribeOptions(model="bundled:tiny.en")
NASTY = "a'b\"c;$(touch PWNED)`touch PWNED`|&>x\n.flac"


# ------------------------------------------------------------------------------------ unit layer

def test_batch_script_is_fixed_text_checked_ids_and_quoted_values():
    """The batch script holds only fixed text, job ids that passed check_job_id and shlex-quoted values."""
    ids = ["a" * 64, "b" * 64]
    text = batch_script("0123abcd", ids, python="/opt/venv bin/python", spool="/shared/sp ool;rm -rf x",
                        config_path="/etc/wd/$(id).yaml", setup="")
    assert "    0) job=" + "a" * 64 + " ;;" in text and "    1) job=" + "b" * 64 + " ;;" in text
    assert "'/shared/sp ool;rm -rf x'" in text and "'/etc/wd/$(id).yaml'" in text and "'/opt/venv bin/python'" in text
    assert text.rstrip().endswith('--job "$job"')
    for bad in ["$(touch x)" + "a" * 54, "A" * 64, "a" * 63, "a" * 64 + "\n"]:
        with pytest.raises(ProtocolError):
            batch_script("0123abcd", [bad], python="python", spool="/s", config_path=None, setup="")
    with pytest.raises(ProtocolError):
        batch_script("x;y", ids, python="python", spool="/s", config_path=None, setup="")


def test_sbatch_arguments_are_one_list_item_per_option():
    """Site options reach sbatch as list items (never a shell string); several jobs make a job array."""
    options = {"partition": "gpu; rm -rf /", "account": "lab", "qos": None, "gres": "gpu:a100:1",
               "time_limit": "2:00:00", "extra_args": ["--mem=16G", "--constraint=a b"]}
    argv = sbatch_arguments(options, name="whisperdrop-0123", output="/s/slurm/task-%A_%a.out", count=3,
                            script="/s/slurm/0123.sh")
    assert argv == ["--job-name=whisperdrop-0123", "--output=/s/slurm/task-%A_%a.out", "--open-mode=append",
                    "--partition=gpu; rm -rf /", "--account=lab", "--gres=gpu:a100:1", "--time=2:00:00",
                    "--mem=16G", "--constraint=a b", "--array=0-2", "/s/slurm/0123.sh"]
    single = sbatch_arguments({}, name="n", output="o", count=1, script="s")
    assert not any(item.startswith("--array") for item in single)


def test_placement_names_the_slurm_job_and_its_gpu():
    """A task's executed_on names the array task as <array job>_<index>, the node and CUDA_VISIBLE_DEVICES."""
    placed = placement_from({"SLURM_JOB_ID": "17", "SLURM_ARRAY_JOB_ID": "15", "SLURM_ARRAY_TASK_ID": "2",
                             "SLURMD_NODENAME": "gpu01", "CUDA_VISIBLE_DEVICES": "0"})
    assert placed["slurm_job_id"] == "15_2"
    assert placed["slurm"] == {"job_id": "17", "array_job_id": "15", "array_task_id": "2", "node": "gpu01",
                               "cuda_visible_devices": "0"}
    assert placement_from({"SLURM_JOB_ID": "9"})["slurm_job_id"] == "9"


class FakeSlurm:
    """Slurm's command layer as a table the test writes: submissions get ids 1, 2, ...; `states` maps
    a Slurm id to the state squeue shows (absent: Slurm forgot it)."""

    def __init__(self):
        self.submitted: list[list[str]] = []
        self.states: dict[str, str] = {}
        self.cancelled: list[str] = []
        self.on_sbatch = None

    def sbatch(self, argv: list[str]) -> str:
        self.submitted.append(argv)
        slurm_id = str(len(self.submitted))
        self.states[slurm_id] = "PENDING"
        return slurm_id

    def jobs(self, user: str) -> dict:
        return {slurm_id: {"state": state, "reason": "Resources" if state == "PENDING" else "None",
                           "name": "whisperdrop-x"} for slurm_id, state in self.states.items()}

    def pending_count(self, partition) -> int:
        return sum(1 for state in self.states.values() if state == "PENDING")

    def state_of(self, slurm_id: str):
        return self.states.get(slurm_id)

    def cancel(self, slurm_id: str) -> None:
        self.cancelled.append(slurm_id)
        self.states[slurm_id] = "CANCELLED"


def fake_runner(tmp_path: Path) -> tuple[SlurmRunner, FakeSlurm, Path]:
    slurm = FakeSlurm()
    spool = tmp_path / "spool"
    runner = SlurmRunner({"spool": str(spool), "name": "cluster", "heartbeat_seconds": 1.0}, slurm=slurm)
    return runner, slurm, spool


def test_a_job_slurm_keeps_killing_is_retried_a_bounded_number_of_times(tmp_path):
    """A job cancelled from outside goes to Slurm again, MAX_ATTEMPTS runs in all, then fails with kind
    slurm_cancelled; progress/<id>.json showed Slurm's state and reason meanwhile."""
    runner, slurm, spool = fake_runner(tmp_path)
    job = submit(spool, b"audio", "bounded")
    assert runner.step()
    assert slurm_state(spool, job) == {"job_id": "1", "state": "PENDING", "reason": None, "attempt": 1}
    runner.step()
    assert slurm_state(spool, job)["reason"] == "Resources"
    assert runner.heartbeat_document(0.0)["queue_length"] == 1  # pending in the cluster
    for attempt in range(1, MAX_ATTEMPTS + 1):
        slurm.states[str(attempt)] = "CANCELLED"
        runner.step()
    assert len(slurm.submitted) == MAX_ATTEMPTS
    failure = read(spool / "failed" / f"{job}.json")
    assert failure["kind"] == "slurm_cancelled" and f"after {MAX_ATTEMPTS} tries" in failure["message"]
    assert not (spool / "work" / f"{job}.json").exists() and not runner.tracked


def test_out_of_memory_and_a_forgotten_job_end_as_they_should(tmp_path):
    """An OUT_OF_MEMORY kill fails the job as kind oom at once; a job Slurm forgot is submitted again."""
    runner, slurm, spool = fake_runner(tmp_path)
    first = submit(spool, b"audio one", "oom")
    runner.step()
    second = submit(spool, b"audio two", "forgotten")
    runner.step()
    slurm.states["1"] = "OUT_OF_MEMORY"
    del slurm.states["2"]
    runner.step()
    assert read(spool / "failed" / f"{first}.json")["kind"] == "oom"
    assert len(slurm.submitted) == 3 and runner.tracked[second].attempt == 2


def test_a_restart_returns_a_claim_never_submitted_and_adopts_a_submitted_one(tmp_path):
    """After a crash, a claim marked for a batch Slurm never got goes back to jobs/; one whose batch
    was recorded is followed again without a second sbatch."""
    runner, slurm, spool = fake_runner(tmp_path)
    submitted = submit(spool, b"audio one", "submitted")
    runner.step()
    lost = submit(spool, b"audio two", "lost")
    slurm.sbatch = lambda argv: (_ for _ in ()).throw(KeyboardInterrupt)  # the runner dies inside sbatch
    with pytest.raises(KeyboardInterrupt):
        runner.step()
    assert (spool / "work" / f"{lost}.json").exists()
    again = FakeSlurm()
    again.states = {"1": "PENDING"}
    restarted = SlurmRunner({"spool": str(spool), "name": "cluster", "heartbeat_seconds": 1.0}, slurm=again)
    assert restarted.adopt() == [submitted]
    assert (spool / "jobs" / f"{lost}.json").exists() and not again.submitted


def test_a_job_the_daemon_removed_is_cancelled_in_slurm(tmp_path):
    """A job whose work/ file vanished without a Result or failure is scancelled, and not resubmitted."""
    runner, slurm, spool = fake_runner(tmp_path)
    job = submit(spool, b"audio", "removed")
    runner.step()
    (spool / "work" / f"{job}.json").unlink()
    runner.step()
    assert slurm.cancelled == ["1"] and len(slurm.submitted) == 1 and not runner.tracked


def test_a_running_task_whose_claim_is_gone_gets_time_to_exit_before_a_cancel(tmp_path, monkeypatch):
    """A task that published and is exiting (its Result fetched and removed by the daemon) is not
    cancelled: it ends as "fetched"; one still running after the grace period is cancelled."""
    runner, slurm, spool = fake_runner(tmp_path)
    fetched, removed = submit(spool, b"audio one", "fetched"), submit(spool, b"audio two", "removed")
    runner.step()
    ids = {job: runner.tracked[job].slurm_id for job in (fetched, removed)}
    slurm.states = {ids[fetched]: "RUNNING", ids[removed]: "RUNNING"}
    for job in (fetched, removed):
        (spool / "work" / f"{job}.json").unlink()
    runner.step()
    assert not slurm.cancelled and set(runner.tracked) == {fetched, removed}
    slurm.states[ids[fetched]] = "COMPLETED"
    monkeypatch.setattr("whisperdrop.gpu_runner.slurm.GONE_GRACE_SECONDS", 0.0)
    runner.step()
    assert slurm.cancelled == [ids[removed]] and not runner.tracked


def test_two_slurm_runners_of_one_name_never_serve_one_spool(tmp_path):
    """A second Slurm runner with the same name on the same spool cannot take the lock the first holds."""
    first, _, spool = fake_runner(tmp_path)
    second = SlurmRunner({"spool": str(spool), "name": "cluster", "heartbeat_seconds": 1.0}, slurm=FakeSlurm())
    held = first.hold_lock()
    try:
        with pytest.raises(OSError, match="another Slurm runner named cluster"):
            second.hold_lock()
    finally:
        os.close(held)
    os.close(second.hold_lock())


# ------------------------------------------------------------------------------- real Slurm layer

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One real one-node Slurm (fake GPU) for the module; each test gets the node back idle."""
    slurm = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()


@pytest.fixture
def node(cluster):
    """The cluster, with the node resumed and no job left behind after the test."""
    yield cluster
    cluster.run("scancel", "--full", "--user", "root", check=False)
    if cluster.node_state().startswith("drain"):
        cluster.resume()


@pytest.fixture(scope="module")
def jfk_opus(tmp_path_factory) -> bytes:
    """jfk.flac (11 s) as the daemon uploads it: 16 kHz mono Opus."""
    return extract(JFK, tmp_path_factory.mktemp("audio") / "jfk.opus").path.read_bytes()


def submit(spool: Path, audio: bytes, tag: str, source_name: str = "jfk.flac") -> str:
    """Put a job in the spool as the daemon does: audio first, then the job document by rename."""
    job = hashlib.sha256(f"{tag}\n{hashlib.sha256(audio).hexdigest()}".encode()).hexdigest()
    for directory in ("incoming", "jobs"):
        (spool / directory).mkdir(parents=True, exist_ok=True)
    (spool / "incoming" / f"{job}.opus").write_bytes(audio)
    document = make_job_document(job, TINY, len(audio), hashlib.sha256(audio).hexdigest(), 11.0, source_name,
                                 time.time())
    (spool / "jobs" / f"{job}.json.tmp").write_bytes(dumps(document))
    os.replace(spool / "jobs" / f"{job}.json.tmp", spool / "jobs" / f"{job}.json")
    return job


def wait_for(condition, timeout: float, what: str, on_timeout=lambda: ""):
    """Poll `condition` until truthy (its value); AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{on_timeout()}")


def read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class SlurmRunnerProcess:
    """`whisperdrop runner` with runner.backend slurm on `spool`, against the test cluster."""

    def __init__(self, root: Path, spool: Path, cluster: SlurmCluster, **slurm_options):
        self.root, self.spool, self.cluster = root, spool, cluster
        self.config = root / "slurm-runner.yaml"
        self.config.write_text(yaml.safe_dump({
            "runner": {"spool": str(spool), "model": "bundled:tiny.en", "device": "cpu", "compute_type": "int8",
                       "name": "cluster", "heartbeat_seconds": 1.0, "backend": "slurm",
                       "slurm": {"gres": "gpu:1", "poll_seconds": 0.5, "time_limit": "10:00", **slurm_options}},
            "logging": {"format": "json"},
        }))
        self.log = root / "slurm-runner.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> "SlurmRunnerProcess":
        started = len(self.events("runner.start"))
        with open(self.log, "ab") as stream:
            self.process = subprocess.Popen([sys.executable, "-m", "whisperdrop", "runner", "-c", str(self.config)],
                                            stdout=stream, stderr=subprocess.STDOUT, cwd=self.root,
                                            env=self.cluster.env)
        wait_for(lambda: len(self.events("runner.start")) > started or self.process.poll() is not None, 60,
                 "the Slurm runner to start", self.tail)
        assert self.process.poll() is None, self.tail()
        return self

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def tail(self) -> str:
        task_logs = sorted((self.spool / "slurm").glob("*.out")) if (self.spool / "slurm").exists() else []
        parts = [self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""]
        parts += [f"--- {path.name}\n{path.read_text(errors='replace')[-1500:]}" for path in task_logs[-3:]]
        return "\n".join(parts) + "\n" + self.cluster.log_tail(800)

    def events(self, name: str) -> list[dict]:
        return _events(self.log, name)

    def task_events(self, name: str) -> list[dict]:
        found = []
        for path in sorted((self.spool / "slurm").glob("*.out")):
            found += _events(path, name)
        return found


def _events(path: Path, name: str) -> list[dict]:
    if not path.exists():
        return []
    found = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == name:
            found.append(event)
    return found


@pytest.fixture
def slurm_runner(node, tmp_path):
    """A factory of Slurm runner processes on tmp_path/spool; every one is stopped afterwards."""
    started: list[SlurmRunnerProcess] = []

    def make(**slurm_options) -> SlurmRunnerProcess:
        runner = SlurmRunnerProcess(tmp_path, tmp_path / "spool", node, **slurm_options)
        started.append(runner)
        return runner

    yield make
    for runner in started:
        runner.stop()


def slurm_state(spool: Path, job: str) -> dict | None:
    document = read(spool / "progress" / f"{job}.json")
    return document.get("slurm") if isinstance(document, dict) else None


@pytest.mark.parametrize("files", [3, pytest.param(10, marks=pytest.mark.slow)])
def test_files_through_the_daemon_end_in_results_made_by_slurm_jobs(sshd, node, tmp_path, files):
    """Files dropped into the daemon's inbox go over SFTP to the spool, run as Slurm jobs with a GPU
    (CUDA_VISIBLE_DEVICES set) and come back as Results whose executed_on names their Slurm job."""
    runner = SlurmRunnerProcess(tmp_path, sshd.spool, node).start()
    (tmp_path / "daemon").mkdir()
    daemon = remote_daemon(tmp_path, sshd.host_settings(), provider="remote").start()
    try:
        for index in range(files):
            write_variant_wav(daemon.inbox / f"clip{index}.wav", index + 1)
        results = [result_of(daemon, f"clip{index}", timeout=600) for index in range(files)]
    finally:
        assert daemon.stop() == 0
        runner.stop()
    slurm_ids = set()
    for result in results:
        ran = result["executed_on"]
        assert ran["route"] == "remote" and ran["runner"] == "cluster", ran
        assert ran["slurm_job_id"] and ran["slurm"]["cuda_visible_devices"] == "0", ran
        assert word_error_rate(jfk_reference(), result["text"]) <= 0.10, result["text"]
        slurm_ids.add(ran["slurm_job_id"])
    assert len(slurm_ids) == files  # each file its own Slurm job (or array task)
    assert not runner.events("slurm.job_killed")
    # The runner submits a job again only when the daemon sent it again: after the daemon gave up on it
    # (a heartbeat it judged too old on this loaded machine) and removed its files.
    submissions = Counter(job for event in runner.events("slurm.submitted") for job in event["job_ids"])
    removed = Counter(event["job_id"] for event in runner.events("slurm.job_ended") if event["outcome"] != "done")
    assert len(submissions) == files, submissions
    for job, count in submissions.items():
        assert count <= 1 + removed[job], (job, count, runner.tail())
    done = Counter(event["job_id"] for event in runner.task_events("runner.job_done"))
    assert set(done) == set(submissions) and all(done[job] <= submissions[job] for job in done), done


def test_the_daemons_status_says_a_job_is_queued_in_slurm(sshd, node, tmp_path):
    """While the only node is drained, the daemon's `status` says the job is queued in Slurm, with the
    Slurm job id and the reason; once the node is back the job finishes."""
    node.drain()
    runner = SlurmRunnerProcess(tmp_path, sshd.spool, node).start()
    (tmp_path / "daemon").mkdir()
    daemon = remote_daemon(tmp_path, sshd.host_settings(), provider="remote").start()
    command = [sys.executable, "-m", "whisperdrop", "status", "-c", str(daemon.config_path)]
    try:
        write_variant_wav(daemon.inbox / "held.wav", 1)

        def queued_line() -> str | None:
            shown = subprocess.run(command, capture_output=True, text=True, timeout=60).stdout
            return next((line for line in shown.splitlines() if "queued in Slurm" in line), None)

        daemon.wait_for(queued_line, timeout=300, what="status saying the job is queued in Slurm")
        line = queued_line()
        states = [slurm_state(sshd.spool, path.stem) for path in (sshd.spool / "progress").glob("*.json")]
        slurm_job = next(state["job_id"] for state in states if state)
        assert f"job {slurm_job}" in line and "reason " in line and "held.wav" in line, line
        node.resume()
        result = result_of(daemon, "held", timeout=600)
        assert result["executed_on"]["slurm_job_id"].split("_")[0] == str(slurm_job).split("_")[0]
    finally:
        if "drain" in node.node_state():  # the test failed before it gave the node back
            node.resume()
        assert daemon.stop() == 0
        runner.stop()


def test_a_job_cancelled_from_outside_is_submitted_again_and_completes(slurm_runner, node, jfk_opus, tmp_path):
    """A queued job shows "PENDING" with Slurm's reason in progress/<id>.json; scancel from outside
    sends it to Slurm again (bounded tries) and it still ends with one Result."""
    node.drain()
    spool = tmp_path / "spool"
    runner = slurm_runner().start()
    job = submit(spool, jfk_opus, "cancelled")
    state = wait_for(lambda: (slurm_state(spool, job) or {}).get("reason") and slurm_state(spool, job),
                     120, "the job to be pending in Slurm with a reason", runner.tail)
    assert state["state"] == "PENDING" and state["job_id"] and state["reason"] not in ("None", ""), state
    node.run("scancel", state["job_id"])
    wait_for(lambda: runner.events("slurm.job_killed"), 120, "the runner to see the cancel", runner.tail)
    node.resume()
    wait_for(lambda: (spool / "results" / f"{job}.json").exists(), 300, "the Result", runner.tail)
    killed = runner.events("slurm.job_killed")[0]
    assert killed["state"] == "CANCELLED" and killed["kind"] == "slurm_cancelled"
    assert [event["attempts"] for event in runner.events("slurm.submitted")] == [[1], [2]]
    assert read(spool / "results" / f"{job}.json")["executed_on"]["slurm_job_id"] != state["job_id"]
    assert not (spool / "work" / f"{job}.json").exists() and not (spool / "failed" / f"{job}.json").exists()


def test_a_job_the_daemon_removed_is_scancelled(slurm_runner, node, jfk_opus, tmp_path):
    """When the daemon removes a queued job's files (its timeout), the runner scancels its Slurm job."""
    node.drain()
    spool = tmp_path / "spool"
    runner = slurm_runner().start()
    job = submit(spool, jfk_opus, "removed")
    state = wait_for(lambda: slurm_state(spool, job), 120, "the job to be in Slurm", runner.tail)
    for path in [spool / "work" / f"{job}.json", spool / "incoming" / f"{job}.opus", spool / "progress" / f"{job}.json"]:
        path.unlink(missing_ok=True)
    wait_for(lambda: runner.events("slurm.cancelled_removed"), 120, "the runner to cancel it", runner.tail)
    wait_for(lambda: {row["job_id"]: row["state"] for row in node.jobs()}.get(state["job_id"]) == "CANCELLED", 60,
             "Slurm to show it cancelled", runner.tail)
    assert not runner.events("slurm.job_killed")  # not mistaken for an outside cancel, not submitted again


@pytest.mark.slow
def test_a_job_killed_by_its_time_limit_fails_as_slurm_timeout(slurm_runner, node, jfk_opus, tmp_path):
    """A task Slurm kills at its time limit ends in failed/<id>.json with kind slurm_timeout, not lost."""
    spool = tmp_path / "spool"
    runner = slurm_runner(time_limit="0:01", setup="sleep 600").start()
    job = submit(spool, jfk_opus, "timeout")
    failure = wait_for(lambda: read(spool / "failed" / f"{job}.json"), 400, "the time-limit failure", runner.tail)
    assert failure["kind"] == "slurm_timeout" and "TIMEOUT" in failure["message"], failure
    assert "time_limit" in failure["message"]
    assert not (spool / "work" / f"{job}.json").exists() and not (spool / "jobs" / f"{job}.json").exists()
    assert len(runner.events("slurm.submitted")) == 1  # a time limit is not retried


def test_a_runner_killed_while_jobs_wait_in_slurm_adopts_them_on_restart(slurm_runner, node, jfk_opus, tmp_path):
    """kill -9 the runner while its jobs are queued in Slurm, restart it: it adopts them (no second
    sbatch) and each job completes exactly once."""
    node.drain()
    spool = tmp_path / "spool"
    runner = slurm_runner().start()
    jobs = [submit(spool, jfk_opus, f"restart{index}") for index in range(3)]
    wait_for(lambda: all((slurm_state(spool, job) or {}).get("state") == "PENDING" for job in jobs), 120,
             "every job to be pending in Slurm", runner.tail)
    sbatches = len(runner.events("slurm.sbatch"))
    assert sbatches >= 1
    runner.kill()
    runner.start()
    wait_for(lambda: len(runner.events("slurm.adopted")) == 3, 120, "the restarted runner to adopt its jobs",
             runner.tail)
    node.resume()
    wait_for(lambda: all((spool / "results" / f"{job}.json").exists() for job in jobs), 600, "every Result",
             runner.tail)
    assert len(runner.events("slurm.sbatch")) == sbatches
    assert sorted(event["job_id"] for event in runner.events("slurm.adopted")) == sorted(jobs)
    done = Counter(event["job_id"] for event in runner.task_events("runner.job_done"))
    assert done == Counter({job: 1 for job in jobs})
    assert not runner.events("slurm.claim_returned")


def test_shell_metacharacters_in_names_never_reach_a_shell(slurm_runner, node, jfk_opus, tmp_path):
    """A job file named with shell syntax is rejected unsubmitted; a source name full of it is carried as
    data: the job completes, nothing it names is run, and the batch script holds none of it."""
    spool = tmp_path / "spool"
    runner = slurm_runner().start()
    (spool / "jobs").mkdir(parents=True, exist_ok=True)
    evil_name = "$(touch PWNED)`touch PWNED`;touch PWNED.json"
    (spool / "jobs" / evil_name).write_text("{}")
    job = submit(spool, jfk_opus, "nasty", source_name=NASTY.replace("\n", " ").replace("/", "_"))
    wait_for(lambda: (spool / "results" / f"{job}.json").exists(), 300, "the Result", runner.tail)
    wait_for(lambda: (spool / "failed" / f"{evil_name}.rejected").exists(), 60, "the rejected file", runner.tail)
    scripts = list((spool / "slurm").glob("*.sh"))
    assert len(scripts) == 1
    text = scripts[0].read_text()
    assert "touch" not in text and "PWNED" not in text
    for where in (tmp_path, spool, spool / "slurm", Path.cwd()):
        assert not list(where.glob("PWNED*")), where
    for event in runner.events("slurm.sbatch"):
        assert not any("PWNED" in item or "touch" in item for item in event["argv"])
