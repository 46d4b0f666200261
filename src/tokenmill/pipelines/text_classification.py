"""text-classification (alias sentiment-analysis): labels and scores for texts or text pairs.

Scores follow transformers: softmax over the labels for single-label models, sigmoid per
label for multi-label models (``problem_type == "multi_label_classification"``) and for
models with one label, raw logits for regression; ``function_to_apply`` overrides that.
The output shape follows transformers too, odd corner included: without ``top_k`` each
input gives its best label as a dict (and a lone string input a list of that one dict);
with ``top_k`` (an int, or None for every label) each input gives a list, best first.
"""

from __future__ import annotations

from typing import Any

import torch

from tokenmill.pipelines.base import Feature, Pipeline, PipelineInputError, check_text, check_top_k

FUNCTIONS = ("softmax", "sigmoid", "none")


def apply_function(logits: torch.Tensor, function: str) -> torch.Tensor:
    """(num_labels,) float32 logits -> scores."""
    if function == "softmax":
        return logits.softmax(dim=-1)
    if function == "sigmoid":
        return logits.sigmoid()
    return logits


def check_function_option(options: dict[str, Any]) -> None:
    """Validates ``function_to_apply`` in place: lower-cased, and "default" removed."""
    if "function_to_apply" not in options:
        return
    fn = options["function_to_apply"]
    name = fn.lower() if isinstance(fn, str) else None
    if name not in (*FUNCTIONS, "default"):
        raise ValueError(
            f"function_to_apply must be one of {', '.join(map(repr, FUNCTIONS))} or 'default', got {fn!r}"
        )
    if name == "default":
        del options["function_to_apply"]
    else:
        options["function_to_apply"] = name


def default_function(config: Any) -> str:
    """What transformers applies to a classifier's logits when the caller does not say."""
    if config.problem_type == "regression":
        return "none"
    if config.problem_type == "multi_label_classification" or config.num_labels == 1:
        return "sigmoid"
    return "softmax"


class TextClassificationPipeline(Pipeline):
    """``pipe(text | {"text": t, "text_pair": p} | a list of them, top_k=, function_to_apply=)``.

    Returns ``{"label", "score"}`` dicts (see the module docstring for the shapes).

    Args (per call or as pipeline defaults):
        top_k: how many labels per input, best first; None for all of them.
        function_to_apply: "softmax", "sigmoid", "none", or "default" (as the model says).
    """

    task = "text-classification"
    call_options = frozenset({"top_k", "function_to_apply"})

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        if "top_k" in options:
            check_top_k(options["top_k"])
        check_function_option(options)
        return options

    def default_function(self) -> str:
        return default_function(self.config)

    def check_input(self, item: Any, i: int) -> Any:
        if isinstance(item, str):
            return check_text(item, i)
        if isinstance(item, dict):
            extra = sorted(set(item) - {"text", "text_pair"})
            if "text" not in item or extra:
                raise PipelineInputError(
                    f"input {i} must be a string or a dict with 'text' and optionally 'text_pair'"
                    + (f"; unknown key(s) {', '.join(map(repr, extra))}" if extra else "")
                )
            pair = item.get("text_pair")
            return {
                "text": check_text(item["text"], i),
                "text_pair": None if pair is None else check_text(pair, i),
            }
        if isinstance(item, (list, tuple)):
            raise PipelineInputError(
                f"input {i} is a {type(item).__name__}; to classify a text pair pass a dict "
                '{"text": "My text", "text_pair": "My pair"}'
            )
        raise PipelineInputError(
            f"input {i} must be a string or a dict with 'text' and 'text_pair', got {type(item).__name__}"
        )

    def preprocess(self, item: Any, index: int, options: dict[str, Any]) -> list[Feature]:
        text, pair = (item["text"], item["text_pair"]) if isinstance(item, dict) else (item, None)
        enc = self.encode(text, pair, truncation=options.get("truncation", False), index=index)
        return [Feature(list(enc.ids), index, list(enc.type_ids))]

    def forward(
        self, batch: dict[str, torch.Tensor], features: list[Feature], options: dict[str, Any]
    ) -> list[Any]:
        logits = self.model(**batch)  # (B, num_labels)
        return list(logits.float().cpu())

    def postprocess(
        self, item: Any, features: list[Feature], outputs: list[Any], options: dict[str, Any]
    ) -> Any:
        scores = apply_function(outputs[0], options.get("function_to_apply") or self.default_function())
        labels = self.config.id2label
        if "top_k" not in options:
            best = int(scores.argmax())
            return {"label": labels[best], "score": scores[best].item()}
        ranked = [{"label": labels[i], "score": s} for i, s in enumerate(scores.tolist())]
        ranked.sort(key=lambda d: d["score"], reverse=True)  # stable: ties keep label order
        top_k = options["top_k"]
        return ranked if top_k is None else ranked[:top_k]

    def __call__(self, inputs: Any, **options: Any) -> Any:
        result = super().__call__(inputs, **options)
        # transformers wraps a lone string's best label in a list (not a dict input's)
        if isinstance(inputs, str) and "top_k" not in {**self.defaults, **options}:
            return [result]
        return result
