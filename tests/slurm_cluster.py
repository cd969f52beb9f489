"""A real one-node Slurm for tests: munged, slurmctld and slurmd under the test's own folder.

`SlurmCluster(base).start()` writes a munge key, `slurm.conf` and `gres.conf` (one node, `localhost`,
2 CPUs and a fake GPU: `Gres=gpu:1` backed by /dev/null, so jobs see `CUDA_VISIBLE_DEVICES`), starts
`munged -F`, `slurmctld -D -i` and `slurmd -D` with `SLURM_CONF` pointing at that file, and waits until
`sinfo` shows the node idle. `stop()` cancels every job of this cluster and ends each daemon by the pid
it saved. No systemd, nothing under /etc.

`require_slurm()` installs the Debian packages when it may (root, apt-get), else skips the test with
the reason, or fails it when CI=true.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from sshd import _descendants, free_port, skip_or_fail

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
COMMANDS = ["munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "scancel"]


def _find(command: str) -> str | None:
    return shutil.which(command) or next(
        (path for path in (f"/usr/sbin/{command}", f"/usr/bin/{command}") if os.access(path, os.X_OK)), None)


def require_slurm() -> None:
    """Make sure the Slurm and munge commands exist: install them as root on Debian, else skip
    (a failure under CI=true)."""
    if all(_find(command) for command in COMMANDS):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        skip_or_fail("needs Slurm and munge (as root on Debian: apt-get install --no-install-recommends "
                     + " ".join(PACKAGES) + ")")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, env=environment, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=environment, capture_output=True)
        done = subprocess.run(install, env=environment, capture_output=True, text=True)
        if done.returncode != 0:
            skip_or_fail(f"installing {' '.join(PACKAGES)} failed: {done.stderr[-1000:]}")
    missing = [command for command in COMMANDS if not _find(command)]
    if missing:
        skip_or_fail(f"Slurm installed but {', '.join(missing)} not found")


class SlurmCluster:
    """One munged + slurmctld + slurmd under `base`; `env` is os.environ with SLURM_CONF set.

    Attributes: conf (slurm.conf), env, logs (folder of the daemons' logs), node ("localhost").
    """

    node = "localhost"

    def __init__(self, base: Path):
        require_slurm()
        if os.geteuid() != 0:
            skip_or_fail("needs root to run slurmd (it starts jobs as their users)")
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)
        self.logs = self.base / "logs"
        for folder in ("logs", "munge", "state", "spool"):
            (self.base / folder).mkdir(exist_ok=True)
        (self.base / "munge").chmod(0o755)  # the socket's folder must be readable by job users
        self.socket = self.base / "munge" / "munge.socket"
        self.conf = self.base / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.processes: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------------------------ set-up

    def _write_files(self) -> None:
        key = self.base / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        controller_port, node_port = free_port(), free_port()
        state, spool = self.base / "state", self.base / "spool"
        self.conf.write_text("\n".join([
            "ClusterName=wdtest",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={controller_port}",
            f"SlurmdPort={node_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.socket}",
            "GresTypes=gpu",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "KillWait=5",
            "MinJobAge=600",
            "InactiveLimit=0",
            f"StateSaveLocation={state}",
            f"SlurmdSpoolDir={spool}",
            f"SlurmctldPidFile={self.base / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.base / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.logs / 'slurmctld.log'}",
            f"SlurmdLogFile={self.logs / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs=2 Gres=gpu:1 State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        (self.base / "gres.conf").write_text(f"AutoDetect=off\nNodeName={self.node} Name=gpu File=/dev/null\n")

    def _spawn(self, name: str, command: list[str]) -> None:
        with open(self.logs / f"{name}.out", "ab") as stream:
            self.processes[name] = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=self.env)
        (self.base / f"{name}.spawned.pid").write_text(str(self.processes[name].pid))

    def start(self, timeout: float = 120.0) -> "SlurmCluster":
        """Write the files, start the three daemons and wait until the node is idle. Raises
        RuntimeError (with the daemons' last log lines) when it does not come up within `timeout`."""
        self._write_files()
        self._spawn("munged", [_find("munged"), "-F", "--force", f"--socket={self.socket}",
                               f"--key-file={self.base / 'munge' / 'munge.key'}",
                               f"--pid-file={self.base / 'munge' / 'munged.pid'}",
                               f"--log-file={self.logs / 'munged.log'}",
                               f"--seed-file={self.base / 'munge' / 'munged.seed'}"])
        self._wait(lambda: self.socket.exists(), timeout, "munged's socket")
        os.chmod(self.socket, 0o777)
        self._spawn("slurmctld", [_find("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, timeout, "slurmctld to answer")
        self._spawn("slurmd", [_find("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)])
        self._wait(lambda: self.node_state().startswith("idle"), timeout, "the node to be idle")
        return self

    def _wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode} while waiting for {what}:\n"
                                       + self.log_tail())
            if time.monotonic() > deadline:
                raise RuntimeError(f"Slurm: no {what} within {timeout} s:\n" + self.log_tail())
            time.sleep(0.2)

    def log_tail(self, characters: int = 1500) -> str:
        """The last lines of every daemon log (for error messages)."""
        parts = []
        for path in sorted(self.logs.iterdir()):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-characters:]}")
        return "\n".join(parts)

    # ------------------------------------------------------------------------------------ commands

    def run(self, *command: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster (a list, never a shell); its CompletedProcess."""
        return subprocess.run([_find(command[0]) or command[0], *command[1:]], env=self.env, capture_output=True,
                              text=True, check=check, timeout=timeout)

    def node_state(self) -> str:
        """sinfo's state of the node in lower case ("idle", "drained", ...), "" when it cannot say."""
        done = self.run("sinfo", "-h", "-N", "-n", self.node, "-o", "%T", check=False)
        return done.stdout.strip().lower() if done.returncode == 0 else ""

    def drain(self) -> None:
        """Hold the node: running jobs go on, queued ones wait (reason ReqNodeNotAvail or Resources)."""
        self.run("scontrol", "update", f"NodeName={self.node}", "State=DRAIN", "Reason=whisperdrop-test")

    def resume(self) -> None:
        """Give the node back to the scheduler."""
        self.run("scontrol", "update", f"NodeName={self.node}", "State=RESUME")

    def jobs(self) -> list[dict]:
        """Every job this cluster still knows (squeue -t all, one line per array task)."""
        done = self.run("squeue", "-h", "-r", "-t", "all", "-o", "%i|%T|%r|%j", check=False)
        rows = []
        for line in done.stdout.splitlines():
            parts = line.split("|")
            if len(parts) == 4:
                rows.append({"job_id": parts[0], "state": parts[1], "reason": parts[2], "name": parts[3]})
        return rows

    # ------------------------------------------------------------------------------------ teardown

    def stop(self) -> None:
        """Cancel this cluster's jobs, then end slurmd, slurmctld and munged by their pids."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user", "root", check=False)
            deadline = time.monotonic() + 30
            while any(job["state"] in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING") for job in self.jobs()):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        for name in ("slurmd", "slurmctld", "munged"):
            process = self.processes.get(name)
            if process is None:
                continue
            children = _descendants(process.pid)
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
            for pid in children:  # job steps left behind by slurmd
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.processes.clear()
