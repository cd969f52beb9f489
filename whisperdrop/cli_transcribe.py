"""`whisperdrop transcribe FILE... [-o DIR] [--model --language --prompt --hotwords --task --format --profile]`:
the daemon's extract, route and outbox stages over the files given, now; the sources stay where they are.

The flags override the config for this run, over the profile named by `--profile` (see
`whisperdrop.profiles`). The paths written go to stdout, one per line (the formats asked for, then
`<stem>.json`, which is always written: it is the Result, and its presence means the set is whole);
progress and messages go to stderr. Ctrl-C stops at once: what was finished is kept and listed, the
file in hand leaves nothing behind, and a second Ctrl-C exits immediately.

For other front ends (the whisper-cli drop-in) the same work is two plain functions:
`transcribe_files(config, files, output, plan)` writes the outbox's files for each file and returns
what it wrote; `transcribe_one(config, path, options)` returns the Result of one file, writing nothing.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from whisperdrop import config as config_module, log
from whisperdrop.daemon.shutdown import Shutdown
from whisperdrop.profiles import OUTPUT_FORMATS, Plan, ProfileError
from whisperdrop.spool import TASKS, TranscribeOptions

FORMAT_CHOICES = ("json",) + OUTPUT_FORMATS


def add_parser(commands: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the `transcribe` command and its flags to the CLI's subparsers."""
    parser = commands.add_parser("transcribe", help="transcribe files now, through the same stages",
                                 description=__doc__.split("\n\n")[1].replace("\n", " "))
    add_common(parser)
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.add_argument("-o", "--output", default=".", metavar="DIR", help="where the outputs go (default: .)")
    parser.add_argument("--profile", metavar="NAME", help="use this profile of the config (its options and outputs)")
    parser.add_argument("--model", help="model for this run, on every route (a faster-whisper name, a CTranslate2 "
                        "folder, bundled:tiny.en); default: transcription.model, local.model on this machine")
    parser.add_argument("--language", metavar="CODE", help="language code (en, de, pt...), or `auto` to detect it")
    parser.add_argument("--prompt", metavar="TEXT", help="initial prompt: your vocabulary and style")
    parser.add_argument("--hotwords", metavar="WORDS", help="words to favour (names, jargon), space separated")
    parser.add_argument("--task", choices=TASKS, help="`translate` writes English (needs a multilingual model)")
    parser.add_argument("--format", action="append", metavar="FMT", dest="formats",
                        help=f"output format, repeatable or comma-separated: {', '.join(FORMAT_CHOICES)} "
                        "(json is always written; default: transcription.outputs)")
    parser.set_defaults(handler=cmd_transcribe)


def _formats(values: list[str] | None) -> list[str] | None:
    """The --format values, split at commas and checked; None when none was given. Raises ProfileError."""
    if not values:
        return None
    formats = [item.strip().lower() for value in values for item in value.split(",") if item.strip()]
    bad = [item for item in formats if item not in FORMAT_CHOICES]
    if bad:
        raise ProfileError(f"--format {', '.join(bad)}: not a format this writes; choose from {', '.join(FORMAT_CHOICES)}")
    return formats


def plan_for(config: config_module.Config, args: argparse.Namespace) -> tuple[config_module.Config, Plan]:
    """The config for this run (with `--model` as local.model too, so the flag holds on every route)
    and the Plan of its files: transcription, then `--profile`, then the flags. Raises ProfileError
    for an unknown profile or format, or translate with an English-only model."""
    from whisperdrop import profiles
    from whisperdrop.daemon.local import LocalTranscriber
    from whisperdrop.daemon.route import Router

    if args.language not in (None, profiles.AUTO_LANGUAGE):
        from faster_whisper.tokenizer import _LANGUAGE_CODES

        if args.language not in _LANGUAGE_CODES:
            raise ProfileError(f"--language {args.language}: not a language code Whisper knows; give one such as "
                               "en, de, fr, pt, or auto to detect it")
    overrides = {"model": args.model, "language": args.language, "initial_prompt": args.prompt,
                 "hotwords": args.hotwords, "task": args.task, "outputs": _formats(args.formats)}
    if args.model:
        config["local"]["model"] = args.model
    local = LocalTranscriber(config.local)  # its engine loads nothing until asked
    try:
        router = Router(config, local, remote=object() if config.remote.hosts else None)  # planning only
        plan = profiles.plan(config, profile=args.profile, planned=router.planned_options,
                             overrides={key: value for key, value in overrides.items() if value is not None})
        fallback = local.options_for(plan.options)  # where a GPU host is asked, the fallback must translate too
    finally:
        local.shutdown()
    problem = profiles.translate_problem(plan.options)
    if problem is None and router.provider != "remote" and profiles.translate_problem(fallback):
        problem = profiles.translate_problem(fallback) + " (local.model: the fallback on this machine)"
    if problem:
        raise ProfileError(problem, hint="give --model a multilingual model, e.g. --model small")
    return config, plan


def cmd_transcribe(args: argparse.Namespace) -> int:
    from whisperdrop.cli import _load_config

    config = _load_config(args)
    try:
        config, plan = plan_for(config, args)
    except ProfileError as error:
        print(f"whisperdrop transcribe: {error}", file=sys.stderr)
        return 2
    output = Path(args.output)
    problem = _prepare_output(output)
    if problem:
        print(f"whisperdrop transcribe: {problem}", file=sys.stderr)
        return 2
    # Progress and results go to the terminal; log events only when asked (--log-format) or on warnings.
    log.configure(level="info" if args.log_format else "warning", fmt=args.log_format or "console", stream=sys.stderr)
    run = OneShot(config, [Path(name) for name in args.files], plan.options, _writer(config, output, plan))
    status = asyncio.run(run.main())
    if run.interrupted:
        # A stopped engine or extraction may still run in an executor thread: joining it would keep
        # going for as long as it takes (and a second Ctrl-C during the interpreter's teardown can
        # crash it). Nothing is left half-written: outputs are written whole or not at all.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


# the plain functions


@dataclass
class Outcome:
    """What a one-shot run did: per file finished, the paths written (the JSON last); per file failed, why."""

    written: dict[str, list[Path]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False


def transcribe_files(config: config_module.Config, files: list[Path], output: Path, plan: Plan,
                     *, install_signals: bool = True) -> Outcome:
    """Transcribe `files` with `plan.options` (a GPU host first where configured, the local CPU as the
    fallback) and write `plan.formats` and `<stem>.json` for each into `output` (made if missing;
    names that are taken get a suffix). Messages go to stderr. Never raises for one file's sake; an
    output folder that cannot be made raises OSError."""
    output.mkdir(parents=True, exist_ok=True)
    run = OneShot(config, list(files), plan.options, _writer(config, output, plan), quiet=True,
                  install_signals=install_signals)
    asyncio.run(run.main())
    return Outcome(written={name: paths for name, paths in run.finished}, failed=dict(run.failed),
                   interrupted=run.interrupted)


def transcribe_one(config: config_module.Config, path: Path, options: TranscribeOptions,
                   *, install_signals: bool = True,
                   progress: Callable[[float, float], None] | None = None) -> tuple[dict | None, str | None]:
    """The Result of `path` with `options` (a GPU host first where configured, then the local CPU), or
    (None, why). Writes nothing; messages go to stderr; `progress(done_s, duration_s)` is called as
    the transcription advances (from the engine's thread)."""
    results: list[dict] = []

    def keep(path: Path, name: str, document: dict, job: str) -> list[Path]:
        results.append(document)
        return []

    run = OneShot(config, [Path(path)], options, keep, quiet=True, install_signals=install_signals,
                  progress=progress)
    asyncio.run(run.main())
    if results:
        return results[0], None
    return None, run.failed[0][1] if run.failed else "interrupted"


def _writer(config: config_module.Config, output: Path, plan: Plan) -> Callable[[Path, str, dict, str], list[Path]]:
    """`write(path, name, document, job)`: the outbox's files for one source in `output`, as the daemon writes them."""
    from whisperdrop.daemon import outbox

    formats = list(plan.formats)
    limits = outbox.Limits.from_config(config.subtitles)

    def write(path: Path, name: str, document: dict, job: str) -> list[Path]:
        base, _ = outbox.plan_outputs(output, path.stem, formats, job)
        return outbox.write_outputs(base, {**document, "profile": plan.profile}, formats, limits)

    return write


# the run


class _ProgressLine:
    """A one-line progress display on a terminal (stderr); silent otherwise. Results go to stdout,
    messages to stderr; both clear the progress line first, so the terminal never shows a stale one."""

    def __init__(self, stream=None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
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


class OneShot:
    """One run over `files` with `options`; `deliver(path, name, document, job)` writes (or keeps) each
    finished Result and returns the paths written, which go to stdout unless `quiet`. Ctrl-C (with
    `install_signals`) stops at once: what was finished is kept and listed, the file in hand leaves
    nothing behind, and a second Ctrl-C exits immediately."""

    def __init__(self, config: config_module.Config, files: list[Path], options: TranscribeOptions,
                 deliver: Callable[[Path, str, dict, str], list[Path]], *, quiet: bool = False,
                 install_signals: bool = True, progress: Callable[[float, float], None] | None = None):
        self.config, self.files, self.options, self.deliver = config, files, options, deliver
        self.quiet, self.install_signals = quiet, install_signals
        self.progress = progress  # told (done_s, duration_s) as well as the progress line
        self.display = _ProgressLine(enabled=not quiet)
        self.shutdown = Shutdown()  # the routes' stop request; `shutdown.threads` stops the engine and hashing
        self.interrupted = False
        self.finished: list[tuple[str, list[Path]]] = []  # (name, the paths written, the JSON last)
        self.failed: list[tuple[str, str]] = []  # (name, why)
        self.position = -1  # index in `files` of the file in hand
        self.doing: str | None = None  # what is being done to it, while something is
        self._task: asyncio.Task | None = None
        self._local = None  # the LocalTranscriber, once made

    def _interrupt(self) -> None:
        """SIGINT/SIGTERM: stop the file in hand now (the loop's handler: only flags and a cancel)."""
        if self.interrupted:
            self.display.message("whisperdrop transcribe: stopped at once (second interrupt)")
            os._exit(130)
        self.interrupted = True
        self.shutdown.request("interrupt")  # the engine thread stops at its next segment
        self.display.stop()
        if self._task is not None:
            self._task.cancel()

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        signals = (signal.SIGINT, signal.SIGTERM) if self.install_signals else ()
        for number in signals:
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
            for number in signals:
                loop.remove_signal_handler(number)
            if self._local is not None:
                self._local.shutdown()  # its worker thread ends once idle (an interrupted one: at os._exit)
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
            lines.append(f"  finished:    {name} -> {written[-1] if written else 'done'}")
        for name, why in self.failed:
            lines.append(f"  failed:      {name}: {why}")
        if self.doing and 0 <= self.position < len(self.files):
            lines.append(f"  stopped:     {_name(self.files[self.position])} while {self.doing}; nothing written")
        for path in self.files[self.position + 1:]:
            lines.append(f"  not started: {_name(path)}")
        self.display.message("\n".join(lines))

    async def _run(self, scratch: Path):
        from whisperdrop import result as results
        from whisperdrop.daemon.extract import MediaError, extract
        from whisperdrop.daemon.local import LocalTranscriber
        from whisperdrop.daemon.route import Router, Work
        from whisperdrop.daemon.service import build_remote
        from whisperdrop.engine import EngineError
        from whisperdrop.files import sha256_file
        from whisperdrop.spool import job_id as make_job_id

        config, display, options = self.config, self.display, self.options
        remote = build_remote(config)
        self._local = LocalTranscriber(config.local)
        router = Router(config, self._local, remote)
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
                digest = await loop.run_in_executor(None, sha256_file, path, self.shutdown.threads)
                job = make_job_id(digest, options)
                self.doing = "extracting its audio"
                display.show(f"{name}: extracting audio")
                extracted = await loop.run_in_executor(
                    None, lambda: extract(path, scratch / f"{job}.opus", config.audio.bitrate_kbps))

                def progress(done: float, duration: float, name=name) -> None:
                    percent = 100 * done / duration if duration else 100
                    self.doing = f"transcribing it, at {percent:.0f}%"
                    display.show(f"{name}: transcribing {percent:5.1f}% ({done:.0f}/{duration:.0f} s)")
                    if self.progress is not None:
                        self.progress(done, duration)

                self.doing = "transcribing it"
                work = Work(job_id=job, audio=extracted.path, options=options, audio_size=extracted.bytes_out,
                            audio_sha256=extracted.sha256, duration=extracted.duration)
                routed = await router.transcribe(work, shutdown=self.shutdown, progress=progress)
                if self.interrupted:  # the engine stopped early; what it returned is not the whole file
                    raise asyncio.CancelledError
                made = results.transcribed(
                    routed.result, job_id=job, route=routed.route, host=routed.host,
                    fallback_reason=routed.fallback_reason, transfer=routed.transfer,
                    timings={"extract_s": round(extracted.seconds, 3), **routed.timings})
                document = results.for_source(made, path=name, size=path.stat().st_size, sha256=digest,
                                              timings={"total_s": round(time.monotonic() - started, 3)})
                # Written whole before the loop takes another callback, so an interrupt never splits it.
                written = self.deliver(path, name, document, job)
                self.doing = None
                self.finished.append((name, written))
                where = routed.route + (f" on {routed.host}" if routed.host else "")
                note = f" (fallback: {routed.fallback_reason})" if routed.fallback_reason else ""
                if not self.quiet:
                    display.message(f"{name}: done [{extracted.duration:.1f} s of audio, {where}{note}, "
                                    f"{time.monotonic() - started:.1f} s]")
                    for written_path in written:
                        display.result(str(written_path))
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
        if not self.quiet:  # a caller that is told (transcribe_one, transcribe_files) says it its own way
            self.display.message(f"{name}: FAILED: {message}")


def _name(path: Path) -> str:
    return path.name or str(path)


class _InputError(Exception):
    """A path given to `transcribe` that is not a file it can read."""


