// The attention view: POST /v1/inspect/attention for a short input, then a heatmap of
// weights[layer][head][query][key] (or the heads' average) drawn on a canvas.

import { postJSON } from "./api.js";
import { el, errorBox, field, option, pct, scoreBar, submitOnCtrlEnter, visibleToken } from "./util.js";

/**
 * The view. `lastRun()` gives the latest generation as an inspection request body
 * ({prompt | messages, completion_token_ids}) or null before the first one.
 */
export function attentionView(config, lastRun) {
  const text = field("Input (at most 256 tokens)", "textarea", { id: "attn-input", rows: "3" });
  text.input.value = "The capital of France is Paris.";
  const useRun = el("input", { type: "checkbox", id: "attn-use-run" });
  const useRunField = el(
    "div",
    { class: "field check" },
    useRun,
    el("label", { for: "attn-use-run" }, "Use the last generation (its prompt and the exact tokens generated)"),
  );
  const go = el("button", { type: "submit", id: "attn-run" }, "Show attention");
  const form = el("form", { class: "attn-form", novalidate: true }, useRunField, text.wrap, el("div", { class: "actions" }, go));
  const out = el("div", { class: "attn-out" });
  const root = el("div", { class: "attention" }, form, out);
  submitOnCtrlEnter(form);
  useRun.addEventListener("change", () => {
    text.input.disabled = useRun.checked;
  });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const run = useRun.checked ? lastRun() : null;
    const body = run ? { ...run } : { prompt: text.input.value };
    if (config.llm) body.model = config.llm.model;
    go.disabled = true;
    out.replaceChildren(el("p", { class: "muted" }, "running a forward pass with attention weights…"));
    try {
      // one layer per request: a whole model's weights can be tens of megabytes
      const fetchLayer = (layer) => postJSON("/v1/inspect/attention", { ...body, layers: [layer] });
      const first = await fetchLayer(0);
      out.replaceChildren(heatmapPanel(first, fetchLayer));
    } catch (err) {
      out.replaceChildren(errorBox(err.message));
    } finally {
      go.disabled = false;
    }
  });
  return {
    element: root,
    /** Offer the latest generation once there is one. */
    refresh() {
      const has = lastRun() !== null;
      useRun.disabled = !has;
      if (has && !useRun.dataset.touched) {
        useRun.checked = true;
        text.input.disabled = true;
      }
    },
    init() {
      useRun.addEventListener("change", () => {
        useRun.dataset.touched = "1";
      });
    },
  };
}

/** Head-averaged weights: mean over heads of weights[layer][h]. */
function averageHeads(layer) {
  const H = layer.length;
  return layer[0].map((row, q) => row.map((_, k) => layer.reduce((s, head) => s + head[q][k], 0) / H));
}

function heatmapPanel(res, fetchLayer) {
  const cache = new Map([[res.layers ? res.layers[0] : 0, res.attention[0]]]);
  const tokens = res.tokens.map((t) => visibleToken(t.text));
  const layerSel = field("Layer", "select", { id: "attn-layer" });
  for (let l = 0; l < res.num_layers; l++) layerSel.input.append(option(String(l), `layer ${l}`));
  const headSel = field("Head", "select", { id: "attn-head" });
  headSel.input.append(option("avg", "average of heads", true));
  for (let h = 0; h < res.num_heads; h++) headSel.input.append(option(String(h), `head ${h}`));
  const querySel = field("Query token", "select", { id: "attn-query" });
  tokens.forEach((t, i) => querySel.input.append(option(String(i), `${i}: ${t}`, i === tokens.length - 1)));
  const canvas = el("canvas", {
    class: "heatmap",
    role: "img",
    "aria-label": "Attention heatmap: rows are query tokens, columns the tokens they attend to",
  });
  const hover = el("p", { class: "muted heat-hover", "aria-live": "polite" }, "Hover the map to read a weight.");
  const row = el("div", { class: "attn-row" });
  const panel = el(
    "div",
    {},
    el("div", { class: "attn-pickers" }, layerSel.wrap, headSel.wrap, querySel.wrap),
    el("div", { class: "heat-wrap" }, canvas),
    hover,
    el("h4", {}, "What the query token attends to"),
    row,
  );

  let matrix = null;
  let geometry = null;
  let lastQuery = null;
  let drawing = 0;
  const redraw = async () => {
    const want = Number(layerSel.input.value);
    const ticket = ++drawing;
    if (!cache.has(want)) {
      hover.textContent = `loading layer ${want}…`;
      try {
        const r = await fetchLayer(want);
        cache.set(want, r.attention[0]);
      } catch (err) {
        hover.textContent = err.message;
        return;
      }
      if (ticket !== drawing) return; // a later choice wins
      hover.textContent = "Hover the map to read a weight.";
    }
    const layer = cache.get(want);
    const head = headSel.input.value;
    matrix = head === "avg" ? averageHeads(layer) : layer[Number(head)];
    drawRow();
  };
  const drawRow = () => {
    const q = Number(querySel.input.value);
    geometry = drawHeatmap(canvas, matrix, tokens, q); // the query's row outlined
    row.replaceChildren(
      ...matrix[q].slice(0, q + 1).map((w, k) =>
        el("div", { class: "attn-row-item" }, el("code", {}, tokens[k]), scoreBar(w, pct(w, 1))),
      ),
    );
  };
  layerSel.input.addEventListener("change", redraw);
  headSel.input.addEventListener("change", redraw);
  querySel.input.addEventListener("change", drawRow);
  canvas.addEventListener("mousemove", (e) => {
    if (!geometry) return;
    const rect = canvas.getBoundingClientRect();
    const x = ((e.clientX - rect.left) * canvas.width) / rect.width / geometry.dpr;
    const y = ((e.clientY - rect.top) * canvas.height) / rect.height / geometry.dpr;
    const k = Math.floor((x - geometry.left) / geometry.cell);
    const q = Math.floor((y - geometry.top) / geometry.cell);
    if (q < 0 || k < 0 || q >= tokens.length || k >= tokens.length) return;
    lastQuery = q;
    hover.textContent = k > q ? `${tokens[q]} cannot see the later ${tokens[k]}` : `${tokens[q]} → ${tokens[k]}: ${pct(matrix[q][k], 2)}`;
  });
  canvas.addEventListener("click", () => {
    // clicking a cell shows that query token's row below the map
    if (lastQuery === null) return;
    querySel.input.value = String(lastQuery);
    drawRow();
  });
  // drawn after the panel is in the document, so the canvas has its width
  requestAnimationFrame(redraw);
  return panel;
}

/**
 * Draw `matrix` (N×N, causal) with the tokens along both axes and query row `selected`
 * outlined. Returns the layout used.
 */
function drawHeatmap(canvas, matrix, tokens, selected = null) {
  const N = tokens.length;
  const dpr = window.devicePixelRatio || 1;
  const avail = Math.max(200, Math.min(canvas.parentElement.clientWidth || 600, 900));
  const labelSpace = N <= 64 ? 90 : 0;
  const cell = Math.max(2, Math.min(28, Math.floor((avail - labelSpace) / N)));
  const left = labelSpace;
  const top = labelSpace;
  const width = left + cell * N + 4;
  const height = top + cell * N + 4;
  canvas.width = Math.round(width * dpr);
  canvas.height = Math.round(height * dpr);
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);
  for (let q = 0; q < N; q++) {
    for (let k = 0; k < N; k++) {
      if (k > q) {
        ctx.fillStyle = "#eee"; // future tokens: masked
      } else {
        // square root: small weights stay visible beside the large first-token sink
        const v = Math.sqrt(Math.max(0, Math.min(1, matrix[q][k])));
        const light = Math.round(97 - v * 72);
        ctx.fillStyle = `hsl(220 70% ${light}%)`;
      }
      ctx.fillRect(left + k * cell, top + q * cell, cell, cell);
    }
  }
  if (labelSpace) {
    ctx.fillStyle = "#222";
    ctx.font = `${Math.min(12, Math.max(8, cell - 2))}px system-ui, sans-serif`;
    ctx.textBaseline = "middle";
    for (let i = 0; i < N; i++) {
      const label = tokens[i].length > 12 ? `${tokens[i].slice(0, 11)}…` : tokens[i];
      ctx.textAlign = "right";
      ctx.fillText(label, left - 4, top + i * cell + cell / 2);
      ctx.save();
      ctx.translate(left + i * cell + cell / 2, top - 4);
      ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "left";
      ctx.fillText(label, 0, 0);
      ctx.restore();
    }
  }
  if (selected !== null && selected >= 0 && selected < N) {
    ctx.strokeStyle = "#f0b400";
    ctx.lineWidth = 2;
    ctx.strokeRect(left + 1, top + selected * cell + 1, cell * (selected + 1) - 2, cell - 2);
  }
  return { cell, left, top, dpr };
}
