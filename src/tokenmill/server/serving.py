"""What the completion routes share: starting a generation, watching for a client that
leaves, turning engine snapshots into per-choice deltas, SSE framing, logprobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tokenmill.generation.async_engine import EngineDeadError, EngineOverloadedError
from tokenmill.generation.errors import ContextLengthError
from tokenmill.generation.outputs import CompletionOutput, RequestOutput
from tokenmill.generation.sampling_params import SamplingParams
from tokenmill.server.errors import SERVER_ERROR, APIError, clip
from tokenmill.server.protocol import invalid_param_from

logger = logging.getLogger("tokenmill.server")

# A text longer than this is tokenized on a worker thread so the event loop keeps serving.
_OFFLOAD_CHARS = 20_000
# JSON has no -inf; a token the model rules out gets this log-probability instead.
_MIN_LOGPROB = -9999.0


@dataclass
class ServerState:
    """What the routes need; one per app."""

    engine: Any
    model_name: str
    request_timeout: float | None = None
    created: int = field(default_factory=lambda: int(time.time()))


async def run_blocking(fn: Callable[..., Any], *args: Any, size: int = 0, **kwargs: Any) -> Any:
    """``fn(*args)`` inline when ``size`` is small, else on a worker thread."""
    if size > _OFFLOAD_CHARS:
        return await asyncio.to_thread(fn, *args, **kwargs)
    return fn(*args, **kwargs)


def check_model(state: ServerState, model: str | None) -> None:
    """A request may omit ``model``; if it names one, it must be the served one."""
    if model is not None and model != state.model_name:
        raise APIError(
            404,
            f"the model '{clip(model)}' does not exist; this server serves '{state.model_name}'",
            param="model",
            code="model_not_found",
        )


def overloaded(e: Exception) -> APIError:
    return APIError(
        503,
        f"the server is overloaded: too many requests are waiting ({e}); retry later",
        type=SERVER_ERROR,
        code="engine_overloaded",
        headers={"Retry-After": "1"},
    )


def engine_dead(e: Exception | None = None) -> APIError:
    why = f": {e}" if e and str(e) else ""
    return APIError(503, f"the engine is not running{why}", type=SERVER_ERROR, code="engine_not_running")


class DisconnectWatcher:
    """Notices the client closing the connection, then calls ``on_disconnect`` once.

    It waits on the ASGI ``receive`` channel, which yields ``http.disconnect`` when the
    client leaves; no polling. ``stop()`` it before the response is complete: the
    server also answers ``http.disconnect`` once a response has been sent.
    """

    def __init__(self, receive: Receive, on_disconnect: Callable[[], None]) -> None:
        self.disconnected = False
        self._receive = receive
        self._on_disconnect = on_disconnect
        #: done once the client has left (or the watch was stopped)
        self.task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                self._on_disconnect()
                return

    def stop(self) -> None:
        self.task.cancel()


async def next_or_disconnect(stream: AsyncIterator[Any], watcher: DisconnectWatcher) -> Any:
    """The stream's next item, or None when it ended or the client left first.

    Racing the stream against the watcher ends the wait as soon as the client leaves,
    without waiting for the engine's next step; the pending step is cancelled, which
    ends the engine stream (and aborts the request).
    """
    step = asyncio.ensure_future(stream.__anext__())
    try:
        await asyncio.wait({step, watcher.task}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        step.cancel()
        raise
    if not step.done():
        step.cancel()
        await asyncio.wait({step})
        return None
    try:
        return step.result()
    except StopAsyncIteration:
        return None


@dataclass
class Generation:
    """A running engine request whose first snapshot is already here (so overload and
    engine errors became HTTP errors before any response started)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    first: RequestOutput | None
    stream: Any
    watcher: DisconnectWatcher

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """Cumulative snapshots until the request finishes or the client leaves."""
        out = self.first
        while out is not None:
            yield out
            if out.finished:
                return
            out = await next_or_disconnect(self.stream, self.watcher)

    async def close(self) -> None:
        """Stop watching and close the engine stream, which aborts the request if it runs."""
        self.watcher.stop()
        with contextlib.suppress(Exception):
            await self.stream.aclose()


def resolve(
    state: ServerState, params: SamplingParams, prompt_len: int, names: dict[str, str]
) -> SamplingParams:
    """The engine's resolved params; a context overflow or bad value is a 400."""
    try:
        return state.engine.resolve_params(params, prompt_len)
    except ContextLengthError as e:
        overflow = e.prompt_tokens >= e.max_model_len
        param = names.get("prompt", "prompt") if overflow else names.get("max_tokens", "max_tokens")
        raise APIError(
            400,
            f"this model's context is {e.max_model_len} tokens, but the request asks for "
            f"{e.prompt_tokens + e.max_tokens} ({e.prompt_tokens} in the prompt and {e.max_tokens} "
            "to generate); shorten the prompt or lower max_tokens",
            param=param,
            code="context_length_exceeded",
            extra={
                "prompt_tokens": e.prompt_tokens,
                "max_tokens": e.max_tokens,
                "max_model_len": e.max_model_len,
            },
        ) from None
    except ValueError as e:
        raise invalid_param_from(e, names) from None


async def start_generation(
    state: ServerState, request: Request, prompt_ids: list[int], params: SamplingParams, request_id: str
) -> Generation:
    """Submit to the engine and wait for its first snapshot (None if the client left first)."""
    engine = state.engine
    deadline = time.monotonic() + state.request_timeout if state.request_timeout else None
    watcher = DisconnectWatcher(request.receive, lambda: engine.abort(request_id))
    stream = engine.generate(prompt_ids, params, request_id, deadline=deadline)
    gen = Generation(request_id, prompt_ids, params, None, stream, watcher)
    try:
        gen.first = await next_or_disconnect(stream, watcher)
    except BaseException as e:
        await gen.close()
        if isinstance(e, EngineOverloadedError):
            raise overloaded(e) from None
        if isinstance(e, EngineDeadError):
            raise engine_dead(e) from None
        if isinstance(e, ValueError):
            raise invalid_param_from(e, {}) from None
        raise
    return gen


async def collect(gen: Generation) -> RequestOutput | None:
    """The final snapshot of a generation (non-streaming responses)."""
    last = None
    try:
        async for out in gen.outputs():
            last = out
    except EngineDeadError as e:
        raise engine_dead(e) from None
    finally:
        await gen.close()
    return last


def usage(prompt_tokens: int, outputs: list[CompletionOutput]) -> dict[str, int]:
    completion = sum(len(o.token_ids) for o in outputs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


# -- streaming ---------------------------------------------------------------------


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


@dataclass
class Delta:
    """What one choice gained since the last chunk."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[Any] | None
    first_token: int  # position of token_ids[0] among the choice's tokens
    finish_reason: str | None
    stop_reason: str | int | None


class DeltaTracker:
    """Turns cumulative snapshots into per-choice deltas (text and tokens not yet sent)."""

    def __init__(self, n: int) -> None:
        self.sent_chars = [0] * n
        self.sent_tokens = [0] * n
        self.done = [False] * n

    def deltas(self, out: RequestOutput, with_tokens: bool) -> list[Delta]:
        result = []
        for o in out.outputs:
            i = o.index
            if self.done[i]:
                continue
            text = o.text[self.sent_chars[i] :]
            start = self.sent_tokens[i]
            tokens = o.token_ids[start:]
            if not text and not (with_tokens and tokens) and o.finish_reason is None:
                continue
            logprobs = o.logprobs[start:] if o.logprobs is not None else None
            self.sent_chars[i] = max(self.sent_chars[i], len(o.text))
            self.sent_tokens[i] = len(o.token_ids)
            self.done[i] = o.finish_reason is not None
            result.append(Delta(i, text, tokens, logprobs, start, o.finish_reason, o.stop_reason))
        return result


class SSEResponse(StreamingResponse):
    """A server-sent event stream that runs ``cleanup`` however it ends, even when the
    client is gone before the first byte."""

    def __init__(
        self, content: AsyncIterator[str], cleanup: Callable[[], Any], headers: dict[str, str]
    ) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
        )
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._cleanup()


async def guarded_stream(gen: Generation, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """``chunks`` then ``[DONE]``; an engine failure midway becomes an SSE error event."""
    try:
        async for chunk in chunks:
            yield chunk
    except EngineDeadError as e:
        yield sse(engine_dead(e).body())
    except Exception:
        logger.exception("stream %s failed", gen.request_id)
        yield sse(
            APIError(
                500, "the server failed while streaming", type=SERVER_ERROR, code="internal_error"
            ).body()
        )
    finally:
        await gen.close()
    yield SSE_DONE


# -- logprobs ----------------------------------------------------------------------


def finite(x: float) -> float:
    return x if math.isfinite(x) else _MIN_LOGPROB


class TokenStrings:
    """Each token decoded on its own (special tokens kept), cached per request."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self.cache.get(token_id)
        if s is None:
            s = self.cache[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return s
