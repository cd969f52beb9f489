"""The command line: `whisperdrop run | transcribe | check-config | runner | status | stats | doctor`.

Direction of imports: cli -> daemon | gpu_runner -> engine, spool, config, log. Heavy modules are
imported inside the command that needs them, so `whisperdrop status` starts fast.
"""

from __future__ import annotations

import argparse
import asyncio
import os
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


def cmd_run(args: argparse.Namespace) -> int:
    config = _load_config(args)
    if config.default_inbox:  # the default `inbox` beside the config (or in the working directory) is made on
        config.inbox.mkdir(exist_ok=True)  # first run; an inbox you named must exist (a typo, an unmounted disk)
    problems = config_module.check_directories(config)
    if config.transcription.provider == "remote" and not config.remote.hosts:
        problems.append("At 'transcription.provider': 'remote' needs at least one entry in 'remote.hosts'; "
                        "add a GPU host or use provider 'auto' or 'local'")
    if problems:
        source = config.source or "embedded default"
        print(f"whisperdrop: cannot start with {source}:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
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
    config = _load_config(args)
    _warn_insecure(config)
    problems = config_module.check_directories(config)
    source = config.source or "the embedded default (no config file found)"
    if problems:
        print(f"{source}: valid, but:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print(f"{source}: OK")
    print(f"  inbox   {config.inbox}\n  outbox  {config.outbox}\n  provider {config.transcription.provider}, "
          f"{len(config.remote.hosts)} GPU host(s), local model {config.local.model}")
    return 0


def cmd_default_config(args: argparse.Namespace) -> int:
    sys.stdout.write(config_module.render_default_yaml())
    return 0


class _ProgressLine:
    """A one-line progress display on a terminal; silent otherwise."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.enabled = stream.isatty()
        self._lock = threading.Lock()

    def show(self, text: str) -> None:
        if self.enabled:
            with self._lock:
                self.stream.write("\r\033[K" + text)
                self.stream.flush()

    def done(self, text: str) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()


def cmd_transcribe(args: argparse.Namespace) -> int:
    config = _load_config(args)
    # Progress and results go to the terminal; log events only when asked (--log-format) or on warnings.
    log.configure(level="info" if args.log_format else "warning", fmt=args.log_format or "console", stream=sys.stderr)
    return asyncio.run(_transcribe_files(config, [Path(name) for name in args.files], Path(args.output)))


async def _transcribe_files(config, files: list[Path], output: Path) -> int:
    """One-shot: the same extract, route and outbox stages as the daemon; sources stay where they are."""
    from whisperdrop.daemon import outbox
    from whisperdrop.daemon.extract import MediaError, extract
    from whisperdrop.daemon.local import LocalTranscriber
    from whisperdrop.daemon.pipeline import sha256_file
    from whisperdrop.daemon.route import Router
    from whisperdrop.daemon.service import build_remote
    from whisperdrop.engine import EngineError
    from whisperdrop import result as results
    from whisperdrop.spool import TranscribeOptions, job_id as make_job_id

    display = _ProgressLine()
    options = TranscribeOptions.from_config(config.transcription)
    remote = build_remote(config)
    router = Router(config, LocalTranscriber(config.local), remote)
    cancel = threading.Event()
    failures = 0
    loop = asyncio.get_running_loop()
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="whisperdrop-") as scratch:
        for path in files:
            name = path.name
            started = time.monotonic()
            try:
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: no such file")
                display.show(f"{name}: reading")
                digest = await loop.run_in_executor(None, sha256_file, path)
                job = make_job_id(digest, options)
                display.show(f"{name}: extracting audio")
                extracted = await loop.run_in_executor(
                    None, lambda: extract(path, Path(scratch) / f"{job}.opus", config.audio.bitrate_kbps))

                def progress(done: float, duration: float, name=name) -> None:
                    percent = 100 * done / duration if duration else 100
                    display.show(f"{name}: transcribing {percent:5.1f}% ({done:.0f}/{duration:.0f} s)")

                from whisperdrop.daemon.ledger import Job

                shell = Job(job_id=job, stage="extracted", attempts=0, created_at=time.time(), updated_at=time.time(),
                            source_sha256=digest, source_size=path.stat().st_size, options=options.to_dict(),
                            duration=extracted.duration, audio_size=extracted.bytes_out, audio_sha256=extracted.sha256)
                routed = await router.transcribe(shell, extracted.path, options, cancel=cancel, progress=progress)
                made = results.transcribed(
                    routed.result, job_id=job, route=routed.route, host=routed.host,
                    fallback_reason=routed.fallback_reason, transfer=routed.transfer,
                    timings={"extract_s": round(extracted.seconds, 3), **routed.timings})
                document = results.for_source(made, path=name, size=path.stat().st_size, sha256=digest,
                                              timings={"total_s": round(time.monotonic() - started, 3)})
                base, _ = outbox.plan_outputs(output, path.stem, list(config.transcription.outputs), job)
                outbox.write_outputs(base, document, list(config.transcription.outputs),
                                     outbox.Limits.from_config(config.subtitles))
                where = routed.route + (f" on {routed.host}" if routed.host else "")
                note = f" (fallback: {routed.fallback_reason})" if routed.fallback_reason else ""
                display.done(f"{name}: {base}.json  [{extracted.duration:.1f} s of audio, {where}{note}, "
                             f"{time.monotonic() - started:.1f} s]")
            except MediaError as error:
                failures += 1
                display.done(f"{name}: FAILED: {error.reason}. {error.hint}")
            except (EngineError, OSError) as error:
                failures += 1
                display.done(f"{name}: FAILED: {error}")
    if remote is not None:
        await remote.close()
    return 1 if failures else 0


def cmd_runner(args: argparse.Namespace) -> int:
    config = _load_config(args)
    _setup_logging(config, args)
    from whisperdrop.gpu_runner.service import main as runner_main

    return runner_main(config)


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
        return args.handler(args)
    except KeyboardInterrupt:
        return 130


def runner_main(argv: list[str] | None = None) -> int:
    """`whisperdrop-runner`: shorthand for `whisperdrop runner`."""
    return main(["runner", *(argv if argv is not None else sys.argv[1:])])
