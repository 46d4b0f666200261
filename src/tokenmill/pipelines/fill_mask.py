"""fill-mask: the most likely tokens for each mask token in a text, as transformers gives them.

The mask is whatever the tokenizer names (``[MASK]`` for BERT and DistilBERT, ``<mask>`` for
RoBERTa and XLM-RoBERTa). The vocabulary projection, the largest matmul of the model, runs
on the masked positions only. Several masks in one input score each position on its own
(transformers' "disjoint" probabilities), one list of candidates per mask.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from tokenmill.pipelines.base import Feature, Pipeline, PipelineInputError, check_top_k
from tokenmill.tokenization.tokenizer import clean_up_tokenization

logger = logging.getLogger("tokenmill.pipelines")

DEFAULT_TOP_K = 5


class FillMaskPipeline(Pipeline):
    """``pipe(text or texts, top_k=5, targets=None, truncation=False)``.

    Each input gives a list of ``{"score", "token", "token_str", "sequence"}`` dicts, best
    first; an input with several masks gives one such list per mask. As in transformers, a
    list holding a single input gives that input's result, not a list of one.

    Args (per call or as pipeline defaults):
        top_k: how many candidates per mask (default 5; at most the number of targets).
        targets: a word or list of words to score instead of the whole vocabulary; a word
            that is not one token scores its first token (logged, as transformers warns).
    """

    task = "fill-mask"
    call_options = frozenset({"top_k", "targets"})

    def __init__(self, loaded: Any, **kwargs: Any) -> None:
        tok = loaded.tokenizer
        if tok.mask_token is None or tok.mask_token_id is None:
            raise ValueError(
                f"{loaded.source}: the tokenizer names no mask token of its vocabulary (mask_token "
                "in tokenizer_config.json or special_tokens_map.json), so fill-mask cannot tell "
                "which position to fill; use a masked-language model's own tokenizer"
            )
        self.mask_token = tok.mask_token
        self.mask_token_id = tok.mask_token_id
        self.clean_up = tok.clean_up_tokenization_spaces
        super().__init__(loaded, **kwargs)

    # -- options ----------------------------------------------------------------------
    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        if "top_k" in options:
            # None means the default, as in transformers
            top_k = check_top_k(options["top_k"])
            if top_k is None:
                del options["top_k"]
        if "targets" in options:
            if options["targets"] is None:  # the whole vocabulary, as in transformers
                del options["targets"]
            else:
                options["targets"] = self.target_ids(options["targets"])
        return options

    def target_ids(self, targets: Any) -> list[int]:
        """Token ids for ``targets``: the word's own token, else its first sub-token."""
        words = [targets] if isinstance(targets, str) else targets
        if not isinstance(words, (list, tuple)) or not words or not all(isinstance(w, str) for w in words):
            raise ValueError(f"targets must be a string or a non-empty list of strings, got {targets!r}")
        vocab = self.tokenizer.backend.get_vocab(with_added_tokens=True)
        ids: list[int] = []
        for word in words:
            token_id = vocab.get(word)
            if token_id is None:
                pieces = self._plain.encode(word, add_special_tokens=False).ids
                if not pieces:
                    logger.warning(
                        "fill-mask target %r is not in the model's vocabulary and has no tokens; ignoring it",
                        word,
                    )
                    continue
                token_id = pieces[0]
                # Scoring the first piece is a stand-in for the word: say which one.
                logger.warning(
                    "fill-mask target %r is not in the model's vocabulary; "
                    "scoring its first token %r instead",
                    word,
                    self.tokenizer.backend.id_to_token(token_id),
                )
            ids.append(token_id)
        if not ids:
            raise ValueError(
                f"none of the targets {list(words)!r} gives a token of this model; "
                "pass words from its vocabulary"
            )
        return list(dict.fromkeys(ids))

    # -- steps ------------------------------------------------------------------------
    def preprocess(self, item: str, index: int, options: dict[str, Any]) -> list[Feature]:
        truncation = options.get("truncation", False)
        enc = self.encode(item, truncation=truncation, index=index)
        ids = list(enc.ids)
        masks = [p for p, t in enumerate(ids) if t == self.mask_token_id]
        if not masks:
            cut = " (truncation=True cut it off)" if truncation and self.mask_token in item else ""
            raise PipelineInputError(
                f"input {index} has no mask token{cut}; write {self.mask_token} where the word to fill goes"
            )
        return [Feature(ids, index, list(enc.type_ids), {"masks": masks})]

    def forward(
        self, batch: dict[str, torch.Tensor], features: list[Feature], options: dict[str, Any]
    ) -> list[Any]:
        T = batch["input_ids"].shape[1]
        flat = [r * T + p for r, f in enumerate(features) for p in f.meta["masks"]]
        select = torch.tensor(flat, device=batch["input_ids"].device)
        logits = self.model(**batch, select=select)  # (N masks, V)
        probs = logits.float().softmax(dim=-1)
        targets = options.get("targets")
        if targets is not None:
            probs = probs[:, torch.tensor(targets, device=probs.device)]  # (N, targets)
        k = min(options.get("top_k", DEFAULT_TOP_K), probs.shape[-1])
        values, picks = probs.topk(k, dim=-1)  # (N, k)
        values, picks = values.cpu().tolist(), picks.cpu().tolist()
        if targets is not None:
            picks = [[targets[j] for j in row] for row in picks]
        out, n = [], 0
        for f in features:
            m = len(f.meta["masks"])
            out.append(list(zip(values[n : n + m], picks[n : n + m])))
            n += m
        return out

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up else text

    def postprocess(
        self, item: str, features: list[Feature], outputs: list[Any], options: dict[str, Any]
    ) -> Any:
        f = features[0]
        single = len(f.meta["masks"]) == 1
        result = []
        for position, (values, picks) in zip(f.meta["masks"], outputs[0]):
            row = []
            for score, token in zip(values, picks):
                ids = list(f.input_ids)
                ids[position] = token
                ids = [t for t in ids if t != self.tokenizer.pad_token_id]
                # With several masks the others stay in the text, so special tokens are kept
                # (skipping them would drop the other masks), as transformers does.
                row.append(
                    {
                        "score": score,
                        "token": token,
                        "token_str": self._decode([token], skip_special_tokens=False),
                        "sequence": self._decode(ids, skip_special_tokens=single),
                    }
                )
            result.append(row)
        return result[0] if single else result

    def __call__(self, inputs: Any, **options: Any) -> Any:
        results = super().__call__(inputs, **options)
        # transformers returns a one-input list's result itself
        if isinstance(inputs, list) and len(inputs) == 1:
            return results[0]
        return results
