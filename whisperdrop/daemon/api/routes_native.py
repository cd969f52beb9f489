"""The original plan's contract (`POST /transcribe`, `GET /health`) and the asynchronous jobs
(`POST /v1/jobs`, `GET /v1/jobs/{id}`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse

from whisperdrop.daemon.api import formats
from whisperdrop.daemon.api.service import Accepted, ApiService, Asked

router = APIRouter()


def service_of(request: Request) -> ApiService:
    return request.app.state.service


def accepted_response(service: ApiService, accepted: Accepted) -> JSONResponse:
    """202 for an asynchronous request: the job id at once, and where to ask for it."""
    view = service.view(accepted.job_id)
    return JSONResponse({"job_id": accepted.job_id, "status": view["status"], "stage": view["stage"],
                         "status_url": f"/v1/jobs/{accepted.job_id}", "duplicate": accepted.duplicate},
                        status_code=202, headers={"Location": f"/v1/jobs/{accepted.job_id}"})


def native_options(
    model: str | None = Form(None), prompt: str | None = Form(None), language: str | None = Form(None),
    profile: str | None = Form(None), task: str | None = Form(None), outbox: bool | None = Form(None),
    word_timestamps: bool | None = Form(None),
) -> Asked:
    """The options `POST /transcribe` and `POST /v1/jobs` take, as form fields beside the file."""
    return Asked(model=model, language=language, prompt=prompt, task=task, profile=profile, outbox=outbox,
                 words=word_timestamps)


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """{"status": "healthy", "model": ...} and each GPU host's state and the local route's."""
    return JSONResponse(service_of(request).health())


@router.post("/transcribe")
async def transcribe(
    request: Request,
    audio: UploadFile = File(..., description="the audio or video file"),
    asked: Asked = Depends(native_options),
    run_async: bool = Query(False, alias="async"),
) -> JSONResponse:
    """The original plan's contract: {"text", "language", "segments": [{"start", "end", "text"}]} and
    whisperdrop's own keys (job_id, route, host, fallback_reason, model, outbox) beside them."""
    service = service_of(request)
    accepted = await service.accept(audio, asked)
    if run_async:
        return accepted_response(service, accepted)
    result, extra = await service.finish(accepted)
    return JSONResponse(formats.native(result, extra))


@router.post("/v1/jobs")
async def submit_job(
    request: Request,
    file: UploadFile = File(..., description="the audio or video file"),
    asked: Asked = Depends(native_options),
) -> JSONResponse:
    """An asynchronous job: 202 with its id as soon as the upload is stored and recorded."""
    service = service_of(request)
    return accepted_response(service, await service.accept(file, asked))


@router.get("/v1/jobs/{job_id}")
async def job(request: Request, job_id: str) -> JSONResponse:
    """A job's status, stage and progress; once done, `result` in the original plan's shape
    (with each segment's words)."""
    service = service_of(request)
    view = service.view(job_id)
    if view["status"] == "done":
        result = await service.result(job_id)
        body = formats.native(result, {})
        for segment, original in zip(body["segments"], result.get("segments") or []):
            segment["words"] = original.get("words") or []
        view["result"] = body
        view.update(model=result.get("model"), language=result.get("language"), profile=result.get("profile"))
    return JSONResponse(view)
