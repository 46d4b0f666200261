"""Take the playground's screenshots for docs/playground.md (docs/img/playground-*.png).

    python scripts/screenshots.py [--skip-tests]

First the browser tests run with TOKENMILL_DOC_SCREENSHOTS set: each view's test copies
its screenshot into docs/img. Their LLM is a tiny random model, so the generation, token,
attention, beam search, chat and metrics views are then taken again with a real one (the packaged
SmolLM2-135M-Instruct by default), the metrics page after most of a minute of mixed
traffic so its charts have history to draw. Needs what the browser tests need: Debian's
chromium and chromium-driver, and selenium.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
IMG = ROOT / "docs" / "img"
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "browser")]


def run_tests() -> None:
    env = dict(os.environ, TOKENMILL_DOC_SCREENSHOTS=str(IMG))
    subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "tests/browser"],
        cwd=ROOT,
        env=env,
        check=True,
    )


def shot(page, name: str, scroll_to: str | None = None) -> None:
    if scroll_to:
        page.js("document.querySelector(arguments[0]).scrollIntoView({block: 'start'})", scroll_to)
    else:
        page.js("window.scrollTo(0, 0)")
    IMG.mkdir(parents=True, exist_ok=True)
    page.driver.save_screenshot(str(IMG / f"playground-{name}.png"))


def tour(page) -> None:
    """The LLM's views with a real model: generation mid-stream, tokens, attention, chat."""
    from selenium.webdriver.support.ui import Select

    page.open()
    page.fill("#prompt", "The three largest cities of France are")
    page.set_params(temperature=0.7, top_p=0.9, seed=3, max_tokens=48)
    page.el("#generate").click()
    page.wait(lambda: int(page.text("#stat-tokens")) >= 20, 60, "some streamed tokens")
    shot(page, "generate")
    page.wait(lambda: page.text("#stat-finish") not in ("", "streaming…"), 120, "the end of the stream")
    page.el("#tab-tokens").click()
    page.wait_el("#token-view[data-source='inspect']", 120)
    # the step where the model hesitated most: the chosen token's probability is lowest
    probs = page.js(
        "return [...document.querySelectorAll('#token-view .tok[data-index]')]"
        ".map(e => parseFloat(e.title.slice(4)))"
    )
    step = min(range(len(probs)), key=probs.__getitem__)
    page.els("#token-view .tok[data-index]")[step].click()
    page.wait_el("#token-view table.alternatives")
    shot(page, "tokens", "#gen-stats")

    page.el("#tab-attention").click()
    page.el("#attn-use-run").click()  # off: a short sentence of its own reads better
    page.fill("#attn-input", "The cat sat on the mat because it was tired.")
    page.el("#attn-run").click()
    page.wait_el("#attn-layer", 120)
    Select(page.el("#attn-layer")).select_by_value("3")
    page.wait(lambda: page.els(".attn-row-item"), 60, "the layer's weights")
    # what "it" looks back at
    it = next(o for o in page.els("#attn-query option") if o.text.endswith("·it"))
    Select(page.el("#attn-query")).select_by_value(it.get_attribute("value"))
    time.sleep(1)
    shot(page, "attention", "#panel-attention .attn-pickers")

    # beam search, where the server runs it: every hypothesis, best first
    if page.js("return window.tokenmillConfig.beam_search"):
        page.el("#tab-text").click()
        page.fill("#prompt", "The best thing about Paris is")
        page.set_params(beam=4, max_tokens=16)
        page.generate(timeout=180)
        shot(page, "beam", "#gen-stats")
        page.set_params(beam=1)

    page.go("#/task/chat")
    page.wait_el("#chat-system")
    page.fill("#prompt", "What is the capital of France? Answer in one sentence.")
    page.set_params(temperature=0.3, seed=1, max_tokens=40)
    page.el("#generate").click()
    page.wait(lambda: page.els(".msg.assistant .feedback"), 120, "the answer")
    shot(page, "chat")


def traffic(url: str, key: str, until: float) -> None:
    """Completions of mixed lengths from a few clients, with pauses, until ``until``."""
    rng = random.Random(0)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
        while time.monotonic() < until:
            n = rng.choice([8, 16, 32, 64])
            c.post(
                "/v1/completions",
                json={"prompt": "Once upon a time", "max_tokens": n, "min_tokens": n, "temperature": 0.8},
            )
            time.sleep(rng.uniform(0.2, 1.5))


def real_model_shots(model: str, seconds: float) -> None:
    from browser_util import API_KEY, Page, Server

    with tempfile.TemporaryDirectory() as tmp:
        server = Server("--model", model, "--dtype", "float32", "--device", "cpu", "--max-model-len", "1024", "--kv-cache-memory", "64MiB",
                        api_key=API_KEY, timeout=300)  # fmt: skip
        page = Page(server.url, Path(tmp), api_key=API_KEY)
        try:
            tour(page)
            page.go("#/metrics")
            page.js("const s = document.getElementById('metrics-window'); s.value = '60000';"
                    "s.dispatchEvent(new Event('change'));")  # fmt: skip
            until = time.monotonic() + seconds
            clients = [threading.Thread(target=traffic, args=(server.url, API_KEY, until)) for _ in range(4)]
            for t in clients:
                t.start()
            for t in clients:
                t.join()
            time.sleep(2.5)  # one more poll after the last request
            IMG.mkdir(parents=True, exist_ok=True)
            shot(page, "metrics")
        finally:
            page.close()
            server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-tests", action="store_true", help="only the real model's shots")
    ap.add_argument(
        "--model", default="smollm2-135m-instruct", help="the LLM of the generation, chat and metrics shots"
    )
    ap.add_argument("--seconds", type=float, default=50, help="how long the metrics page watches traffic")
    args = ap.parse_args()
    if not args.skip_tests:
        run_tests()
    real_model_shots(args.model, args.seconds)
    for png in sorted(IMG.glob("playground-*.png")):
        print(f"{png.relative_to(ROOT)}  {png.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
