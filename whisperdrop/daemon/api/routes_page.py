"""The page at `/` (HTML, one script, one style sheet, all in `page/`) and the small JSON it reads.

    GET /                               the page (its shell holds no data)
    GET /page/app.js, /page/style.css   its script and style
    GET /v1/jobs?hours=24               queued and running jobs, and those finished in the last hours
    GET /v1/hosts                       each GPU host (up, down and why, its runners), the local route
    GET /v1/throughput?hours=24         audio hours and real-time factor per route, per hour
    GET /v1/jobs/{id}/audio             a done job's extracted audio (Ogg Opus), while it is kept
    GET /v1/jobs/{id}/transcript.{fmt}  its transcript as json, srt, vtt or txt

The page's three files are served to anyone who may reach the port (`PUBLIC_PATHS`: the Guard lets
them through without the token), so that a browser, which cannot send a bearer token when it opens
a URL, gets the page and the page asks for the token. Everything else, the JSON above included,
passes the same Guard as every API request. Files are found by job id only (64 hex digits, checked),
never by a name the client gives, and no answer names a path of the daemon's.
"""

from __future__ import annotations

import asyncio
import html
import json
import math
import time
from pathlib import Path

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from whisperdrop.daemon import outbox
from whisperdrop.daemon.api import overview
from whisperdrop.daemon.api.errors import ApiError
from whisperdrop.daemon.api.routes_native import service_of
from whisperdrop.daemon.ledger import Ledger
from whisperdrop.outputs.subtitles import Limits
from whisperdrop.shared.spool import ProtocolError, check_job_id

router = APIRouter()

PAGE_DIR = Path(__file__).resolve().parent / "page"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
PUBLIC_PATHS = frozenset({"/", *(f"/page/{name}" for name in ASSETS)})
# The page runs nothing but its own script, fetches only from the daemon, plays audio from blobs.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; media-src blob:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache",
}
TRANSCRIPT_TYPES = {"json": "application/json", "srt": "text/plain; charset=utf-8", "vtt": "text/vtt; charset=utf-8",
                    "txt": "text/plain; charset=utf-8"}
MAX_HOURS = 24 * 30


@router.get("/", include_in_schema=False)
async def page(request: Request) -> HTMLResponse:
    """The page, with the upload limit filled in (the only setting it shows before it has a token)."""
    service = service_of(request)
    text = (PAGE_DIR / "index.html").read_text(encoding="utf-8")
    text = text.replace("{max_upload_mb}", html.escape(f"{float(service.config.api.max_upload_mb):g}"))
    return HTMLResponse(text, headers=PAGE_HEADERS)


@router.get("/page/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    """The page's script or style sheet (a fixed list: no other name reaches the file system)."""
    if name not in ASSETS:
        raise ApiError(404, f"no page file {name!r}; the page's files are {', '.join(ASSETS)}", code="not_found")
    return Response((PAGE_DIR / name).read_bytes(), media_type=ASSETS[name], headers=PAGE_HEADERS)


@router.get("/v1/jobs")
async def jobs(request: Request, hours: float = Query(24.0, gt=0, le=MAX_HOURS),
               limit: int = Query(200, ge=1, le=1000)) -> JSONResponse:
    """The jobs not finished (the first `limit`, oldest first), then up to `limit` finished in the
    last `hours`, newest first; `counts`: jobs per stage in the whole ledger."""
    service = service_of(request)
    pipeline, now = service.pipeline, time.time()
    ledger = pipeline.ledger
    states = getattr(service.remote, "states", [])
    waiting = pipeline.router.provider == "remote" and not any(overview.host_state(state, now) == "up"
                                                                for state in states)
    chosen = ledger.unfinished_jobs(limit) + ledger.recently_finished(now - hours * overview.HOUR_S, limit)
    rows = [overview.job_row(job, ledger.first_source(job.job_id), working=job.job_id in pipeline.current,
                             waiting_for_host=waiting, now=now, scrub=service.scrubbed) for job in chosen]
    return JSONResponse({"now": now, "hours": hours, "jobs": rows, "counts": ledger.stage_counts()})


@router.get("/v1/hosts")
async def hosts(request: Request) -> JSONResponse:
    """Each configured GPU host as the daemon last saw it, and the local route."""
    service = service_of(request)
    now = time.time()
    return JSONResponse({"provider": service.pipeline.router.provider, "now": now,
                         "hosts": [overview.host_row(state, now, service.scrubbed)
                                   for state in getattr(service.remote, "states", [])],
                         "local": service.local_route(), "jobs_in_progress": service.pipeline.busy()})


@router.get("/v1/throughput")
async def throughput(request: Request, hours: int = Query(24, ge=1, le=MAX_HOURS)) -> JSONResponse:
    """Per clock hour of the last `hours` (the current one last): jobs done, hours of audio and the
    real-time factor of each route. Read on a read-only connection, off the event loop."""
    service = service_of(request)
    now = time.time()
    since = (math.floor(now / overview.HOUR_S) - hours + 1) * overview.HOUR_S
    path = service.pipeline.ledger.path

    def read() -> list:
        ledger = Ledger(path, readonly=True)
        try:
            return ledger.done_by_interval(since, overview.HOUR_S)
        finally:
            ledger.close()

    rows = await asyncio.get_running_loop().run_in_executor(service.pipeline.context.io, read)
    return JSONResponse({"now": now, **overview.throughput(rows, since, hours)})


def _done_job(service, job_id: str):
    """The ledger's done job `job_id`. Raises ApiError 404 for a malformed id, an unknown job, or
    one not done (yet)."""
    try:
        check_job_id(job_id)
    except ProtocolError:
        raise ApiError(404, f"{job_id!r} is not a job id (64 hex digits)", param="job_id", code="no_such_job") from None
    job = service.pipeline.ledger.job(job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id!r} in the ledger", param="job_id", code="no_such_job")
    if job.stage != "done":
        raise ApiError(404, f"job {job_id} is {overview.status_of(job.stage)}, not done: it has no transcript yet",
                       param="job_id", code="not_done")
    return job


@router.get("/v1/jobs/{job_id}/audio")
async def audio(request: Request, job_id: str) -> Response:
    """The audio a done job was transcribed from (Ogg Opus, 16 kHz mono), kept api.keep_audio_hours."""
    service = service_of(request)
    _done_job(service, job_id)
    path = service.pipeline.kept_audio_path(job_id)
    if not path.is_file():
        hours = float(service.config.api.keep_audio_hours)
        raise ApiError(404, f"the audio of job {job_id} is no longer kept (api.keep_audio_hours: {hours:g}); "
                            "its transcript is", param="job_id", code="audio_expired")
    return FileResponse(path, media_type="audio/ogg", headers={"Cache-Control": "private, max-age=3600"})


@router.get("/v1/jobs/{job_id}/transcript.{fmt}")
async def transcript(request: Request, job_id: str, fmt: str) -> Response:
    """A done job's transcript: json (its Result), srt, vtt or txt (as the outbox has them), as an
    attachment named after its source."""
    if fmt not in TRANSCRIPT_TYPES:
        raise ApiError(404, f"no transcript format {fmt!r}: use one of {', '.join(TRANSCRIPT_TYPES)}", param="fmt",
                       code="unknown_format")
    service = service_of(request)
    _done_job(service, job_id)
    result = await service.result(job_id)
    if fmt == "json":
        body = json.dumps(result, ensure_ascii=False, indent=1).encode("utf-8")
    else:
        body = outbox.render(fmt, result, Limits.from_config(service.config.subtitles))
    stem = Path(overview.display_name(service.pipeline.ledger.first_source(job_id))).stem or "transcript"
    name = "".join(character if character.isascii() and character.isprintable() and character not in '"\\' else "_"
                   for character in stem)
    return Response(body, media_type=TRANSCRIPT_TYPES[fmt],
                    headers={"Content-Disposition": f'attachment; filename="{name}.{fmt}"'})

