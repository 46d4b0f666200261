"""What every pipeline shares: input checks, options, tokenization with explicit length
rules, length-sorted batching and the four steps (sanitize, preprocess, forward, postprocess).

A task module subclasses ``Pipeline`` and fills in the steps. Inputs are encoded with
truncation and padding switched off in the tokenizer, so nothing is cut without the
caller asking: an input over the model's limit is an error unless ``truncation=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenmill.weights.task_loader import LoadedTaskModel


class PipelineInputError(ValueError):
    """An input a pipeline cannot take: wrong type, empty, or longer than the model allows."""


@dataclass
class Feature:
    """One model row made from an input (question answering splits an input into several)."""

    input_ids: list[int]
    index: int  # which input of the call it came from
    token_type_ids: list[int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_top_k(value: Any, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"top_k must be a positive integer{' or None' if allow_none else ''}, got {value!r}")
    return value


class Pipeline:
    """Base class: ``pipe(inputs, **options)`` with one input or a list of them.

    Subclasses set ``task`` and ``call_options`` (the names ``__call__`` accepts besides
    the shared ``truncation`` and ``batch_size``) and implement ``check_input``,
    ``preprocess``, ``forward`` and ``postprocess``.
    """

    task: str = ""
    call_options: frozenset[str] = frozenset()

    def __init__(self, loaded: LoadedTaskModel, *, batch_size: int = 8, **defaults: Any) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        self.device = loaded.device
        self.batch_size = self._check_batch_size(batch_size)
        self.pad_token_id = getattr(self.config, "pad_token_id", None) or 0
        self.max_length: int | None = None
        if self.tokenizer is not None:  # vision models have none; their pipelines read pixels
            self._setup_tokenizer()
        # Only BERT-style encoders have a token type (segment) embedding; RoBERTa's one-row
        # table is never indexed past 0, as transformers never sends it segment ids.
        self.uses_token_types = int(loaded.hf_config.get("type_vocab_size") or 0) > 1 and (
            loaded.hf_config.get("model_type") != "distilbert"
        )
        self.defaults = self.sanitize(defaults) if defaults else {}

    def _setup_tokenizer(self) -> None:
        from tokenizers import Tokenizer as Backend

        self.max_length = self._max_length()
        # Two copies of the tokenizer: one that never cuts, one that cuts at the limit
        # (only used when the caller passes truncation=True).
        self._plain = Backend.from_str(self.tokenizer.backend.to_str())
        self._plain.no_truncation()
        self._plain.no_padding()
        self._cutting = Backend.from_str(self._plain.to_str())
        if self.max_length is not None:
            self._cutting.enable_truncation(self.max_length)
        if self.tokenizer.pad_token_id is not None:
            self.pad_token_id = self.tokenizer.pad_token_id

    # -- options ----------------------------------------------------------------------
    @staticmethod
    def _check_batch_size(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"batch_size must be a positive integer, got {value!r}")
        return value

    def sanitize(self, options: dict[str, Any]) -> dict[str, Any]:
        """Check option names and values; unknown names are an error listing the known ones."""
        out = self.known_options(options, self.call_options | {"truncation", "batch_size"})
        if "truncation" in out:
            _check_bool("truncation", out["truncation"])
        return self.check_options(out)

    def known_options(self, options: dict[str, Any], known: set[str] | frozenset[str]) -> dict[str, Any]:
        """A copy of ``options`` once every name is in ``known`` (else an error listing them)
        and ``batch_size``, where given, is valid."""
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"{self.task} got unknown option(s) {', '.join(map(repr, unknown))}; "
                f"it accepts {', '.join(sorted(known))}"
            )
        out = dict(options)
        if "batch_size" in out:
            self._check_batch_size(out["batch_size"])
        return out

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Validate task options (subclasses); return them, normalised."""
        return options

    # -- inputs -----------------------------------------------------------------------
    def check_input(self, item: Any, i: int) -> Any:
        """One input, checked; the default takes a non-empty string."""
        return check_text(item, i)

    def _split_inputs(self, inputs: Any) -> tuple[list[Any], bool]:
        if isinstance(inputs, (list, tuple)):
            if len(inputs) == 0:
                raise PipelineInputError(f"{self.task} got an empty list of inputs; pass at least one")
            return list(inputs), False
        return [inputs], True

    # -- tokenization -----------------------------------------------------------------
    def _max_length(self) -> int | None:
        """The longest input the model takes: its position table, or what its tokenizer says."""
        limits = [self.tokenizer.model_max_length, model_position_limit(self.loaded.hf_config)]
        known = [n for n in limits if n is not None]
        return min(known) if known else None

    def encode(
        self,
        text: str | list[str],
        pair: str | list[str] | None = None,
        *,
        truncation: bool = False,
        index: int = 0,
        is_pretokenized: bool = False,
    ) -> Any:
        """Encode with special tokens; over the limit is an error unless ``truncation``.

        ``is_pretokenized``: ``text`` (and ``pair``) are lists of words, split by the caller.
        """
        enc = (self._cutting if truncation else self._plain).encode(
            text, pair, is_pretokenized=is_pretokenized, add_special_tokens=True
        )
        if self.max_length is not None and len(enc.ids) > self.max_length:
            raise PipelineInputError(
                f"input {index} is {len(enc.ids)} tokens long, over this model's limit of "
                f"{self.max_length}; shorten it or pass truncation=True to drop the tokens past the limit"
            )
        return enc

    # -- the four steps ---------------------------------------------------------------
    def preprocess(self, item: Any, index: int, options: dict[str, Any]) -> list[Feature]:
        raise NotImplementedError

    def forward(
        self, batch: dict[str, torch.Tensor], features: list[Feature], options: dict[str, Any]
    ) -> list[Any]:
        """Run the model on one padded batch; return one output per feature (on the CPU)."""
        raise NotImplementedError

    def postprocess(
        self, item: Any, features: list[Feature], outputs: list[Any], options: dict[str, Any]
    ) -> Any:
        raise NotImplementedError

    # -- driver -----------------------------------------------------------------------
    def __call__(self, inputs: Any, **options: Any) -> Any:
        opts = {**self.defaults, **(self.sanitize(options) if options else {})}
        items, single = self._split_inputs(inputs)
        items = [self.check_input(x, i) for i, x in enumerate(items)]
        results = self.run(items, opts)
        return results[0] if single else results

    def run(self, items: list[Any], opts: dict[str, Any]) -> list[Any]:
        features: list[Feature] = []
        for i, item in enumerate(items):
            features.extend(self.preprocess(item, i, opts))
        outputs = self.run_features(features, opts)
        grouped: list[list[int]] = [[] for _ in items]
        for k, f in enumerate(features):
            grouped[f.index].append(k)
        return [
            self.postprocess(item, [features[k] for k in ks], [outputs[k] for k in ks], opts)
            for item, ks in zip(items, grouped)
        ]

    def run_features(self, features: list[Feature], opts: dict[str, Any]) -> list[Any]:
        """Run every feature through ``forward``; outputs come back in the features' order."""
        batch_size = opts.get("batch_size", self.batch_size)
        outputs: list[Any] = [None] * len(features)
        for idx in plan_batches([len(f.input_ids) for f in features], batch_size):
            chunk = [features[k] for k in idx]
            with torch.inference_mode():
                outs = self.forward(self.collate(chunk), chunk, opts)
            for k, out in zip(idx, outs):
                outputs[k] = out
        return outputs

    def collate(self, features: Sequence[Feature]) -> dict[str, torch.Tensor]:
        """Right-padded ids, attention mask and (where used) token type ids."""
        width = max(len(f.input_ids) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        types = torch.zeros((len(features), width), dtype=torch.long)
        for r, f in enumerate(features):
            n = len(f.input_ids)
            ids[r, :n] = torch.tensor(f.input_ids)
            mask[r, :n] = 1
            if f.token_type_ids is not None:
                types[r, :n] = torch.tensor(f.token_type_ids)
        batch = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if self.uses_token_types:
            batch["token_type_ids"] = types.to(self.device)
        return batch


#: a batch may hold this much more padded than real tokens before it is split by length
PAD_SLACK = 1.15
#: ... unless it is still this small (fewer rows make each matrix product less efficient)
MIN_BATCH_TOKENS = 128


def plan_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices of each batch: sorted by length, at most ``batch_size`` per batch, and cut
    where padding to the longest would waste more than ``PAD_SLACK``.

    Padding is pure waste on a CPU (every padded position is computed), so a list of
    mixed-length inputs runs as several batches of near-equal lengths rather than one
    padded block; batches stay large enough for efficient matrix products.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for k in order:
        n = lengths[k]
        padded = n * (len(current) + 1)  # sorted ascending: the newcomer is the longest
        full = len(current) == batch_size
        wasteful = current and padded > PAD_SLACK * (real + n) and real >= MIN_BATCH_TOKENS
        if current and (full or wasteful):
            batches.append(current)
            current, real = [], 0
        current.append(k)
        real += n
    if current:
        batches.append(current)
    return batches


def model_position_limit(hf: dict[str, Any]) -> int | None:
    """Positions the model has embeddings for; None where positions are relative (T5)."""
    n = hf.get("max_position_embeddings") or hf.get("n_positions")
    if not isinstance(n, int):
        return None
    if hf.get("model_type") in ("roberta", "xlm-roberta"):
        # RoBERTa numbers positions from padding_idx + 1, so two table rows are never used.
        return n - (hf.get("pad_token_id", 1) or 0) - 1
    return n


def check_text(item: Any, i: int) -> str:
    if not isinstance(item, str):
        raise PipelineInputError(f"input {i} must be a string, got {type(item).__name__}")
    if not item.strip():
        raise PipelineInputError(f"input {i} is an empty string; give some text")
    return item
