"""The playground in a real headless Chromium against a real `tokenmill serve`.

Each test drives the page as a user would (click, type, upload), then checks what the
page shows against the same server answered over plain HTTP. Every test saves a
screenshot in its own directory, and fails if the page logged a console error.
"""

from __future__ import annotations

import math
import re
import sqlite3
import time
from decimal import ROUND_HALF_UP, Decimal

import httpx
import pytest

from browser_util import API_KEY, KEY_STORAGE

MODEL = "tiny-llama"


def _pct(p: float, digits: int = 2) -> str:
    """What the page prints for a probability: JavaScript's ``(p * 100).toFixed(digits)``,
    which rounds the double's exact value half up (Python's format rounds half to even)."""
    exact = Decimal(p * 100).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP)
    return f"{exact}%"


def _number(text: str) -> float:
    """'12.3 ms' -> 0.0123 s, '1.20 s' -> 1.2, '82.5' -> 82.5."""
    value = float(text.split()[0])
    return value / 1000 if text.endswith(" ms") else value


# -- the page and its files ---------------------------------------------------------------


def test_page_is_public_and_v1_needs_the_key(served):
    url = served["url"]
    page = httpx.get(f"{url}/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/static/js/app.js">' in page.text
    for path, kind in (("/static/js/app.js", "javascript"), ("/static/style.css", "text/css")):
        r = httpx.get(f"{url}{path}")
        assert r.status_code == 200 and kind in r.headers["content-type"], (path, r.headers)
    missing = httpx.get(f"{url}/static/nothing.js")
    assert missing.status_code == 404
    assert httpx.get(f"{url}/v1/playground/config").status_code == 401
    cfg = httpx.get(f"{url}/v1/playground/config", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert cfg["llm"] == {"model": MODEL, "max_model_len": 4096, "chat": True}
    assert [t["task"] for t in cfg["tasks"]] == ["image-classification", "text-classification"]
    assert cfg["tasks"][1]["models"] == [served["classifier"]]
    assert (
        cfg["routes"]["feedback"] and cfg["routes"]["inspect_tokens"] and cfg["routes"]["inspect_attention"]
    )
    # true once the completion routes take use_beam_search (test_beam_search_* follows it)
    assert isinstance(cfg["beam_search"], bool)


def test_task_picker_lists_what_the_server_serves(page):
    page.open()
    links = [a.get_attribute("data-task") for a in page.els("#task-list a")]
    assert links == ["text-generation", "chat", "image-classification", "text-classification"]
    assert page.text("#task-title") == "Text generation"
    assert MODEL in page.text("#server-info")


# -- generation ---------------------------------------------------------------------------------


def test_streaming_shows_live_latency_and_the_metrics_page_counts_it(page, api):
    before = api.get("/metrics").text
    page.open()
    page.fill("#prompt", "The capital of France is")
    # min_tokens = max_tokens: the random model cannot end early, so the stream lasts
    page.set_params(temperature=0.8, seed=7, max_tokens=300, min_tokens=300)
    page.el("#generate").click()
    # mid-stream: the first token's latency is shown while tokens still arrive
    page.wait(
        lambda: page.text("#stat-finish") == "streaming…" and page.text("#stat-ttft") != "–",
        30,
        "a live TTFT",
    )
    seen = page.wait(lambda: page.completion_text(), 10, "streamed text")
    live_count = int(page.text("#stat-tokens"))
    page.shot("streaming", "playground-generate")
    page.wait(lambda: page.text("#stat-finish") == "length", 60, "the end of the stream")
    assert live_count < 300 and page.completion_text().startswith(seen)
    assert page.text("#stat-tokens").startswith("300 (+")
    ttft, tpot, tps = (_number(page.text(s)) for s in ("#stat-ttft", "#stat-tpot", "#stat-tps"))
    assert 0 < ttft < 30 and 0 < tpot < 1 and tps > 0
    # the server's own histograms saw the request the page made
    after = api.get("/metrics").text

    def count(text: str, name: str) -> float:
        m = re.search(rf"^tokenmill:{name} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    assert count(after, "generation_tokens_total") - count(before, "generation_tokens_total") >= 300
    assert count(after, "time_to_first_token_seconds_count") > count(
        before, "time_to_first_token_seconds_count"
    )
    page.go("#/metrics")
    page.wait(lambda: int(page.text("#card-generated")) >= 300, 20, "the metrics page to count the tokens")
    page.wait(lambda: "observations" in page.text("#caption-ttft"), 20, "the TTFT distribution")
    page.wait(lambda: "observations" in page.text("#caption-tpot"), 20, "the TPOT distribution")
    # the charts are drawn: some pixel of each canvas is not blank
    for chart in ("requests", "kv", "throughput", "latency", "ttft", "tpot"):
        drawn = page.js(
            "const c = document.getElementById(arguments[0]);"
            "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "for (let i = 3; i < d.length; i += 4) if (d[i] > 0) return true; return false;",
            f"chart-{chart}",
        )
        assert drawn, chart
    page.shot("metrics", "playground-metrics")


def test_same_seed_same_output_other_seed_other_output(page, api):
    page.open()
    page.fill("#prompt", "Hello world!")
    page.set_params(temperature=1.0, top_p=0.95, seed=1234, max_tokens=24, min_tokens=24)
    assert page.generate() == "length"
    first = page.completion_text()
    assert page.generate() == "length"
    assert page.completion_text() == first
    page.set_params(seed=4321)
    page.generate()
    assert page.completion_text() != first
    # the page sent exactly these fields: the server answers the same without a browser
    body = {"prompt": "Hello world!", "temperature": 1.0, "top_p": 0.95, "seed": 1234, "max_tokens": 24,
            "min_tokens": 24, "model": MODEL}  # fmt: skip
    assert api.post("/v1/completions", json=body).json()["choices"][0]["text"] == first


def test_token_view_shows_alternatives_before_and_after_filtering(page, api):
    page.open()
    page.fill("#prompt", "The capital of France is")
    page.set_params(temperature=0.8, top_k=3, seed=11, max_tokens=8, min_tokens=8)
    page.generate()
    page.el("#tab-tokens").click()
    page.wait_el("#token-view[data-source='inspect']")
    assert len(page.els("#token-view .tok[data-index]")) == 8
    page.els("#token-view .tok[data-index]")[0].click()
    table = page.wait_el("#token-view table.alternatives")
    rows = table.find_elements("css selector", "tbody tr")
    assert len(rows) >= 10
    # the same numbers the inspection route gives for the same request
    completion = api.post(
        "/v1/completions",
        json={"prompt": "The capital of France is", "temperature": 0.8, "top_k": 3, "seed": 11, "max_tokens": 8,
              "min_tokens": 8, "logprobs": 1, "return_tokens_as_token_ids": True},
    ).json()  # fmt: skip
    ids = [int(t.split(":")[1]) for t in completion["choices"][0]["logprobs"]["tokens"]]
    want = api.post(
        "/v1/inspect/tokens",
        json={"prompt": "The capital of France is", "completion_token_ids": ids, "temperature": 0.8, "top_k": 3,
              "seed": 11, "top_n": 10},
    ).json()["steps"][0]  # fmt: skip
    cells = [[td.text for td in r.find_elements("css selector", "td")] for r in rows[:10]]
    for alt, cell in zip(want["alternatives"], cells):
        assert cell[1:4] == [_pct(alt["prob"]), _pct(alt["prob_temperature"]), _pct(alt["prob_final"])]
        assert cell[4] == (f"removed by {alt['removed_by']}" if alt["removed_by"] else "kept")
    # top-k 3 keeps three and removes the rest; the chosen token is among the kept
    assert [c[4] for c in cells].count("kept") == 3
    assert sum(c[4] == "removed by top_k" for c in cells) == 7
    chosen = table.find_element("css selector", "tr.chosen").find_elements("css selector", "td")
    assert chosen[4].text == "kept"
    # the inspected step is the streamed one: same token, same log-probability
    assert want["token"]["id"] == ids[0]
    assert math.isclose(
        want["token"]["logprob"], completion["choices"][0]["logprobs"]["token_logprobs"][0], abs_tol=1e-4
    )
    # each token is coloured by its probability: the model's, or after temperature and top-k
    steps = api.post(
        "/v1/inspect/tokens",
        json={"prompt": "The capital of France is", "completion_token_ids": ids, "temperature": 0.8, "top_k": 3,
              "seed": 11, "top_n": 1},
    ).json()["steps"]  # fmt: skip
    toks = page.els("#token-view .tok[data-index]")
    assert [t.get_attribute("title") for t in toks] == [f"p = {_pct(s['token']['prob'])}" for s in steps]

    def colour(p: float) -> str:
        return page.js(
            "const e = document.createElement('span'); e.style.background = arguments[0];"
            "document.body.append(e); const c = getComputedStyle(e).backgroundColor; e.remove(); return c;",
            f"hsl({math.floor(p * 120 + 0.5)} 75% 82%)",  # Math.round
        )

    def shown() -> list[str]:
        return page.js(
            "return [...document.querySelectorAll('#token-view .tok[data-index]')]"
            ".map(e => getComputedStyle(e).backgroundColor)"
        )

    assert shown() == [colour(s["token"]["prob"]) for s in steps]
    from selenium.webdriver.support.ui import Select

    Select(page.el("#token-colour")).select_by_value("final")
    assert shown() == [colour(s["token"]["prob_final"]) for s in steps]
    page.shot("tokens", "playground-tokens", scroll_to="#gen-stats")


def test_attention_view_draws_the_heads_weights(page, api):
    page.open()
    page.el("#tab-attention").click()
    page.fill("#attn-input", "The capital of France is Paris.")
    page.el("#attn-run").click()
    page.wait_el("#attn-layer")
    from selenium.webdriver.support.ui import Select

    Select(page.el("#attn-layer")).select_by_value("1")
    Select(page.el("#attn-head")).select_by_value("2")
    want = api.post(
        "/v1/inspect/attention", json={"prompt": "The capital of France is Paris.", "layers": [1]}
    ).json()
    last = len(want["tokens"]) - 1
    row = want["attention"][0][2][last]

    def shown() -> list[str]:
        return [e.text for e in page.els(".attn-row-item .bar-text")]

    page.wait(lambda: shown() == [_pct(w, 1) for w in row], 20, "layer 1 head 2's last row")
    Select(page.el("#attn-head")).select_by_value("avg")
    heads = want["attention"][0]
    avg = [sum(h[last][k] for h in heads) / len(heads) for k in range(last + 1)]
    page.wait(lambda: shown() == [_pct(w, 1) for w in avg], 20, "the heads' average")
    page.shot("attention", "playground-attention", scroll_to="#gen-stats")


def test_chat_keeps_the_conversation(page, api):
    page.open("#/task/chat")
    page.fill("#prompt", "Hi there")
    page.set_params(temperature=0, max_tokens=6)
    page.el("#prompt").click()
    from selenium.webdriver.common.keys import Keys

    page.el("#prompt").send_keys(Keys.CONTROL, Keys.ENTER)  # the keyboard way to send
    page.wait(lambda: len(page.els(".msg.assistant .feedback")) == 1, 30, "the first answer")
    first = page.els(".msg.assistant .msg-text")[0].text
    want = api.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi there"}], "temperature": 0, "max_tokens": 6},
    ).json()["choices"][0]["message"]["content"]
    assert first == want
    page.fill("#prompt", "And again")
    page.el("#generate").click()
    page.wait(lambda: len(page.els(".msg.assistant .feedback")) == 2, 30, "the second answer")
    second = page.els(".msg.assistant .msg-text")[1].text
    history = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": want},
        {"role": "user", "content": "And again"},
    ]
    again = api.post(
        "/v1/chat/completions", json={"messages": history, "temperature": 0, "max_tokens": 6}
    ).json()
    assert second == again["choices"][0]["message"]["content"]
    page.shot("chat", "playground-chat")


# -- pipelines --------------------------------------------------------------------------------------


def test_text_classification_shows_label_bars(page, api):
    page.open("#/task/text-classification")
    page.fill("#task-text", "What a wonderful day.")
    page.el("#task-all").click()
    page.el("#task-run").click()
    page.wait_el("#task-result table.scores")
    want = api.post(
        "/v1/pipelines/text-classification",
        json={"inputs": "What a wonderful day.", "parameters": {"top_k": None}},
    ).json()
    rows = [(r.find_element("css selector", "th").text, r.find_element("css selector", "td").text)
            for r in page.els("#task-result table.scores tr")]  # fmt: skip
    assert rows == [(x["label"], _pct(x["score"], 1)) for x in want]
    page.shot("text-classification", "playground-task")


def test_image_upload_shows_top_classes(page, api, tmp_path):
    import base64

    import tiny_vit

    image = next(iter(tiny_vit.sample_images().values()))
    path = tmp_path / "picture.png"
    image.convert("RGB").save(path)
    page.open("#/task/image-classification")
    page.el("#task-file").send_keys(str(path))
    page.el("#task-run").click()
    page.wait_el("#task-result table.scores")
    uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    want = api.post(
        "/v1/pipelines/image-classification", json={"inputs": uri, "parameters": {"top_k": 5}}
    ).json()
    rows = [r.find_element("css selector", "th").text for r in page.els("#task-result table.scores tr")]
    assert rows == [x["label"] for x in want]
    assert page.el("#task-result img.preview").get_attribute("src").startswith("data:image/png;base64,")
    page.shot("image-classification", "playground-image")


# -- feedback, errors, the key ---------------------------------------------------------------


def test_feedback_is_stored(page, served):
    page.open()
    page.set_params(max_tokens=4)
    page.generate()
    bar = page.wait_el(".feedback-slot .feedback")
    request_id = bar.get_attribute("data-request-id")
    assert request_id.startswith("cmpl-")
    bar.find_element("css selector", ".fb-down").click()
    from selenium.webdriver.support.ui import Select

    Select(bar.find_element("css selector", ".fb-label")).select_by_value("wrong")
    bar.find_element("css selector", ".fb-comment").send_keys("not the capital")
    bar.find_element("css selector", ".fb-send").click()
    page.wait(lambda: page.text(".feedback-status") == "thanks, feedback stored", 20, "the stored message")
    page.shot("feedback")

    def stored():
        with sqlite3.connect(served["db"]) as db:
            db.row_factory = sqlite3.Row
            return db.execute("SELECT * FROM feedback WHERE request_id = ?", (request_id,)).fetchall()

    rows = page.wait(stored, 10, "the feedback row")
    row = dict(rows[0])
    assert row["rating"] == 1 and row["comment"] == "not the capital" and row["model"] == MODEL
    assert "wrong" in row["labels"]


def test_a_server_error_is_shown_as_its_message(page, api):
    page.open()
    page.expect_network_error(400)
    page.set_params(top_p=1.5, max_tokens=4)
    page.el("#generate").click()
    box = page.wait_el("#gen-error .error")
    want = api.post(
        "/v1/completions", json={"prompt": "The capital of France is", "top_p": 1.5, "max_tokens": 4}
    )
    assert want.status_code == 400
    assert box.text == want.json()["error"]["message"]
    assert "top_p" in box.text
    # a prompt longer than the context: the server's words again
    page.set_params(top_p=None, max_tokens=5000)
    page.el("#generate").click()
    want = api.post("/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 5000})
    assert want.status_code == 400
    page.wait(
        lambda: page.text("#gen-error .error") == want.json()["error"]["message"], 20, "the context error"
    )
    page.shot("error", "playground-error")


def test_the_key_is_asked_once_and_kept_for_the_tab(fresh_page):
    page = fresh_page
    page.expect_network_error(401)
    page.driver.get(f"{page.base_url}/")
    dialog = page.wait_el("#key-dialog")
    assert "needs an API key" in page.text("#key-reason")
    page.el("#key-input").send_keys("wrong-key\n")
    page.wait(lambda: "incorrect API key" in page.text("#key-reason"), 20, "the refusal")
    page.shot("key-refused", "playground-api-key")
    page.el("#key-input").clear()
    page.el("#key-input").send_keys(API_KEY + "\n")
    page.wait(lambda: page.js("return document.body.dataset.ready === '1'"), 20, "the page to load")
    assert not dialog.is_displayed()
    assert page.js(f"return sessionStorage.getItem({KEY_STORAGE!r})") == API_KEY
    assert API_KEY not in page.driver.current_url
    assert len(page.els("#task-list a")) == 4
    page.driver.refresh()  # the tab keeps the key: no second question
    page.wait(lambda: page.js("return document.body.dataset.ready === '1'"), 20, "the reload")
    assert not page.el("#key-dialog").is_displayed()


# -- responsiveness, keyboard, narrow screens --------------------------------------------------


def test_page_stays_responsive_while_a_long_generation_streams(page):
    page.open()
    # the longest stream the 4096-position context allows: the tiny model is fast
    page.set_params(temperature=0.8, max_tokens=4000, min_tokens=4000)
    # a click handler records how long after the click event it ran
    page.js(
        "window.delays = []; document.getElementById('tab-tokens').addEventListener('click',"
        " (e) => window.delays.push(performance.now() - e.timeStamp));"
        "document.getElementById('tab-text').addEventListener('click',"
        " (e) => window.delays.push(performance.now() - e.timeStamp));"
    )
    page.el("#generate").click()
    page.wait(lambda: int(page.text("#stat-tokens")) > 20, 30, "the stream to start")
    page.fill("#prompt", "typed while streaming")
    assert page.el("#prompt").get_attribute("value") == "typed while streaming"
    # Each check counts only while tokens still stream in: the tiny model can finish its
    # 4,000 tokens within a few checks on a fast machine.
    lags = []
    while len(lags) < 6 and page.text("#stat-finish") == "streaming…":
        page.el("#tab-tokens" if len(lags) % 2 == 0 else "#tab-text").click()
        # the event loop answers a timer promptly while tokens stream in
        lags.append(
            page.driver.execute_async_script(
                "const done = arguments[0]; const t = performance.now();"
                "setTimeout(() => done(performance.now() - t), 0);"
            )
        )
        time.sleep(0.05)
    assert len(lags) >= 2, f"the stream ended after {len(lags)} checks"
    delays = page.js("return window.delays")
    assert len(delays) == len(lags) and max(delays) < 200, delays
    assert max(lags) < 200, lags
    if page.text("#stat-finish") != "streaming…":  # finished: stop the next one instead
        page.el("#generate").click()
        page.wait(lambda: page.text("#stat-finish") == "streaming…", 30, "the second stream")
    page.el("#stop").click()
    page.wait(lambda: page.text("#stat-finish") == "stopped", 20, "the stop")


def test_keyboard_and_narrow_screen(narrow_page):
    page = narrow_page
    page.open()
    # one column: nothing wider than the phone's screen
    assert page.js("return document.documentElement.scrollWidth <= window.innerWidth + 1")
    from selenium.webdriver.common.keys import Keys

    # min_tokens: the tiny random model samples its EOS about once in 500 tokens, which
    # would end the run with "stop" instead of "length"
    page.set_params(max_tokens=4, min_tokens=4)
    page.el("#prompt").click()
    page.el("#prompt").send_keys(Keys.CONTROL, Keys.ENTER)
    page.wait(lambda: page.text("#stat-finish") not in ("", "–", "streaming…"), 30, "Ctrl+Enter to generate")
    assert page.text("#stat-finish") == "length"
    # every control has a label the browser knows
    unlabelled = page.js(
        "return [...document.querySelectorAll('input, textarea, select')]"
        ".filter(e => !e.closest('dialog') && e.labels.length === 0 && !e.getAttribute('aria-label'))"
        ".map(e => e.id || e.outerHTML.slice(0, 60))"
    )
    assert unlabelled == []
    page.shot("narrow", "playground-narrow")


# -- beam search --------------------------------------------------------------------------------


def test_beam_width_control_follows_the_server(page, api):
    served_beams = api.get("/v1/playground/config").json()["beam_search"]
    page.open()
    beam = page.el("#param-beam")
    assert beam.is_enabled() == served_beams
    hint = page.text("#param-beam-hint")
    if not served_beams:
        # the width stays 1 and the page says why; nothing beam-related is sent
        assert "does not serve beam search" in hint
        assert not page.el("#param-length_penalty").is_displayed()
        return
    assert "beam search" in hint
    page.set_params(beam=3)
    # the fields only sampling reads are greyed out, with a note saying so
    for name in (
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "repetition_penalty",
        "seed",
        "min_tokens",
        "stop",
    ):
        assert not page.el(f"#param-{name}").is_enabled(), name
    assert page.el("#param-max_tokens").is_enabled() and page.el("#param-length_penalty").is_enabled()
    assert "not used" in page.text("#beam-note")
    page.set_params(beam=1)
    assert page.el("#param-temperature").is_enabled() and not page.el("#beam-note").is_displayed()


def test_beam_search_shows_every_hypothesis_best_first(page, api):
    if not api.get("/v1/playground/config").json()["beam_search"]:
        pytest.skip("this server does not run beam search over HTTP (playground config beam_search is false)")
    page.open()
    page.fill("#prompt", "The capital of France is")
    # sampling fields filled in before the switch are left out of the beam request
    page.set_params(temperature=0.9, top_k=5, seed=3, max_tokens=6, beam=3, length_penalty=0.5)
    assert page.generate() in ("length", "stop")

    def shown(css: str) -> list[str]:
        return page.js(f"return [...document.querySelectorAll({css!r})].map(e => e.textContent)")

    body = {"prompt": "The capital of France is", "use_beam_search": True, "n": 3, "max_tokens": 6,
            "length_penalty": 0.5, "model": MODEL}  # fmt: skip
    want = api.post("/v1/completions", json=body).json()
    choices = sorted(want["choices"], key=lambda c: c["index"])
    assert shown("#output .hypothesis .hyp-text") == [c["text"] for c in choices]
    assert len(choices) == 3 and page.completion_text() == choices[0]["text"]
    assert page.text("#stat-finish") == choices[0]["finish_reason"]
    assert page.text("#stat-tokens") == (
        f"{want['usage']['completion_tokens']} (+{want['usage']['prompt_tokens']} prompt)"
    )
    page.shot("beam", "playground-beam")

    # chat: the best hypothesis joins the conversation, both are listed under it
    page.go("#/task/chat")
    page.wait_el("#chat-system")
    page.fill("#prompt", "Hi there")
    page.set_params(max_tokens=5, beam=2)
    page.el("#generate").click()
    page.wait(lambda: page.els(".msg.assistant .feedback"), 30, "the answer")
    want = api.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi there"}], "use_beam_search": True, "n": 2,
              "max_tokens": 5},
    ).json()  # fmt: skip
    texts = [c["message"]["content"] for c in sorted(want["choices"], key=lambda c: c["index"])]
    assert shown(".msg.assistant .hyp-text") == texts
    assert shown(".msg.assistant .msg-text") == [texts[0]]
