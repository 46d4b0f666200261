"""Start-up time: from a new process to the first token, cold and warm.

Two paths, each in fresh processes:

* ``LLM()``: ``python -c "from tokenmill import LLM; LLM().generate(...)"``; the time
  from process start to the first generated token, split into import, ``LLM()`` and the
  first token.
* ``tokenmill serve``: from spawning the server to the first answered
  ``/v1/completions`` request (polled every 50 ms).

"Cold" runs with an empty kernel cache (``TOKENMILL_CACHE`` pointed at a new directory), so
tokenmill compiles its CPU kernels; "warm" reuses the cache the cold run filled. Both use
the embedded default model. Medians over ``--rounds``.

    python benchmarks/bench_startup.py [--rounds 3] [--dtype auto]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

LLM_SCRIPT = """
import time, json, sys
t0 = float(sys.argv[1])
t1 = time.time()
from tokenmill import LLM, SamplingParams
t2 = time.time()
llm = LLM(dtype=sys.argv[2])
t3 = time.time()
llm.generate(["Hello"], SamplingParams(max_tokens=1, temperature=0))
t4 = time.time()
print(json.dumps({"interpreter": t1 - t0, "import": t2 - t1, "LLM()": t3 - t2, "first_token": t4 - t3,
                  "total": t4 - t0}))
"""


def run_llm(cache: str, dtype: str) -> dict:
    env = dict(os.environ, TOKENMILL_CACHE=cache)
    out = subprocess.run(
        [sys.executable, "-c", LLM_SCRIPT, repr(time.time()), dtype],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_serve(cache: str, dtype: str) -> dict:
    port = _free_port()
    env = dict(os.environ, TOKENMILL_CACHE=cache)
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenmill.cli.main", "serve", "--port", str(port), "--dtype", dtype],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    body = {"prompt": "Hello", "max_tokens": 1, "temperature": 0}
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tokenmill serve exited with {proc.returncode} before answering")
            if time.time() - t0 > 600:
                raise RuntimeError("tokenmill serve did not answer within 600 s")
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30)
                if r.status_code == 200:
                    return {"first_answer": time.time() - t0}
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_startup.json"))
    args = ap.parse_args()
    rows: dict[str, list[dict]] = {"LLM cold": [], "LLM warm": [], "serve cold": [], "serve warm": []}
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as cache:
            rows["LLM cold"].append(run_llm(cache, args.dtype))
            rows["LLM warm"].append(run_llm(cache, args.dtype))
        with tempfile.TemporaryDirectory() as cache:
            rows["serve cold"].append(run_serve(cache, args.dtype))
            rows["serve warm"].append(run_serve(cache, args.dtype))
    medians = {
        name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in rows.items()
    }
    print(f"start-up, medians of {args.rounds} rounds (s), dtype {args.dtype}:\n")
    print("| path | import | LLM() | first token | to first token / first answer |")
    print("|---|---|---|---|---|")
    for name in ("LLM cold", "LLM warm"):
        m = medians[name]
        print(
            f"| {name} | {m['import']:.2f} | {m['LLM()']:.2f} | {m['first_token']:.2f} | {m['total']:.2f} |"
        )
    for name in ("serve cold", "serve warm"):
        print(f"| tokenmill {name} | | | | {medians[name]['first_answer']:.2f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"rounds": rows, "medians": medians, "dtype": args.dtype}, f, indent=1)
    print(f"\nresults written to {args.out}")


if __name__ == "__main__":
    main()
