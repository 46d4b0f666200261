// The metrics page: polls the server's own /metrics (Prometheus text), keeps a rolling
// history in the page and draws requests, KV cache use, throughput and the TTFT / TPOT
// distributions over the last minutes.

import { barChart, lineChart } from "./charts.js";
import { el, errorBox, fmtMs, option, pct } from "./util.js";

const POLL_MS = 2000;
const KEEP_MS = 15 * 60 * 1000;
const P = "tokenmill:";

/** Prometheus text -> [{name, labels: {k: v}, value}]. */
export function parsePrometheus(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    if (m[3]) {
      for (const lm of m[3].matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[lm[1]] = lm[2].replace(/\\(.)/g, "$1");
    }
    const value = m[4] === "+Inf" ? Infinity : m[4] === "-Inf" ? -Infinity : Number(m[4]);
    samples.push({ name: m[1], labels, value });
  }
  return samples;
}

/** One poll's numbers. */
function snapshot(samples, t) {
  const one = (name) => samples.find((s) => s.name === P + name)?.value ?? 0;
  const sum = (name) => samples.filter((s) => s.name === P + name).reduce((a, s) => a + s.value, 0);
  const hist = (name) =>
    samples
      .filter((s) => s.name === `${P}${name}_bucket`)
      .map((s) => ({ le: s.labels.le === "+Inf" ? Infinity : Number(s.labels.le), count: s.value }))
      .sort((a, b) => a.le - b.le);
  return {
    t,
    running: one("num_requests_running"),
    waiting: one("num_requests_waiting"),
    kv: one("kv_cache_usage_perc"),
    kvUsed: one("kv_cache_blocks_used"),
    kvTotal: one("kv_cache_blocks_total"),
    gen: sum("generation_tokens_total"),
    prompt: sum("prompt_tokens_total"),
    finished: sum("request_success_total"),
    pipelines: sum("pipeline_requests_total"),
    ttft: hist("time_to_first_token_seconds"),
    ttftSum: one("time_to_first_token_seconds_sum"),
    ttftCount: one("time_to_first_token_seconds_count"),
    tpot: hist("time_per_output_token_seconds"),
    tpotSum: one("time_per_output_token_seconds_sum"),
    tpotCount: one("time_per_output_token_seconds_count"),
  };
}

/** Per-bucket counts observed between snapshots `a` (older, may be null) and `b`. */
function bucketDelta(a, b, key) {
  const before = new Map((a ? a[key] : []).map((x) => [x.le, x.count]));
  let prev = 0;
  return b[key].map((x) => {
    const cum = x.count - (before.get(x.le) ?? 0);
    const n = cum - prev;
    prev = cum;
    return { le: x.le, count: n, cum };
  });
}

/** The q-quantile from per-bucket counts, interpolated inside its bucket. */
function quantile(buckets, q) {
  const total = buckets.length ? buckets[buckets.length - 1].cum : 0;
  if (!(total > 0)) return null;
  const target = q * total;
  let lower = 0;
  for (const b of buckets) {
    if (b.cum >= target) {
      if (!Number.isFinite(b.le)) return lower;
      const inBucket = b.count || 1;
      return lower + ((target - (b.cum - b.count)) / inBucket) * (b.le - lower);
    }
    lower = b.le;
  }
  return lower;
}

function leLabel(le) {
  if (!Number.isFinite(le)) return "more";
  return le < 1 ? `${+(le * 1000).toFixed(1)}ms` : `${le}s`;
}

export function metricsPage(root) {
  const history = [];
  let lastError = null;
  let visible = false;
  const windowSel = el(
    "select",
    { id: "metrics-window" },
    option("60000", "last minute"),
    option("300000", "last 5 minutes", true),
    option("900000", "last 15 minutes"),
  );
  const cards = el("div", { class: "cards", id: "metric-cards" });
  const status = el("div", { id: "metrics-status" });
  const charts = {};
  const chartBox = (key, title) => {
    const canvas = el("canvas", { id: `chart-${key}`, role: "img", "aria-label": title });
    const caption = el("p", { class: "muted chart-caption", id: `caption-${key}` });
    charts[key] = { canvas, caption };
    return el("figure", { class: "chart" }, el("figcaption", {}, title), canvas, caption);
  };
  root.append(
    el(
      "div",
      { class: "metrics-head" },
      el("h2", {}, "Server metrics"),
      el("label", { for: "metrics-window" }, "Window "),
      windowSel,
      el("span", { class: "muted" }, ` polled from /metrics every ${POLL_MS / 1000} s while this page is open`),
    ),
    status,
    cards,
    el(
      "div",
      { class: "chart-grid" },
      chartBox("requests", "Requests running and waiting"),
      chartBox("kv", "KV cache use"),
      chartBox("throughput", "Throughput (tokens / s)"),
      chartBox("latency", "Mean TTFT and TPOT per interval"),
      chartBox("ttft", "Time to first token: distribution in the window"),
      chartBox("tpot", "Time per output token: distribution in the window"),
    ),
  );
  windowSel.addEventListener("change", draw);

  function card(label, value, id) {
    return el("div", { class: "card" }, el("div", { class: "card-value", id }, value), el("div", { class: "card-label" }, label));
  }

  function draw() {
    if (!visible) return;
    status.replaceChildren(lastError ? errorBox(`could not read /metrics: ${lastError}`) : "");
    const latest = history[history.length - 1];
    if (!latest) return;
    const windowMs = Number(windowSel.value);
    const now = latest.t;
    const inWindow = history.filter((s) => s.t >= now - windowMs);
    const first = inWindow[0] === latest ? null : inWindow[0];
    cards.replaceChildren(
      card("running", String(latest.running), "card-running"),
      card("waiting", String(latest.waiting), "card-waiting"),
      card(`KV cache (${latest.kvUsed} / ${latest.kvTotal} blocks)`, pct(latest.kv), "card-kv"),
      card("requests finished", String(latest.finished), "card-finished"),
      card("tokens generated", String(latest.gen), "card-generated"),
      card("pipeline requests", String(latest.pipelines), "card-pipelines"),
    );
    const pts = (f) => history.map((s) => [s.t, f(s)]);
    const rate = (key) =>
      history.map((s, i) => {
        const p = history[i - 1];
        return [s.t, p ? ((s[key] - p[key]) * 1000) / (s.t - p.t) : NaN];
      });
    const meanOf = (sumKey, countKey) =>
      history.map((s, i) => {
        const p = history[i - 1];
        const n = p ? s[countKey] - p[countKey] : 0;
        return [s.t, n > 0 ? (s[sumKey] - p[sumKey]) / n : NaN];
      });
    const opts = { now, windowMs };
    lineChart(charts.requests.canvas, [
      { label: "running", colour: "#2b7a3d", points: pts((s) => s.running) },
      { label: "waiting", colour: "#c0572b", points: pts((s) => s.waiting) },
    ], { ...opts, yFormat: (v) => (Number.isInteger(v) ? String(v) : v.toFixed(1)) });
    lineChart(charts.kv.canvas, [{ label: "KV blocks in use", colour: "#6a4bc4", points: pts((s) => s.kv) }], {
      ...opts,
      yMax: 1,
      yFormat: (v) => pct(v, 0),
    });
    lineChart(charts.throughput.canvas, [
      { label: "generated", colour: "#4a7bd0", points: rate("gen") },
      { label: "prompt", colour: "#d0a24a", points: rate("prompt") },
    ], { ...opts, yFormat: (v) => v.toFixed(0) });
    lineChart(charts.latency.canvas, [
      { label: "TTFT", colour: "#c0572b", points: meanOf("ttftSum", "ttftCount") },
      { label: "TPOT", colour: "#2b7a3d", points: meanOf("tpotSum", "tpotCount") },
    ], { ...opts, yFormat: (v) => fmtMs(v) });
    for (const key of ["ttft", "tpot"]) {
      const buckets = bucketDelta(first, latest, key);
      const nonzero = buckets.map((b, i) => (b.count > 0 ? i : -1)).filter((i) => i >= 0);
      const shown = nonzero.length ? buckets.slice(Math.max(0, nonzero[0] - 1), nonzero[nonzero.length - 1] + 2) : [];
      barChart(charts[key].canvas, shown.map((b) => ({ label: `≤${leLabel(b.le)}`, value: b.count })), {
        colour: key === "ttft" ? "#c0572b" : "#2b7a3d",
        empty: "no requests finished in this window",
      });
      const total = buckets.length ? buckets[buckets.length - 1].cum : 0;
      charts[key].caption.textContent = total
        ? `${total} observations; p50 ≈ ${fmtMs(quantile(buckets, 0.5))}, p90 ≈ ${fmtMs(quantile(buckets, 0.9))}, p99 ≈ ${fmtMs(quantile(buckets, 0.99))}`
        : "";
    }
  }

  let timer = null;
  let inFlight = false;
  async function poll() {
    if (inFlight) return;
    inFlight = true;
    try {
      const res = await fetch("/metrics", { cache: "no-store" });
      if (!res.ok) throw new Error(`${res.status} ${res.statusText}`);
      history.push(snapshot(parsePrometheus(await res.text()), Date.now()));
      while (history.length && history[0].t < Date.now() - KEEP_MS) history.shift();
      lastError = null;
    } catch (e) {
      lastError = e.message;
    } finally {
      inFlight = false;
    }
    draw();
  }

  return {
    /** Start polling (the history builds from here on, whichever page is shown). */
    start() {
      if (timer === null) {
        poll();
        timer = setInterval(poll, POLL_MS);
      }
    },
    show(on) {
      visible = on;
      if (on) draw();
    },
    history,
  };
}
