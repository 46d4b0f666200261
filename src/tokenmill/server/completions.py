"""POST /v1/completions: OpenAI's legacy text completions, streamed or not."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse
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
    SSEResponse,
    TokenStrings,
    check_model,
    collect_choices,
    finite,
    guarded_stream,
    new_tracker,
    resolve,
    run_blocking,
    sse,
    start_generation,
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
    beam_params = None
    if req.use_beam_search:
        beam_params = beam.beam_params(req, params)
        beam.check_cache(engine, len(prompt_ids), beam_params, {})
    request_id = f"cmpl-{uuid.uuid4().hex}"
    record = RequestRecord(
        state,
        request_id,
        "completions",
        prompt if isinstance(prompt, str) else json.dumps(prompt),
        req.model_dump(exclude_unset=True, exclude={"prompt", "model"}),
        params.n,
    )
    if beam_params is not None:
        gen = await beam.start_beam_search(state, request, prompt_ids, params, beam_params, request_id)
    else:
        gen = await start_generation(state, request, prompt_ids, params, request_id)
    record.prompt_tokens = len(prompt_ids)
    meta = {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.model_name,
    }
    headers = {"X-Request-Id": request_id}
    tracker = new_tracker(state, params.n)
    as_ids = bool(req.return_tokens_as_token_ids)  # logprobs name tokens "token_id:N"
    if req.stream:
        tokens = TokenStrings(engine.tokenizer, as_ids)
        chunks = _stream(gen, meta, tokens, req.include_usage, tracker, record)

        async def cleanup() -> None:
            await gen.close()
            record.close(tracker)

        return SSEResponse(guarded_stream(gen, chunks), cleanup, headers)
    try:
        outputs, record.last = await collect_choices(gen, tracker)
        record.sent_all(outputs)
    finally:
        record.close(tracker)
    body = _response(gen, outputs, record.last, meta, TokenStrings(engine.tokenizer, as_ids))
    return JSONResponse(body, headers=headers)


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
