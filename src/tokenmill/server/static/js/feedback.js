// Feedback on one answer: thumbs up or down, an optional label and comment -> POST /v1/feedback.

import { request } from "./api.js";
import { el, uid } from "./util.js";

const LABELS = ["", "helpful", "wrong", "harmful", "biased", "off-topic", "other"];

/**
 * A feedback bar for the answer with `requestId`. `extra()` returns fields to send along
 * (the model name). Shows the server's message when the server keeps no feedback.
 */
export function feedbackBar(requestId, extra = () => ({})) {
  const status = el("span", { class: "feedback-status", role: "status" });
  const labelId = uid("fb-label");
  const commentId = uid("fb-comment");
  const label = el(
    "select",
    { id: labelId, class: "fb-label" },
    LABELS.map((l) => el("option", { value: l }, l || "(no label)")),
  );
  const comment = el("input", { id: commentId, class: "fb-comment", type: "text", placeholder: "comment (optional)" });
  let rating = null;
  const up = el("button", { type: "button", class: "fb-up secondary", "aria-pressed": "false", title: "Good answer" }, "▲ good");
  const down = el("button", { type: "button", class: "fb-down secondary", "aria-pressed": "false", title: "Bad answer" }, "▼ bad");
  up.setAttribute("aria-label", "thumbs up");
  down.setAttribute("aria-label", "thumbs down");
  const send = el("button", { type: "button", class: "fb-send secondary" }, "Send feedback");

  const choose = (value) => {
    rating = value;
    up.setAttribute("aria-pressed", String(value === 5));
    down.setAttribute("aria-pressed", String(value === 1));
  };
  up.addEventListener("click", () => choose(5));
  down.addEventListener("click", () => choose(1));

  send.addEventListener("click", async () => {
    if (!rating) {
      status.textContent = "choose good or bad first";
      status.className = "feedback-status warn";
      return;
    }
    const body = { request_id: requestId, rating, ...extra() };
    if (label.value) body.labels = [label.value];
    if (comment.value.trim()) body.comment = comment.value.trim();
    send.disabled = true;
    status.textContent = "sending…";
    status.className = "feedback-status";
    try {
      await request("/v1/feedback", { method: "POST", json: body });
      status.textContent = "thanks, feedback stored";
      status.className = "feedback-status ok";
    } catch (e) {
      status.textContent = e.message;
      status.className = "feedback-status error-text";
    } finally {
      send.disabled = false;
    }
  });

  return el(
    "div",
    { class: "feedback", "data-request-id": requestId },
    el("span", { class: "muted" }, "Feedback:"),
    up,
    down,
    el("label", { for: labelId, class: "sr-only" }, "Feedback label"),
    label,
    el("label", { for: commentId, class: "sr-only" }, "Feedback comment"),
    comment,
    send,
    status,
  );
}
