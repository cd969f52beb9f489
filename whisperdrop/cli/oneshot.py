"""A one-shot run: the daemon's extract, route and outbox stages over files given, now, with the
sources left where they are (`whisperdrop transcribe`, the whisper-cli drop-in).

`OneShot` is the run: a GPU host first where one is configured, the local CPU as the fallback, a
progress line on a terminal, results on stdout and messages on stderr. Ctrl-C stops at once: what
was finished is kept and listed, the file in hand leaves nothing behind, and a second Ctrl-C exits
immediately. For other front ends the same work is two plain functions:
`transcribe_files(config, files, output, plan)` writes the outbox's files for each file and returns
what it wrote; `transcribe_one(config, path, options)` returns the Result of one file, writing nothing.
"""

from __future__ import annotations

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
from typing import Callable

from whisperdrop.daemon.shutdown import Shutdown
from whisperdrop.shared import config as config_module
from whisperdrop.shared.profiles import Plan
from whisperdrop.shared.spool import TranscribeOptions


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
    run = OneShot(config, list(files), plan.options, writer(config, output, plan), quiet=True,
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


def writer(config: config_module.Config, output: Path, plan: Plan) -> Callable[[Path, str, dict, str], list[Path]]:
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
        from whisperdrop.daemon.extract import MediaError, extract
        from whisperdrop.daemon.local import LocalTranscriber
        from whisperdrop.daemon.route import Router, Work
        from whisperdrop.daemon.service import build_remote
        from whisperdrop.engine.engine import EngineError
        from whisperdrop.outputs import result as results
        from whisperdrop.shared.files import sha256_file
        from whisperdrop.shared.spool import job_id as make_job_id

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
                    if document.get("language_warning"):  # an English-only model heard other speech
                        display.message(f"{name}: warning: {document['language_warning']}")
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


