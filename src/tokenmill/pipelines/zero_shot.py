"""zero-shot-classification: score any candidate labels with a model trained on NLI.

Each (sequence, label) pair becomes one premise/hypothesis row, "sequence </s> This example
is {label}.", so the rows of every input and label share the length-sorted batches. The
entailment logit says how well a label fits: softmaxed across the labels (one label is
true), or, with ``multi_label`` (or a single label), against the contradiction logit of
the same row, label by label, as transformers does.
"""

from __future__ import annotations

from typing import Any

import torch

from tokenmill.pipelines.base import Feature, Pipeline, PipelineInputError

DEFAULT_TEMPLATE = "This example is {}."


def entailment_id(label2id: dict[str, int]) -> int | None:
    """The id of the first label starting with "entail" (any case), as transformers finds it."""
    for label, i in label2id.items():
        if label.lower().startswith("entail"):
            return i
    return None


def parse_labels(labels: Any) -> list[str]:
    """candidate_labels as a list: a comma-separated string is split (and stripped)."""
    if isinstance(labels, str):
        labels = [label.strip() for label in labels.split(",") if label.strip()]
    elif isinstance(labels, (list, tuple)) and all(isinstance(x, str) for x in labels):
        labels = list(labels)
        if any(not x.strip() for x in labels):
            raise ValueError(f"candidate_labels must not hold empty labels, got {labels!r}")
    else:
        raise ValueError(
            f"candidate_labels must be a list of strings or a comma-separated string, got {labels!r}"
        )
    if not labels:
        raise ValueError("candidate_labels is empty; name at least one label, e.g. ['sports', 'politics']")
    return labels


def check_template(template: Any) -> str:
    if not isinstance(template, str):
        raise ValueError(
            f"hypothesis_template must be a string such as {DEFAULT_TEMPLATE!r}, got {template!r}"
        )
    try:
        filled = template.format("LABEL")
    except (IndexError, KeyError, ValueError) as e:
        raise ValueError(
            f"hypothesis_template {template!r} cannot be formatted with a label ({e}); "
            "write {} where the label goes, e.g. 'This example is {}.'"
        ) from e
    if filled == template:
        raise ValueError(
            f"hypothesis_template {template!r} has no {{}} for the label to go in; "
            "write {} where the label goes, e.g. 'This example is {}.'"
        )
    return template


class ZeroShotClassificationPipeline(Pipeline):
    """``pipe(sequences, candidate_labels, hypothesis_template=, multi_label=False)``.

    Each sequence gives ``{"sequence", "labels", "scores"}``, labels sorted best first.
    ``truncation=True`` shortens the sequence only, never the hypothesis.

    Args (per call or as pipeline defaults):
        candidate_labels: a list of labels or one comma-separated string (also the second
            positional argument).
        hypothesis_template: the hypothesis each label is put in; must hold ``{}``.
        multi_label: score each label on its own (several may be true).
    """

    task = "zero-shot-classification"
    call_options = frozenset({"candidate_labels", "hypothesis_template", "multi_label"})

    def __init__(self, loaded: Any, **kwargs: Any) -> None:
        cfg = loaded.config
        entail = entailment_id(cfg.label2id)
        if entail is None:
            raise ValueError(
                f"{loaded.source} is not labelled as an NLI model: zero-shot-classification needs a "
                f"label starting with 'entailment' in config.json's label2id, and this model has "
                f"{sorted(cfg.label2id, key=cfg.label2id.get)}; use an NLI checkpoint (e.g. one "
                "fine-tuned on MNLI) or name its labels in label2id"
            )
        self.entailment_id = entail
        # transformers' choice: label 0, or the last label when entailment is label 0
        self.contradiction_id = cfg.num_labels - 1 if entail == 0 else 0
        super().__init__(loaded, **kwargs)
        from tokenizers import Tokenizer as Backend

        # truncation=True cuts the sequence (the first text), never the hypothesis
        self._cut_first = Backend.from_str(self._plain.to_str())
        if self.max_length is not None:
            self._cut_first.enable_truncation(self.max_length, strategy="only_first")

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        if "candidate_labels" in options:
            options["candidate_labels"] = parse_labels(options["candidate_labels"])
        if "hypothesis_template" in options:
            check_template(options["hypothesis_template"])
        if "multi_label" in options and not isinstance(options["multi_label"], bool):
            raise ValueError(f"multi_label must be True or False, got {options['multi_label']!r}")
        return options

    def __call__(self, sequences: Any, *args: Any, **options: Any) -> Any:
        if len(args) == 1 and "candidate_labels" not in options:
            options["candidate_labels"] = args[0]
        elif args:
            raise ValueError(
                f"zero-shot-classification takes the sequences and, optionally, the candidate labels "
                f"as positional arguments; got {len(args) + 1} positional arguments"
            )
        if "candidate_labels" not in options and "candidate_labels" not in self.defaults:
            raise ValueError(
                "zero-shot-classification needs candidate_labels, e.g. "
                "pipe(text, candidate_labels=['sports', 'politics']) or a comma-separated string"
            )
        return super().__call__(sequences, **options)

    def _encode_pair(self, sequence: str, hypothesis: str, truncation: bool, index: int) -> Any:
        if truncation and self.max_length is not None:
            try:
                return self._cut_first.encode(sequence, hypothesis, add_special_tokens=True)
            except Exception as e:  # tokenizers: the sequence alone cannot be cut enough
                if "too short" not in str(e):
                    raise
                n = len(self._plain.encode(hypothesis, add_special_tokens=False).ids)
                raise PipelineInputError(
                    f"input {index}: the hypothesis {hypothesis!r} alone is {n} tokens, too long for this "
                    f"model's limit of {self.max_length} with the sequence; shorten the label or "
                    "hypothesis_template"
                ) from e
        return self.encode(sequence, hypothesis, index=index)

    def preprocess(self, item: str, index: int, options: dict[str, Any]) -> list[Feature]:
        template = options.get("hypothesis_template", DEFAULT_TEMPLATE)
        truncation = options.get("truncation", False)
        features = []
        for label in options["candidate_labels"]:
            enc = self._encode_pair(item, template.format(label), truncation, index)
            features.append(Feature(list(enc.ids), index, list(enc.type_ids), {"label": label}))
        return features

    def forward(
        self, batch: dict[str, torch.Tensor], features: list[Feature], options: dict[str, Any]
    ) -> list[Any]:
        logits = self.model(**batch)  # (B, num_labels)
        return list(logits.float().cpu())

    def postprocess(
        self, item: str, features: list[Feature], outputs: list[Any], options: dict[str, Any]
    ) -> Any:
        labels = [f.meta["label"] for f in features]
        logits = torch.stack(outputs)  # (labels, num NLI labels)
        if options.get("multi_label", False) or len(labels) == 1:
            pair = logits[:, [self.contradiction_id, self.entailment_id]]
            scores = pair.softmax(dim=-1)[:, 1]
        else:
            scores = logits[:, self.entailment_id].softmax(dim=0)
        values = scores.tolist()
        # numpy's argsort, reversed: equal scores come out last label first
        order = sorted(range(len(values)), key=values.__getitem__)[::-1]
        return {"sequence": item, "labels": [labels[i] for i in order], "scores": [values[i] for i in order]}
