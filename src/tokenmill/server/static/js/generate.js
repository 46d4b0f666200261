// Text generation and chat: a streamed answer with live TTFT / TPOT / tokens per second,
// the sampling controls, the token view and the attention view.

import { postJSON, request, sseEvents } from "./api.js";
import { attentionView } from "./attention.js";
import { feedbackBar } from "./feedback.js";
import { samplingControls } from "./sampling.js";
import { renderTokens } from "./tokens.js";
import { el, errorBox, field, fmtMs, fmtNum, submitOnCtrlEnter } from "./util.js";

/** Alternatives per token the stream asks for (OpenAI allows up to 20). */
const STREAM_TOP = 5;
/** Alternatives per step the token view asks the inspection route for. */
const INSPECT_TOP = 10;

const TOKEN_ID = /^token_id:(\d+)$/;

/** One streamed token: its id where the server sent it, the text it added, logprobs. */
function streamTokens(choice, chat) {
  const out = [];
  const lp = choice.logprobs;
  if (!lp) return out;
  if (chat) {
    for (const c of lp.content || []) {
      out.push({ raw: c.token, logprob: c.logprob, top: (c.top_logprobs || []).map((t) => ({ token: t.token, logprob: t.logprob })) });
    }
  } else {
    (lp.tokens || []).forEach((tok, i) => {
      const top = Object.entries(lp.top_logprobs?.[i] || {}).map(([token, logprob]) => ({ token, logprob }));
      out.push({ raw: tok, logprob: lp.token_logprobs[i], top });
    });
  }
  for (const t of out) {
    const m = TOKEN_ID.exec(t.raw);
    t.id = m ? Number(m[1]) : null;
    t.text = m ? "" : t.raw;
    for (const a of t.top) {
      const am = TOKEN_ID.exec(a.token);
      if (am) a.token = `#${am[1]}`;
    }
  }
  return out;
}

/** The generation view for `mode` "completion" (/v1/completions) or "chat". */
export function generationView(config, mode) {
  const chat = mode === "chat";
  const controls = samplingControls(config);
  const history = []; // chat messages so far: {role, content}
  let current = null; // the latest run

  // -- the input form -------------------------------------------------------------
  const form = el("form", { class: "gen-form", novalidate: true, "aria-label": chat ? "Chat" : "Prompt" });
  let promptField;
  let systemField;
  const transcript = el("div", { class: "chat-log", "aria-live": "polite" });
  if (chat) {
    systemField = field("System message", "textarea", { id: "chat-system", rows: "2", placeholder: "(optional)" });
    promptField = field("Your message", "textarea", { id: "prompt", rows: "3", placeholder: "Ask something…" });
    form.append(systemField.wrap, transcript, promptField.wrap);
  } else {
    promptField = field("Prompt", "textarea", { id: "prompt", rows: "5" }, "Ctrl+Enter to generate");
    promptField.input.value = "The capital of France is";
    form.append(promptField.wrap);
  }
  const runButton = el("button", { type: "submit", id: "generate" }, chat ? "Send" : "Generate");
  const stopButton = el("button", { type: "button", id: "stop", class: "secondary", disabled: true }, "Stop");
  const actions = el("div", { class: "actions" }, runButton, stopButton);
  if (chat) {
    const clear = el("button", { type: "button", id: "chat-clear", class: "secondary" }, "New chat");
    clear.addEventListener("click", () => {
      history.length = 0;
      transcript.replaceChildren();
    });
    actions.append(clear, el("small", { class: "muted" }, "Ctrl+Enter to send"));
  }
  form.append(actions);
  submitOnCtrlEnter(form);

  // -- the output ------------------------------------------------------------------
  const stat = (id, label) => {
    const value = el("span", { class: "stat-value", id }, "–");
    return { node: el("div", { class: "stat" }, el("span", { class: "stat-label" }, label), value), value };
  };
  const stats = {
    ttft: stat("stat-ttft", "time to first token"),
    tpot: stat("stat-tpot", "time per output token"),
    tps: stat("stat-tps", "tokens / s"),
    count: stat("stat-tokens", "tokens"),
    finish: stat("stat-finish", "finish"),
  };
  const statsBar = el("div", { class: "stats", id: "gen-stats", "aria-live": "off" }, Object.values(stats).map((s) => s.node));
  const outputText = el("div", { class: "output-text", id: "output", tabindex: "0", "aria-label": "Generated text" });
  const tokenPanel = el("div", { class: "token-view", id: "token-view" });
  const attn = attentionView(config, () => {
    if (!current || !current.done || current.finish === "error") return null;
    const ids = current.tokens.map((t) => t.id);
    const body = chat ? { messages: current.messages } : { prompt: current.prompt };
    if (ids.length && ids.every((id) => id !== null)) body.completion_token_ids = ids;
    return body;
  });
  const errorSlot = el("div", { id: "gen-error" });
  const feedbackSlot = el("div", { class: "feedback-slot" });

  const tabs = [
    ["text", chat ? "Answer" : "Text", chat ? el("p", { class: "muted" }, "The answer appears in the conversation above.") : outputText],
    ["tokens", "Tokens", tokenPanel],
    ["attention", "Attention", attn.element],
  ];
  const tabList = el("div", { class: "tabs", role: "tablist", "aria-label": "Output views" });
  const panels = el("div", {});
  const tabButtons = {};
  for (const [key, label, content] of tabs) {
    const button = el(
      "button",
      { type: "button", role: "tab", id: `tab-${key}`, "aria-controls": `panel-${key}`, "aria-selected": "false", tabindex: "-1" },
      label,
    );
    const panel = el("div", { role: "tabpanel", id: `panel-${key}`, "aria-labelledby": `tab-${key}`, hidden: true }, content);
    button.addEventListener("click", () => selectTab(key));
    tabButtons[key] = { button, panel };
    tabList.append(button);
    panels.append(panel);
  }
  if (!config.routes.inspect_attention) {
    attn.element.replaceChildren(el("p", { class: "muted" }, "This server has no /v1/inspect/attention route."));
  }
  tabList.addEventListener("keydown", (e) => {
    const keys = tabs.map((t) => t[0]);
    const at = keys.findIndex((k) => tabButtons[k].button.getAttribute("aria-selected") === "true");
    const step = e.key === "ArrowRight" ? 1 : e.key === "ArrowLeft" ? -1 : 0;
    if (!step) return;
    e.preventDefault();
    const next = keys[(at + step + keys.length) % keys.length];
    selectTab(next);
    tabButtons[next].button.focus();
  });
  function selectTab(key) {
    for (const [k, { button, panel }] of Object.entries(tabButtons)) {
      const on = k === key;
      button.setAttribute("aria-selected", String(on));
      button.tabIndex = on ? 0 : -1;
      panel.hidden = !on;
    }
    if (key === "tokens") showTokens();
    if (key === "attention") attn.refresh();
  }

  const output = el("section", { class: "output", "aria-label": "Output" }, statsBar, errorSlot, tabList, panels, feedbackSlot);
  const element = el("div", { class: "gen" }, el("div", { class: "gen-main" }, form, output), controls.element);
  attn.init();
  selectTab("text");

  // -- a run -------------------------------------------------------------------------
  function setStats(run) {
    if (run.beam) {
      // one whole answer: no first token to time; throughput over the request
      const n = run.usage?.completion_tokens;
      const span = (run.tLast ?? performance.now()) - run.t0;
      stats.ttft.value.textContent = "–";
      stats.tpot.value.textContent = "–";
      stats.tps.value.textContent = n && run.tLast ? fmtNum((n * 1000) / span, 1) : "–";
      stats.count.value.textContent = run.usage ? `${n} (+${run.usage.prompt_tokens} prompt)` : "–";
      stats.finish.value.textContent = run.finish || (run.done ? "–" : "beam search…");
      return;
    }
    const n = run.tokens.length || run.chunks;
    stats.ttft.value.textContent = run.tFirst !== null ? fmtMs((run.tFirst - run.t0) / 1000) : "–";
    const tpot = n > 1 && run.tLast > run.tFirst ? (run.tLast - run.tFirst) / 1000 / (n - 1) : null;
    stats.tpot.value.textContent = fmtMs(tpot);
    const span = (run.tLast ?? performance.now()) - run.t0;
    stats.tps.value.textContent = n > 0 && span > 0 ? fmtNum((n * 1000) / span, 1) : "–";
    stats.count.value.textContent = run.usage
      ? `${run.usage.completion_tokens} (+${run.usage.prompt_tokens} prompt)`
      : String(n);
    stats.finish.value.textContent = run.finish || (run.done ? "–" : "streaming…");
  }

  /** A beam search's answer: its hypotheses, best first; the best is the run's text. */
  async function readBeams(run, res) {
    const answer = await res.json();
    run.tFirst = run.tLast = performance.now();
    run.id = run.id || answer.id;
    run.usage = answer.usage || null;
    const choices = (answer.choices || []).slice().sort((a, b) => a.index - b.index);
    run.hypotheses = choices.map((c) => ({
      text: chat ? c.message?.content ?? "" : c.text ?? "",
      finish: c.finish_reason,
      score: c.score ?? null,
      logprob: c.cumulative_logprob ?? null,
    }));
    run.text = run.hypotheses[0]?.text ?? "";
    run.finish = run.hypotheses[0]?.finish ?? null;
  }

  function hypothesesList(run) {
    return el(
      "ol",
      { class: "hypotheses", "aria-label": "Beam search hypotheses, best first" },
      run.hypotheses.map((h, i) =>
        el(
          "li",
          { class: "hypothesis", "data-index": String(i) },
          el("span", { class: "hyp-rank" }, i === 0 ? "best" : `#${i + 1}`),
          el("span", { class: "hyp-text" }, h.text),
          el(
            "span",
            { class: "hyp-meta muted" },
            [h.score !== null ? `score ${fmtNum(h.score, 3)}` : "", h.logprob !== null ? `log p ${fmtNum(h.logprob, 3)}` : "", h.finish || ""]
              .filter(Boolean)
              .join(" · "),
          ),
        ),
      ),
    );
  }

  let pendingPaint = false;
  function paint(run) {
    // one repaint per frame however fast tokens arrive
    if (pendingPaint) return;
    pendingPaint = true;
    requestAnimationFrame(() => {
      pendingPaint = false;
      setStats(run);
      if (run.answerNode) {
        run.answerNode.textContent = run.text;
        if (run.hypotheses && run.hypotheses.length > 1) run.hypSlot.replaceChildren(hypothesesList(run));
      } else {
        outputText.replaceChildren(el("span", { class: "prompt-echo" }, run.prompt), el("span", { class: "completion" }, run.text));
        if (run.hypotheses) outputText.append(hypothesesList(run));
      }
      if (!tokenPanel.closest("[hidden]")) renderTokens(tokenPanel, run.tokens);
    });
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (current && !current.done) return;
    const params = controls.values();
    const beam = Boolean(params.use_beam_search);
    // beam search answers whole: every hypothesis at once, best first
    const body = beam
      ? { ...params }
      : { ...params, stream: true, stream_options: { include_usage: true }, return_tokens_as_token_ids: true };
    if (config.llm) body.model = config.llm.model;
    const run = {
      t0: performance.now(),
      tFirst: null,
      tLast: null,
      text: "",
      tokens: [],
      chunks: 0,
      finish: null,
      usage: null,
      id: null,
      done: false,
      beam,
      hypotheses: null,
      params,
      inspected: null,
      controller: new AbortController(),
    };
    if (chat) {
      const content = promptField.input.value;
      const messages = [];
      if (systemField.input.value.trim()) messages.push({ role: "system", content: systemField.input.value });
      messages.push(...history, { role: "user", content });
      run.messages = messages;
      body.messages = messages;
      if (!beam) {
        body.logprobs = true;
        body.top_logprobs = STREAM_TOP;
      }
      run.answerNode = el("div", { class: "msg-text" });
      run.hypSlot = el("div", { class: "hyp-slot" });
      run.userNode = el("div", { class: "msg user" }, el("div", { class: "msg-role" }, "user"), el("div", { class: "msg-text" }, content));
      run.bubble = el("div", { class: "msg assistant" }, el("div", { class: "msg-role" }, "assistant"), run.answerNode, run.hypSlot);
      transcript.append(run.userNode, run.bubble);
    } else {
      run.prompt = promptField.input.value;
      body.prompt = run.prompt;
      if (!beam) body.logprobs = STREAM_TOP;
    }
    current = run;
    errorSlot.replaceChildren();
    feedbackSlot.replaceChildren();
    runButton.disabled = true;
    stopButton.disabled = false;
    paint(run);
    try {
      const res = await request(chat ? "/v1/chat/completions" : "/v1/completions", {
        method: "POST",
        json: body,
        signal: run.controller.signal,
      });
      run.id = res.headers.get("X-Request-Id");
      if (beam) await readBeams(run, res);
      else for await (const event of sseEvents(res)) {
        run.id = run.id || event.id;
        if (event.usage) run.usage = event.usage;
        const choice = event.choices?.[0];
        if (!choice) continue;
        const piece = chat ? choice.delta?.content || "" : choice.text || "";
        const toks = streamTokens(choice, chat);
        if (toks.length) {
          // the chunk's text belongs to its tokens; exact per-token texts come from inspection
          toks[0].text = toks[0].id === null ? toks[0].text : piece;
        }
        if (piece || toks.length) {
          const now = performance.now();
          if (run.tFirst === null) run.tFirst = now;
          run.tLast = now;
          run.chunks += 1;
        }
        run.text += piece;
        run.tokens.push(...toks);
        if (choice.finish_reason) run.finish = choice.finish_reason;
        paint(run);
      }
      if (chat) history.push({ role: "user", content: run.messages[run.messages.length - 1].content }, { role: "assistant", content: run.text });
      if (chat) promptField.input.value = "";
    } catch (err) {
      if (err.name === "AbortError") {
        run.finish = "stopped";
      } else {
        run.finish = "error";
        errorSlot.replaceChildren(errorBox(err.message));
        if (chat) {
          run.userNode.remove();
          run.bubble.remove();
        }
      }
    } finally {
      run.done = true;
      runButton.disabled = false;
      stopButton.disabled = true;
      paint(run);
    }
    if (run.id && run.finish !== "error") {
      const bar = feedbackBar(run.id, () => (config.llm ? { model: config.llm.model } : {}));
      if (chat) run.bubble.append(bar);
      else feedbackSlot.append(bar);
    }
    if (!tokenPanel.closest("[hidden]")) showTokens();
    setStats(run); // the final numbers, before anyone reads them
    element.dataset.runs = String(Number(element.dataset.runs || 0) + 1);
  });
  stopButton.addEventListener("click", () => current?.controller.abort());

  // -- the token view ------------------------------------------------------------------
  async function showTokens() {
    const run = current;
    if (!run) {
      renderTokens(tokenPanel, []);
      return;
    }
    if (!run.done) {
      renderTokens(tokenPanel, run.tokens);
      return;
    }
    if (run.beam) {
      tokenPanel.dataset.source = "beam";
      tokenPanel.replaceChildren(
        el("p", { class: "muted" }, "Beam search returns whole hypotheses, not one sampled token after another: set the beam width to 1 to see each token's alternatives."),
      );
      return;
    }
    if (run.inspected) {
      renderTokens(tokenPanel, run.tokens, run.inspected.steps);
      return;
    }
    const ids = run.tokens.map((t) => t.id);
    const haveIds = ids.length > 0 && ids.every((id) => id !== null);
    if (!config.routes.inspect_tokens || !haveIds) {
      const why = !config.routes.inspect_tokens
        ? "This server has no /v1/inspect/tokens route: the alternatives shown are the model's top log-probabilities from the stream."
        : "The server did not send token ids, so only the stream's log-probabilities are shown.";
      renderTokens(tokenPanel, run.tokens, null, why);
      return;
    }
    tokenPanel.replaceChildren(el("p", { class: "muted" }, "asking the model for the alternatives at each step…"));
    const { max_tokens: _max, min_tokens: _min, stop: _stop, ...sampling } = run.params;
    const body = { ...sampling, completion_token_ids: ids, top_n: INSPECT_TOP };
    if (config.llm) body.model = config.llm.model;
    if (chat) body.messages = run.messages;
    else body.prompt = run.prompt;
    try {
      run.inspected = await postJSON("/v1/inspect/tokens", body);
      if (current === run && !tokenPanel.closest("[hidden]")) renderTokens(tokenPanel, run.tokens, run.inspected.steps);
    } catch (err) {
      renderTokens(tokenPanel, run.tokens, null, `The inspection failed: ${err.message}`);
      tokenPanel.prepend(errorBox(err.message));
    }
  }

  return { element, focus: () => promptField.input.focus() };
}
