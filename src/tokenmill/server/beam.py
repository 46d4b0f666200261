"""Beam search on the completion routes: vLLM's ``use_beam_search`` extra.

``n`` is the beam width and the number of choices, best first. The request's
``max_tokens``, ``ignore_eos``, ``stop_token_ids``, ``skip_special_tokens`` and
``length_penalty`` become a BeamSearchParams; ``early_stopping`` may only be true (the
search ends once ``n`` hypotheses have finished). Fields that change how tokens are
sampled have no meaning for a search that ranks hypotheses by the model's own
log-probabilities: each is refused with a 400 naming it, unless it holds its neutral
value. ``seed`` is accepted and changes nothing (the search is deterministic).

The search runs on the engine thread between two engine steps (see
``AsyncEngine.run_on_model_thread``); its result goes through the same response and
streaming code as sampled choices, as one final snapshot.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch
from starlette.requests import Request

from tokenmill.generation.async_engine import EngineDeadError
from tokenmill.generation.outputs import BeamHypothesis, CompletionOutput, RequestMetrics, RequestOutput
from tokenmill.generation.sampling_params import BeamSearchParams, SamplingParams
from tokenmill.server.errors import SERVER_ERROR, APIError, invalid_param
from tokenmill.server.serving import DisconnectWatcher, Generation, ServerState, engine_dead, start_generation

# request field -> (is the value neutral?, what to send instead)
_SAMPLING_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "temperature": (lambda v: v in (0, 1), "leave temperature out (0 and 1 change nothing)"),
    "top_p": (lambda v: v == 1, "leave top_p out"),
    "top_k": (lambda v: v in (0, -1), "leave top_k out"),
    "min_p": (lambda v: v == 0, "leave min_p out"),
    "repetition_penalty": (lambda v: v == 1, "leave repetition_penalty out"),
    "presence_penalty": (lambda v: v == 0, "leave presence_penalty out"),
    "frequency_penalty": (lambda v: v == 0, "leave frequency_penalty out"),
    "logit_bias": (lambda v: not v, "leave logit_bias out"),
    "min_tokens": (lambda v: v == 0, "leave min_tokens out"),
}


def check_request(req: Any, wants_logprobs: bool, logprobs_field: str) -> None:
    """A 400 for each field that beam search cannot honour, and for the beam search
    fields sent without ``use_beam_search``."""
    if not req.use_beam_search:
        for name in ("length_penalty", "early_stopping"):
            if getattr(req, name) is not None:
                raise invalid_param(
                    f"{name} applies only to beam search; set use_beam_search=true or leave {name} out",
                    name,
                )
        return
    for name, (neutral, fix) in _SAMPLING_FIELDS.items():
        value = getattr(req, name)
        if value is not None and not neutral(value):
            raise invalid_param(
                f"{name} is not supported with use_beam_search: beam search ranks hypotheses by "
                f"the model's own log-probabilities and samples nothing; {fix}",
                name,
            )
    if req.stop:
        raise invalid_param(
            "stop strings are not supported with use_beam_search; use stop_token_ids to end "
            "hypotheses at given tokens",
            "stop",
        )
    if wants_logprobs:
        raise invalid_param(
            f"{logprobs_field} is not supported with use_beam_search: beam search returns no "
            f"per-token log-probabilities; leave {logprobs_field} out",
            logprobs_field,
        )
    if req.early_stopping is False:
        raise invalid_param(
            "early_stopping=false is not supported: beam search ends once n hypotheses have "
            "finished (early_stopping=true); leave early_stopping out or set it to true",
            "early_stopping",
        )


def beam_params(req: Any, params: SamplingParams) -> BeamSearchParams:
    """The BeamSearchParams of a request whose SamplingParams are resolved."""
    assert params.max_tokens is not None
    try:
        return BeamSearchParams(
            beam_width=params.n,
            max_tokens=params.max_tokens,
            length_penalty=1.0 if req.length_penalty is None else req.length_penalty,
            ignore_eos=params.ignore_eos,
            stop_token_ids=params.stop_token_ids,
            skip_special_tokens=params.skip_special_tokens,
        )
    except ValueError as e:  # only length_penalty can be out of range here
        raise invalid_param(str(e), "length_penalty") from None


def check_cache(engine: Any, prompt_len: int, bp: BeamSearchParams, names: dict[str, str]) -> None:
    """The search's dense KV cache may hold at most what the paged cache holds."""
    need = bp.beam_width * (prompt_len + bp.max_tokens)
    limit = engine.num_blocks * engine.block_size
    if need > limit:
        max_tokens = names.get("max_tokens", "max_tokens")
        raise invalid_param(
            f"beam search with n={bp.beam_width} keeps {bp.beam_width} x ({prompt_len} prompt + "
            f"{bp.max_tokens} new) = {need} tokens of KV cache, more than the {limit} tokens "
            f"this server's KV cache holds; lower n or {max_tokens}, or shorten the prompt",
            "n",
        )


class _ClientLeft(Exception):
    pass


class _TimedOut(Exception):
    pass


async def _no_more() -> AsyncIterator[RequestOutput]:
    return
    yield  # an async generator with nothing in it


def _stop_reason(h: BeamHypothesis, bp: BeamSearchParams, eos_ids: list[int]) -> int | None:
    """As sampling reports it: None for EOS, the token id for a stop token id."""
    if h.finish_reason != "stop" or not h.token_ids:
        return None
    last = h.token_ids[-1]
    if not bp.ignore_eos and last in eos_ids:
        return None
    return last


async def start_beam_search(
    state: ServerState,
    request: Request,
    prompt_ids: list[int],
    params: SamplingParams,
    bp: BeamSearchParams,
    request_id: str,
) -> Generation:
    """Run the search and hand back its hypotheses as a finished Generation (whose first
    snapshot is None if the client left before the search ended)."""
    engine = state.engine
    started = time.perf_counter()
    left = threading.Event()
    watcher = DisconnectWatcher(request.receive, left.set)
    deadline = time.monotonic() + state.request_timeout if state.request_timeout else None

    def check() -> None:
        if left.is_set():
            raise _ClientLeft
        if deadline is not None and time.monotonic() > deadline:
            raise _TimedOut

    gen = Generation(request_id, prompt_ids, params, None, _no_more(), watcher)
    try:
        hypotheses = await engine.beam_search(prompt_ids, bp, check)
    except _ClientLeft:
        return gen
    except BaseException as e:
        left.set()  # a cancelled caller stops the search too
        await gen.close()
        if isinstance(e, _TimedOut):
            raise APIError(
                504,
                f"the beam search ran past this server's request timeout of {state.request_timeout:g} s; "
                "lower n or max_tokens",
                type=SERVER_ERROR,
                code="timeout",
            ) from None
        if isinstance(e, EngineDeadError):
            raise engine_dead(e) from None
        if isinstance(e, torch.cuda.OutOfMemoryError):
            need = bp.beam_width * (len(prompt_ids) + bp.max_tokens)
            raise APIError(
                503,
                f"the device has no memory left for this beam search's KV cache ({need} tokens, "
                "beside the server's own KV cache); lower n or max_tokens, or retry later",
                type=SERVER_ERROR,
                code="out_of_memory",
            ) from None
        raise
    eos_ids = engine.engine.eos_token_ids
    outputs = [
        CompletionOutput(
            i, h.text, h.token_ids, h.finish_reason, _stop_reason(h, bp, eos_ids), h.cumulative_logprob
        )
        for i, h in enumerate(hypotheses)
    ]
    metrics = RequestMetrics(
        arrival_time=started,
        finished_time=time.perf_counter(),
        prompt_tokens=len(prompt_ids),
        output_tokens=sum(len(o.token_ids) for o in outputs),
    )
    metrics.finalize()
    gen.first = RequestOutput(request_id, None, list(prompt_ids), outputs, True, metrics)
    _count(state, gen.first)
    return gen


def _count(state: ServerState, out: RequestOutput) -> None:
    """Count the request in the server metrics, as a finished engine request is."""
    m = state.metrics
    if m is None:
        return
    m.success.labels(finished_reason=out.outputs[0].finish_reason).inc()
    m.e2e.observe(out.metrics.e2e_s or 0.0)
    m.req_prompt.observe(out.metrics.prompt_tokens)
    m.req_gen.observe(out.metrics.output_tokens)


async def start(
    state: ServerState,
    request: Request,
    req: Any,
    prompt_ids: list[int],
    params: SamplingParams,
    names: dict[str, str],
    request_id: str,
) -> Generation:
    """The request's generation: a beam search when it asks for one, else sampling on the
    engine. ``names`` maps SamplingParams fields to the request's names for errors."""
    if not req.use_beam_search:
        return await start_generation(state, request, prompt_ids, params, request_id)
    bp = beam_params(req, params)
    check_cache(state.engine, len(prompt_ids), bp, names)
    return await start_beam_search(state, request, prompt_ids, params, bp, request_id)
