"""Task pipelines over HTTP: ``POST /v1/pipelines/{task}`` (Hugging Face Inference API style).

``tokenmill serve --task TASK=MODEL`` loads each pipeline at start-up. Requests for one
pipeline that arrive together run as one pipeline call when their parameters are the
same (``tokenmill.server.batching``), and the results are split back per request.

Merging goes through the pipeline's own ``__call__``, so each request gets exactly what
``pipe(inputs, **parameters)`` returns, transformers' output shapes included:

1. capture: ``pipe(inputs, **parameters)`` runs on a copy of the pipeline whose ``run``
   step records the checked inputs and options and stops there; bad options or inputs
   fail this request alone.
2. merge: one ``run`` over the inputs of every request with the same options.
3. replay: ``pipe(inputs, **parameters)`` again, on a copy whose ``run`` answers from
   the merged results, so the pipeline shapes its output as for a call of its own.

A pipeline that is not a ``tokenmill.pipelines.base.Pipeline`` (text-generation, which runs
on the LLM engine) is called once per request.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import Response

from tokenmill.pipelines.hf_backend import to_json
from tokenmill.server.batching import Batcher, Job, Worker
from tokenmill.server.errors import APIError, clip, invalid_param
from tokenmill.server.protocol import parse_body

logger = logging.getLogger("tokenmill.server")

#: how long a request waits for others to join it when its pipeline is idle
BATCH_WAIT_S = 0.002
#: most requests merged into one pipeline call
MAX_BATCH_REQUESTS = 64
#: most inputs in one request (OpenAI's limit for embeddings)
MAX_INPUTS = 2048
#: options whose results JSON cannot carry
_NOT_OVER_HTTP = {
    "return_tensors": "tensors cannot be sent as JSON; leave it out to get lists",
    # filters are the operator's choice, not the client's: a client could otherwise switch them off
    "filters": "output filters are set by the server operator (tokenmill serve --filters FILE)",
}


# -- loading -----------------------------------------------------------------------


def parse_task_specs(values: list[str]) -> list[tuple[str, str]]:
    """``TASK[=MODEL]`` flags -> (served task name, model) pairs; MODEL defaults to the task's.

    The served name is the canonical task ("ner" serves token-classification), except
    ``translation_XX_to_YY``, which keeps the languages it implies.
    """
    from tokenmill.pipelines.registry import resolve_task

    specs: list[tuple[str, str]] = []
    for value in values:
        task, sep, model = (part.strip() for part in value.partition("="))
        if sep and not model:
            raise ValueError(f"--task {value!r}: give a model after '=' or leave '=' out for the default")
        try:
            spec, implied = resolve_task(task)
        except ValueError as e:
            raise ValueError(f"--task {value!r}: {e}") from None
        chosen = model or spec.default_model
        if chosen is None:
            raise ValueError(
                f"--task {value!r}: {spec.name} has no default model in tokenmill; "
                f"use --task {task}=MODEL with a checkpoint fine-tuned for it"
            )
        name = task if implied else spec.name
        if (name, chosen) in specs:
            raise ValueError(f"--task {value!r} is given twice")
        specs.append((name, chosen))
    return specs


def load_pipelines(
    values: list[str],
    *,
    device: str | None = None,
    dtype: str | None = None,
    revision: str | None = None,
    batch_size: int = 8,
) -> PipelineSet:
    """Load every ``--task TASK[=MODEL]`` pipeline; a bad flag or model is a ValueError."""
    from tokenmill.pipelines import pipeline

    loaded = []
    for name, model in parse_task_specs(values):
        logger.info("loading %s pipeline with %s", name, model)
        pipe = pipeline(name, model, device=device, dtype=dtype, revision=revision, batch_size=batch_size)
        loaded.append((name, model, pipe))
    return PipelineSet(loaded)


# -- the served pipelines ----------------------------------------------------------


@dataclass
class ServedPipeline:
    task: str
    model: str
    pipe: Any
    batcher: Batcher = field(repr=False)


class PipelineSet:
    """The pipelines one server runs: ``(task, model name, pipeline)`` each, one worker thread.

    Args:
        batch_wait_s: how long a request waits for others when its pipeline is idle.
        max_batch_requests: most requests merged into one pipeline call.
    """

    def __init__(
        self,
        pipelines: list[tuple[str, str, Any]],
        *,
        batch_wait_s: float = BATCH_WAIT_S,
        max_batch_requests: int = MAX_BATCH_REQUESTS,
    ) -> None:
        self.worker = Worker(batch_wait_s, max_batch_requests)
        self.install_metrics(CollectorRegistry())
        self.by_task: dict[str, dict[str, ServedPipeline]] = {}
        for task, model, pipe in pipelines:
            if model in self.by_task.get(task, {}):
                raise ValueError(f"{task} with {model} is served twice")
            batcher = Batcher(
                self.worker,
                lambda n, t=task, m=model: self._requests.labels(t, m).inc(n),
                lambda t=task, m=model: self._calls.labels(t, m).inc(),
            )
            self.by_task.setdefault(task, {})[model] = ServedPipeline(task, model, pipe, batcher)

    def __bool__(self) -> bool:
        return bool(self.by_task)

    def __iter__(self) -> Iterator[ServedPipeline]:
        for models in self.by_task.values():
            yield from models.values()

    def describe(self) -> str:
        return ", ".join(f"{sp.task}={sp.model}" for sp in self)

    def install_metrics(self, registry: CollectorRegistry) -> None:
        """Count requests and pipeline calls per task and model in ``registry`` (the server's)."""
        labels = ("task", "model")
        self._requests = Counter(
            "tokenmill:pipeline_requests_total", "Requests run by task pipelines.", labels, registry=registry
        )
        self._calls = Counter(
            "tokenmill:pipeline_batches_total",
            "Pipeline calls; requests that arrive together share one.",
            labels,
            registry=registry,
        )

    def close(self) -> None:
        for sp in self:
            sp.batcher.cancel()
        self.worker.close()

    # -- lookup ---------------------------------------------------------------------
    def served_tasks(self) -> list[str]:
        return sorted(self.by_task)

    def models_for(self, task: str) -> tuple[str, dict[str, ServedPipeline]]:
        """The served name of ``task`` (aliases allowed) and its models; 404 when not served."""
        from tokenmill.pipelines.registry import ALIASES, resolve_task

        key = task if task in self.by_task else ALIASES.get(task, task)
        models = self.by_task.get(key)
        if models is not None:
            return key, models
        served = ", ".join(self.served_tasks()) or "none"
        try:
            resolve_task(task)
        except ValueError:
            raise APIError(
                404, f"unknown task '{clip(task)}'; this server serves: {served}", code="task_not_found"
            ) from None
        raise APIError(
            404,
            f"the task '{task}' is not served here (served: {served}); "
            f"start the server with --task {task}=MODEL to serve it",
            code="task_not_served",
        )


def pick_model(models: dict[str, ServedPipeline], model: str | None, what: str) -> ServedPipeline:
    if model is None:
        if len(models) == 1:
            return next(iter(models.values()))
        raise APIError(
            400,
            f"model is required: {what} is served by {', '.join(map(repr, models))}",
            param="model",
            code="missing_required_parameter",
        )
    if model not in models:
        raise APIError(
            404,
            f"the model '{clip(model)}' does not exist; {what} is served by {', '.join(map(repr, models))}",
            param="model",
            code="model_not_found",
        )
    return models[model]


def user_error(e: Exception, input_param: str, options_param: str | None) -> APIError:
    from tokenmill.pipelines.base import PipelineInputError

    param = input_param if isinstance(e, PipelineInputError) else options_param
    return invalid_param(str(e), param)


# -- POST /v1/pipelines/{task} -----------------------------------------------------


class PipelineRequest(BaseModel):
    """The Hugging Face Inference API's body, plus ``model`` to choose among several."""

    model_config = ConfigDict(extra="ignore", strict=True)

    inputs: Any
    parameters: dict[str, Any] | None = None
    model: str | None = None


class _Captured(BaseException):
    """Stops a pipeline call at ``run`` (a BaseException: no ``except Exception`` eats it)."""

    def __init__(self, items: list[Any], opts: dict[str, Any]) -> None:
        super().__init__()
        self.items, self.opts = items, opts


def _with_run(pipe: Any, run: Callable[[list[Any], dict[str, Any]], list[Any]]) -> Any:
    """A shallow copy of ``pipe`` whose ``run`` step is ``run`` (the pipeline itself is untouched)."""
    view = copy.copy(pipe)
    view.run = run
    return view


def _capture_job(sp: ServedPipeline, inputs: Any, params: dict[str, Any]) -> Job:
    from tokenmill.pipelines.base import Pipeline

    pipe = sp.pipe
    has_run = isinstance(pipe, Pipeline)  # the four steps, with run(items, options) in the middle

    def stop(items: list[Any], opts: dict[str, Any]) -> list[Any]:
        raise _Captured(list(items), dict(opts))

    def prepare() -> tuple[list[Any] | None, Any]:
        call = _with_run(pipe, stop) if has_run else pipe
        try:
            return None, call(inputs, **params)  # the whole call, where there is no run() to merge
        except TypeError as e:
            # checks only, so far: a parameter the call signature cannot take ("inputs"),
            # or a value of a type the checks did not expect
            raise ValueError(f"{sp.task} cannot take these parameters or inputs: {e}") from None
        except _Captured as c:
            if len(c.items) > MAX_INPUTS:
                from tokenmill.pipelines.base import PipelineInputError

                raise PipelineInputError(
                    f"inputs holds {len(c.items)} inputs; at most {MAX_INPUTS} per request"
                ) from None
            return c.items, c.opts

    def run(items: list[Any], opts: dict[str, Any]) -> list[Any]:
        return pipe.run(items, opts)

    def finish(results: list[Any]) -> Any:
        given = [results]

        def answer(items: list[Any], opts: dict[str, Any]) -> list[Any]:
            return given.pop() if given else pipe.run(items, opts)  # a second run(): do it

        return _with_run(pipe, answer)(inputs, **params)

    key = json.dumps(params, sort_keys=True, default=repr)
    return Job(key, prepare, run, finish)


async def pipeline_route(pipelines: PipelineSet, task: str, request: Request) -> Response:
    key, models = pipelines.models_for(task)
    req: PipelineRequest = parse_body(await request.body(), PipelineRequest)
    sp = pick_model(models, req.model, f"task '{key}'")
    params = dict(req.parameters or {})
    for name, why in _NOT_OVER_HTTP.items():
        if name in params:
            raise invalid_param(f"parameters.{name}: {why}", f"parameters.{name}")
    try:
        result = await sp.batcher.submit(_capture_job(sp, req.inputs, params))
    except ValueError as e:
        raise user_error(e, "inputs", "parameters") from None
    body = json.dumps(to_json(result), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return Response(body, media_type="application/json")


def model_cards(pipelines: PipelineSet, created: int) -> list[dict[str, Any]]:
    """One card per served pipeline model, listing its tasks."""
    cards: dict[str, dict[str, Any]] = {}
    for sp in pipelines:
        card = cards.setdefault(
            sp.model,
            {"id": sp.model, "object": "model", "created": created, "owned_by": "tokenmill", "tasks": []},
        )
        card["tasks"].append(sp.task)
    return list(cards.values())
