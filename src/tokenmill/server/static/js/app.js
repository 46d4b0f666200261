// The page: reads what the server serves, lists the tasks, and routes between the
// playground (#/, #/task/NAME) and the metrics page (#/metrics).

import { askKey, getJSON } from "./api.js";
import { generationView } from "./generate.js";
import { metricsPage } from "./metrics.js";
import { pipelineView } from "./tasks.js";
import { el } from "./util.js";

const $ = (id) => document.getElementById(id);

/** The tasks to offer: the LLM's (completion, chat) then each pipeline task. */
function taskEntries(config) {
  const entries = [];
  if (config.llm) {
    entries.push({ key: "text-generation", title: "Text generation", note: config.llm.model, make: () => generationView(config, "completion") });
    if (config.llm.chat) entries.push({ key: "chat", title: "Chat", note: config.llm.model, make: () => generationView(config, "chat") });
  }
  for (const t of config.tasks) {
    entries.push({ key: t.task, title: t.task, note: t.models.join(", "), make: () => pipelineView(config, t) });
  }
  return entries;
}

function showBanner(message) {
  const banner = $("banner");
  banner.textContent = message;
  banner.hidden = !message;
}

async function loadConfig() {
  for (;;) {
    try {
      return await getJSON("/v1/playground/config");
    } catch (e) {
      // a refused key was already asked for again; anything else is shown with a retry
      showBanner(`Could not read the server's configuration: ${e.message}`);
      const retry = el("button", { type: "button", id: "retry" }, "Try again");
      $("banner").append(" ", retry);
      await new Promise((resolve) => retry.addEventListener("click", resolve, { once: true }));
      showBanner("");
    }
  }
}

async function main() {
  const metrics = metricsPage($("view-metrics"));
  metrics.start();
  $("key-button").addEventListener("click", () => askKey("Enter the key this server was started with (--api-key)."));

  const config = await loadConfig();
  window.tokenmillConfig = config; // for people poking at the page from the console
  $("server-info").textContent = config.llm ? `${config.llm.model} · context ${config.llm.max_model_len}` : "pipelines only";
  const entries = taskEntries(config);
  const views = new Map();
  const list = $("task-list");
  list.replaceChildren(
    ...entries.map((entry) =>
      el("li", {}, el("a", { href: `#/task/${entry.key}`, id: `task-${entry.key}-link`, class: "task-link", "data-task": entry.key }, el("span", {}, entry.title), el("small", { class: "muted" }, entry.note))),
    ),
  );
  if (!entries.length) list.replaceChildren(el("li", { class: "muted" }, "This server serves nothing the page can show."));

  function route() {
    const hash = location.hash || "#/";
    const onMetrics = hash === "#/metrics";
    $("view-playground").hidden = onMetrics;
    $("view-metrics").hidden = !onMetrics;
    $("nav-metrics").setAttribute("aria-current", String(onMetrics));
    $("nav-playground").setAttribute("aria-current", String(!onMetrics));
    metrics.show(onMetrics);
    if (onMetrics) return;
    const m = /^#\/task\/(.+)$/.exec(hash);
    const key = m ? decodeURIComponent(m[1]) : entries[0]?.key;
    const entry = entries.find((e) => e.key === key) || entries[0];
    if (!entry) return;
    for (const a of list.querySelectorAll("a")) a.setAttribute("aria-current", String(a.dataset.task === entry.key));
    // each view is built once and kept, so a running stream survives switching tasks
    if (!views.has(entry.key)) views.set(entry.key, entry.make());
    const view = views.get(entry.key);
    const panel = $("task-panel");
    if (panel.dataset.task !== entry.key) {
      panel.dataset.task = entry.key;
      panel.replaceChildren(el("h2", { id: "task-title" }, entry.title), view.element);
    }
  }
  window.addEventListener("hashchange", route);
  route();
  document.body.dataset.ready = "1"; // tests wait for this
}

main();
