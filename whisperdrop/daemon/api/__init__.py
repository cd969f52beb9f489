"""The daemon's HTTP API: the original plan's `POST /transcribe` and `GET /health`, the OpenAI
transcription API, whisper-asr-webservice's `/asr`, asynchronous jobs, and the page at `/`.

Every request becomes a job in the daemon's ledger, routed like a dropped file (see `uploads`).

    server (uvicorn on the daemon's loop, `app`) -> connections (a bound on open connections,
        deadlines for a request's head and body) -> guard (Host, who may call, Origin, uploads in
        flight, size limit, the request log) -> routes_native | routes_openai | routes_asr
        -> service (store, submit, wait) -> Pipeline (`/detect-language`: service -> detect, the
        first speech only, no job); responses are rendered by `formats`, errors
        by `errors`; what a client does wrong is counted into log lines by `rejections`
        -> routes_page: the page (`page/`: HTML, script, style) and the JSON it reads (`overview`),
        behind the same connections and guard

This package's `__init__` imports nothing, so the pipeline's stages can use `uploads` without
loading FastAPI.
"""
