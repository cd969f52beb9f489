"""The GPU side of whisperdrop: a runner that processes jobs from a spool directory (see `runner`)."""

from whisperdrop.gpu_runner.runner import Runner, main

__all__ = ["Runner", "main"]
