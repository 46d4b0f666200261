"""feature-extraction and sentence-similarity: hidden states, pooled as the model says.

A sentence-transformers checkpoint says how to pool (``modules.json`` and its Pooling
module's config) and whether to normalise; tokenmill follows it. A plain encoder has no
pooling config, and, as in transformers, gives one vector per token.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from tokenmill.pipelines.base import Feature, Pipeline, PipelineInputError, check_text

POOLINGS = ("mean", "cls", "max", "last", "none")


def read_pooling(model_dir: str) -> tuple[str | None, bool]:
    """(pooling mode, normalize) from a sentence-transformers layout; (None, False) without one."""
    modules_path = os.path.join(model_dir, "modules.json")
    if not os.path.isfile(modules_path):
        return None, False
    with open(modules_path, encoding="utf-8") as f:
        modules = json.load(f)
    pooling, normalize = None, False
    for m in modules:
        kind = str(m.get("type", ""))
        if kind.endswith(".Pooling"):
            cfg_path = os.path.join(model_dir, m.get("path", ""), "config.json")
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
            modes = [
                name
                for key, name in (
                    ("pooling_mode_cls_token", "cls"),
                    ("pooling_mode_mean_tokens", "mean"),
                    ("pooling_mode_max_tokens", "max"),
                    ("pooling_mode_lasttoken", "last"),
                )
                if cfg.get(key)
            ]
            if len(modes) != 1 or cfg.get("pooling_mode_mean_sqrt_len_tokens"):
                raise ValueError(
                    f"{cfg_path}: tokenmill pools with exactly one of cls, mean, max or last-token; "
                    "pass pooling= to choose one"
                )
            pooling = modes[0]
        elif kind.endswith(".Normalize"):
            normalize = True
    return pooling, normalize


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, T, H) states and (B, T) mask -> (B, H), computed in float32."""
    h = hidden.float()
    m = mask.to(h.dtype).unsqueeze(-1)
    if mode == "mean":
        return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if mode == "cls":
        return h[:, 0]
    if mode == "max":
        return h.masked_fill(m == 0, float("-inf")).max(1).values
    if mode == "last":  # right padding: the last real token of each row
        last = mask.sum(1).long() - 1
        return h[torch.arange(h.shape[0], device=h.device), last]
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {mode!r}")


class FeatureExtractionPipeline(Pipeline):
    """``pipe(text or texts, pooling=, normalize=, return_tensors=, truncation=)``.

    Without pooling, each input gives a ``[1, tokens, hidden]`` nested list as in
    transformers; with pooling, a ``[hidden]`` list (or a tensor with return_tensors).
    """

    task = "feature-extraction"
    call_options = frozenset({"pooling", "normalize", "return_tensors"})

    def __init__(self, loaded: Any, **kwargs: Any) -> None:
        self.model_pooling, self.model_normalize = read_pooling(loaded.source)
        super().__init__(loaded, **kwargs)

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        if "pooling" in options and options["pooling"] not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {options['pooling']!r}")
        for name in ("normalize", "return_tensors"):
            if name in options and not isinstance(options[name], bool):
                raise ValueError(f"{name} must be True or False, got {options[name]!r}")
        return options

    def _mode(self, options: dict[str, Any]) -> str:
        return options.get("pooling") or self.model_pooling or "none"

    def preprocess(self, item: str, index: int, options: dict[str, Any]) -> list[Feature]:
        enc = self.encode(item, truncation=options.get("truncation", False), index=index)
        return [Feature(list(enc.ids), index, list(enc.type_ids))]

    def forward(
        self, batch: dict[str, torch.Tensor], features: list[Feature], options: dict[str, Any]
    ) -> list[Any]:
        hidden = self.model(**batch)
        mode = self._mode(options)
        normalize = options.get("normalize", self.model_normalize)
        if mode == "none":
            if normalize:
                hidden = torch.nn.functional.normalize(hidden.float(), dim=-1)
            return [hidden[r, : len(f.input_ids)].float().cpu() for r, f in enumerate(features)]
        pooled = pool(hidden, batch["attention_mask"], mode)
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return list(pooled.cpu())

    def postprocess(
        self, item: str, features: list[Feature], outputs: list[Any], options: dict[str, Any]
    ) -> Any:
        out = outputs[0]
        if self._mode(options) == "none":
            out = out.unsqueeze(0)  # transformers' [1, tokens, hidden] per input
        return out if options.get("return_tensors") else out.tolist()


class SentenceSimilarityPipeline(FeatureExtractionPipeline):
    """``pipe({"source_sentence": s, "sentences": [...]})`` -> cosine similarity per sentence."""

    task = "sentence-similarity"
    call_options = frozenset({"pooling"})

    def check_input(self, item: Any, i: int) -> Any:
        if not isinstance(item, dict) or set(item) != {"source_sentence", "sentences"}:
            raise PipelineInputError(
                f"input {i} must be a dict with 'source_sentence' (a string) and 'sentences' (a list of strings)"
            )
        source = check_text(item["source_sentence"], i)
        sentences = item["sentences"]
        if not isinstance(sentences, list) or not sentences:
            raise PipelineInputError(f"input {i}: 'sentences' must be a non-empty list of strings")
        return {"source_sentence": source, "sentences": [check_text(s, i) for s in sentences]}

    def _mode(self, options: dict[str, Any]) -> str:
        mode = options.get("pooling") or self.model_pooling or "mean"
        if mode == "none":
            raise ValueError("sentence-similarity compares one vector per sentence; pooling='none' has none")
        return mode

    def preprocess(self, item: dict[str, Any], index: int, options: dict[str, Any]) -> list[Feature]:
        texts = [item["source_sentence"], *item["sentences"]]
        truncation = options.get("truncation", False)
        return [
            Feature(list(enc.ids), index, list(enc.type_ids))
            for enc in (self.encode(t, truncation=truncation, index=index) for t in texts)
        ]

    def forward(
        self, batch: dict[str, torch.Tensor], features: list[Feature], options: dict[str, Any]
    ) -> list[Any]:
        pooled = pool(self.model(**batch), batch["attention_mask"], self._mode(options))
        return list(torch.nn.functional.normalize(pooled, dim=-1).cpu())

    def postprocess(
        self, item: Any, features: list[Feature], outputs: list[Any], options: dict[str, Any]
    ) -> Any:
        source, rest = outputs[0], torch.stack(outputs[1:])
        return (rest @ source).tolist()
