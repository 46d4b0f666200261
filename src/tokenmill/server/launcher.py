"""`tokenmill serve`: load the engine, bind the port, run uvicorn, shut down cleanly.

On SIGTERM or SIGINT uvicorn stops accepting connections and waits (at most
``DRAIN_TIMEOUT`` seconds) for in-flight requests; the app's lifespan then shuts the
engine down, and the process exits 0. A second SIGINT forces the exit.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger("tokenmill.server")

#: seconds in-flight requests get to finish after SIGTERM before they are cancelled
DRAIN_TIMEOUT = 30


def engine_config(args: argparse.Namespace) -> Any:
    """EngineConfig from the `serve` flags; a bad value is a ValueError naming the flag."""
    from tokenmill.generation.engine import EngineConfig

    kv_bytes = None
    if args.kv_cache_memory is not None:
        from tokenmill.utils.devices import parse_memory

        try:
            kv_bytes = parse_memory(args.kv_cache_memory)
        except ValueError as e:
            raise ValueError(f"--kv-cache-memory: {e}") from None
    if args.max_waiting is not None and args.max_waiting < 0:
        raise ValueError(f"--max-waiting must be >= 0, got {args.max_waiting}")
    return EngineConfig(
        model=args.model,
        dtype=None if args.dtype == "auto" else args.dtype,
        device=args.device,
        revision=args.revision,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        kv_cache_memory=kv_bytes,
        enable_prefix_caching=not args.no_prefix_caching,
        max_waiting=args.max_waiting,
        quantization=args.quantization,
        enforce_eager=args.enforce_eager,
    )


def _check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.request_timeout is not None and not args.request_timeout > 0:
        raise ValueError(f"--request-timeout must be > 0 seconds, got {args.request_timeout}")
    if getattr(args, "request_log", False) and not getattr(args, "feedback_db", None):
        raise ValueError("--request-log needs a database to write to: add --feedback-db PATH_OR_URL")
    retention = getattr(args, "request_log_retention", None)
    if retention is not None and not retention > 0:
        raise ValueError(f"--request-log-retention must be > 0 days, got {retention}")


def _bind(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) socket: connections are refused until the server is ready."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} is not an address this machine can listen on: {e}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _log_config(level: str) -> dict[str, Any]:
    import uvicorn.config

    cfg = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    cfg["loggers"]["tokenmill"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return cfg


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _make_server(
    config: Any, engine: Any, sock: socket.socket, model_name: str, pipelines: Any = None
) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises a caught SIGTERM after its graceful shutdown, which would end
            # the process with -15; a drained, clean shutdown is a success, so exit 0 instead.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.should_exit:  # the lifespan failed; uvicorn has said why
                return
            if pipelines:
                logger.info("tokenmill serving pipelines %s at %s", pipelines.describe(), _url(sock))
            if engine is None:
                return
            kv = (
                f"KV cache {engine.num_blocks} blocks of {engine.block_size} tokens, "
                f"{engine.kv_cache_bytes / 2**20:.0f} MiB"
            )
            logger.info(
                "tokenmill serving %s at %s (max_model_len %d, %s)",
                model_name,
                _url(sock),
                engine.max_model_len,
                kv,
            )

    return Server(config)


def serve(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM/SIGINT. Returns the exit code."""
    import uvicorn

    from tokenmill.generation.async_engine import AsyncEngine
    from tokenmill.server.app import create_app

    _check_args(args)
    level = getattr(args, "log_level", "info")
    logging.getLogger("tokenmill").setLevel(level.upper())
    api_key = args.api_key or os.environ.get("TOKENMILL_API_KEY") or None
    tasks = getattr(args, "task", None) or []
    # With --task and no --model the server runs only those pipelines, no LLM.
    with_engine = args.model is not None or not tasks
    if not with_engine and args.served_model_name:
        raise ValueError("--served-model-name names the --model's model; give --model too")
    filters = None
    if getattr(args, "filters", None):
        from tokenmill.filters import load_filters

        filters = load_filters(args.filters)  # before the models load: a bad file fails at once
        logger.info("output filters from %s: %s", args.filters, filters.describe())
    store = None
    if getattr(args, "feedback_db", None):
        # opened before the models load: a database that cannot be reached fails at once
        from tokenmill.feedback import open_store

        store = open_store(
            args.feedback_db, request_log=args.request_log, retention_days=args.request_log_retention
        )
    pipelines = None
    if tasks:
        from tokenmill.server.pipelines import load_pipelines

        dtype = None if args.dtype == "auto" else args.dtype
        pipelines = load_pipelines(tasks, device=args.device, dtype=dtype)
    engine = AsyncEngine.from_config(engine_config(args)) if with_engine else None
    model_name = args.served_model_name or (engine.model_name if engine else "")
    sock = _bind(args.host, args.port)
    app = create_app(
        engine,
        pipelines=pipelines,
        served_model_name=model_name,
        api_key=api_key,
        request_timeout=args.request_timeout,
        store=store,
        filters=filters,
    )
    config = uvicorn.Config(
        app,
        log_level=level,
        log_config=_log_config(level),
        timeout_graceful_shutdown=DRAIN_TIMEOUT,
        lifespan="on",
    )
    server = _make_server(config, engine, sock, model_name, pipelines)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if store is not None:
            store.close()  # closed by the app's lifespan already, unless it never started
    return 0 if server.started else 1  # a clean, drained shutdown is a success
