"""``POST /v1/feedback`` and the metric of the feedback store's failed writes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter

from tokenmill.server.errors import SERVER_ERROR, APIError, clip

_FIELDS = ("request_id", "rating", "labels", "comment", "model")


def install_feedback(app: FastAPI, store: Any | None, registry: CollectorRegistry) -> None:
    """Add the feedback route to ``app``; with a store, count its failed writes in ``registry``.

    Without a store the route answers 404 saying how to turn feedback on.
    """
    if store is not None:
        failures = Counter(
            "tokenmill:store_write_failures_total",
            "Rows the feedback store could not write (database unreachable, queue full).",
            ("table",),
            registry=registry,
        )
        for table in ("feedback", "request_log"):
            failures.labels(table=table)  # shown at 0 before the first failure
        store.add_failure_listener(lambda table, n: failures.labels(table=table).inc(n))

    @app.post("/v1/feedback")
    async def post_feedback(request: Request) -> JSONResponse:
        if store is None:
            raise APIError(
                404,
                "this server stores no feedback; start tokenmill serve with --feedback-db PATH_OR_URL",
                code="feedback_not_enabled",
            )
        fields = _parse(await request.body())
        from tokenmill.feedback import InvalidFeedback, StoreUnavailable

        try:
            row = await asyncio.to_thread(store.add_feedback, *(fields.get(f) for f in _FIELDS))
        except InvalidFeedback as e:
            raise APIError(400, str(e), param=e.param, code="invalid_value") from None
        except StoreUnavailable as e:
            raise APIError(
                503,
                f"{e}; retry later",
                type=SERVER_ERROR,
                code="store_unavailable",
                headers={"Retry-After": "5"},
            ) from None
        return JSONResponse({"object": "feedback", **row})


def _parse(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {clip(str(e))}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name in ("request_id", "rating"):
        if data.get(name) is None:
            raise APIError(400, f"'{name}' is required", param=name, code="missing_required_parameter")
    return data
