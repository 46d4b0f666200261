"""The asyncio face of the engine: one stream per request, the engine on its own thread.

The engine loop runs in a background thread (torch releases the GIL in its kernels, so
the event loop stays responsive). ``from_config`` builds the engine on that same thread,
so every PyTorch call of the engine, loading included, comes from one thread (see
``_TorchThread``). Requests and aborts reach it through a lock-guarded
inbox; each step's outputs go back to the waiting coroutines with
``call_soon_threadsafe``. A request whose consumer stops listening (a client that
disconnects) is aborted, and its KV blocks are freed before the next step runs.
Other work on the model (beam search) goes through ``run_on_model_thread``: it runs on
the same thread between two steps, so it never races them.
"""

from __future__ import annotations

import asyncio
import logging
import queue as queue_mod
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

from tokenmill.generation.beam_search import beam_search, to_hypotheses
from tokenmill.generation.engine import EngineConfig, LLMEngine
from tokenmill.generation.errors import EngineDeadError, EngineOverloadedError, check_context
from tokenmill.generation.outputs import BeamHypothesis, RequestOutput
from tokenmill.generation.sampling_params import BeamSearchParams, SamplingParams
from tokenmill.generation.stats import EngineStats, StepStats

log = logging.getLogger("tokenmill.engine")

__all__ = ["AsyncEngine", "EngineDeadError", "EngineOverloadedError"]


class _TorchThread:
    """A daemon thread that runs jobs in order: the one thread of an engine's PyTorch calls.

    OpenMP keeps a worker pool for each thread that starts parallel regions. With a second
    pool (a model loaded on the main thread, then run on another) libgomp manages more
    threads than there are CPUs on a small machine and stops spinning between parallel
    regions, so every matmul waits for its workers to wake: a decode step measured 15-20%
    slower on 2 cores. Loading and stepping on one thread keeps one pool.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue_mod.SimpleQueue = queue_mod.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            fn, future = self._jobs.get()
            if fn is None:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:  # handed to the waiter, which re-raises it
                    future.set_exception(e)

    def submit(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        self._jobs.put((fn, future))
        return future

    def close(self) -> None:
        self._jobs.put((None, None))


class AsyncEngine:
    def __init__(
        self, engine: LLMEngine, model_name: str | None = None, *, torch_thread: _TorchThread | None = None
    ) -> None:
        self.engine = engine
        self.model_name = model_name or engine.config.model or "smollm2-135m-instruct"
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.model_config.vocab_size
        self.max_waiting = engine.config.max_waiting
        self.max_num_seqs = engine.config.max_num_seqs
        self.block_size = engine.config.block_size
        self.num_blocks = engine.kv.num_blocks
        self.kv_cache_bytes = engine.kv_cache_bytes
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._adds: list[tuple] = []
        self._aborts: list[str] = []
        self._calls: list[tuple[Callable[[], Any], Future]] = []
        self._calls_in_flight = 0
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._listeners: list[Callable[[StepStats], None]] = []
        self._worker = torch_thread
        self._thread: threading.Thread | None = None
        self._loop_done: Future | None = None
        self._stop = False
        self._accepting = False
        self._error: BaseException | None = None
        self._stats = engine.stats()

    @classmethod
    def from_config(cls, config: EngineConfig, model_name: str | None = None) -> AsyncEngine:
        """Build the engine on the thread that will step it."""
        worker = _TorchThread("tokenmill-engine")
        try:
            engine = worker.submit(lambda: LLMEngine.from_config(config)).result()
        except BaseException:
            worker.close()
            raise
        return cls(engine, model_name, torch_thread=worker)

    # -- life cycle -------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is not None:
            return
        self._stop, self._accepting = False, True
        if self._worker is None:
            self._worker = _TorchThread("tokenmill-engine")
        self._thread = self._worker.thread
        self._loop_done = self._worker.submit(self._loop)

    @property
    def is_running(self) -> bool:
        return (
            self._loop_done is not None
            and not self._loop_done.done()
            and self._thread is not None
            and self._thread.is_alive()
            and self._error is None
            and not self._stop
        )

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting; let in-flight requests finish for up to ``timeout`` s, abort the rest."""
        self._accepting = False
        end = time.monotonic() + timeout
        while (self._queues or self._calls_in_flight) and time.monotonic() < end and self.is_running:
            await asyncio.sleep(0.05)
        with self._lock:
            self._stop = True  # the engine thread aborts what is left; streams get an error event
            self._wake.notify()
        if self._loop_done is not None:
            done = asyncio.wrap_future(self._loop_done)
            try:
                await asyncio.wait_for(asyncio.shield(done), 10.0)
            except (asyncio.TimeoutError, Exception):
                pass  # a hung or failed loop: the streams below still learn the server stopped
        if self._worker is not None:
            self._worker.close()
            await asyncio.get_running_loop().run_in_executor(None, self._worker.thread.join, 5.0)
        for loop, queue in list(self._queues.values()):
            loop.call_soon_threadsafe(queue.put_nowait, EngineDeadError("the server is shutting down"))

    # -- requests ---------------------------------------------------------------------
    def resolve_params(self, params: SamplingParams | None, prompt_len: int) -> SamplingParams:
        return self.engine.resolve_params(params, prompt_len)

    def stats(self) -> EngineStats:
        return self._stats

    def add_stats_listener(self, fn: Callable[[StepStats], None]) -> None:
        self._listeners.append(fn)

    def abort(self, request_id: str) -> None:
        """End a request; its stream gets a last output with finish_reason "abort"."""
        with self._lock:
            self._aborts.append(request_id)
            self._wake.notify()

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        deadline: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream cumulative outputs of one request; leaving early aborts it."""
        if not self.is_running or not self._accepting:
            raise EngineDeadError(self._dead_reason())
        if self.max_waiting is not None:
            # Requests in flight beyond the engine's seats are waiting; this loop alone adds
            # and removes them, so the count is exact. A request that finds a free seat is
            # never refused.
            waiting = len(self._queues) - self.max_num_seqs
            if waiting >= self.max_waiting:
                raise EngineOverloadedError(
                    f"{waiting} requests are already waiting (the limit is {self.max_waiting}); retry later"
                )
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already running")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            # Checked under the lock the engine thread takes to fail: a request is either
            # refused here or seen (and told) by the thread's error handler.
            if self._error is not None or self._stop:
                raise EngineDeadError(self._dead_reason())
            self._queues[request_id] = (loop, queue)
            self._adds.append((request_id, list(prompt_ids), params, time.perf_counter(), deadline))
            self._wake.notify()
        finished = False
        try:
            while True:
                item = await queue.get()
                # Outputs are cumulative: when the consumer fell behind, only the newest matters.
                while not isinstance(item, BaseException) and not item.finished and not queue.empty():
                    item = queue.get_nowait()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    async def run_on_model_thread(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the engine thread between two steps and return its result.

        Engine steps wait while ``fn`` runs, so it may use the model and its runner freely
        (beam search does). Its exception is raised here; it does not stop the engine.
        A caller that stops waiting before ``fn`` starts cancels it.
        """
        if not self.is_running or not self._accepting:
            raise EngineDeadError(self._dead_reason())
        future: Future = Future()
        with self._lock:
            if self._error is not None or self._stop:
                raise EngineDeadError(self._dead_reason())
            self._calls.append((fn, future))
            self._wake.notify()
        self._calls_in_flight += 1
        try:
            return await asyncio.wrap_future(future)
        finally:
            self._calls_in_flight -= 1

    async def beam_search(
        self, prompt_ids: list[int], params: BeamSearchParams, check: Callable[[], None] | None = None
    ) -> list[BeamHypothesis]:
        """``LLM.beam_search`` of one prompt, run on the engine thread: hypotheses best first.

        The search keeps its own dense KV cache (``beam_width`` rows of prompt plus
        ``max_tokens``), outside the paged cache; engine steps wait until it ends.
        ``check`` is called before each forward pass; what it raises ends the search.
        """
        check_context(len(prompt_ids), params.max_tokens, self.max_model_len)
        engine, ids = self.engine, list(prompt_ids)

        def check_step() -> None:
            if self._stop:  # shutdown waited its time; the engine thread must end
                raise EngineDeadError("the server is shutting down")
            if check is not None:
                check()

        def run() -> list[BeamHypothesis]:
            results = beam_search(engine.runner, ids, params, engine.eos_token_ids, check_step)
            return to_hypotheses(results, self.tokenizer, params.skip_special_tokens)

        return await self.run_on_model_thread(run)

    def _dead_reason(self) -> str:
        if self._error is not None:
            return f"the engine stopped after an error: {self._error}"
        if self._thread is None:
            return "the engine is not started"
        return "the engine is shutting down"

    # -- the engine thread ------------------------------------------------------------
    def _loop(self) -> None:
        engine = self.engine
        calls: list[tuple[Callable[[], Any], Future]] = []
        try:
            while True:
                with self._lock:
                    while not (
                        self._stop or self._adds or self._aborts or self._calls or engine.has_unfinished()
                    ):
                        self._wake.wait()
                    adds, self._adds = self._adds, []
                    aborts, self._aborts = self._aborts, []
                    calls, self._calls = self._calls, []
                    stop = self._stop
                for request_id in aborts:
                    group = engine.get_group(request_id)
                    if engine.abort(request_id) and group is not None:
                        self._send(request_id, engine.snapshot(group))  # a listener learns why it ended
                for request_id, ids, params, arrival, deadline in adds:
                    if request_id not in self._queues:
                        continue  # its client left before the engine saw it
                    try:
                        engine.add_request(request_id, ids, params, arrival_time=arrival, deadline=deadline)
                    except Exception as e:  # one bad request fails alone, not the engine
                        self._send(request_id, e if isinstance(e, ValueError) else ValueError(str(e)))
                if stop:
                    self._fail_calls(calls, EngineDeadError("the server is shutting down"))
                    calls = []
                for fn, future in calls:
                    if not future.set_running_or_notify_cancel():
                        continue  # its caller stopped waiting
                    try:
                        result = fn()
                    except BaseException as e:  # the caller's error; only a non-Exception stops the engine
                        future.set_exception(e)
                        if not isinstance(e, Exception):
                            raise
                    else:
                        future.set_result(result)
                calls = []  # an idle loop keeps no result (nor a failed call's traceback) alive
                if stop:
                    for request_id in list(self._queues):
                        engine.abort(request_id)
                    self._publish(engine.step())  # reports the aborts; runs nothing
                    return
                self._publish(engine.step())
        except BaseException as e:  # a failed step: every stream learns why, the engine stops
            log.exception("engine step failed")
            with self._lock:
                self._error = e
            for request_id in list(self._queues):
                self._send(request_id, EngineDeadError(f"the engine stopped after an error: {e}"))
        finally:
            with self._lock:
                calls, self._calls = calls + self._calls, []
            self._fail_calls(calls, EngineDeadError(self._dead_reason()))
            self._stats = engine.stats()

    @staticmethod
    def _fail_calls(calls: list[tuple[Callable[[], Any], Future]], error: BaseException) -> None:
        for _fn, future in calls:
            if not future.done() and (future.running() or future.set_running_or_notify_cancel()):
                future.set_exception(error)

    def _publish(self, groups) -> None:
        engine = self.engine
        # Stats first: a client that has its last output must find the step in the metrics.
        self._stats = engine.stats()
        for fn in self._listeners:
            try:
                fn(engine.last_stats)
            except Exception:
                log.exception("stats listener failed")
        for group in groups:
            if group.request_id in self._queues:
                self._send(group.request_id, engine.snapshot(group))

    def _send(self, request_id: str, item) -> None:
        entry = self._queues.get(request_id)
        if entry is not None:
            loop, queue = entry
            loop.call_soon_threadsafe(queue.put_nowait, item)
