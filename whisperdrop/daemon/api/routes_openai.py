"""OpenAI's transcription API: `POST /v1/audio/transcriptions` and `/v1/audio/translations`, with
the fields and response formats that API defines (and its error shape, which its SDK reads)."""

from __future__ import annotations

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from whisperdrop.daemon.api import formats
from whisperdrop.daemon.api.errors import ApiError
from whisperdrop.daemon.api.routes_native import accepted_response, service_of
from whisperdrop.daemon.api.service import Asked
from whisperdrop.outputs.subtitles import Limits

router = APIRouter()


def headers_of(extra: dict) -> dict:
    """whisperdrop's keys as response headers, for the formats that are not JSON."""
    names = {"job_id": "X-Whisperdrop-Job", "route": "X-Whisperdrop-Route", "host": "X-Whisperdrop-Host",
             "fallback_reason": "X-Whisperdrop-Fallback-Reason", "model": "X-Whisperdrop-Model"}
    return {header: str(extra[key]).encode("latin-1", "replace").decode("latin-1").replace("\n", " ")
            for key, header in names.items() if extra.get(key) is not None}


async def _audio(request: Request, task: str, file: UploadFile, model: str | None, language: str | None,
                 prompt: str | None, response_format: str, temperature: float | None, granularities: list[str],
                 profile: str | None, outbox: bool | None, run_async: bool) -> Response:
    if response_format not in formats.OPENAI_FORMATS:
        raise ApiError(400, f"response_format {response_format!r} is not one of {', '.join(formats.OPENAI_FORMATS)}",
                       param="response_format")
    unknown = [value for value in granularities if value not in ("word", "segment")]
    if unknown:
        raise ApiError(400, f"timestamp_granularities[] {unknown[0]!r} is not word or segment",
                       param="timestamp_granularities")
    service = service_of(request)
    asked = Asked(model=model, language=None if task == "translate" and not language else language, prompt=prompt,
                  task=task, profile=profile, words="word" in granularities or None, outbox=outbox,
                  temperature=temperature)
    accepted = await service.accept(file, asked)
    if run_async:
        return accepted_response(service, accepted)
    result, extra = await service.finish(accepted)
    limits = Limits.from_config(service.config.subtitles)
    body, media_type = formats.openai(result, response_format, granularities, task, limits,
                                      {"job_id": extra["job_id"], "route": extra["route"],
                                       "fallback_reason": extra["fallback_reason"]}
                                      if response_format == "verbose_json" else {})
    if isinstance(body, dict):
        return JSONResponse(body, headers=headers_of(extra))
    return Response(body, media_type=media_type, headers=headers_of(extra))


@router.post("/v1/audio/transcriptions")
async def transcriptions(
    request: Request, file: UploadFile = File(...), model: str | None = Form(None), language: str | None = Form(None),
    prompt: str | None = Form(None), response_format: str = Form("json"), temperature: float | None = Form(None),
    timestamp_granularities: list[str] = Form([], alias="timestamp_granularities[]"),
    profile: str | None = Form(None), outbox: bool | None = Form(None), run_async: bool = Query(False, alias="async"),
) -> Response:
    """Speech to text in its own language."""
    return await _audio(request, "transcribe", file, model, language, prompt, response_format, temperature,
                        timestamp_granularities, profile, outbox, run_async)


@router.post("/v1/audio/translations")
async def translations(
    request: Request, file: UploadFile = File(...), model: str | None = Form(None), prompt: str | None = Form(None),
    response_format: str = Form("json"), temperature: float | None = Form(None),
    profile: str | None = Form(None), outbox: bool | None = Form(None), run_async: bool = Query(False, alias="async"),
) -> Response:
    """Speech in any language to English text (needs a multilingual model)."""
    return await _audio(request, "translate", file, model, None, prompt, response_format, temperature, [],
                        profile, outbox, run_async)
