"""The FastAPI application: OpenAI routes, health, metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from tokenmill.server.audio import transcription_route
from tokenmill.server.chat import create_chat_completion
from tokenmill.server.completions import create_completion
from tokenmill.server.embeddings import embeddings_route
from tokenmill.server.errors import APIError, clip, install_handlers
from tokenmill.server.feedback import install_feedback
from tokenmill.server.inspect import install_inspection
from tokenmill.server.metrics import CONTENT_TYPE, ServerMetrics
from tokenmill.server.middleware import DEFAULT_MAX_BODY_BYTES, ApiKeyMiddleware, BodySizeLimitMiddleware
from tokenmill.server.pipelines import PipelineSet, model_cards, pipeline_route
from tokenmill.server.playground import install_playground
from tokenmill.server.serving import ServerState, engine_dead

logger = logging.getLogger("tokenmill.server")

#: seconds the engine gets at shutdown to finish what is still running, then the rest is aborted
DEFAULT_SHUTDOWN_TIMEOUT = 30.0


def create_app(
    engine: Any | None,
    *,
    pipelines: PipelineSet | None = None,
    served_model_name: str | None = None,
    api_key: str | None = None,
    request_timeout: float | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    store: Any | None = None,
    filters: Any | None = None,
) -> FastAPI:
    """An app serving ``engine`` (an AsyncEngine); its lifespan starts and stops the engine.

    Args:
        engine: the LLM behind the completion routes; None serves only ``pipelines``.
        pipelines: task pipelines behind /v1/pipelines/{task} and /v1/embeddings.
        served_model_name: the model name clients send (default: ``engine.model_name``).
        api_key: when set, ``/v1/*`` requires ``Authorization: Bearer <api_key>``.
        request_timeout: seconds after which a request ends with finish_reason "timeout".
        max_body_bytes: larger request bodies are answered 413.
        shutdown_timeout: seconds in-flight requests get when the app stops.
        store: the feedback store (``tokenmill.feedback.open_store``) behind /v1/feedback and
            the request log; the app closes it when it stops.
        filters: output filters for the completion routes: a ``tokenmill.filters.FilterSet``
            or the path of a filter file (see docs/filters.md).
    """
    if request_timeout is not None and not request_timeout > 0:
        raise ValueError(f"request_timeout must be > 0 seconds, got {request_timeout}")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    pipelines = pipelines if pipelines is not None else PipelineSet([])
    if engine is None and not pipelines:
        raise ValueError("nothing to serve: give an engine, pipelines or both")
    state = ServerState(engine, served_model_name or (engine.model_name if engine else ""), request_timeout)
    state.store = store
    if filters is not None:
        from tokenmill.filters import FilterSet, load_filters

        state.filters = filters if isinstance(filters, FilterSet) else load_filters(filters)
    metrics = ServerMetrics()
    state.metrics = metrics
    pipelines.install_metrics(metrics.registry)
    if engine is not None:
        engine.add_stats_listener(metrics.on_step)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if engine is not None:
            await engine.start()
        try:
            yield
        finally:
            pipelines.close()
            if engine is not None:
                await engine.shutdown(timeout=shutdown_timeout)
            if store is not None:  # after the engine: the last requests' log records are written
                await asyncio.to_thread(store.close)

    app = FastAPI(title="tokenmill", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.tokenmill = state
    app.state.metrics = metrics
    app.state.pipelines = pipelines
    app.state.store = store
    install_handlers(app)
    install_feedback(app, store, metrics.registry)
    # Starlette runs the last middleware added first: the key is checked before the body is read.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)

    def no_engine() -> APIError:
        return APIError(
            404,
            "this server serves no text-generation model; start it with --model MODEL for this route",
            param="model",
            code="model_not_found",
        )

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        if engine is None:
            raise no_engine()
        return await create_completion(state, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        if engine is None:
            raise no_engine()
        return await create_chat_completion(state, request)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await embeddings_route(pipelines, request)

    @app.post("/v1/pipelines/{task}")
    async def run_pipeline(task: str, request: Request) -> Response:
        return await pipeline_route(pipelines, task, request)

    @app.post("/v1/audio/transcriptions")
    async def audio_transcriptions(request: Request) -> Response:
        return await transcription_route(pipelines, request, translate=False)

    @app.post("/v1/audio/translations")
    async def audio_translations(request: Request) -> Response:
        return await transcription_route(pipelines, request, translate=True)

    def model_cards_all() -> list[dict[str, Any]]:
        cards = model_cards(pipelines, state.created)
        if engine is None:
            return cards
        card = {
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "tokenmill",
            "root": engine.model_name,
            "max_model_len": engine.max_model_len,
        }
        return [card, *cards]

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": model_cards_all()})

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> JSONResponse:
        cards = model_cards_all()
        for card in cards:
            if card["id"] == model:
                return JSONResponse(card)
        served = ", ".join(f"'{c['id']}'" for c in cards)
        raise APIError(
            404,
            f"the model '{clip(model)}' does not exist; this server serves {served}",
            param="model",
            code="model_not_found",
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine is None or engine.is_running:
            return JSONResponse({"status": "ok"})
        body = engine_dead().body()
        return JSONResponse({"status": "unavailable", **body}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        try:
            if engine is not None:
                metrics.refresh(engine.stats())
        except Exception as e:  # a dead engine still has metrics to show
            logger.warning("could not read engine stats: %s", e)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    install_playground(app)
    install_inspection(app, state)
    return app
