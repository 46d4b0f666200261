// Line and bar charts drawn on a <canvas>: no chart library, nothing fetched.

const AXIS = "#666";
const GRID = "#e4e4e4";
const FONT = "11px system-ui, sans-serif";

function setup(canvas, height) {
  const dpr = window.devicePixelRatio || 1;
  const width = Math.max(240, canvas.parentElement?.clientWidth || 400);
  canvas.width = Math.round(width * dpr);
  canvas.height = Math.round(height * dpr);
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = FONT;
  return { ctx, width, height };
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

/**
 * series: [{label, colour, points: [[tMillis, value]]}]; the x axis spans the last
 * `windowMs` up to `now`. yFormat formats axis values.
 */
export function lineChart(canvas, series, { now, windowMs, yMax = null, yFormat = (v) => String(v), height = 160 }) {
  const { ctx, width } = setup(canvas, height);
  const pad = { left: 62, right: 10, top: 18, bottom: 22 };
  const w = width - pad.left - pad.right;
  const h = height - pad.top - pad.bottom;
  const t0 = now - windowMs;
  let top = yMax;
  if (top === null) {
    let m = 0;
    for (const s of series) for (const [t, v] of s.points) if (t >= t0 && Number.isFinite(v)) m = Math.max(m, v);
    top = niceMax(m);
  }
  ctx.strokeStyle = GRID;
  ctx.fillStyle = AXIS;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const y = pad.top + h - (h * i) / 4;
    ctx.beginPath();
    ctx.moveTo(pad.left, y);
    ctx.lineTo(pad.left + w, y);
    ctx.stroke();
    ctx.fillText(yFormat((top * i) / 4), pad.left - 4, y);
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  const minutes = windowMs / 60000;
  for (let i = 0; i <= 4; i++) {
    const x = pad.left + (w * i) / 4;
    const ago = minutes * (1 - i / 4);
    ctx.fillText(ago === 0 ? "now" : `-${ago < 1 ? `${Math.round(ago * 60)}s` : `${+ago.toFixed(1)}m`}`, x, pad.top + h + 4);
  }
  const xOf = (t) => pad.left + ((t - t0) / windowMs) * w;
  const yOf = (v) => pad.top + h - (Math.min(v, top) / top) * h;
  let legendX = pad.left;
  for (const s of series) {
    ctx.strokeStyle = s.colour;
    ctx.lineWidth = 2;
    ctx.beginPath();
    let started = false;
    for (const [t, v] of s.points) {
      if (t < t0 || !Number.isFinite(v)) {
        started = false;
        continue;
      }
      if (!started) ctx.moveTo(xOf(t), yOf(v));
      else ctx.lineTo(xOf(t), yOf(v));
      started = true;
    }
    ctx.stroke();
    ctx.lineWidth = 1;
    ctx.fillStyle = s.colour;
    ctx.fillRect(legendX, 4, 10, 10);
    ctx.fillStyle = "#222";
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    ctx.fillText(s.label, legendX + 14, 3);
    legendX += ctx.measureText(s.label).width + 30;
  }
}

/** bars: [{label, value}] drawn left to right; values are counts. */
export function barChart(canvas, bars, { colour = "#4a7bd0", height = 160, empty = "no data yet" } = {}) {
  const { ctx, width } = setup(canvas, height);
  const pad = { left: 36, right: 8, top: 8, bottom: 30 };
  const w = width - pad.left - pad.right;
  const h = height - pad.top - pad.bottom;
  const max = Math.max(0, ...bars.map((b) => b.value));
  if (!(max > 0)) {
    ctx.fillStyle = AXIS;
    ctx.textAlign = "center";
    ctx.fillText(empty, width / 2, height / 2);
    return;
  }
  const top = niceMax(max);
  ctx.strokeStyle = GRID;
  ctx.fillStyle = AXIS;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let i = 0; i <= 2; i++) {
    const y = pad.top + h - (h * i) / 2;
    ctx.beginPath();
    ctx.moveTo(pad.left, y);
    ctx.lineTo(pad.left + w, y);
    ctx.stroke();
    ctx.fillText(String(Math.round((top * i) / 2)), pad.left - 4, y);
  }
  const bw = w / bars.length;
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  bars.forEach((b, i) => {
    const bh = (b.value / top) * h;
    ctx.fillStyle = colour;
    ctx.fillRect(pad.left + i * bw + 1, pad.top + h - bh, Math.max(1, bw - 2), bh);
    // label every bar when they fit, else every other one
    if (bw > 34 || i % 2 === 0) {
      ctx.fillStyle = AXIS;
      ctx.fillText(b.label, pad.left + i * bw + bw / 2, pad.top + h + 4);
    }
  });
}
