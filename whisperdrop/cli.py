"""The command line: `whisperdrop run | transcribe | check-config | runner | status | stats | doctor`.

Direction of imports: cli -> daemon | gpu_runner -> engine, spool, result, config, files, log. Heavy
modules are imported inside the command that needs them, so `whisperdrop status` starts fast. Each
command is a short function over the layers below (the reports print from `cli_report`); the module
is one argument parser and its dispatch.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from whisperdrop import __version__, config as config_module, log


def _load_config(args: argparse.Namespace) -> config_module.Config:
    try:
        return config_module.load(args.config)
    except config_module.ConfigError as error:
        print(f"whisperdrop: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _setup_logging(config: config_module.Config, args: argparse.Namespace, stream=None) -> None:
    settings = config.logging
    log.configure(
        level="debug" if getattr(args, "verbose", False) else settings.level,
        fmt=getattr(args, "log_format", None) or settings.format,
        file=settings.file,
        stream=stream,
    )


def _print_problems(headline: str, problems: list[str]) -> None:
    print(headline, file=sys.stderr)
    for problem in problems:
        print(f"  - {problem}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    config = _load_config(args)
    # The same check as `check-config`, which writes nothing; the folders are made only once it passes.
    problems = config_module.check(config, "daemon") or config_module.make_folders(config)
    if problems:
        _print_problems(f"whisperdrop: cannot start with {config.source or 'the embedded default'}:", problems)
        return 2
    from whisperdrop.daemon.status import DaemonRunning, hold_daemon_lock

    try:
        hold_daemon_lock(config.path("state_dir"))  # held until the process ends, however it ends
    except DaemonRunning as error:
        print(f"whisperdrop: cannot start: {error}", file=sys.stderr)
        return 2
    _warn_insecure(config)
    _setup_logging(config, args)
    from whisperdrop.daemon.service import serve

    status = asyncio.run(serve(config))
    # Every stage is committed to the ledger, so a worker thread still inside a long engine window
    # holds nothing worth waiting for: exit now instead of joining it (SIGTERM's 10-second promise).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _warn_insecure(config: config_module.Config) -> None:
    """Print a warning on stderr for each config or key file that others can change (or read)."""
    for warning in config_module.insecure_files(config):
        print(f"whisperdrop: warning: {warning}", file=sys.stderr)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Check the config as `run` (or, for a runner-only file, `runner`) would, creating nothing: the
    verdict on stdout, the problems on stderr; 0 when it would start, 1 when not, 2 when invalid."""
    config = _load_config(args)
    role = config_module.role(config)
    _warn_insecure(config)
    problems = config_module.check(config, role)
    source = config.source or "the embedded default (no config file found)"
    command = "whisperdrop runner" if role == "runner" else "whisperdrop run"
    if problems:
        _print_problems(f"{source}: valid, but `{command}` would not start:", problems)
        return 1
    if role == "runner":
        runner = config.runner
        print(f"{source}: OK, a GPU runner config (`{command}`)\n  spool   {runner.spool}\n"
              f"  model   {runner.model} on {runner.device}")
        return 0
    made = " (made on first run)" if config.default_inbox and not config.inbox.exists() else ""
    print(f"{source}: OK (`{command}`)\n  inbox   {config.inbox}{made}\n  outbox  {config.outbox}\n"
          f"  provider {config.transcription.provider}, {len(config.remote.hosts)} GPU host(s), "
          f"local model {config.local.model}")
    return 0


def cmd_default_config(args: argparse.Namespace) -> int:
    sys.stdout.write(config_module.render_default_yaml())
    return 0


class _ProgressLine:
    """A one-line progress display on a terminal (stderr); silent otherwise. Results go to stdout,
    messages to stderr; both clear the progress line first, so the terminal never shows a stale one."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self._lock = threading.Lock()
        self._shown = False

    def show(self, text: str) -> None:
        with self._lock:
            if self.enabled:
                self.stream.write("\r\033[K" + text)
                self.stream.flush()
                self._shown = True

    def stop(self) -> None:
        """Clear the line and show no more progress (an engine thread may still be reporting)."""
        with self._lock:
            self._clear()
            self.enabled = False

    def _clear(self) -> None:
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False

    def result(self, text: str) -> None:
        with self._lock:
            self._clear()
            print(text, file=sys.stdout, flush=True)

    def message(self, text: str) -> None:
        with self._lock:
            self._clear()
            print(text, file=self.stream, flush=True)


def _one_shot_hint(hint: str) -> str:
    """A MediaError hint written for the daemon, told for `transcribe`: there is no inbox to move the
    file back to; the file is given again on the command line."""
    hint = re.sub(r"[;,]? *(then |and )?(move it back (in)?to the inbox|drop it again)", "", hint).rstrip(" .;,")
    return f"{hint}, then run `whisperdrop transcribe` on it again."


def _prepare_output(output: Path) -> str | None:
    """Make the output folder; what stops it (a file of that name, a folder that cannot be made or
    written), or None."""
    if output.exists() and not output.is_dir():
        return f"-o {output}: that is a file; give -o a folder (made if missing)"
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"cannot create the output folder {output}: {error.strerror}"
    if not os.access(output, os.W_OK | os.X_OK):
        return f"the output folder {output} is not writable by this user"
    return None


def cmd_transcribe(args: argparse.Namespace) -> int:
    config = _load_config(args)
    output = Path(args.output)
    problem = _prepare_output(output)
    if problem:
        print(f"whisperdrop transcribe: {problem}", file=sys.stderr)
        return 2
    # Progress and results go to the terminal; log events only when asked (--log-format) or on warnings.
    log.configure(level="info" if args.log_format else "warning", fmt=args.log_format or "console", stream=sys.stderr)
    run = _OneShot(config, [Path(name) for name in args.files], output)
    status = asyncio.run(run.main())
    if run.interrupted:
        # A stopped engine or extraction may still run in an executor thread: joining it would keep
        # going for as long as it takes (and a second Ctrl-C during the interpreter's teardown can
        # crash it). Nothing is left half-written: outputs are written whole or not at all.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


class _OneShot:
    """`whisperdrop transcribe`: the daemon's extract, route and outbox stages over the files given;
    the sources stay where they are. Ctrl-C stops at once: what was finished is kept and listed,
    the file in hand leaves nothing behind, and a second Ctrl-C exits immediately."""

    def __init__(self, config: config_module.Config, files: list[Path], output: Path):
        self.config, self.files, self.output = config, files, output
        self.display = _ProgressLine()
        self.cancel = threading.Event()
        self.interrupted = False
        self.finished: list[tuple[str, Path]] = []  # (name, the Result written)
        self.failed: list[tuple[str, str]] = []  # (name, why)
        self.position = -1  # index in `files` of the file in hand
        self.doing: str | None = None  # what is being done to it, while something is
        self._task: asyncio.Task | None = None

    def _interrupt(self) -> None:
        """SIGINT/SIGTERM: stop the file in hand now (the loop's handler: only flags and a cancel)."""
        if self.interrupted:
            self.display.message("whisperdrop transcribe: stopped at once (second interrupt)")
            os._exit(130)
        self.interrupted = True
        self.cancel.set()  # the engine thread stops at its next segment
        self.display.stop()
        if self._task is not None:
            self._task.cancel()

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        for number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(number, self._interrupt)
        remote = None
        try:
            with tempfile.TemporaryDirectory(prefix="whisperdrop-") as scratch:
                try:
                    remote = await self._run(Path(scratch))
                except asyncio.CancelledError:
                    if not self.interrupted:
                        raise
        finally:
            for number in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(number)
        if self.interrupted:
            self._summary()
            return 130
        if remote is not None:
            await remote.close()
        return 1 if self.failed else 0

    def _summary(self) -> None:
        """What an interrupt left: the files finished (with their Result), the one stopped, the rest."""
        lines = ["whisperdrop transcribe: interrupted"]
        for name, written in self.finished:
            lines.append(f"  finished:    {name} -> {written}")
        for name, why in self.failed:
            lines.append(f"  failed:      {name}: {why}")
        if self.doing and 0 <= self.position < len(self.files):
            lines.append(f"  stopped:     {_name(self.files[self.position])} while {self.doing}; nothing written")
        for path in self.files[self.position + 1:]:
            lines.append(f"  not started: {_name(path)}")
        self.display.message("\n".join(lines))

    async def _run(self, scratch: Path):
        from whisperdrop.daemon import outbox
        from whisperdrop.daemon.extract import MediaError, extract
        from whisperdrop.daemon.local import LocalTranscriber
        from whisperdrop.daemon.route import Router, Work
        from whisperdrop.daemon.service import build_remote
        from whisperdrop.engine import EngineError
        from whisperdrop.files import sha256_file
        from whisperdrop import result as results
        from whisperdrop.spool import TranscribeOptions, job_id as make_job_id

        config, display = self.config, self.display
        remote = build_remote(config)
        router = Router(config, LocalTranscriber(config.local), remote)
        options = router.planned_options(TranscribeOptions.from_config(config.transcription))
        formats = list(config.transcription.outputs)
        loop = asyncio.get_running_loop()
        for self.position, path in enumerate(self.files):
            name = _name(path)
            started = time.monotonic()
            try:
                if path.is_dir():
                    raise _InputError(f"is a folder; give the files in it (for example {path}/*)")
                if not path.exists():
                    raise _InputError("no such file")
                if not path.is_file():
                    raise _InputError("not a regular file")
                self.doing = "reading it"
                display.show(f"{name}: reading")
                digest = await loop.run_in_executor(None, sha256_file, path, self.cancel)
                job = make_job_id(digest, options)
                self.doing = "extracting its audio"
                display.show(f"{name}: extracting audio")
                extracted = await loop.run_in_executor(
                    None, lambda: extract(path, scratch / f"{job}.opus", config.audio.bitrate_kbps))

                def progress(done: float, duration: float, name=name) -> None:
                    percent = 100 * done / duration if duration else 100
                    self.doing = f"transcribing it, at {percent:.0f}%"
                    display.show(f"{name}: transcribing {percent:5.1f}% ({done:.0f}/{duration:.0f} s)")

                self.doing = "transcribing it"
                work = Work(job_id=job, audio=extracted.path, options=options, audio_size=extracted.bytes_out,
                            audio_sha256=extracted.sha256, duration=extracted.duration)
                routed = await router.transcribe(work, cancel=self.cancel, progress=progress)
                if self.interrupted:  # the engine stopped early; what it returned is not the whole file
                    raise asyncio.CancelledError
                made = results.transcribed(
                    routed.result, job_id=job, route=routed.route, host=routed.host,
                    fallback_reason=routed.fallback_reason, transfer=routed.transfer,
                    timings={"extract_s": round(extracted.seconds, 3), **routed.timings})
                document = results.for_source(made, path=name, size=path.stat().st_size, sha256=digest,
                                              timings={"total_s": round(time.monotonic() - started, 3)})
                # Written whole before the loop takes another callback, so an interrupt never splits it.
                base, _ = outbox.plan_outputs(self.output, path.stem, formats, job)
                outbox.write_outputs(base, document, formats, outbox.Limits.from_config(config.subtitles))
                self.doing = None
                self.finished.append((name, base.with_name(base.name + ".json")))
                where = routed.route + (f" on {routed.host}" if routed.host else "")
                note = f" (fallback: {routed.fallback_reason})" if routed.fallback_reason else ""
                display.result(f"{name}: {base}.json  [{extracted.duration:.1f} s of audio, {where}{note}, "
                               f"{time.monotonic() - started:.1f} s]")
            except _InputError as error:
                self._fail(name, str(error))
            except MediaError as error:
                self._fail(name, f"{error.reason}. {_one_shot_hint(error.hint)}")
            except EngineError as error:
                if self.interrupted:
                    raise asyncio.CancelledError from error
                self._fail(name, str(error))
            except OSError as error:
                self._fail(name, f"{error.strerror or error}" + (f": {error.filename}" if error.filename else ""))
        return remote

    def _fail(self, name: str, message: str) -> None:
        self.doing = None
        self.failed.append((name, message))
        self.display.message(f"{name}: FAILED: {message}")


def _name(path: Path) -> str:
    return path.name or str(path)


class _InputError(Exception):
    """A path given to `transcribe` that is not a file it can read."""


def cmd_runner(args: argparse.Namespace) -> int:
    config = _load_config(args)
    problems = config_module.check(config, "runner")  # what `check-config` says of a runner config
    if problems:
        _print_problems(f"whisperdrop runner: cannot start with {config.source or 'the embedded default'}:", problems)
        return 2
    _setup_logging(config, args)
    if config.runner.backend == "slurm":
        from whisperdrop.gpu_runner.slurm import main as slurm_main

        return slurm_main(config)
    from whisperdrop.gpu_runner.service import main as runner_main

    return runner_main(config)


def cmd_slurm_task(args: argparse.Namespace) -> int:
    """A compute node's side of the Slurm backend: do one claimed job from the spool (the batch
    script the runner writes calls this; it is no command for people)."""
    config = _load_config(args)
    _setup_logging(config, args)
    from whisperdrop.gpu_runner.slurm import run_task

    settings = dict(config["runner"])
    if args.spool:
        settings["spool"] = os.path.abspath(args.spool)
    return run_task(settings, args.job)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="config file (default: $WHISPERDROP_CONFIG, ./config.yaml, "
                        "~/.config/whisperdrop/config.yaml, /etc/whisperdrop/config.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--log-format", choices=("json", "console"), help="override logging.format")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="whisperdrop", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"whisperdrop {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="watch the inbox and transcribe everything that lands there")
    _add_common(run)
    run.set_defaults(handler=cmd_run)

    transcribe = commands.add_parser("transcribe", help="transcribe files now, through the same stages")
    _add_common(transcribe)
    transcribe.add_argument("files", nargs="+", metavar="FILE")
    transcribe.add_argument("-o", "--output", default=".", metavar="DIR", help="where the outputs go (default: .)")
    transcribe.set_defaults(handler=cmd_transcribe)

    check = commands.add_parser("check-config", help="validate the configuration and its folders")
    _add_common(check)
    check.set_defaults(handler=cmd_check_config)

    default = commands.add_parser("default-config", help="print the documented default config.yaml")
    default.set_defaults(handler=cmd_default_config)

    runner = commands.add_parser("runner", help="GPU host: transcribe jobs from the spool")
    _add_common(runner)
    runner.set_defaults(handler=cmd_runner)

    task = commands.add_parser("slurm-task", help="Slurm compute node: do one job the Slurm runner submitted")
    _add_common(task)
    task.add_argument("--spool", help="the spool on the shared file system (default: runner.spool)")
    task.add_argument("--job", required=True, metavar="ID", help="the job id (64 hex digits)")
    task.set_defaults(handler=cmd_slurm_task)

    from whisperdrop import cli_report

    for name, command_help in cli_report.COMMANDS:
        sub = commands.add_parser(name, help=command_help)
        _add_common(sub)
        cli_report.add_arguments(name, sub)
        sub.set_defaults(handler=lambda args, name=name: cli_report.run(name, args, _load_config(args)))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.handler(args)
        sys.stdout.flush()  # inside the try: a reader that went away (`| head -1`) is seen here
        return status
    except KeyboardInterrupt:
        print("\nwhisperdrop: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout closed it (`whisperdrop status | head -1`): that is its choice, not an
        # error worth a traceback. Point stdout at /dev/null so the interpreter's final flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # what a shell reports for a command ended by SIGPIPE


def runner_main(argv: list[str] | None = None) -> int:
    """`whisperdrop-runner`: shorthand for `whisperdrop runner`."""
    return main(["runner", *(argv if argv is not None else sys.argv[1:])])
