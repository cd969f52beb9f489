"""What every API request does, whatever its dialect: store the upload, check it, make it a job,
wait for it (or not), and read its Result.

`accept` turns an upload and its options into a source of a job in the ledger: the options are
planned like a dropped file's (`Pipeline.plan`: `transcription`, a named profile, the request's own
options), the upload is written and fsynced under state_dir and checked as media BEFORE anything
reaches the ledger, so a rejected request leaves nothing behind. `finish` waits for the job and
returns its Result, or raises the ApiError that says why not (failed, timed out, daemon stopping).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from whisperdrop.daemon.api import uploads
from whisperdrop.daemon.api.errors import ApiError
from whisperdrop.daemon.api.formats import language_code
from whisperdrop.daemon.api.overview import host_state
from whisperdrop.shared import log
from whisperdrop.shared.profiles import ProfileError, capability_problem

OPENAI_MODEL_ALIASES = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe", "default")


@dataclass(frozen=True)
class Asked:
    """A request's transcription options as sent (None: not given, the config decides)."""

    model: str | None = None
    language: str | None = None
    prompt: str | None = None
    task: str | None = None
    profile: str | None = None
    words: bool | None = None  # word timestamps wanted
    vad_filter: bool | None = None
    outbox: bool | None = None
    temperature: float | None = None  # OpenAI's: 0 (its default) decodes with beam search, above 0 samples


@dataclass(frozen=True)
class Accepted:
    """An upload that became a source of a job: the job, its source row, and how it was planned."""

    job_id: str
    source_id: int
    relpath: str
    filename: str | None
    task: str
    duplicate: bool
    profile: str | None = None


class ApiService:
    """The API's link to the daemon's Pipeline (and its RemotePool, for health)."""

    def __init__(self, config: Any, pipeline: Any, remote: Any | None = None):
        self.config = config
        self.pipeline = pipeline
        self.remote = remote
        self.state_dir = config.path("state_dir")
        self.limit = int(float(config.api.max_upload_mb) * 1_000_000)
        self.figures: Callable[[], dict] | None = None  # the server's bounds and their use (ApiServer.figures)
        self.log = log.get("api")
        self._detector: tuple[Any, asyncio.Lock] | None = None   # /detect-language's engine, made on first use

    # options

    def _model(self, asked: str | None) -> str | None:
        """The model override a request's `model` means: None (the configured one) for OpenAI's names
        and the configured model; a faster-whisper name or a configured model. Raises ApiError."""
        if asked is None or not asked.strip() or asked.strip() in OPENAI_MODEL_ALIASES:
            return None
        asked = asked.strip()
        configured = {self.config.transcription.model, self.config.local.model}
        configured |= {profile.get("model") for profile in self.config.get("profiles") or [] if profile.get("model")}
        if asked in configured:
            return asked
        from faster_whisper.utils import available_models

        known = set(available_models())
        if asked in known:
            return asked
        raise ApiError(400, f"unknown model {asked!r}: use whisper-1 (the configured model, "
                            f"{self.config.transcription.model}), one of the configured models, or a faster-whisper "
                            f"name ({', '.join(sorted(known))})", param="model", code="model_not_found")

    def plan(self, asked: Asked) -> Any:
        """The job's Plan for a request (see Pipeline.plan). Raises ApiError naming a bad option."""
        overrides: dict[str, Any] = {}
        model = self._model(asked.model)
        if model is not None:
            overrides["model"] = model
        try:
            language = language_code(asked.language)
        except ValueError as error:
            raise ApiError(400, str(error), param="language", code="invalid_language") from None
        if language is not None:
            overrides["language"] = language
        elif asked.language is not None and asked.language.strip().lower() == "auto":
            overrides["language"] = "auto"
        if asked.prompt:
            overrides["initial_prompt"] = asked.prompt
        if asked.task is not None:
            if asked.task not in ("transcribe", "translate"):
                raise ApiError(400, f"task {asked.task!r} is not transcribe or translate", param="task")
            overrides["task"] = asked.task
        if asked.words:
            overrides["word_timestamps"] = True
        if asked.vad_filter is not None:
            overrides["vad_filter"] = asked.vad_filter
        if asked.temperature is not None:
            if not 0 <= asked.temperature <= 1:  # NaN too
                raise ApiError(400, f"temperature {asked.temperature:g} is not between 0 and 1: send 0 (beam search, "
                                    "the default) or a sampling temperature up to 1", param="temperature",
                               code="invalid_temperature")
            if asked.temperature > 0:  # 0 is OpenAI's default: the same decoding, and the same job, as none
                overrides["temperature"] = float(asked.temperature)
        try:
            planned = self.pipeline.plan(profile=asked.profile or None, overrides=overrides)
        except ProfileError as error:  # an unknown profile, or what an English-only model cannot do
            raise self._refusal(str(error)) from None
        problem = capability_problem(planned.options)
        if problem:
            raise self._refusal(problem)
        return planned

    @staticmethod
    def _refusal(message: str) -> ApiError:
        """The 400 for options that cannot be planned, naming the parameter: `task` for translate and
        `language` for a language an English-only model cannot do (each with its code), else `profile`."""
        if "cannot translate" in message:
            return ApiError(400, message, param="task", code="translate_unsupported")
        if "cannot transcribe language" in message:
            return ApiError(400, message, param="language", code="language_unsupported")
        return ApiError(400, message, param="profile" if "profile" in message else None)

    # one upload

    async def accept(self, upload: Any, asked: Asked, *, raw_pcm: bool = False, video_file: str | None = None) -> Accepted:
        """Store `upload` (a Starlette UploadFile) durably, check it is media, and record it as a
        source of its job; the job is scheduled. `video_file`: the name of the video the audio comes
        from (Bazarr's), which names the outputs. Raises ApiError (400, 413, 415) with nothing kept."""
        if upload is None or not hasattr(upload, "file"):
            raise ApiError(422, "no file in the request: send the audio as a multipart file field", code="no_file")
        planned = self.plan(asked)
        loop = asyncio.get_running_loop()
        write_outbox = asked.outbox is not False
        request = {"formats": list(planned.formats), "profile": planned.profile, "video_file": video_file}
        try:
            stored = await loop.run_in_executor(
                self.pipeline.context.io, lambda: uploads.store(upload.file, self.state_dir, upload.filename, self.limit,
                                                         raw_pcm=raw_pcm, write_outbox=write_outbox, request=request))
        except uploads.TooLarge as error:
            raise ApiError(413, f"{error}; send a smaller file, or raise api.max_upload_mb in config.yaml",
                           code="too_large") from None
        finally:
            await upload.close()  # the parser's spooled copy: gone now, not when a synchronous answer is sent
        try:
            await loop.run_in_executor(self.pipeline.context.io, uploads.probe, stored.path, upload.filename)
        except uploads.NotMedia as error:
            await loop.run_in_executor(self.pipeline.context.io, uploads.remove, self.state_dir, stored.relpath)
            raise ApiError(415, str(error), param="file", code="not_media") from None
        except BaseException:
            await loop.run_in_executor(self.pipeline.context.io, uploads.remove, self.state_dir, stored.relpath)
            raise
        job, source = self.pipeline.submit(stored.relpath, stored.sha256, stored.size, stored.mtime_ns, stored.inode,
                                           planned.options)
        return Accepted(job.job_id, source.id, stored.relpath, upload.filename, planned.options.task,
                        duplicate=job.stage != "new" or len(self.pipeline.ledger.sources_of(job.job_id)) > 1,
                        profile=planned.profile)

    async def finish(self, accepted: Accepted) -> tuple[dict, dict]:
        """Wait up to `api.sync_timeout` for the job; return (its Result, the extra keys a response
        carries: job id, route, host, fallback reason, model, profile, outbox). Raises ApiError:
        422 when the job failed, 504 at the timeout, 503 when the daemon stops first."""
        settled = await self.pipeline.settled(accepted.job_id, accepted.source_id, float(self.config.api.sync_timeout))
        extra = {"job_id": accepted.job_id, "status_url": f"/v1/jobs/{accepted.job_id}"}
        if not settled:
            if self.pipeline.shutdown.is_set():
                raise ApiError(503, "the daemon is stopping; the job is kept and resumes when it starts again: "
                                    f"GET /v1/jobs/{accepted.job_id} then", code="stopping", extra=extra)
            raise ApiError(504, f"no transcript within api.sync_timeout ({self.config.api.sync_timeout:g} s); the job "
                                f"goes on: GET /v1/jobs/{accepted.job_id} (or send async=true next time)",
                           code="timeout", extra=extra)
        source = self.pipeline.ledger.source(accepted.source_id)
        job = self.pipeline.ledger.job(accepted.job_id)
        if source.state != "done" or job is None or job.stage == "failed":
            raise self.failure(accepted.job_id, job, source, accepted.filename or Path(accepted.relpath).name)
        result = await self.result(accepted.job_id)
        return result, {**self.extra(result, job), "profile": accepted.profile,
                        "outbox": (source.outputs or {}).get("base")}

    def failure(self, job_id: str, job: Any, source: Any, shown: str | None = None) -> ApiError:
        """The ApiError of a job that failed (422: the upload could not be transcribed), naming the
        upload as `shown` (the client's file name), never by the daemon's own paths."""
        error = (job.last_error if job else None) or (source.last_error if source else None) or "unknown error"
        kind, _, message = error.partition(": ")
        hint = self.scrubbed(job.hint, shown) if job else None
        return ApiError(422, f"could not transcribe the upload: {self.scrubbed(message or kind, shown)}",
                        code=kind if message else "failed", extra={"job_id": job_id, "hint": hint})

    def scrubbed(self, text: str | None, shown: str | None = None) -> str | None:
        """`text` (a job's error or hint) without the daemon's own paths: one under state_dir (the
        upload, its extracted audio) becomes `shown` quoted (the name the client gave, or "the
        upload"); one under the inbox, outbox, archive or failed folder its path relative to it."""
        if not text:
            return text
        folders = {str(self.config.path(key)): key for key in ("state_dir", "inbox", "outbox", "archive", "failed")}
        pattern = "|".join(re.escape(folder) for folder in sorted(folders, key=len, reverse=True))

        def replace(match: re.Match) -> str:
            folder = match.group(1) or match.group(3)
            rest = (match.group(2) or match.group(4) or "").lstrip("/")
            if folders[folder] == "state_dir":
                return repr(shown) if shown else "the upload"
            return repr(rest) if rest else folders[folder]

        return re.sub(rf"'({pattern})(/[^']*)?'|({pattern})(/[^\s'\":,;]*)?", replace, text)

    async def result(self, job_id: str) -> dict:
        """The job's cached Result (state/results). Raises ApiError 404 when it is gone."""
        path = self.pipeline.result_path(job_id)
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.pipeline.context.io, lambda: json.loads(Path(path).read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise ApiError(404, f"the Result of job {job_id} is no longer kept (results_days); send the file again",
                           code="result_expired") from None

    @staticmethod
    def extra(result: dict, job: Any) -> dict:
        """The whisperdrop keys beside a response's own: where it ran and why there."""
        executed = result.get("executed_on") or {}
        return {"job_id": result.get("job_id") or job.job_id, "route": executed.get("route") or job.route,
                "host": executed.get("host"), "fallback_reason": result.get("fallback_reason"),
                "model": result.get("model"), "duration": result.get("duration"), "profile": result.get("profile")}

    # /detect-language

    async def detect_language(self, upload: Any, *, raw_pcm: bool = False) -> Any:
        """The language of `upload` from its first speech (`detect.detect_upload`): stored under
        state_dir, checked as media, extracted and detected in a worker thread (one at a time),
        removed. No job is made.
        Raises ApiError: 413, 415, 422 (only an English-only model here and the speech not English),
        503 (the model that detects cannot load)."""
        from whisperdrop.daemon.api import detect
        from whisperdrop.daemon.extract import MediaError
        from whisperdrop.engine.engine import Engine, EngineError

        if upload is None or not hasattr(upload, "file"):
            raise ApiError(422, "no file in the request: send the audio as a multipart file field", code="no_file")
        loop = asyncio.get_running_loop()
        io = self.pipeline.context.io
        try:
            stored = await loop.run_in_executor(io, lambda: uploads.store(
                upload.file, self.state_dir, upload.filename, self.limit, raw_pcm=raw_pcm, write_outbox=False))
        except uploads.TooLarge as error:
            raise ApiError(413, f"{error}; send a smaller file, or raise api.max_upload_mb in config.yaml",
                           code="too_large") from None
        try:
            await loop.run_in_executor(io, uploads.probe, stored.path, upload.filename)
            if self._detector is None:
                self._detector = (Engine(max_models=1), asyncio.Lock())
            engine, lock = self._detector
            async with lock:
                return await asyncio.to_thread(detect.detect_upload, engine, stored.path, self.config.local,
                                               self.config.audio.bitrate_kbps)
        except uploads.NotMedia as error:
            raise ApiError(415, str(error), param="file", code="not_media") from None
        except MediaError as error:
            shown = upload.filename or "the upload"   # the daemon's own paths stay its own
            raise ApiError(415, f"{shown}: {error.reason.replace(str(stored.path), shown)}", param="file",
                           code="not_media") from None
        except detect.Undetectable as error:
            raise ApiError(422, str(error), code="language_undetectable") from None
        except EngineError as error:   # its message may name the daemon's folders: those stay in its log
            model = detect.detector_model(self.config.local.model) or self.config.local.model
            self.log.error("api.detect_unavailable", model=model, error=str(error))
            raise ApiError(503, f"cannot detect the language: the model that detects ({model}) cannot load here; "
                                "`whisperdrop doctor` on the daemon's machine says why", code="model_unavailable") from None
        finally:
            await loop.run_in_executor(io, uploads.remove, self.state_dir, stored.relpath)

    # asynchronous jobs and health

    def view(self, job_id: str) -> dict:
        """A job as `GET /v1/jobs/{id}` shows it: status, stage, progress, route, error. Raises ApiError 404."""
        job = self.pipeline.ledger.job(job_id) if len(job_id) == 64 else None
        if job is None:
            raise ApiError(404, f"no job {job_id!r} in the ledger; POST the file to /v1/jobs to make one",
                           param="job_id", code="no_such_job")
        uploaded = [source for source in self.pipeline.ledger.sources_of(job_id) if uploads.is_upload(source.relpath)]
        shown = Path(uploaded[0].relpath).name if uploaded else None
        status = {"new": "queued", "done": "done", "failed": "failed"}.get(job.stage, "running")
        if job.stage == "transcribed":
            status = "running"
        return {"job_id": job.job_id, "status": status, "stage": job.stage, "progress": job.progress,
                "duration": job.duration, "route": job.route, "host": job.host, "fallback_reason": job.fallback_reason,
                "attempts": job.attempts, "error": self.scrubbed(job.last_error, shown),
                "hint": self.scrubbed(job.hint, shown) if job.stage == "failed" else None,
                "created_at": job.created_at, "updated_at": job.updated_at, "finished_at": job.finished_at}

    def health(self) -> dict:
        """`GET /health`: the original plan's {"status", "model"}, each route's state, and the API's
        bounds with how full they are (`api`: connections, uploads in flight, refusals by reason)."""
        now = time.time()
        hosts = []
        for state in getattr(self.remote, "states", []):
            hosts.append({"name": state.name, "state": host_state(state, now),
                          "runners": len(state.runners), "in_flight": state.in_flight, "failures": state.failures,
                          "last_error": state.last_error,
                          "retry_in_s": round(state.down_until - now, 1) if state.down_until > now else None})
        local = self.local_route()
        serving = local["role"] != "off" or any(host["state"] != "down" for host in hosts)
        return {"status": "healthy" if serving else "degraded", "model": self.pipeline.options.model,
                "provider": self.pipeline.router.provider, "hosts": hosts, "local": local,
                "jobs_in_progress": self.pipeline.busy(), **({"api": self.figures()} if self.figures else {})}

    def local_route(self) -> dict:
        """The local route: its model and device, and its role: every job, the fallback, or off."""
        provider = self.pipeline.router.provider
        local_on = self.remote is None or provider in ("auto", "local")
        return {"model": self.config.local.model, "device": self.config.local.device,
                "role": ("every job" if self.remote is None or provider == "local" else "fallback")
                if local_on else "off"}
