// Calls to the server: the API key, OpenAI-shaped errors and server-sent events.
//
// The key lives in sessionStorage (this tab only) and travels as an Authorization header,
// never in a URL. A 401 asks for it once; requests that fail together share one prompt.

const KEY_NAME = "tokenmill.apiKey";

export class ApiError extends Error {
  constructor(message, status, body) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.body = body;
  }
}

export function getKey() {
  return sessionStorage.getItem(KEY_NAME);
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_NAME, key);
  else sessionStorage.removeItem(KEY_NAME);
}

let pendingPrompt = null;

/** Ask for the key in the dialog; resolves to the key, or null when the user cancels. */
export function askKey(reason) {
  if (pendingPrompt) return pendingPrompt;
  const dialog = document.getElementById("key-dialog");
  const form = document.getElementById("key-form");
  const input = document.getElementById("key-input");
  document.getElementById("key-reason").textContent = reason || "";
  input.value = getKey() || "";
  pendingPrompt = new Promise((resolve) => {
    const done = (key) => {
      form.removeEventListener("submit", onSubmit);
      document.getElementById("key-cancel").removeEventListener("click", onCancel);
      document.getElementById("key-clear").removeEventListener("click", onClear);
      dialog.removeEventListener("cancel", onCancel);
      if (dialog.open) dialog.close();
      pendingPrompt = null;
      resolve(key);
    };
    const onSubmit = (e) => {
      e.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      setKey(key);
      done(key);
    };
    const onCancel = (e) => {
      if (e) e.preventDefault();
      done(null);
    };
    const onClear = () => {
      setKey(null);
      input.value = "";
      done(null);
    };
    form.addEventListener("submit", onSubmit);
    document.getElementById("key-cancel").addEventListener("click", onCancel);
    document.getElementById("key-clear").addEventListener("click", onClear);
    dialog.addEventListener("cancel", onCancel);
    dialog.showModal();
    input.focus();
  });
  return pendingPrompt;
}

/** The server's own words for a failed response: OpenAI's error.message where there is one. */
export async function errorMessage(res) {
  const text = await res.text().catch(() => "");
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON: the text itself is the message
  }
  const message =
    body?.error?.message ?? (typeof body?.detail === "string" ? body.detail : null) ?? (text.trim() || null);
  return { message: message || `${res.status} ${res.statusText}`.trim(), body };
}

/**
 * fetch() with the key; a 401 asks for the key and tries again. Any other failure throws an
 * ApiError carrying the server's message. Returns the (ok) Response.
 */
export async function request(path, { method = "GET", json, form, signal, headers = {} } = {}) {
  for (;;) {
    const h = { ...headers };
    const key = getKey();
    if (key) h.Authorization = `Bearer ${key}`;
    let body;
    if (json !== undefined) {
      h["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    } else if (form !== undefined) {
      body = form; // the browser sets the multipart boundary
    }
    const res = await fetch(path, { method, headers: h, body, signal });
    if (res.ok) return res;
    const { message, body: errBody } = await errorMessage(res);
    if (res.status === 401) {
      const reason = key ? `The key was refused: ${message}` : `This server needs an API key: ${message}`;
      const newKey = await askKey(reason);
      if (newKey) continue;
    }
    throw new ApiError(message, res.status, errBody);
  }
}

export async function getJSON(path, opts = {}) {
  return (await request(path, opts)).json();
}

export async function postJSON(path, json, opts = {}) {
  return (await request(path, { ...opts, method: "POST", json })).json();
}

/**
 * The data of each server-sent event of a streaming response, parsed as JSON, until
 * "[DONE]". An error event ({"error": {...}}) mid-stream throws an ApiError.
 */
export async function* sseEvents(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = block
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const event = JSON.parse(data);
      if (event.error) throw new ApiError(event.error.message || JSON.stringify(event.error), 500, event);
      yield event;
    }
  }
}
