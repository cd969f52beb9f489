"""The API's errors: every failure a JSON body that names the problem and the fix, never a traceback.

The body is OpenAI's error shape, which its SDK reads: `{"error": {"message", "type", "param",
"code"}}`, with `job_id` beside it where a job exists. `install(app)` puts a handler on every error
FastAPI and Starlette raise, and on anything unexpected (500, logged with its traceback).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from whisperdrop.shared import log

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
         421: "invalid_request_error", 422: "invalid_request_error", 503: "service_unavailable", 504: "timeout"}


class ApiError(Exception):
    """A request the API answers with `status` and a message that says what is wrong and what to do."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 extra: dict | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.extra = extra or {}
        self.headers = headers


class BodyTooLarge(StarletteHTTPException):
    """The request body passed the upload limit while it was read (a Starlette HTTPException, so
    FastAPI's body parsing lets it through instead of calling it a parse error)."""

    code = "too_large"

    def __init__(self, limit: int):
        super().__init__(413, f"the upload is larger than api.max_upload_mb ({limit / 1e6:g} MB); send a smaller "
                              "file, or raise api.max_upload_mb in config.yaml")


class UploadsFull(StarletteHTTPException):
    """The uploads in flight passed `api.max_uploads_in_flight_mb` while this body was read (503, with
    Retry-After; a Starlette HTTPException for the same reason as BodyTooLarge)."""

    code = "uploads_full"

    def __init__(self, why: str, retry_after_s: int):
        super().__init__(503, f"too many uploads in flight: {why}; try again later",
                         headers={"Retry-After": str(retry_after_s)})


def body(status: int, message: str, param: str | None = None, code: str | None = None, **extra: Any) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "api_error"), "param": param, "code": code},
            **extra}


def response(status: int, message: str, param: str | None = None, code: str | None = None,
             headers: dict | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse(body(status, message, param, code, **extra), status_code=status, headers=headers)


def _field(location: tuple) -> str:
    names = [str(part) for part in location if part not in ("body", "query", "path", "header")]
    return ".".join(names) or "request"


def install(app: FastAPI) -> None:
    """Handlers that turn every error into a JSON body (see the module's doc)."""
    logger = log.get("api")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return response(error.status, error.message, error.param, error.code, headers=error.headers, **error.extra)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = []
        for item in error.errors():
            field = _field(tuple(item.get("loc") or ()))
            message = "missing" if item.get("type") == "missing" else item.get("msg", "invalid")
            problems.append(f"{field}: {message}")
        first = _field(tuple((error.errors() or [{}])[0].get("loc") or ()))
        return response(422, "bad or missing field(s): " + "; ".join(problems) + f" (see {request.url.path} in "
                        "docs/api.md)", param=first, code="invalid_field")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = str(error.detail)
        if error.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}; see docs/api.md"
        elif error.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; see docs/api.md"
        return response(error.status_code, message, code=getattr(error, "code", None),
                        headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.error("api.error", method=request.method, path=request.url.path, error=f"{type(error).__name__}: {error}",
                     exc_info=error)
        return response(500, f"internal error ({type(error).__name__}); the daemon's log has the details (api.error)")
