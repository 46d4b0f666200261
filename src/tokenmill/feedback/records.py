"""What a feedback row and a request-log row hold, checked and turned into column values."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from tokenmill.feedback.errors import InvalidFeedback

#: ratings are whole numbers on a five-point scale; a thumbs-up/down UI sends 5 and 1
RATING_MIN, RATING_MAX = 1, 5
MAX_ID_CHARS = 200
MAX_MODEL_CHARS = 200
MAX_ROUTE_CHARS = 100
MAX_LABELS = 20
MAX_LABEL_CHARS = 64
MAX_COMMENT_CHARS = 4000

#: request-log columns stored as JSON text, with the value a missing key stands for
LOG_JSON_COLUMNS = {"output": [], "params": {}, "finish_reasons": [], "filter_decisions": [], "timing": {}}


def check_feedback(
    request_id: Any, rating: Any, labels: Any, comment: Any, model: Any
) -> tuple[str, int, list[str], str | None, str | None]:
    """The fields of one feedback, checked.

    Raises:
        InvalidFeedback: naming the field, what it must be, and what it was.
    """
    if not isinstance(request_id, str) or not request_id.strip():
        raise InvalidFeedback(
            "'request_id' must be the id of a response (e.g. 'chatcmpl-...'), a non-empty string",
            "request_id",
        )
    if len(request_id) > MAX_ID_CHARS:
        raise InvalidFeedback(f"'request_id' is longer than {MAX_ID_CHARS} characters", "request_id")
    # no response id holds a NUL, and PostgreSQL text cannot store one: a client's mistake,
    # not a database that is down
    if "\x00" in request_id:
        raise InvalidFeedback("'request_id' must not contain the NUL character", "request_id")
    # bool is an int in Python and JSON's true is no rating
    if isinstance(rating, bool) or not isinstance(rating, int) or not RATING_MIN <= rating <= RATING_MAX:
        raise InvalidFeedback(
            f"'rating' must be a whole number from {RATING_MIN} (worst) to {RATING_MAX} (best), "
            f"got {_show(rating)}",
            "rating",
        )
    if labels is None:
        labels = []
    if not isinstance(labels, list):
        raise InvalidFeedback(f"'labels' must be a list of strings, got {_show(labels)}", "labels")
    if len(labels) > MAX_LABELS:
        raise InvalidFeedback(
            f"'labels' has {len(labels)} labels; at most {MAX_LABELS} are allowed", "labels"
        )
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip() or len(label) > MAX_LABEL_CHARS:
            raise InvalidFeedback(
                f"'labels[{i}]' must be a non-empty string of at most {MAX_LABEL_CHARS} characters, "
                f"got {_show(label)}",
                f"labels[{i}]",
            )
    if comment is not None and not isinstance(comment, str):
        raise InvalidFeedback(f"'comment' must be a string, got {_show(comment)}", "comment")
    if comment is not None and len(comment) > MAX_COMMENT_CHARS:
        raise InvalidFeedback(
            f"'comment' has {len(comment)} characters; at most {MAX_COMMENT_CHARS} are allowed", "comment"
        )
    if model is not None and (not isinstance(model, str) or len(model) > MAX_MODEL_CHARS):
        raise InvalidFeedback(f"'model' must be a string of at most {MAX_MODEL_CHARS} characters", "model")
    if model is not None and "\x00" in model:
        raise InvalidFeedback("'model' must not contain the NUL character", "model")
    return request_id, rating, list(labels), comment, model


def feedback_row(
    request_id: str, rating: int, labels: list[str], comment: str | None, model: str | None
) -> dict[str, Any]:
    return {
        "id": f"fb-{uuid.uuid4().hex}",
        "request_id": request_id,
        "created": time.time(),
        "model": model,
        "rating": rating,
        "labels": json.dumps(labels, ensure_ascii=False),
        "comment": comment,
    }


def log_row(record: dict[str, Any], *, nul_free: bool) -> dict[str, Any]:
    """A request-log record (see ``Store.log_request``) as column values.

    Args:
        nul_free: replace NUL characters in free text by U+FFFD; PostgreSQL's text type
            cannot hold them (JSON columns escape them anyway).
    """
    prompt = record.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        prompt = _dumps(prompt)
    if prompt is not None and nul_free:
        prompt = prompt.replace("\x00", "\ufffd")
    row = {
        "id": str(record["id"]),
        "created": float(record.get("created") or time.time()),
        # the columns' lengths (PostgreSQL enforces them): a served model named by a long
        # path must not fail every record of the log
        "model": None if record.get("model") is None else str(record["model"])[:MAX_MODEL_CHARS],
        "route": str(record.get("route") or "")[:MAX_ROUTE_CHARS],
        "prompt": prompt,
    }
    for name, empty in LOG_JSON_COLUMNS.items():
        row[name] = _dumps(record.get(name, empty))
    return row


def decode_feedback(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["labels"] = json.loads(out["labels"] or "[]")
    return out


def decode_log(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for name, empty in LOG_JSON_COLUMNS.items():
        out[name] = json.loads(out[name]) if out[name] else empty
    return out


def _dumps(value: Any) -> str:
    # default=str: a value JSON cannot hold (an enum, a tensor scalar) is logged as its text
    return json.dumps(value, ensure_ascii=False, default=str)


def _show(value: Any) -> str:
    s = json.dumps(value, default=repr) if not isinstance(value, str) else repr(value)
    return s if len(s) <= 60 else s[:60] + "..."
