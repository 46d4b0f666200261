"""ASGI middleware: the API key check and the request body size limit.

Both are plain ASGI (not Starlette's BaseHTTPMiddleware) so that they neither buffer
responses nor get in the way of the routes' own disconnect detection.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.server.errors import AUTHENTICATION, APIError

#: default request body limit; a prompt this long is far beyond any context
DEFAULT_MAX_BODY_BYTES = 16 * 2**20


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class ApiKeyMiddleware:
    """Requires ``Authorization: Bearer <key>`` on ``/v1/*``; other routes stay open."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == "/v1" or path.startswith("/v1/")):
            await self.app(scope, receive, send)
            return
        auth = _header(scope, b"authorization")
        if auth is None:
            message = "no API key: send it as 'Authorization: Bearer <key>'"
        else:
            scheme, _, given = auth.partition(" ")
            # Headers arrive as bytes decoded latin-1; encoding back the same way recovers the
            # bytes sent, so a UTF-8 key compares equal to its UTF-8 encoding.
            if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"), self.key):
                await self.app(scope, receive, send)
                return
            message = "incorrect API key"
        err = APIError(
            401, message, type=AUTHENTICATION, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )
        await err.response()(scope, receive, send)


class BodySizeLimitMiddleware:
    """Answers 413 to a request body over ``max_bytes`` without reading the rest of it.

    The body is read here and replayed to the app; later ``receive()`` calls go to the
    server, so the app still sees ``http.disconnect`` when the client leaves.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: int | None) -> APIError:
        got = f" ({size} bytes)" if size is not None else ""
        return APIError(
            413,
            f"the request body is too large{got}; the limit is {self.max_bytes} bytes",
            code="request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await APIError(400, "the Content-Length header is not a number").response()(
                    scope, receive, send
                )
                return
            if declared > self.max_bytes:
                await self._too_large(declared).response()(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        first: Message | None = None
        while True:
            message = await receive()
            if message["type"] != "http.request":
                first = message  # the client left before sending everything
                break
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._too_large(None).response()(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        pending: list[Message] = [
            first or {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        ]

        async def replay() -> Message:
            if pending:
                return pending.pop()
            return await receive()

        await self.app(scope, replay, send)
