// Small DOM and formatting helpers shared by the views.

/** el("div", {class: "x", onclick: f}, child, "text", ...) -> an Element. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name === "style" && typeof value === "object") Object.assign(node.style, value);
    else if (value === true) node.setAttribute(name, "");
    else node.setAttribute(name, String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

let counter = 0;
/** A fresh id for pairing labels and inputs. */
export function uid(prefix = "f") {
  counter += 1;
  return `${prefix}-${counter}`;
}

/** A labelled field: returns {wrap, input}. `kind` is "input", "textarea" or "select". */
export function field(label, kind = "input", attrs = {}, hint = "") {
  const id = attrs.id || uid();
  const input = el(kind, { ...attrs, id });
  const wrap = el("div", { class: "field" }, el("label", { for: id }, label), input);
  if (hint) {
    const hintId = `${id}-hint`;
    wrap.append(el("small", { id: hintId, class: "muted" }, hint));
    input.setAttribute("aria-describedby", hintId);
  }
  return { wrap, input };
}

export function option(value, label, selected = false) {
  return el("option", { value, selected }, label ?? value);
}

/** Submit `form` on Ctrl+Enter (or Cmd+Enter) from any of its fields, Enter in single-line inputs. */
export function submitOnCtrlEnter(form) {
  form.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      form.requestSubmit();
    }
  });
}

export function fmtMs(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  return seconds < 1 ? `${(seconds * 1000).toFixed(1)} ms` : `${seconds.toFixed(2)} s`;
}

export function fmtNum(x, digits = 1) {
  if (x === null || x === undefined || !Number.isFinite(x)) return "–";
  return x.toFixed(digits);
}

export function pct(p, digits = 1) {
  if (p === null || p === undefined || !Number.isFinite(p)) return "–";
  return `${(p * 100).toFixed(digits)}%`;
}

/** A token's text with whitespace made visible (a space as ·, a newline as ↵). */
export function visibleToken(text) {
  if (text === "") return "∅";
  return text.replace(/ /g, "·").replace(/\n/g, "↵").replace(/\t/g, "→");
}

/** A horizontal bar for a value in [0, 1], with its number beside it. */
export function scoreBar(value, label = pct(value)) {
  const width = Math.max(0, Math.min(1, value || 0)) * 100;
  return el(
    "span",
    { class: "bar", role: "img", "aria-label": label },
    el("span", { class: "bar-fill", style: { width: `${width}%` } }),
    el("span", { class: "bar-text" }, label),
  );
}

/** A box that shows an error message (the server's words) in place of a result. */
export function errorBox(message) {
  return el("div", { class: "error", role: "alert" }, message);
}

/** Probability to a background colour: red (unlikely) through yellow to green (likely). */
export function probColour(p) {
  const hue = Math.round(Math.max(0, Math.min(1, p)) * 120);
  return `hsl(${hue} 75% 82%)`;
}
