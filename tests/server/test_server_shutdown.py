"""`tokenmill serve` as a process: start-up line, SIGTERM drains and exits 0, bad flags exit 2."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
from server_util import sse_events


def _serve(*args: str, api_key: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TOKENMILL_API_KEY", None)
    if api_key:
        env["TOKENMILL_API_KEY"] = api_key
    return subprocess.Popen(
        [sys.executable, "-m", "tokenmill.cli.main", "serve", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)


def test_sigterm_finishes_in_flight_requests_and_exits_0(long_dir):
    proc = _serve(
        "--model", long_dir, "--dtype", "float32", "--device", "cpu", "--port", "0", api_key="env-key"
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stderr, lines), daemon=True).start()
    log = []
    try:
        end = time.monotonic() + 60
        url = None
        while url is None:
            line = lines.get(timeout=max(0.1, end - time.monotonic()))
            log.append(line)
            m = re.search(
                r"tokenmill serving (\S+) at (http://\S+) \(max_model_len 4096, KV cache \d+ blocks", line
            )
            url = m and m.group(2)
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the key came from TOKENMILL_API_KEY
        body = {"prompt": "Hello", "max_tokens": 1500, "temperature": 0, "ignore_eos": True, "stream": True}
        headers = {"Authorization": "Bearer env-key"}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=60) as r:
            events = sse_events(r.iter_lines())
            first = next(events)
            proc.send_signal(signal.SIGTERM)
            refused = False
            end = time.monotonic() + 10
            while not refused and time.monotonic() < end:
                try:
                    httpx.get(f"{url}/health", timeout=1)
                    time.sleep(0.05)
                except httpx.TransportError:
                    refused = True
            rest = list(events)
        assert refused, "the server still accepted connections after SIGTERM"
        assert rest[-1] == "[DONE]"
        chunks = [first, *rest[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    while not lines.empty():
        log.append(lines.get())
    assert "Traceback" not in "".join(log), "".join(log)


def test_bad_flags_exit_2_with_one_line(tmp_path):
    for args, expected in (
        (["--model", str(tmp_path / "missing")], "tokenmill serve: error:"),
        (["--model", "x", "--kv-cache-memory", "lots"], "--kv-cache-memory"),
    ):
        proc = _serve(*args)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        assert expected in err and "Traceback" not in err


def test_flag_errors_in_process(long_dir, capsys):
    from tokenmill.cli.main import main

    assert main(["serve", "--model", "x", "--request-timeout", "0"]) == 2
    assert "--request-timeout must be > 0" in capsys.readouterr().err
    assert main(["serve", "--model", "x", "--port", "70000"]) == 2
    assert "--port must be in [0, 65535]" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert (
            main(["serve", "--model", long_dir, "--dtype", "float32", "--device", "cpu", "--port", port]) == 2
        )
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
