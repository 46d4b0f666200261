// The token view: each generated token coloured by its probability; selecting one shows
// the alternatives at that step before and after temperature and filtering.

import { el, pct, probColour, scoreBar, visibleToken } from "./util.js";

/**
 * Render `tokens` ([{id, text, logprob, top: [{token, logprob}]}], from the stream) into
 * `container`. `steps` (from POST /v1/inspect/tokens) replaces the texts and adds the
 * full alternatives when present.
 */
export function renderTokens(container, tokens, steps = null, note = "") {
  container.replaceChildren();
  container.dataset.source = steps ? "inspect" : "stream";
  if (!tokens.length && !(steps && steps.length)) {
    container.append(el("p", { class: "muted" }, "Generate some text to see its tokens."));
    return;
  }
  // colour by the model's probability, or by the chance the sampler actually gave the token
  const mode = steps && container.dataset.colour === "final" ? "final" : "model";
  const items = steps
    ? steps.map((s) => ({
        text: s.token.text,
        prob: s.token.prob ?? Math.exp(s.token.logprob),
        colourBy: mode === "final" ? s.token.prob_final : s.token.prob ?? Math.exp(s.token.logprob),
        step: s,
      }))
    : tokens.map((t) => ({ text: t.text, prob: Math.exp(t.logprob), colourBy: Math.exp(t.logprob), stream: t }));
  const detail = el("div", { class: "token-detail", "aria-live": "polite" });
  const strip = el("div", { class: "token-strip", role: "list", "aria-label": "Generated tokens" });
  let selected = null;
  items.forEach((item, i) => {
    const tok = el(
      "span",
      {
        class: "tok",
        role: "listitem",
        tabindex: "0",
        "data-index": String(i),
        title: `p = ${pct(item.prob, 2)}`,
        style: { background: probColour(item.colourBy) },
      },
      visibleToken(item.text),
    );
    const show = () => {
      if (selected) selected.classList.remove("selected");
      selected = tok;
      tok.classList.add("selected");
      detail.replaceChildren(stepDetail(item, i));
    };
    tok.addEventListener("mouseenter", show);
    tok.addEventListener("focus", show);
    tok.addEventListener("click", show);
    tok.addEventListener("keydown", (e) => {
      const next = e.key === "ArrowRight" ? tok.nextElementSibling : e.key === "ArrowLeft" ? tok.previousElementSibling : null;
      if (next) {
        e.preventDefault();
        next.focus();
      }
    });
    strip.append(tok);
  });
  const legend = el(
    "div",
    { class: "legend muted" },
    "probability: ",
    ...[0, 0.25, 0.5, 0.75, 1].map((p) => el("span", { class: "tok legend-tok", style: { background: probColour(p) } }, pct(p, 0))),
    " — hover, click or focus a token (← → to move) to see the alternatives",
  );
  container.append(legend);
  if (steps) {
    const select = el(
      "select",
      { id: "token-colour" },
      el("option", { value: "model", selected: mode === "model" }, "the model's probability"),
      el("option", { value: "final", selected: mode === "final" }, "the probability after temperature and filters"),
    );
    select.addEventListener("change", () => {
      container.dataset.colour = select.value;
      renderTokens(container, tokens, steps, note);
    });
    container.append(el("div", { class: "field check" }, el("label", { for: "token-colour" }, "Colour by"), select));
  }
  container.append(strip, detail);
  if (note) container.append(el("p", { class: "muted note" }, note));
}

function stepDetail(item, index) {
  const head = el(
    "p",
    {},
    el("strong", {}, `Step ${index + 1}: `),
    el("code", {}, visibleToken(item.text)),
    ` chosen with p = ${pct(item.prob, 2)}`,
  );
  if (item.step) {
    const params = item.step;
    const alts = params.alternatives.slice();
    // the chosen token may lie outside the top alternatives (a sampled long shot)
    if (!alts.some((a) => a.id === params.token.id)) alts.push(params.token);
    const rows = alts.map((a) =>
      el(
        "tr",
        { class: [a.id === params.token.id ? "chosen" : "", a.removed_by ? "removed" : ""].join(" ").trim() },
        el("td", {}, el("code", {}, visibleToken(a.text))),
        el("td", {}, scoreBar(a.prob, pct(a.prob, 2))),
        el("td", {}, scoreBar(a.prob_temperature, pct(a.prob_temperature, 2))),
        el("td", {}, scoreBar(a.prob_final, pct(a.prob_final, 2))),
        el("td", { class: "removed-by" }, a.removed_by ? `removed by ${a.removed_by}` : "kept"),
      ),
    );
    return el(
      "div",
      {},
      head,
      el(
        "table",
        { class: "alternatives" },
        el("caption", { class: "muted" }, "The model's top alternatives at this step"),
        el(
          "thead",
          {},
          el(
            "tr",
            {},
            el("th", { scope: "col" }, "token"),
            el("th", { scope: "col" }, "model"),
            el("th", { scope: "col" }, "after penalties + temperature"),
            el("th", { scope: "col" }, "after top-k / top-p / min-p"),
            el("th", { scope: "col" }, "filter"),
          ),
        ),
        el("tbody", {}, rows),
      ),
    );
  }
  const top = (item.stream.top || []).slice().sort((a, b) => b.logprob - a.logprob);
  return el(
    "div",
    {},
    head,
    el(
      "table",
      { class: "alternatives" },
      el("caption", { class: "muted" }, "Top alternatives reported with the stream (model probabilities)"),
      el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "token"), el("th", { scope: "col" }, "model"))),
      el(
        "tbody",
        {},
        top.map((a) =>
          el("tr", {}, el("td", {}, el("code", {}, visibleToken(a.token))), el("td", {}, scoreBar(Math.exp(a.logprob), pct(Math.exp(a.logprob), 2)))),
        ),
      ),
    ),
  );
}
