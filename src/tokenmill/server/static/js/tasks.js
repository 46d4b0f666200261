// Pipeline tasks: a form suited to each task, POST /v1/pipelines/{task} (or
// /v1/audio/transcriptions), and the result drawn readably.

import { request } from "./api.js";
import { feedbackBar } from "./feedback.js";
import { el, errorBox, field, fmtMs, option, pct, scoreBar, submitOnCtrlEnter } from "./util.js";

/** label/score pairs wherever they sit in a result (a list, a list of lists, one dict). */
function labelScores(result) {
  if (Array.isArray(result) && result.length && Array.isArray(result[0])) return labelScores(result[0]);
  if (Array.isArray(result)) return result.filter((r) => r && typeof r.score === "number");
  if (result && Array.isArray(result.labels) && Array.isArray(result.scores)) {
    return result.labels.map((label, i) => ({ label, score: result.scores[i] }));
  }
  if (result && typeof result.score === "number") return [result];
  return [];
}

function barsTable(rows, nameOf = (r) => r.label) {
  return el(
    "table",
    { class: "scores" },
    el("tbody", {}, rows.map((r) => el("tr", {}, el("th", { scope: "row" }, String(nameOf(r))), el("td", {}, scoreBar(r.score, pct(r.score, 1)))))),
  );
}

/** A stable colour per entity label. */
function labelColour(label) {
  let h = 0;
  for (const ch of label) h = (h * 31 + ch.charCodeAt(0)) % 360;
  return `hsl(${h} 70% 85%)`;
}

function renderEntities(text, entities) {
  const spans = entities
    .filter((e) => typeof e.start === "number" && typeof e.end === "number")
    .sort((a, b) => a.start - b.start);
  const parts = [];
  let at = 0;
  for (const e of spans) {
    if (e.start < at) continue; // overlapping tokens: keep the first
    parts.push(text.slice(at, e.start));
    const label = e.entity_group || e.entity || "?";
    parts.push(
      el(
        "mark",
        { class: "entity", style: { background: labelColour(label) }, title: `${label} ${pct(e.score, 1)}` },
        text.slice(e.start, e.end),
        el("span", { class: "entity-label" }, label),
      ),
    );
    at = e.end;
  }
  parts.push(text.slice(at));
  const rows = entities.map((e) =>
    el("tr", {}, el("td", {}, e.word ?? ""), el("td", {}, e.entity_group || e.entity || ""), el("td", {}, scoreBar(e.score, pct(e.score, 1)))),
  );
  return el(
    "div",
    {},
    el("p", { class: "entities" }, parts),
    entities.length
      ? el("table", { class: "scores" }, el("thead", {}, el("tr", {}, el("th", {}, "word"), el("th", {}, "label"), el("th", {}, "score"))), el("tbody", {}, rows))
      : el("p", { class: "muted" }, "No entities found."),
  );
}

function renderAnswer(context, result) {
  const answers = Array.isArray(result) ? result : [result];
  const best = answers[0];
  const p = el("p", { class: "qa-context" });
  if (best && typeof best.start === "number" && best.end > best.start) {
    p.append(context.slice(0, best.start), el("mark", { class: "answer" }, context.slice(best.start, best.end)), context.slice(best.end));
  } else {
    p.append(context);
  }
  return el(
    "div",
    {},
    el("p", {}, "Answer: ", el("strong", { class: "answer-text" }, best?.answer || "(no answer)"), " ", best ? scoreBar(best.score, pct(best.score, 1)) : ""),
    p,
    answers.length > 1 ? barsTable(answers, (a) => a.answer) : "",
  );
}

function renderVector(result) {
  // feature-extraction: one vector (pooled) or one per token; draw the first as a strip
  let vec = result;
  let shape = [];
  let v = result;
  while (Array.isArray(v)) {
    shape.push(v.length);
    v = v[0];
  }
  while (Array.isArray(vec) && Array.isArray(vec[0])) vec = vec[0];
  const norm = Math.sqrt(vec.reduce((s, x) => s + x * x, 0));
  const max = Math.max(...vec.map(Math.abs)) || 1;
  const canvas = el("canvas", { class: "vector", width: String(Math.min(vec.length, 768)), height: "24", role: "img", "aria-label": "vector values" });
  const ctx = canvas.getContext("2d");
  const w = canvas.width / vec.length;
  vec.forEach((x, i) => {
    const t = x / max;
    ctx.fillStyle = t >= 0 ? `hsl(10 80% ${100 - t * 50}%)` : `hsl(220 80% ${100 + t * 50}%)`;
    ctx.fillRect(i * w, 0, Math.max(1, w), 24);
  });
  return el(
    "div",
    {},
    el("p", {}, `shape ${shape.join(" × ")}, first vector norm ${norm.toFixed(4)}`),
    canvas,
    el("pre", { class: "json" }, `[${vec.slice(0, 8).map((x) => x.toFixed(4)).join(", ")}${vec.length > 8 ? ", …" : ""}]`),
  );
}

function renderText(result) {
  const items = Array.isArray(result) ? result.flat() : [result];
  return el(
    "div",
    {},
    items.map((r) => el("p", { class: "generated" }, typeof r === "string" ? r : Object.values(r).find((x) => typeof x === "string") ?? JSON.stringify(r))),
  );
}

function renderTranscript(result, values) {
  const segments = result.segments || [];
  const chunks = result.chunks || [];
  const rows = segments.length
    ? segments.map((s) => [s.start, s.end, s.text])
    : chunks.map((c) => [c.timestamp?.[0], c.timestamp?.[1], c.text]);
  // the uploaded file plays beside its transcript, to check what was heard
  const player = values?.file ? el("audio", { controls: true, src: URL.createObjectURL(values.file), class: "audio-preview" }) : "";
  return el(
    "div",
    {},
    player,
    el("p", { class: "transcript" }, result.text ?? ""),
    rows.length
      ? el(
          "table",
          { class: "segments" },
          el("thead", {}, el("tr", {}, el("th", {}, "from"), el("th", {}, "to"), el("th", {}, "text"))),
          el("tbody", {}, rows.map(([a, b, t]) => el("tr", {}, el("td", {}, fmtTime(a)), el("td", {}, fmtTime(b)), el("td", {}, t)))),
        )
      : "",
    result.language ? el("p", { class: "muted audio-meta" }, `language: ${result.language}${result.duration ? `, ${result.duration.toFixed(2)} s of audio` : ""}`) : "",
  );
}

function fmtTime(s) {
  if (typeof s !== "number") return "–";
  const m = Math.floor(s / 60);
  return `${m}:${(s - m * 60).toFixed(2).padStart(5, "0")}`;
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

/** Per task: the form fields, how to build the request, how to draw the answer. */
function taskSpec(task, routes) {
  const text = (label = "Text", value = "") => ({ name: "text", label, kind: "textarea", value });
  switch (task) {
    case "text-classification":
      return {
        fields: [text("Text", "I love this movie!"), { name: "all", label: "Show every label", kind: "checkbox" }],
        body: (v) => ({ inputs: v.text, parameters: v.all ? { top_k: null } : {} }),
        render: (r) => barsTable(labelScores(r)),
      };
    case "zero-shot-classification":
      return {
        fields: [
          text("Text", "The new phone has a great camera."),
          { name: "labels", label: "Candidate labels (comma-separated)", kind: "input", value: "technology, sports, cooking" },
          { name: "multi", label: "Labels are independent (multi-label)", kind: "checkbox" },
        ],
        body: (v) => ({
          inputs: v.text,
          parameters: { candidate_labels: v.labels.split(",").map((s) => s.trim()).filter(Boolean), multi_label: v.multi },
        }),
        render: (r) => barsTable(labelScores(r)),
      };
    case "token-classification":
      return {
        fields: [
          text("Text", "My name is Sarah and I live in London."),
          { name: "agg", label: "Group tokens into entities", kind: "select", options: ["simple", "first", "average", "max", "none"] },
        ],
        body: (v) => ({ inputs: v.text, parameters: { aggregation_strategy: v.agg } }),
        render: (r, v) => renderEntities(v.text, Array.isArray(r) ? r : []),
      };
    case "question-answering":
      return {
        fields: [
          { name: "question", label: "Question", kind: "input", value: "Where does Sarah live?" },
          { name: "context", label: "Context", kind: "textarea", value: "My name is Sarah and I live in London." },
        ],
        body: (v) => ({ inputs: { question: v.question, context: v.context } }),
        render: (r, v) => renderAnswer(v.context, r),
      };
    case "fill-mask":
      return {
        fields: [text("Text with the model's mask token ([MASK] for BERT, <mask> for RoBERTa)", "Paris is the [MASK] of France.")],
        body: (v) => ({ inputs: v.text }),
        render: (r) => barsTable(labelScores(r), (x) => x.token_str ?? x.sequence),
      };
    case "feature-extraction":
      return { fields: [text("Text", "Hello world.")], body: (v) => ({ inputs: v.text }), render: renderVector };
    case "sentence-similarity":
      return {
        fields: [
          { name: "source", label: "Source sentence", kind: "input", value: "A man is eating food." },
          { name: "sentences", label: "Sentences to compare (one per line)", kind: "textarea", value: "A man is eating a meal.\nA plane is taking off." },
        ],
        body: (v) => ({ inputs: { source_sentence: v.source, sentences: v.sentences.split("\n").filter((s) => s.trim()) } }),
        render: (r, v) => {
          const sentences = v.sentences.split("\n").filter((s) => s.trim());
          return barsTable(r.map((score, i) => ({ label: sentences[i], score })));
        },
      };
    case "summarization":
    case "translation":
    case "text2text-generation":
      return { fields: [text("Text")], body: (v) => ({ inputs: v.text }), render: renderText };
    case "image-classification":
      return {
        fields: [{ name: "file", label: "Image", kind: "file", accept: "image/*" }],
        body: async (v) => ({ inputs: await readAsDataURL(v.file), parameters: { top_k: 5 } }),
        render: (r, v) => el("div", { class: "image-result" }, el("img", { src: v.preview, alt: "the uploaded image", class: "preview" }), barsTable(labelScores(r))),
      };
    case "automatic-speech-recognition":
      return {
        fields: [{ name: "file", label: "Audio file (WAV, FLAC, MP3, …)", kind: "file", accept: "audio/*" }],
        // the OpenAI route takes the file as it is; verbose_json brings timestamped segments
        send: routes.audio_transcriptions
          ? async (v) => {
              const form = new FormData();
              form.append("file", v.file, v.file.name);
              form.append("model", v.model);
              form.append("response_format", "verbose_json");
              form.append("timestamp_granularities[]", "segment");
              const res = await request("/v1/audio/transcriptions", { method: "POST", form });
              return { result: await res.json(), id: res.headers.get("X-Request-Id") };
            }
          : null,
        body: async (v) => ({ inputs: await readAsDataURL(v.file), parameters: { return_timestamps: true } }),
        render: (r, v) => renderTranscript(r, v),
      };
    default:
      return {
        fields: [
          { name: "inputs", label: "inputs (JSON)", kind: "textarea", value: '"Hello world."' },
          { name: "params", label: "parameters (JSON object)", kind: "textarea", value: "{}" },
        ],
        body: (v) => {
          try {
            return { inputs: JSON.parse(v.inputs), parameters: JSON.parse(v.params || "{}") };
          } catch (e) {
            throw new Error(`the JSON is not valid: ${e.message}`);
          }
        },
        render: (r) => el("pre", { class: "json" }, JSON.stringify(r, null, 2)),
      };
  }
}

/** The view of one pipeline task (`entry` from /v1/playground/config). */
export function pipelineView(config, entry) {
  const spec = taskSpec(entry.task, config.routes);
  const form = el("form", { class: "task-form", novalidate: true, "aria-label": entry.task });
  const inputs = {};
  if (entry.models.length > 1) {
    const m = field("Model", "select", { id: "task-model" });
    entry.models.forEach((name) => m.input.append(option(name)));
    inputs.model = m.input;
    form.append(m.wrap);
  }
  for (const f of spec.fields) {
    const id = `task-${f.name}`;
    if (f.kind === "checkbox") {
      const box = el("input", { type: "checkbox", id });
      inputs[f.name] = box;
      form.append(el("div", { class: "field check" }, box, el("label", { for: id }, f.label)));
      continue;
    }
    const attrs = { id };
    if (f.kind === "textarea") attrs.rows = "4";
    if (f.kind === "file") Object.assign(attrs, { type: "file", accept: f.accept });
    const { wrap, input } = field(f.label, f.kind === "file" ? "input" : f.kind, attrs);
    if (f.options) f.options.forEach((o) => input.append(option(o)));
    if (f.value !== undefined) input.value = f.value;
    inputs[f.name] = input;
    form.append(wrap);
  }
  const run = el("button", { type: "submit", id: "task-run" }, "Run");
  form.append(el("div", { class: "actions" }, run, el("small", { class: "muted" }, "Ctrl+Enter to run")));
  submitOnCtrlEnter(form);
  const timing = el("span", { class: "muted", id: "task-timing" });
  const result = el("div", { class: "task-result", id: "task-result", "aria-live": "polite" });

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const values = { model: entry.models[0] };
    for (const [name, input] of Object.entries(inputs)) {
      values[name] = input.type === "checkbox" ? input.checked : input.type === "file" ? input.files[0] : input.value;
    }
    if ("file" in values && !values.file) {
      result.replaceChildren(errorBox("choose a file first"));
      return;
    }
    run.disabled = true;
    result.replaceChildren(el("p", { class: "muted" }, "running…"));
    const t0 = performance.now();
    try {
      if (values.file && values.file.type.startsWith("image/")) values.preview = await readAsDataURL(values.file);
      let answer;
      let id = null;
      if (spec.send) {
        ({ result: answer, id } = await spec.send(values));
      } else {
        const body = await spec.body(values);
        body.model = values.model;
        const res = await request(`/v1/pipelines/${entry.task}`, { method: "POST", json: body });
        id = res.headers.get("X-Request-Id");
        answer = await res.json();
      }
      timing.textContent = `answered in ${fmtMs((performance.now() - t0) / 1000)}`;
      result.replaceChildren(spec.render(answer, values));
      if (config.routes.feedback) {
        // a pipeline answer without a server id gets one here, so feedback can name it
        const rid = id || `${entry.task}-${crypto.randomUUID ? crypto.randomUUID() : Date.now()}`;
        result.append(feedbackBar(rid, () => ({ model: values.model })));
      }
    } catch (err) {
      timing.textContent = "";
      result.replaceChildren(errorBox(err.message));
    } finally {
      run.disabled = false;
    }
  });

  const element = el(
    "div",
    { class: "task" },
    el("p", { class: "muted" }, entry.description, " — ", entry.models.join(", ")),
    form,
    el("section", { class: "output", "aria-label": "Result" }, el("h3", {}, "Result ", timing), result),
  );
  return { element, focus: () => form.querySelector("textarea, input, select")?.focus() };
}
