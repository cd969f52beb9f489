"""whisper-asr-webservice's `POST /asr` and `POST /detect-language`, as Bazarr's Whisper provider
calls them: the file as `audio_file`, options as query parameters, and with `encode=false` the audio
sent as raw 16 kHz mono 16-bit PCM (stored as WAV here). `/detect-language` makes no job: it reads
the upload's first speech only (`detect`)."""

from __future__ import annotations

from fastapi import APIRouter, File, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from whisperdrop.daemon.api import formats
from whisperdrop.daemon.api.errors import ApiError
from whisperdrop.daemon.api.routes_native import accepted_response, service_of
from whisperdrop.daemon.api.routes_openai import headers_of
from whisperdrop.daemon.api.service import Asked
from whisperdrop.outputs.subtitles import Limits

router = APIRouter()


@router.post("/asr")
async def asr(
    request: Request, audio_file: UploadFile = File(...), task: str = Query("transcribe"),
    language: str | None = Query(None), initial_prompt: str | None = Query(None), output: str = Query("txt"),
    word_timestamps: bool = Query(False), vad_filter: bool | None = Query(None), encode: bool = Query(True),
    profile: str | None = Query(None), outbox: bool | None = Query(None), run_async: bool = Query(False, alias="async"),
    video_file: str | None = Query(None),
) -> Response:
    """The transcript in `output` (txt, vtt, srt, tsv, json), as an attachment named after the upload.
    `video_file` (Bazarr's "pass video name"): the video the audio comes from, which names the outputs."""
    if output not in formats.ASR_OUTPUTS:
        raise ApiError(400, f"output {output!r} is not one of {', '.join(formats.ASR_OUTPUTS)}", param="output")
    service = service_of(request)
    asked = Asked(language=language, prompt=initial_prompt, task=task, profile=profile,
                  words=word_timestamps or None, vad_filter=vad_filter, outbox=outbox)
    accepted = await service.accept(audio_file, asked, raw_pcm=not encode, video_file=video_file)
    if run_async:
        return accepted_response(service, accepted)
    result, extra = await service.finish(accepted)
    body, media_type = formats.asr(result, output, Limits.from_config(service.config.subtitles))
    name = "".join(character for character in audio_file.filename or "audio" if character.isprintable() and character != '"')
    headers = {**headers_of(extra), "Asr-Engine": "whisperdrop",
               "Content-Disposition": f'attachment; filename="{name}.{output}"'.encode("latin-1", "replace").decode("latin-1")}
    return Response(body, media_type=media_type, headers=headers)


@router.post("/detect-language")
async def detect_language(request: Request, audio_file: UploadFile = File(...), encode: bool = Query(True)) -> JSONResponse:
    """{"detected_language": name, "language_code": code} (and its probability, the model that judged
    it, and `language_warning` when doubtful), from the upload's first speech only (see `detect`):
    no job is made, nothing goes to the outbox."""
    answer = await service_of(request).detect_language(audio_file, raw_pcm=not encode)
    body = {"detected_language": formats.language_name(answer.code), "language_code": answer.code,
            "language_probability": answer.probability, "model": answer.model}
    if answer.warning:
        body["language_warning"] = answer.warning
    return JSONResponse(body)
