"""The GPU side of whisperdrop: a runner that processes jobs from a spool directory.

`store` (the POSIX spool: claim, publish, fail, return, reclaim, expire) <- `worker` (one job per
`step(now)`: verify, transcribe with the out-of-memory ladder, publish) <- `service` (`Runner`:
threads, signals, heartbeat, watchdog; `main`, the `whisperdrop runner` entry point). The Slurm
backend: `slurm` (`SlurmRunner`: claim, submit, follow, adopt) <- `slurm_service` (its threads,
signals and `main`); `slurm_task` does one job on a compute node; `slurm_commands` runs Slurm's commands.

May import: engine, outputs, shared.
"""

from whisperdrop.gpu_runner.service import Runner, main

__all__ = ["Runner", "main"]
