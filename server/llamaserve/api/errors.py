"""Every error leaves the server in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Bad input is a 400 that names the parameter (FastAPI's 422 is overridden), an unknown model a 404,
a request past its deadline a 408, a dead or stalled engine a 503; anything unexpected is logged here and answered with a bare 500, never a trace.
"""

import json
import logging
from collections.abc import Callable

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from llamaserve.api.protocol import ErrorInfo, ErrorResponse
from llamaserve.engine.client import EngineDeadError, EngineStalledError, RequestTimeoutError

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    @property
    def info(self) -> ErrorInfo:
        # An overloaded server is not the request's fault: the client should retry, not fix it.
        kind = "invalid_request_error" if self.status < 500 and self.status != 429 else "server_error"
        return ErrorInfo(message=self.message, type=kind, param=self.param, code=self.code)

    def response(self) -> Response:
        # ASCII-escaped, so a message quoting the request (a lone surrogate included) always encodes.
        body = json.dumps(ErrorResponse(error=self.info).model_dump())
        return Response(body, status_code=self.status, headers=self.headers, media_type="application/json")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"the request body exceeds this server's limit of {limit} bytes (--max-request-body-bytes)",
                    code="request_too_large")


def overloaded(limit: int) -> APIError:
    return APIError(429, f"the server is at its limit of {limit} concurrent generations; retry shortly",
                    code="overloaded", headers={"Retry-After": "1"})


def engine_dead() -> APIError:
    return APIError(503, "the inference engine is not running", code="engine_dead")


def engine_stalled() -> APIError:
    return APIError(503, "the inference engine has stopped making progress", code="engine_stalled")


def request_timeout() -> APIError:
    return APIError(408, "the request did not complete within its time limit (--request-timeout or the "
                    "x-request-timeout header); it was stopped", code="request_timeout")


def engine_request_error(message: str | None, error_type: str | None) -> APIError:
    """A request the engine failed: refused as invalid (400), or hit by a fault while it ran (500)."""
    if error_type == "engine_error":
        return APIError(500, message or "the engine failed while running the request", code="engine_error")
    return bad_request(message or "the engine refused the request")


def internal_error() -> APIError:
    return APIError(500, "internal server error", code="internal_error")


def as_api_error(error: Exception) -> APIError:
    """The APIError a failure maps to; unexpected ones are logged with their traceback here."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, EngineStalledError):
        return engine_stalled()
    if isinstance(error, EngineDeadError):
        return engine_dead()
    if isinstance(error, RequestTimeoutError):
        return request_timeout()
    log.error("unexpected error while serving a request", exc_info=error)
    return internal_error()


def _param(loc: tuple) -> str | None:
    """'messages.0.content' from a pydantic location, without its leading 'body' and without the tags
    pydantic adds for union members ('str', 'list[int]', 'TextPart')."""
    parts = []
    for part in loc[1:]:
        if part == "[key]":  # a bad key of a mapping: name the mapping, not the key
            parts.pop()
            break
        if isinstance(part, str) and ("[" in part or part[:1].isupper() or part in ("str", "int", "float", "bool")):
            break
        parts.append(str(part))
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> APIError:
    # A union reports one error per member; the deepest one is the most specific.
    error = max(exc.errors(), key=lambda e: len(e["loc"]))
    param = _param(tuple(error["loc"]))
    if error["type"] == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        return bad_request(f"The request body is not valid JSON: {detail}".rstrip(": "))
    if param is None:
        return bad_request("The request body must be a JSON object (sent with Content-Type: application/json)")
    if error["type"] == "missing":
        return bad_request(f"Missing required parameter: '{param}'", param)
    return bad_request(f"Invalid value for '{param}': {error['msg']}", param)


def install_error_handlers(app: FastAPI, on_rejected: Callable[[Request, APIError], None] | None = None) -> None:
    """`on_rejected(request, error)` hears of every error answered by a matched route (for metrics)."""

    def refuse(request: Request, error: APIError) -> Response:
        if on_rejected is not None:
            on_rejected(request, error)
        return error.response()

    async def on_api_error(request: Request, exc: APIError) -> Response:
        return refuse(request, exc)

    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        return refuse(request, validation_error(exc))

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 413: "request_too_large"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    async def on_engine_failure(request: Request, exc: EngineDeadError | RequestTimeoutError) -> Response:
        return refuse(request, as_api_error(exc))

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        return internal_error().response()  # Starlette re-raises it after this, so uvicorn logs the trace

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(EngineDeadError, on_engine_failure)
    app.add_exception_handler(RequestTimeoutError, on_engine_failure)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
