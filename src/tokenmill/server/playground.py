"""The browser playground: ``/`` (the page), ``/static/...`` (its files) and its config route.

The page is plain HTML, CSS and JavaScript modules shipped inside the package: no build
step and nothing fetched from another host. ``/`` and ``/static`` are public, like
``/health``; every call the page makes to ``/v1/*`` carries the API key when one is set.

``GET /v1/playground/config`` tells the page what this server serves (the LLM, its chat
template, the pipeline tasks and their models, and which optional routes are present), so
it can build one form per task without guessing.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse
from starlette.routing import BaseRoute
from starlette.staticfiles import StaticFiles

#: optional routes the page adapts to, by the name the config reports them under
_OPTIONAL_ROUTES = {
    "feedback": "/v1/feedback",
    "inspect_tokens": "/v1/inspect/tokens",
    "inspect_attention": "/v1/inspect/attention",
    "audio_transcriptions": "/v1/audio/transcriptions",
}


def static_dir() -> str:
    """The folder holding the page's files inside the installed package."""
    return str(resources.files("tokenmill.server") / "static")


def _route_paths(routes: list[BaseRoute]) -> set[str]:
    return {getattr(r, "path", "") for r in routes}


def playground_config(app: FastAPI) -> dict[str, Any]:
    """What the page needs to know about this server (read at request time: routes other
    modules add after the playground's are reported too)."""
    from tokenmill.pipelines.registry import TASKS

    state = app.state.tokenmill
    engine = state.engine
    llm = None
    if engine is not None:
        tokenizer = engine.tokenizer
        llm = {
            "model": state.model_name,
            "max_model_len": engine.max_model_len,
            "chat": getattr(tokenizer, "chat_template", None) is not None,
        }
    tasks = []
    for task in app.state.pipelines.served_tasks():
        _, models = app.state.pipelines.models_for(task)
        spec = TASKS.get(task)
        tasks.append(
            {
                "task": task,
                "models": list(models),
                "description": spec.description if spec else "",
            }
        )
    paths = _route_paths(app.routes)
    routes = {name: path in paths for name, path in _OPTIONAL_ROUTES.items()}
    return {
        "llm": llm,
        "tasks": tasks,
        "routes": routes,
        # the completion routes run beam search too (use_beam_search, n, length_penalty)
        "beam_search": True,
        "filters": bool(getattr(app.state, "filters", None)),
    }


def install_playground(app: FastAPI) -> None:
    """Serve the page at ``/``, its files at ``/static`` and ``GET /v1/playground/config``."""
    root = static_dir()
    index = f"{root}/index.html"

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        # no-cache: after an upgrade the browser asks again instead of running an old page
        return FileResponse(
            index, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"}
        )

    @app.get("/v1/playground/config")
    async def config() -> JSONResponse:
        return JSONResponse(playground_config(app))

    app.mount("/static", StaticFiles(directory=root), name="static")
