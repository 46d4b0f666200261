"""Requests that arrive together run as one pipeline call, on one worker thread.

Each served pipeline has a ``Batcher``; all of them share one ``Worker``: a single thread
(pipeline calls never overlap; torch parallelises inside each) and an asyncio lock that
says whose call runs. A batcher takes its waiting requests only once it holds the
worker, so everything that arrived while the worker was busy runs in its next call. An
idle pipeline waits ``wait_s`` first, so requests sent at the same moment meet.

A request is a ``Job``. On the worker, each job is prepared on its own (its checks fail
it alone), the jobs whose keys and options are equal run as one call, and each job
finishes with its share of the results. When the merged call fails on an input, each
job runs alone, so only the request with the bad input fails, with an error that counts
inputs from its own first one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tokenmill.server.errors import SERVER_ERROR, APIError


@dataclass
class Job:
    """One request's work; ``prepare``, ``run`` and ``finish`` run on the worker thread.

    ``prepare()`` returns ``(items, options)`` to merge with other jobs, or
    ``(None, answer)`` when it answered the request itself; ``run(items, options)``
    gives one result per item; ``finish(results)`` turns this job's results into its answer.
    """

    key: str  # jobs merge only when their keys and prepared options are equal
    prepare: Callable[[], tuple[list[Any] | None, Any]]
    run: Callable[[list[Any], dict[str, Any]], list[Any]]
    finish: Callable[[list[Any]], Any]
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    outcome: Any = None
    error: BaseException | None = None
    items: list[Any] = field(default_factory=list)
    opts: dict[str, Any] = field(default_factory=dict)


class Worker:
    """The thread every pipeline call runs on, and the lock that hands it out."""

    def __init__(self, wait_s: float, max_jobs: int) -> None:
        if wait_s < 0:
            raise ValueError(f"batch wait must be >= 0 seconds, got {wait_s}")
        if max_jobs < 1:
            raise ValueError(f"max requests per call must be >= 1, got {max_jobs}")
        self.wait_s = wait_s
        self.max_jobs = max_jobs
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock: asyncio.Lock | None = None

    @property
    def executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenmill-pipeline")
        return self._executor

    @property
    def lock(self) -> asyncio.Lock:
        # made on first use, inside the server's event loop
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def close(self) -> None:
        """Wait for the running call, drop the thread; a later request starts a new one."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self._executor = self._lock = None


class Batcher:
    """The waiting requests of one pipeline.

    Args:
        on_jobs: called with the number of requests each time some are taken to run.
        on_call: called (on the worker thread) for each pipeline call made.
    """

    def __init__(self, worker: Worker, on_jobs: Callable[[int], None], on_call: Callable[[], None]) -> None:
        self.worker = worker
        self.on_jobs = on_jobs
        self.on_call = on_call
        self.pending: list[Job] = []
        self.task: asyncio.Task | None = None

    async def submit(self, job: Job) -> Any:
        """The job's answer; its error is raised here."""
        self.pending.append(job)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._drain())
        return await job.future

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def _drain(self) -> None:
        await asyncio.sleep(self.worker.wait_s)
        loop = asyncio.get_running_loop()
        while self.pending:
            async with self.worker.lock:
                n = self.worker.max_jobs
                jobs = [j for j in self.pending[:n] if not j.future.done()]  # done: the client left
                del self.pending[:n]
                if not jobs:
                    continue
                self.on_jobs(len(jobs))
                try:
                    await loop.run_in_executor(self.worker.executor, run_jobs, jobs, self.on_call)
                except BaseException as e:  # cancelled, or the worker was closed: the server stops
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(
                                APIError(
                                    503,
                                    "the server is shutting down",
                                    type=SERVER_ERROR,
                                    code="shutting_down",
                                )
                            )
                    if isinstance(e, asyncio.CancelledError):
                        raise
                    continue
            for job in jobs:
                if job.future.done():
                    continue
                if job.error is not None:
                    job.future.set_exception(job.error)
                else:
                    job.future.set_result(job.outcome)


def run_jobs(jobs: list[Job], on_call: Callable[[], None]) -> None:
    """Prepare, merge, run and finish ``jobs``; sets each one's outcome or error."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        try:
            items, value = job.prepare()
        except Exception as e:
            job.error = e
            continue
        if items is None:
            on_call()  # the pipeline answered the request in a call of its own
            job.outcome = value
            continue
        job.items, job.opts = items, value
        groups.setdefault(json.dumps([job.key, value], sort_keys=True, default=repr), []).append(job)
    for group in groups.values():
        for job, part in zip(group, _run_group(group, on_call)):
            if part is None:
                continue
            try:
                job.outcome = job.finish(part)
            except Exception as e:
                job.error = e


def _run_group(group: list[Job], on_call: Callable[[], None]) -> list[list[Any] | None]:
    """Each job's results from one merged call (None where the job failed)."""
    run, opts = group[0].run, group[0].opts
    try:
        on_call()
        results = run([x for job in group for x in job.items], opts)
        return _split(results, [len(job.items) for job in group])
    except ValueError as e:
        if len(group) == 1:
            group[0].error = e
            return [None]
    except Exception as e:
        for job in group:
            job.error = e
        return [None] * len(group)
    # An input of one request failed the merged call: run each request alone.
    parts: list[list[Any] | None] = []
    for job in group:
        try:
            on_call()
            parts.append(run(job.items, opts))
        except Exception as e:
            job.error = e
            parts.append(None)
    return parts


def _split(results: list[Any], sizes: list[int]) -> list[list[Any]]:
    if len(results) != sum(sizes):
        raise RuntimeError(f"a pipeline returned {len(results)} results for {sum(sizes)} inputs")
    out, start = [], 0
    for n in sizes:
        out.append(results[start : start + n])
        start += n
    return out
