"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can see goes through here, so no route answers 422 (FastAPI's
default for a bad body), a bare-text 404, or a traceback. Values quoted back to the
client are clipped: a megabyte sent as ``temperature`` is never echoed back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

logger = logging.getLogger("tokenmill.server")

#: longest value quoted back inside an error message
QUOTE_LIMIT = 100
#: longest error message sent to a client
MESSAGE_LIMIT = 500

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
SERVER_ERROR = "server_error"


def clip(text: Any, limit: int = QUOTE_LIMIT) -> str:
    """``text`` as a string of at most about ``limit`` characters."""
    s = text if isinstance(text, str) else repr(text)
    if len(s) <= limit:
        return s
    return f"{s[:limit]}... ({len(s)} characters in all)"


class APIError(Exception):
    """An error answered to the client with ``status`` and OpenAI's error body.

    Args:
        status: HTTP status code.
        message: what went wrong and, where possible, what to do about it.
        type: OpenAI's error type (``invalid_request_error``, ``authentication_error``, ...).
        param: the request field at fault, if one is.
        code: a short machine-readable code (``model_not_found``, ...).
        headers: extra response headers (``Retry-After``, ``WWW-Authenticate``).
        extra: more fields for the error object (token counts of a context overflow).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = clip(message, MESSAGE_LIMIT)
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        error.update(self.extra)
        return {"error": error}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid_param(message: str, param: str | None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value" if param else None)


def _loc_path(loc: Iterable[Any]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def from_validation_errors(errors: list[Mapping[str, Any]]) -> APIError:
    """A 400 for the first of pydantic's errors, naming the field from its ``loc``."""
    if not errors:
        return APIError(400, "the request body is not valid")
    err = errors[0]
    loc = list(err.get("loc", ()))
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    kind = err.get("type", "")
    if kind == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {clip(err.get('msg', ''))}")
    if not loc:
        return APIError(400, "the request body must be a JSON object")
    path = _loc_path(loc)
    if kind == "missing":
        return APIError(400, f"'{path}' is required", param=path, code="missing_required_parameter")
    return invalid_param(f"invalid value for '{path}': {clip(err.get('msg', 'invalid'), 200)}", path)


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return from_validation_errors(list(exc.errors())).response()


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"no route {request.method} {clip(request.url.path)}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {clip(request.url.path)}"
    else:
        message = clip(str(exc.detail), MESSAGE_LIMIT)
    kind = SERVER_ERROR if exc.status_code >= 500 else INVALID_REQUEST
    err = APIError(exc.status_code, message, type=kind, code=_HTTP_CODES.get(exc.status_code))
    return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _client_left(_request: Request, _exc: Exception) -> JSONResponse:
    # The client left while sending its body; nobody reads this answer, and it is no server error.
    return APIError(400, "the client closed the connection before sending the whole request").response()


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises after this response is sent, so uvicorn logs the traceback;
    # the client only learns that the server failed.
    logger.error("unexpected error in %s %s: %s", request.method, request.url.path, type(exc).__name__)
    return APIError(
        500, "the server failed to handle this request", type=SERVER_ERROR, code="internal_error"
    ).response()


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_left)
    app.add_exception_handler(Exception, _unexpected)
