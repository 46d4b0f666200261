"""OpenAI's ``POST /v1/embeddings``, served by a ``--task feature-extraction`` pipeline.

Vectors are pooled as the model says (a sentence-transformers checkpoint's pooling and
normalisation), or, for a plain encoder, by the mean over tokens. Inputs are texts or
token ids; a text over the model's limit is an error unless the request says
``"truncation": true`` (tokenmill's extension: OpenAI has no such field).
"""

from __future__ import annotations

import base64
import struct
from typing import Any

from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenmill.server.batching import Job
from tokenmill.server.errors import APIError, clip, invalid_param
from tokenmill.server.pipelines import MAX_INPUTS, PipelineSet, ServedPipeline, pick_model, user_error
from tokenmill.server.protocol import parse_body


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings body; ``truncation`` (tokenmill's) cuts inputs at the model's limit."""

    model_config = ConfigDict(extra="ignore", strict=True)

    input: Any
    model: str | None = None
    encoding_format: str | None = None
    dimensions: int | None = None
    user: str | None = None
    truncation: bool | None = None


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def embedding_inputs(value: Any) -> list[str | list[int]]:
    """OpenAI's ``input``: a string, a list of strings, a list of token ids, or a list of those."""
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list) and value and _is_ids(value):
        items = [value]
    elif isinstance(value, list) and value and all(isinstance(x, str) for x in value):
        items = value
    elif isinstance(value, list) and value and all(isinstance(x, list) and _is_ids(x) for x in value):
        items = value
    elif isinstance(value, list) and not value:
        raise invalid_param("input must not be an empty list", "input")
    else:
        raise invalid_param(
            f"input must be a string, a list of strings, a list of token ids or a list of such lists, "
            f"got {clip(value)}",
            "input",
        )
    if len(items) > MAX_INPUTS:
        raise invalid_param(f"input holds {len(items)} inputs; at most {MAX_INPUTS} per request", "input")
    for i, x in enumerate(items):
        if isinstance(x, str) and not x.strip():
            raise invalid_param(f"input {i} is an empty string; give some text", "input")
        if isinstance(x, list) and not x:
            raise invalid_param(f"input {i} is an empty list of token ids", "input")
    return items


def _embedding_job(sp: ServedPipeline, items: list[str | list[int]], truncation: bool) -> Job:
    from tokenmill.pipelines.base import Feature

    pipe = sp.pipe
    # the model's own pooling (sentence-transformers config) or, without one, the mean
    opts = {
        "pooling": pipe.model_pooling or "mean",
        "normalize": bool(pipe.model_normalize),
        "truncation": truncation,
    }

    def run(batch: list[Any], o: dict[str, Any]) -> list[Any]:
        features = []
        for i, x in enumerate(batch):
            if isinstance(x, str):
                features.extend(pipe.preprocess(x, i, o))
            else:
                features.append(Feature(list(x), i, [0] * len(x)))
        vectors = pipe.run_features(features, o)
        return [(v.tolist(), len(f.input_ids)) for v, f in zip(vectors, features)]

    return Job(f"embeddings {truncation}", lambda: (items, opts), run, lambda results: results)


def _check_ids(items: list[Any], vocab_size: int, max_length: int | None) -> None:
    for i, x in enumerate(items):
        if isinstance(x, str):
            continue
        bad = [t for t in x if not 0 <= t < vocab_size]
        if bad:
            raise invalid_param(
                f"input {i}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})", "input"
            )
        if max_length is not None and len(x) > max_length:
            raise invalid_param(
                f"input {i} is {len(x)} tokens long, over this model's limit of {max_length}; shorten it",
                "input",
            )


def _encode_vector(vector: list[float], encoding_format: str) -> Any:
    if encoding_format == "float":
        return vector
    # OpenAI's base64: the little-endian float32 bytes of the vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


async def embeddings_route(pipelines: PipelineSet, request: Request) -> Response:
    req: EmbeddingRequest = parse_body(await request.body(), EmbeddingRequest)
    models = pipelines.by_task.get("feature-extraction")
    if not models:
        raise APIError(
            404,
            "this server serves no embedding model; start it with --task feature-extraction=MODEL "
            "(or --task feature-extraction for all-minilm-l6-v2)",
            param="model",
            code="model_not_found",
        )
    sp = pick_model(models, req.model, "feature-extraction")
    encoding_format = req.encoding_format or "float"
    if encoding_format not in ("float", "base64"):
        raise invalid_param(
            f"encoding_format must be 'float' or 'base64', got {clip(encoding_format)}", "encoding_format"
        )
    size = sp.pipe.config.hidden_size
    if req.dimensions is not None and req.dimensions != size:
        raise invalid_param(
            f"dimensions: {sp.model} makes {size}-dimensional embeddings and cannot shorten them "
            f"(it was not trained for it); leave dimensions out",
            "dimensions",
        )
    items = embedding_inputs(req.input)
    _check_ids(items, sp.pipe.config.vocab_size, sp.pipe.max_length)
    try:
        results = await sp.batcher.submit(_embedding_job(sp, items, bool(req.truncation)))
    except ValueError as e:
        raise user_error(e, "input", None) from None
    tokens = sum(n for _, n in results)
    data = [
        {"object": "embedding", "index": i, "embedding": _encode_vector(vec, encoding_format)}
        for i, (vec, _) in enumerate(results)
    ]
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": sp.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )
