"""POST /v1/completions: OpenAI's legacy text completions, streamed or not."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from tokenmill.generation.outputs import Logprob
from tokenmill.server import beam, protocol
from tokenmill.server.errors import invalid_param
from tokenmill.server.serving import (
    DeltaTracker,
    Generation,
    RequestRecord,
    ServerState,
    TokenStrings,
    check_model,
    finite,
    new_tracker,
    resolve,
    respond,
    run_blocking,
    sse,
    usage,
)

# OpenAI's default for the legacy completions route
DEFAULT_MAX_TOKENS = 16


def _logprobs(
    tokens: TokenStrings, token_ids: list[int], lps: list[Logprob], offset: int
) -> tuple[dict, int]:
    """OpenAI's completion logprobs for some tokens; ``offset`` is the first token's place
    in the completion text. Returns the object and the offset after the last token."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tid, lp in zip(token_ids, lps):
        s = tokens(tid)
        out["tokens"].append(tokens.label(tid))
        out["token_logprobs"].append(finite(lp.logprob))
        top = {tokens.label(t): finite(v) for t, v in lp.top_logprobs.items()}
        top.setdefault(tokens.label(tid), finite(lp.logprob))
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(s)
    return out, offset


async def create_completion(state: ServerState, request: Request) -> Response:
    engine = state.engine
    req: protocol.CompletionRequest = protocol.parse_body(await request.body(), protocol.CompletionRequest)
    check_model(state, req.model)
    if req.echo:
        raise invalid_param("echo is not supported", "echo")
    if req.suffix:
        raise invalid_param("suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise invalid_param("best_of is not supported (only best_of equal to n)", "best_of")
    beam.check_request(req, req.logprobs is not None, "logprobs")
    prompt = protocol.completion_prompt(req.prompt, engine.vocab_size)
    params = protocol.sampling_params(
        req,
        max_tokens=DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens,
        logprobs=req.logprobs,
        vocab_size=engine.vocab_size,
    )
    if isinstance(prompt, str):
        prompt_ids = await run_blocking(engine.tokenizer.encode, prompt, size=len(prompt))
        if not prompt_ids:
            raise invalid_param("prompt must not be empty", "prompt")
    else:
        prompt_ids = prompt
    params = resolve(state, params, len(prompt_ids), {})
    request_id = f"cmpl-{uuid.uuid4().hex}"
    record = RequestRecord(
        state,
        request_id,
        "completions",
        prompt if isinstance(prompt, str) else json.dumps(prompt),
        req.model_dump(exclude_unset=True, exclude={"prompt", "model"}),
        params.n,
    )
    gen = await beam.start(state, request, req, prompt_ids, params, {}, request_id)
    record.prompt_tokens = len(prompt_ids)
    meta = {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.model_name,
    }
    headers = {"X-Request-Id": request_id}
    tracker = new_tracker(state, params.n)
    # logprobs name tokens "token_id:N" when asked
    tokens = TokenStrings(engine.tokenizer, bool(req.return_tokens_as_token_ids))
    chunks = _stream(gen, meta, tokens, req.include_usage, tracker, record) if req.stream else None
    return await respond(
        gen,
        tracker,
        record,
        headers,
        chunks,
        lambda outputs, final: _response(gen, outputs, final, meta, tokens),
    )


def _response(
    gen: Generation, outputs: list[Any], final: Any, meta: dict, tokens: TokenStrings
) -> dict[str, Any]:
    choices = []
    for o in outputs:
        lp = None
        if gen.params.logprobs is not None and o.logprobs is not None:
            lp, _ = _logprobs(tokens, o.token_ids, o.logprobs, 0)
        choices.append(
            {
                "index": o.index,
                "text": o.text,
                "logprobs": lp,
                "finish_reason": o.finish_reason or "abort",
                "stop_reason": o.stop_reason,
            }
        )
    # usage counts every generated token, those of filtered text included
    generated = final.outputs if final is not None else []
    return {**meta, "choices": choices, "usage": usage(len(gen.prompt_ids), generated)}


async def _stream(
    gen: Generation,
    meta: dict,
    tokens: TokenStrings,
    include_usage: bool,
    tracker: DeltaTracker,
    record: RequestRecord,
) -> AsyncIterator[str]:
    want_logprobs = gen.params.logprobs is not None
    offsets = [0] * gen.params.n
    extra = {"usage": None} if include_usage else {}
    async for out in gen.outputs():
        record.last = out
        deltas = await tracker.step(out, with_tokens=want_logprobs)
        for d in deltas:
            lp = None
            if want_logprobs and d.logprobs is not None:
                lp, offsets[d.index] = _logprobs(tokens, d.token_ids, d.logprobs, offsets[d.index])
            choice = {
                "index": d.index,
                "text": d.text,
                "logprobs": lp,
                "finish_reason": d.finish_reason,
                "stop_reason": d.stop_reason,
            }
            yield sse({**meta, "choices": [choice], **extra})
        record.sent(deltas)
        if tracker.all_done:
            break  # every choice ended (some refused by a filter): the engine need not go on
    if include_usage:
        last = record.last
        yield sse({**meta, "choices": [], "usage": usage(len(gen.prompt_ids), last.outputs if last else [])})
