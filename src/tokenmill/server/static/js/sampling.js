// The sampling controls: one labelled field per request field the server accepts.

import { el, field } from "./util.js";

// [request field, label, input attributes, hint, initial value]; an empty field is not sent,
// so the server's (and the model's generation_config) default applies.
const NUMBER_FIELDS = [
  ["temperature", "Temperature", { step: "0.05" }, "0 = greedy; higher = more random", "0.7"],
  ["top_k", "Top-k", { step: "1" }, "keep the k most likely tokens (empty or -1: all)", ""],
  ["top_p", "Top-p", { step: "0.01" }, "keep the smallest set with this much probability, (0, 1]", ""],
  ["min_p", "Min-p", { step: "0.01" }, "drop tokens below min_p × the top probability, [0, 1]", ""],
  ["repetition_penalty", "Repetition penalty", { step: "0.05" }, "> 1 discourages repeating any seen token", ""],
  ["presence_penalty", "Presence penalty", { step: "0.1" }, "[-2, 2], per token already generated", ""],
  ["frequency_penalty", "Frequency penalty", { step: "0.1" }, "[-2, 2], times each token's count", ""],
  ["max_tokens", "Max tokens", { step: "1" }, "stop after this many tokens", "64"],
  ["min_tokens", "Min tokens", { step: "1" }, "no end-of-sequence or stop before this many", ""],
  ["seed", "Seed", { step: "1" }, "same seed + same settings = same output", ""],
];

/** The controls panel. Returns {element, values()} where values() is the request fields. */
export function samplingControls(config) {
  const inputs = {};
  const fields = [];
  for (const [name, label, attrs, hint, initial] of NUMBER_FIELDS) {
    const { wrap, input } = field(label, "input", { type: "number", name, ...attrs, value: initial }, hint);
    input.id = `param-${name}`;
    wrap.querySelector("label").htmlFor = input.id;
    inputs[name] = input;
    fields.push(wrap);
  }
  const seedRandom = el("button", { type: "button", class: "secondary small", id: "seed-random" }, "random seed");
  seedRandom.addEventListener("click", () => {
    inputs.seed.value = String(Math.floor(Math.random() * 2 ** 31));
  });
  fields[fields.length - 1].append(seedRandom);

  const stop = field(
    "Stop strings",
    "textarea",
    { id: "param-stop", name: "stop", rows: "2" },
    "one per line; generation ends before the first one",
  );
  inputs.stop = stop.input;
  fields.push(stop.wrap);

  const beam = field(
    "Beam width",
    "input",
    { id: "param-beam", type: "number", value: "1", disabled: !config.beam_search },
    config.beam_search
      ? "hypotheses kept by beam search"
      : "beam search is not served over HTTP (use LLM.beam_search in Python); the server samples one sequence",
  );
  fields.push(beam.wrap);

  const element = el(
    "aside",
    { class: "controls", "aria-label": "Sampling controls" },
    el("h3", {}, "Sampling"),
    ...fields,
  );

  function values() {
    const out = {};
    for (const [name] of NUMBER_FIELDS) {
      const raw = inputs[name].value.trim();
      // a number input gives "" for text it cannot parse; send what was typed so the
      // server says what is wrong instead of the field being dropped silently
      if (raw === "") {
        if (inputs[name].validity.badInput) out[name] = inputs[name].value;
        continue;
      }
      out[name] = Number(raw);
    }
    const stops = inputs.stop.value.split("\n").filter((s) => s.length > 0);
    if (stops.length) out.stop = stops;
    return out;
  }

  return { element, values, inputs };
}
