// The sampling controls: one labelled field per request field the server accepts, and the
// beam width when the server serves beam search.

import { el, field } from "./util.js";

// [request field, label, input attributes, hint, initial value, used by beam search]; an
// empty field is not sent, so the server's (and the model's generation_config) default
// applies.
const NUMBER_FIELDS = [
  ["temperature", "Temperature", { step: "0.05" }, "0 = greedy; higher = more random", "0.7", false],
  ["top_k", "Top-k", { step: "1" }, "keep the k most likely tokens (empty or -1: all)", "", false],
  ["top_p", "Top-p", { step: "0.01" }, "keep the smallest set with this much probability, (0, 1]", "", false],
  ["min_p", "Min-p", { step: "0.01" }, "drop tokens below min_p × the top probability, [0, 1]", "", false],
  ["repetition_penalty", "Repetition penalty", { step: "0.05" }, "> 1 discourages repeating any seen token", "", false],
  ["presence_penalty", "Presence penalty", { step: "0.1" }, "[-2, 2], per token already generated", "", false],
  ["frequency_penalty", "Frequency penalty", { step: "0.1" }, "[-2, 2], times each token's count", "", false],
  ["max_tokens", "Max tokens", { step: "1" }, "stop after this many tokens", "64", true],
  ["min_tokens", "Min tokens", { step: "1" }, "no end-of-sequence or stop before this many", "", false],
  ["seed", "Seed", { step: "1" }, "same seed + same settings = same output", "", false],
];

/**
 * The controls panel. Returns {element, values(), beamWidth(), inputs}: values() is the
 * request fields; with a beam width above 1 they ask for beam search (use_beam_search,
 * n = the width) and leave out the fields only sampling reads.
 */
export function samplingControls(config) {
  const inputs = {};
  const fields = {};
  for (const [name, label, attrs, hint, initial] of NUMBER_FIELDS) {
    const { wrap, input } = field(label, "input", { type: "number", name, ...attrs, value: initial }, hint);
    input.id = `param-${name}`;
    wrap.querySelector("label").htmlFor = input.id;
    inputs[name] = input;
    fields[name] = wrap;
  }
  const seedRandom = el("button", { type: "button", class: "secondary small", id: "seed-random" }, "random seed");
  seedRandom.addEventListener("click", () => {
    inputs.seed.value = String(Math.floor(Math.random() * 2 ** 31));
  });
  fields.seed.append(seedRandom);

  const stop = field(
    "Stop strings",
    "textarea",
    { id: "param-stop", name: "stop", rows: "2" },
    "one per line; generation ends before the first one",
  );
  inputs.stop = stop.input;

  const beamOn = Boolean(config.beam_search);
  const beam = field(
    "Beam width",
    "input",
    { id: "param-beam", type: "number", min: "1", step: "1", value: "1", disabled: !beamOn },
    beamOn
      ? "1 = sample one sequence; more = beam search, every hypothesis shown best first"
      : "this server does not serve beam search over HTTP (use LLM.beam_search in Python); it samples one sequence",
  );
  inputs.beam = beam.input;
  const lengthPenalty = field(
    "Length penalty",
    "input",
    { id: "param-length_penalty", type: "number", step: "0.1", disabled: true },
    "beam score = sum of log-probabilities / length ^ this (empty: the server's default)",
  );
  inputs.length_penalty = lengthPenalty.input;
  lengthPenalty.wrap.hidden = !beamOn;
  const beamNote = el(
    "p",
    { id: "beam-note", class: "note warn", role: "status", hidden: true },
    "Beam search keeps the hypotheses the model itself finds most likely and samples nothing: temperature, top-k, top-p, min-p, the penalties, min tokens, seed and stop strings are not used and not sent. The answer comes whole, not streamed.",
  );

  const element = el(
    "aside",
    { class: "controls", "aria-label": "Sampling controls" },
    el("h3", {}, "Sampling"),
    ...NUMBER_FIELDS.map(([name]) => fields[name]),
    stop.wrap,
    beam.wrap,
    lengthPenalty.wrap,
    beamNote,
  );

  function beamWidth() {
    if (!beamOn) return 1;
    const w = Number(inputs.beam.value);
    return Number.isFinite(w) && w > 1 ? w : 1;
  }

  // beam search on: the sampling-only fields are greyed out and say why
  function syncBeam() {
    const on = beamWidth() > 1;
    for (const [name, , , , , usedByBeam] of NUMBER_FIELDS) {
      if (usedByBeam) continue;
      inputs[name].disabled = on;
      fields[name].classList.toggle("unused", on);
    }
    seedRandom.disabled = on;
    inputs.stop.disabled = on;
    stop.wrap.classList.toggle("unused", on);
    inputs.length_penalty.disabled = !on;
    beamNote.hidden = !on;
  }
  inputs.beam.addEventListener("input", syncBeam);
  syncBeam();

  function number(name, out) {
    const raw = inputs[name].value.trim();
    // a number input gives "" for text it cannot parse; send what was typed so the
    // server says what is wrong instead of the field being dropped silently
    if (raw === "") {
      if (inputs[name].validity.badInput) out[name] = inputs[name].value;
      return;
    }
    out[name] = Number(raw);
  }

  function values() {
    const out = {};
    const width = beamWidth();
    for (const [name, , , , , usedByBeam] of NUMBER_FIELDS) {
      if (width === 1 || usedByBeam) number(name, out);
    }
    if (width > 1) {
      out.use_beam_search = true;
      out.n = width;
      number("length_penalty", out);
    }
    const stops = inputs.stop.value.split("\n").filter((s) => s.length > 0);
    if (stops.length && width === 1) out.stop = stops;
    return out;
  }

  return { element, values, beamWidth, inputs };
}
