"""Helpers of the server tests: a real uvicorn server in a thread, SSE and metrics parsing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator

import uvicorn

API_KEY = "test-key"
MODEL = "tiny-llama"
LONG_CONTEXT = 4096


class ServerThread:
    """uvicorn serving ``app`` on a free port, its event loop on a daemon thread."""

    def __init__(self, app) -> None:
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", timeout_graceful_shutdown=5
        )
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, name="test-uvicorn", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve()

        asyncio.run(main())

    def start(self) -> ServerThread:
        self.thread.start()
        end = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def call(self, coro, timeout: float = 30.0):
        """Run ``coro`` on the server's event loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def make_engine(model_dir: str, **kwargs):
    from tokenmill.generation.async_engine import AsyncEngine
    from tokenmill.generation.engine import EngineConfig

    kwargs.setdefault("kv_cache_memory", 16 * 2**20)
    return AsyncEngine.from_config(EngineConfig(model=model_dir, dtype="float32", device="cpu", **kwargs))


@contextlib.contextmanager
def serving(engine, **app_kwargs) -> Iterator[ServerThread]:
    from tokenmill.server.app import create_app

    app_kwargs.setdefault("shutdown_timeout", 2.0)
    server = ServerThread(create_app(engine, **app_kwargs)).start()
    try:
        yield server
    finally:
        server.stop()


def wait_idle(engine, timeout: float = 2.0) -> None:
    """Poll until the engine runs nothing and holds no KV blocks."""
    end = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if s.num_running == 0 and s.num_waiting == 0 and s.kv_blocks_used == 0:
            return
        if time.monotonic() > end:
            raise AssertionError(f"the engine is not idle after {timeout} s: {s}")
        time.sleep(0.02)


def sse_events(lines) -> Iterator[dict | str]:
    """The data of each server-sent event: parsed JSON, or the string "[DONE]"."""
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: ") :]
        yield data if data == "[DONE]" else json.loads(data)


def metric_value(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0
