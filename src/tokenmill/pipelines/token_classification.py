"""token-classification (alias "ner"): a label per token, or entities grouped from B-/I- tags.

Follows transformers' TokenClassificationPipeline: the same aggregation strategies, word
heuristics, grouping and output dicts. Two differences, both about length: an input over the
model's limit is an error unless ``truncation=True`` (transformers cuts it silently), and
``stride=`` splits a long input into overlapping chunks whose entities are merged, as in
transformers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tokenmill.pipelines.base import Feature, Pipeline, PipelineInputError

AGGREGATIONS = ("none", "simple", "first", "average", "max")
_WORD_LEVEL = ("first", "average", "max")


class TokenClassificationPipeline(Pipeline):
    """``pipe(text or texts, aggregation_strategy=, ignore_labels=, stride=, truncation=)``.

    Each input gives a list of dicts: ``entity``, ``score``, ``index``, ``word``, ``start``,
    ``end`` per token with ``aggregation_strategy="none"`` (the default), or ``entity_group``,
    ``score``, ``word``, ``start``, ``end`` per entity otherwise. Labels in ``ignore_labels``
    (default ``["O"]``) are left out. With ``is_split_into_words=True`` an input is a list
    of words (joined with ``delimiter``, default a space, for the offsets) and, as in
    transformers, the result is always a list with one entry per input.
    """

    task = "token-classification"
    call_options = frozenset(
        {"aggregation_strategy", "ignore_labels", "stride", "is_split_into_words", "delimiter"}
    )

    def __init__(self, loaded: Any, **kwargs: Any) -> None:
        super().__init__(loaded, **kwargs)
        self.id2label = dict(self.config.id2label)
        # WordPiece marks word continuations ("##"), so a token whose text is longer than the
        # characters it covers is a subword; other tokenizers fall back to looking at spaces.
        self.word_aware = bool(getattr(self._plain.model, "continuing_subword_prefix", None))
        self.unk_token_id = self.tokenizer.token_to_id(self.tokenizer.special_tokens.get("unk_token"))
        self._striding: dict[int, Any] = {}

    # -- options ----------------------------------------------------------------------
    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        if "aggregation_strategy" in options:
            value = options["aggregation_strategy"]
            name = value.lower() if isinstance(value, str) else None
            if name not in AGGREGATIONS:
                raise ValueError(
                    f"aggregation_strategy must be one of {', '.join(AGGREGATIONS)}, got {value!r}"
                )
            options["aggregation_strategy"] = name
        if "ignore_labels" in options:
            labels = options["ignore_labels"]
            if not isinstance(labels, (list, tuple, set)) or not all(isinstance(x, str) for x in labels):
                raise ValueError(f"ignore_labels must be a list of label names, got {labels!r}")
            options["ignore_labels"] = list(labels)
        if options.get("stride") is not None:
            stride = options["stride"]
            # each chunk holds the model's limit minus its special tokens; the chunks must advance
            room = (self.max_length or 0) - self._plain.num_special_tokens_to_add(False)
            if isinstance(stride, bool) or not isinstance(stride, int) or stride < 0:
                raise ValueError(f"stride must be a non-negative integer, got {stride!r}")
            if self.max_length is None:
                raise ValueError("stride splits inputs at the model's length limit, but this model has none")
            if stride >= room:
                raise ValueError(
                    f"stride must be less than {room} (the model's limit of {self.max_length} tokens "
                    f"minus its special tokens), got {stride}"
                )
        if "is_split_into_words" in options and not isinstance(options["is_split_into_words"], bool):
            raise ValueError(
                f"is_split_into_words must be True or False, got {options['is_split_into_words']!r}"
            )
        if "delimiter" in options and not isinstance(options["delimiter"], str):
            raise ValueError(f"delimiter must be a string, got {options['delimiter']!r}")
        return options

    # -- inputs -----------------------------------------------------------------------
    def __call__(self, inputs: Any, **options: Any) -> Any:
        opts = {**self.defaults, **(self.sanitize(options) if options else {})}
        if opts.get("stride") is not None and opts.get("aggregation_strategy", "none") == "none":
            raise ValueError(
                "stride splits a long input into overlapping chunks whose entities are then merged; "
                "that needs grouped entities: pass aggregation_strategy='simple', 'first', 'average' or 'max'"
            )
        if not opts.get("is_split_into_words"):
            return super().__call__(inputs, **options)
        # transformers: one list of words is one input, a list of lists a batch; the result is
        # a list of results either way.
        if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(x, (list, tuple)) for x in inputs):
            items = list(inputs)
        else:
            items = [inputs]
        return self.run([_check_words(x, i) for i, x in enumerate(items)], opts)

    # -- the four steps ---------------------------------------------------------------
    def _striding_backend(self, stride: int) -> Any:
        if stride not in self._striding:
            from tokenizers import Tokenizer as Backend

            backend = Backend.from_str(self._plain.to_str())
            backend.enable_truncation(self.max_length, stride=stride)
            self._striding[stride] = backend
        return self._striding[stride]

    def _encodings(self, item: str | list[str], index: int, options: dict[str, Any]) -> list[Any]:
        words = isinstance(item, list)
        stride = options.get("stride")
        if stride is not None:
            enc = self._striding_backend(stride).encode(item, is_pretokenized=words, add_special_tokens=True)
            return [enc, *enc.overflowing]
        truncation = options.get("truncation", False)
        return [self.encode(item, truncation=truncation, index=index, is_pretokenized=words)]

    def preprocess(self, item: str | list[str], index: int, options: dict[str, Any]) -> list[Feature]:
        word_spans = None
        if isinstance(item, list):
            # offsets of pre-split words are relative to each word: remember where each starts
            delimiter = options.get("delimiter", " ")
            sentence, pos, word_spans = delimiter.join(item), 0, []
            for w in item:
                word_spans.append(pos)
                pos += len(w) + len(delimiter)
        else:
            sentence = item
        try:
            encodings = self._encodings(item, index, options)
        except PipelineInputError as e:  # only without stride: the input is over the limit
            raise PipelineInputError(f"{e}, or pass stride= to classify it in overlapping chunks") from None
        features = []
        for enc in encodings:
            offsets = [tuple(o) for o in enc.offsets]
            if word_spans is not None:
                offsets = [
                    (s + word_spans[w], e + word_spans[w]) if w is not None else (s, e)
                    for (s, e), w in zip(offsets, enc.word_ids)
                ]
            meta = {"sentence": sentence, "offsets": offsets, "special": list(enc.special_tokens_mask)}
            features.append(Feature(list(enc.ids), index, list(enc.type_ids), meta))
        return features

    def forward(
        self, batch: dict[str, torch.Tensor], features: list[Feature], options: dict[str, Any]
    ) -> list[Any]:
        logits = self.model(**batch)  # (B, T, num_labels)
        return [logits[r, : len(f.input_ids)].float().cpu().numpy() for r, f in enumerate(features)]

    def postprocess(
        self, item: Any, features: list[Feature], outputs: list[Any], options: dict[str, Any]
    ) -> list[dict[str, Any]]:
        strategy = options.get("aggregation_strategy", "none")
        ignore = options.get("ignore_labels", ["O"])
        entities: list[dict[str, Any]] = []
        for feature, logits in zip(features, outputs):
            shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
            scores = shifted / shifted.sum(axis=-1, keepdims=True)  # (T, num_labels)
            pre = self._pre_entities(feature, scores, strategy)
            grouped = self._aggregate(pre, strategy)
            entities.extend(
                e for e in grouped if e.get("entity") not in ignore and e.get("entity_group") not in ignore
            )
        if len(features) > 1:
            entities = merge_overlapping(entities)
        for e in entities:
            e["score"] = float(e["score"])
        return entities

    # -- aggregation (transformers' rules) --------------------------------------------
    def _pre_entities(self, feature: Feature, scores: np.ndarray, strategy: str) -> list[dict[str, Any]]:
        sentence, offsets, special = (
            feature.meta["sentence"],
            feature.meta["offsets"],
            feature.meta["special"],
        )
        out = []
        for idx, token_id in enumerate(feature.input_ids):
            if special[idx]:
                continue
            word = self._plain.id_to_token(token_id)
            start, end = offsets[idx]
            word_ref = sentence[start:end]
            if self.word_aware:
                is_subword = len(word) != len(word_ref)
            else:
                # no word marks in the vocabulary: a token glued to the previous character is a subword
                is_subword = start > 0 and " " not in sentence[start - 1 : start + 1]
            if token_id == self.unk_token_id:
                word, is_subword = word_ref, False
            out.append(
                {
                    "word": word,
                    "scores": scores[idx],
                    "start": start,
                    "end": end,
                    "index": idx,
                    "is_subword": is_subword,
                }
            )
        return out

    def _aggregate(self, pre: list[dict[str, Any]], strategy: str) -> list[dict[str, Any]]:
        if strategy in ("none", "simple"):
            entities = []
            for p in pre:
                k = int(p["scores"].argmax())
                entities.append(
                    {
                        "entity": self.id2label[k],
                        "score": p["scores"][k],
                        "index": p["index"],
                        "word": p["word"],
                        "start": p["start"],
                        "end": p["end"],
                    }
                )
            if strategy == "none":
                return entities
        else:
            entities = []
            group: list[dict[str, Any]] = []
            for p in pre:
                if group and not p["is_subword"]:
                    entities.append(self._aggregate_word(group, strategy))
                    group = []
                group.append(p)
            if group:
                entities.append(self._aggregate_word(group, strategy))
        return self._group_entities(entities)

    def _tokens_to_string(self, tokens: list[str]) -> str:
        decoder = self._plain.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    def _aggregate_word(self, tokens: list[dict[str, Any]], strategy: str) -> dict[str, Any]:
        """One word's label from its tokens: the first token's, the most confident, or the mean."""
        if strategy == "first":
            scores = tokens[0]["scores"]
        elif strategy == "max":
            scores = max(tokens, key=lambda t: t["scores"].max())["scores"]
        else:  # average
            scores = np.nanmean(np.stack([t["scores"] for t in tokens]), axis=0)
        k = int(scores.argmax())
        return {
            "entity": self.id2label[k],
            "score": scores[k],
            "word": self._tokens_to_string([t["word"] for t in tokens]),
            "start": tokens[0]["start"],
            "end": tokens[-1]["end"],
        }

    def _group_entities(self, entities: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Adjacent tokens (or words) with the same tag form one entity; a B- tag starts a new one."""
        groups: list[dict[str, Any]] = []
        current: list[dict[str, Any]] = []
        for e in entities:
            if current:
                bi, tag = _split_tag(e["entity"])
                _, last_tag = _split_tag(current[-1]["entity"])
                if tag != last_tag or bi == "B":
                    groups.append(self._group(current))
                    current = []
            current.append(e)
        if current:
            groups.append(self._group(current))
        return groups

    def _group(self, entities: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            # as transformers: everything after the first "-" of the first member's label
            "entity_group": entities[0]["entity"].split("-", 1)[-1],
            "score": np.nanmean([e["score"] for e in entities]),
            "word": self._tokens_to_string([e["word"] for e in entities]),
            "start": entities[0]["start"],
            "end": entities[-1]["end"],
        }


def _split_tag(label: str) -> tuple[str, str]:
    """("B"|"I", tag); a label without a B-/I- prefix continues like an I- tag."""
    if label.startswith("B-"):
        return "B", label[2:]
    if label.startswith("I-"):
        return "I", label[2:]
    return "I", label


def merge_overlapping(entities: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Entities from overlapping chunks: of those that overlap, keep the longest (then the surest)."""
    if not entities:
        return entities
    entities = sorted(entities, key=lambda e: e["start"])
    merged = []
    previous = entities[0]
    for e in entities:
        if previous["start"] <= e["start"] < previous["end"]:
            length, previous_length = e["end"] - e["start"], previous["end"] - previous["start"]
            if length > previous_length or (length == previous_length and e["score"] > previous["score"]):
                previous = e
        else:
            merged.append(previous)
            previous = e
    merged.append(previous)
    return merged


def _check_words(item: Any, i: int) -> list[str]:
    if not isinstance(item, (list, tuple)) or not item or not all(isinstance(w, str) for w in item):
        raise PipelineInputError(
            f"input {i} must be a non-empty list of words (strings) when is_split_into_words=True, "
            f"got {type(item).__name__}"
        )
    if not "".join(item).strip():
        raise PipelineInputError(f"input {i} has no text in its words; give some text")
    return list(item)
