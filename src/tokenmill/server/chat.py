"""POST /v1/chat/completions: messages formatted by the model's chat template."""

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
from tokenmill.server.errors import clip, invalid_param
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

# where the request names a SamplingParams field differently
_NAMES = {"logprobs": "top_logprobs", "prompt": "messages"}


def _entry(tokens: TokenStrings, token_id: int, logprob: float) -> dict[str, Any]:
    s = tokens(token_id)
    return {"token": tokens.label(token_id), "logprob": finite(logprob), "bytes": list(s.encode("utf-8"))}


def _logprobs(tokens: TokenStrings, token_ids: list[int], lps: list[Logprob], k: int) -> dict[str, Any]:
    content = []
    for tid, lp in zip(token_ids, lps):
        entry = _entry(tokens, tid, lp.logprob)
        top = sorted(lp.top_logprobs.items(), key=lambda kv: kv[1], reverse=True)[:k]
        entry["top_logprobs"] = [_entry(tokens, t, v) for t, v in top]
        content.append(entry)
    return {"content": content}


def _check_unsupported(req: protocol.ChatCompletionRequest) -> None:
    if req.tools:
        raise invalid_param("tools are not supported by this server", "tools")
    fmt = req.response_format
    if fmt and fmt.get("type") not in (None, "text"):
        raise invalid_param(
            f"response_format type {clip(fmt.get('type'))} is not supported; only 'text' is",
            "response_format",
        )
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid_param("top_logprobs requires logprobs=true", "top_logprobs")


async def create_chat_completion(state: ServerState, request: Request) -> Response:
    engine = state.engine
    req: protocol.ChatCompletionRequest = protocol.parse_body(
        await request.body(), protocol.ChatCompletionRequest
    )
    check_model(state, req.model)
    _check_unsupported(req)
    beam.check_request(req, bool(req.logprobs), "logprobs")  # top_logprobs needs logprobs (above)
    messages = protocol.chat_messages(req.messages)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    names = dict(_NAMES)
    if req.max_completion_tokens is not None:
        names["max_tokens"] = "max_completion_tokens"
    params = protocol.sampling_params(
        req,
        max_tokens=max_tokens,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        vocab_size=engine.vocab_size,
        names=names,
    )
    tokenizer = engine.tokenizer
    if getattr(tokenizer, "chat_template", None) is None:
        raise invalid_param(
            "this model has no chat template; use /v1/completions with a plain prompt", "messages"
        )
    try:
        prompt_ids = await run_blocking(
            tokenizer.apply_chat_template,
            messages,
            add_generation_prompt=req.add_generation_prompt is not False,
            tokenize=True,
            size=sum(len(m["content"]) for m in messages),
        )
    except ValueError as e:
        raise invalid_param(f"the chat template could not format the messages: {e}", "messages") from None
    if not prompt_ids:
        raise invalid_param("the chat template produced an empty prompt", "messages")
    params = resolve(state, params, len(prompt_ids), names)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    record = RequestRecord(
        state,
        request_id,
        "chat.completions",
        json.dumps(messages, ensure_ascii=False),
        req.model_dump(exclude_unset=True, exclude={"messages", "model"}),
        params.n,
    )
    gen = await beam.start(state, request, req, prompt_ids, params, names, request_id)
    record.prompt_tokens = len(prompt_ids)
    meta = {"id": request_id, "created": int(time.time()), "model": state.model_name}
    headers = {"X-Request-Id": request_id}
    tokens = TokenStrings(tokenizer, bool(req.return_tokens_as_token_ids))
    k = req.top_logprobs or 0
    tracker = new_tracker(state, params.n)
    chunks = _stream(gen, meta, tokens, k, req.include_usage, tracker, record) if req.stream else None
    return await respond(
        gen,
        tracker,
        record,
        headers,
        chunks,
        lambda outputs, final: _response(gen, outputs, final, meta, tokens, k),
    )


def _response(
    gen: Generation, outputs: list[Any], final: Any, meta: dict, tokens: TokenStrings, k: int
) -> dict[str, Any]:
    choices = []
    for o in outputs:
        lp = None
        if gen.params.logprobs is not None and o.logprobs is not None:
            lp = _logprobs(tokens, o.token_ids, o.logprobs, k)
        choices.append(
            {
                "index": o.index,
                "message": {"role": "assistant", "content": o.text},
                "logprobs": lp,
                "finish_reason": o.finish_reason or "abort",
                "stop_reason": o.stop_reason,
            }
        )
    # usage counts every generated token, those of filtered text included
    generated = final.outputs if final is not None else []
    return {
        **meta,
        "object": "chat.completion",
        "choices": choices,
        "usage": usage(len(gen.prompt_ids), generated),
    }


async def _stream(
    gen: Generation,
    meta: dict,
    tokens: TokenStrings,
    k: int,
    include_usage: bool,
    tracker: DeltaTracker,
    record: RequestRecord,
) -> AsyncIterator[str]:
    want_logprobs = gen.params.logprobs is not None
    meta = {**meta, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}
    # OpenAI opens each choice with the assistant role and empty content.
    for i in range(gen.params.n):
        choice = {
            "index": i,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        yield sse({**meta, "choices": [choice], **extra})
    async for out in gen.outputs():
        record.last = out
        deltas = await tracker.step(out, with_tokens=want_logprobs)
        for d in deltas:
            lp = None
            if want_logprobs and d.logprobs is not None:
                lp = _logprobs(tokens, d.token_ids, d.logprobs, k)
            choice = {
                "index": d.index,
                "delta": {"content": d.text} if d.text or d.finish_reason is None else {},
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
