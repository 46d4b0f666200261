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
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from tokenmill.generation.async_engine import EngineDeadError, EngineOverloadedError
from tokenmill.generation.deltas import Delta, DeltaTracker
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
    #: the feedback store (tokenmill.feedback.Store); routes log requests to it when set
    store: Any | None = None
    #: output filters (tokenmill.filters.FilterSet) applied to every completion and chat choice
    filters: Any | None = None
    #: the app's ServerMetrics (filter actions are counted there)
    metrics: Any | None = None


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


def new_tracker(state: ServerState, n: int) -> DeltaTracker:
    """The delta tracker of one request: filtering when the server has filters."""
    if state.filters is None:
        return DeltaTracker(n)
    from tokenmill.filters.tracker import FilteredDeltas

    return FilteredDeltas(state.filters, n)


async def collect_choices(gen: Generation, tracker: DeltaTracker) -> tuple[list[CompletionOutput], Any]:
    """The choices of a non-streaming response and the engine's last snapshot.

    Without filters the choices are the last snapshot's. With filters they are what the
    tracker releases, put together; a choice refused early ends the generation early.
    """
    if type(tracker) is DeltaTracker:
        final = await collect(gen)
        return (final.outputs if final is not None else []), final
    n = gen.params.n
    want_lp = gen.params.logprobs is not None
    choices = [CompletionOutput(i, "", [], None, logprobs=[] if want_lp else None) for i in range(n)]
    last = None
    try:
        async for out in gen.outputs():
            last = out
            for d in await tracker.step(out, with_tokens=want_lp):
                c = choices[d.index]
                c.text += d.text
                c.token_ids.extend(d.token_ids)
                if c.logprobs is not None and d.logprobs is not None:
                    c.logprobs.extend(d.logprobs)
                if d.finish_reason is not None:
                    c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
            if tracker.all_done:
                break  # closing the stream below aborts what the engine still runs
    except EngineDeadError as e:
        raise engine_dead(e) from None
    finally:
        await gen.close()
    return choices, last


class RequestRecord:
    """One completion request as the request log and the filter metrics see it: what was
    sent to the client, how it ended, what the filters did, and when."""

    def __init__(
        self, state: ServerState, request_id: str, route: str, prompt: str, params: dict[str, Any], n: int
    ) -> None:
        self.state = state
        self.request_id = request_id
        self.route = route
        self.prompt = prompt
        self.params = params
        self.created = time.time()
        self.started = time.perf_counter()
        self.texts: list[list[str]] = [[] for _ in range(n)]
        self.finish_reasons: list[str | None] = [None] * n
        self.first_text: float | None = None
        self.last: RequestOutput | None = None
        self.prompt_tokens = 0
        self._closed = False

    def sent(self, deltas: list[Delta]) -> None:
        """Note deltas as they go to the client."""
        for d in deltas:
            if d.text:
                self.texts[d.index].append(d.text)
                if self.first_text is None:
                    self.first_text = time.perf_counter()
            if d.finish_reason is not None:
                self.finish_reasons[d.index] = d.finish_reason

    def sent_all(self, outputs: list[CompletionOutput]) -> None:
        """Note a whole (non-streaming) response."""
        for o in outputs:
            self.texts[o.index] = [o.text]
            self.finish_reasons[o.index] = o.finish_reason or "abort"
        if any(o.text for o in outputs):
            self.first_text = time.perf_counter()

    def close(self, tracker: DeltaTracker) -> None:
        """Count the filter decisions and write the log record (once). Never raises: the
        user's request must not fail for its log."""
        if self._closed:
            return
        self._closed = True
        try:
            decisions = tracker.decisions()
            metrics = self.state.metrics
            if metrics is not None:
                for d in decisions:
                    metrics.filter_actions.labels(filter=d["filter"], action=d["action"]).inc(d["count"])
            if self.state.store is not None:
                self.state.store.log_request(self._record(decisions))
        except Exception:
            logger.exception("could not record request %s", self.request_id)

    def _record(self, decisions: list[dict[str, Any]]) -> dict[str, Any]:
        now = time.perf_counter()
        outputs = self.last.outputs if self.last is not None else []
        return {
            "id": self.request_id,
            "created": self.created,
            "model": self.state.model_name,
            "route": self.route,
            "prompt": self.prompt,
            "output": ["".join(t) for t in self.texts],
            "params": self.params,
            "finish_reasons": [r or "abort" for r in self.finish_reasons],
            "filter_decisions": decisions,
            "timing": {
                "ttft_s": None if self.first_text is None else self.first_text - self.started,
                "total_s": now - self.started,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": sum(len(o.token_ids) for o in outputs),
            },
        }


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
    """Each token decoded on its own (special tokens kept), cached per request.

    ``as_ids`` is vLLM's ``return_tokens_as_token_ids``: ``label`` names a token
    ``"token_id:123"`` instead of its text, so a client gets exact ids back even where a
    token is part of a UTF-8 character or decodes the same as another.
    """

    def __init__(self, tokenizer: Any, as_ids: bool = False) -> None:
        self.tokenizer = tokenizer
        self.as_ids = as_ids
        self.cache: dict[int, str] = {}

    def label(self, token_id: int) -> str:
        """The token as logprobs name it: its text, or ``token_id:N``."""
        return f"token_id:{token_id}" if self.as_ids else self(token_id)

    def __call__(self, token_id: int) -> str:
        s = self.cache.get(token_id)
        if s is None:
            s = self.cache[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return s


async def respond(
    gen: Generation,
    tracker: DeltaTracker,
    record: RequestRecord,
    headers: dict[str, str],
    chunks: AsyncIterator[str] | None,
    body: Callable[[list[Any], Any], dict[str, Any]],
) -> Response:
    """The HTTP answer of a completion route: the SSE ``chunks`` when streaming, else the
    JSON ``body(outputs, final)`` once every choice is done. The request's log record is
    closed either way."""
    if chunks is not None:

        async def cleanup() -> None:
            await gen.close()
            record.close(tracker)

        return SSEResponse(guarded_stream(gen, chunks), cleanup, headers)
    try:
        outputs, record.last = await collect_choices(gen, tracker)
        record.sent_all(outputs)
    finally:
        record.close(tracker)
    return JSONResponse(body(outputs, record.last), headers=headers)
