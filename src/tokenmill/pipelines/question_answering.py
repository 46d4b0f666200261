"""question-answering: the span of a context that answers a question, as transformers 4.x found it.

transformers 5 dropped this pipeline; tokenmill keeps its 4.x behaviour and options. A
context too long for the model is split into overlapping chunks (``max_seq_len`` tokens each,
question included, overlapping by ``doc_stride`` tokens); every chunk is one model row. In
each chunk the start and end logits are turned into probabilities by a softmax over the
context tokens (and the CLS token), a span scores start probability x end probability, and
the best spans of all chunks compete. Answers with the same text (ignoring case) add up
their scores, as in 4.x.

Differences from 4.x: a question longer than ``max_question_len`` tokens is an error unless
``truncation=True`` cuts it (4.x's fast-tokenizer path ignored the option); only spans
inside the context can be answers (4.x could pad a short list with zero-score spans that
start at the CLS token); and a list of inputs always gives a list of results.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tokenmill.pipelines.base import Feature, Pipeline, PipelineInputError, check_top_k

_MISSING = object()
_INPUT_HINT = "a dict {'question': ..., 'context': ...} (or a list of them), or question=... and context=..."


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class QuestionAnsweringPipeline(Pipeline):
    """``pipe(question=, context=)``, ``pipe({"question": q, "context": c})`` or a list of dicts.

    Returns ``{"score", "start", "end", "answer"}`` (character offsets into the context) for
    one input, a list of ``top_k`` such dicts when ``top_k`` > 1 finds several answers, and
    a list of those per input for a list of inputs.

    Options: top_k (1), max_answer_len (15 tokens), max_seq_len (384 or the model's limit if
    smaller), doc_stride (min(max_seq_len // 2, 128)), max_question_len (64 tokens),
    handle_impossible_answer (False: True lets the empty answer compete with the CLS score),
    align_to_words (True: widen a span to whole words).
    """

    task = "question-answering"
    call_options = frozenset(
        {
            "top_k",
            "max_answer_len",
            "max_seq_len",
            "doc_stride",
            "max_question_len",
            "handle_impossible_answer",
            "align_to_words",
        }
    )

    def __init__(self, loaded: Any, **kwargs: Any) -> None:
        super().__init__(loaded, **kwargs)
        self.cls_token_id = self.tokenizer.token_to_id(self.tokenizer.special_tokens.get("cls_token"))
        self._chunkers: dict[tuple[int, int], Any] = {}

    # -- options ----------------------------------------------------------------------
    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        if "top_k" in options:
            check_top_k(options["top_k"], allow_none=False)
        for name in ("max_answer_len", "max_question_len"):
            if name in options:
                _check_positive(name, options[name])
        if "max_seq_len" in options:
            n = _check_positive("max_seq_len", options["max_seq_len"])
            if self.max_length is not None and n > self.max_length:
                raise ValueError(
                    f"max_seq_len={n} is over this model's limit of {self.max_length} tokens; "
                    f"pass a value up to {self.max_length}"
                )
            least = self._plain.num_special_tokens_to_add(True) + 2
            if n < least:
                raise ValueError(
                    f"max_seq_len must leave room for a question and a context: at least {least}, got {n}"
                )
        if "doc_stride" in options:
            stride = options["doc_stride"]
            if isinstance(stride, bool) or not isinstance(stride, int) or stride < 0:
                raise ValueError(f"doc_stride must be a non-negative integer, got {stride!r}")
        for name in ("handle_impossible_answer", "align_to_words"):
            if name in options and not isinstance(options[name], bool):
                raise ValueError(f"{name} must be True or False, got {options[name]!r}")
        return options

    def _resolve(self, opts: dict[str, Any]) -> dict[str, Any]:
        """Fill in the length defaults, which depend on the model and on each other."""
        out = dict(opts)
        limit = self.max_length if self.max_length is not None else 384
        out.setdefault("max_seq_len", min(limit, 384))
        out.setdefault("doc_stride", min(out["max_seq_len"] // 2, 128))
        if out["doc_stride"] >= out["max_seq_len"]:
            raise ValueError(
                f"doc_stride ({out['doc_stride']}) must be smaller than max_seq_len ({out['max_seq_len']}): "
                "it is how many tokens consecutive chunks share"
            )
        return out

    # -- inputs -----------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        question, context = kwargs.pop("question", _MISSING), kwargs.pop("context", _MISSING)
        opts = self._resolve({**self.defaults, **(self.sanitize(kwargs) if kwargs else {})})
        items, single = self._gather(args, question, context)
        results = self.run([self.check_input(x, i) for i, x in enumerate(items)], opts)
        return results[0] if single else results

    def _gather(self, args: tuple[Any, ...], question: Any, context: Any) -> tuple[list[Any], bool]:
        """transformers 4.x's ways of passing inputs -> (inputs, whether there was just one)."""
        if (question is _MISSING) != (context is _MISSING):
            given, missing = ("question", "context") if context is _MISSING else ("context", "question")
            raise PipelineInputError(f"{given}= was given without {missing}=; pass both")
        if question is not _MISSING:
            if args:
                raise PipelineInputError(f"pass the inputs once: {_INPUT_HINT}, not both")
            if isinstance(question, str) and isinstance(context, str):
                return [{"question": question, "context": context}], True
            if isinstance(question, list) and isinstance(context, str):
                return [{"question": q, "context": context} for q in question], False
            if isinstance(question, list) and isinstance(context, list):
                if len(question) != len(context):
                    raise PipelineInputError(
                        f"question= has {len(question)} questions but context= has {len(context)} contexts; "
                        "pass one context per question, or a single context string for all of them"
                    )
                return [{"question": q, "context": c} for q, c in zip(question, context)], False
            raise PipelineInputError(
                "question= must be a string or a list of strings and context= a string or a list of "
                f"strings, got {type(question).__name__} and {type(context).__name__}"
            )
        if len(args) == 2 and all(isinstance(a, str) for a in args):
            return [{"question": args[0], "context": args[1]}], True
        if len(args) != 1:
            raise PipelineInputError(f"question-answering takes {_INPUT_HINT}")
        items, single = self._split_inputs(args[0])
        return items, single

    def check_input(self, item: Any, i: int) -> dict[str, str]:
        if not isinstance(item, dict):
            raise PipelineInputError(f"input {i} must be {_INPUT_HINT}; got {type(item).__name__}")
        missing = [k for k in ("question", "context") if k not in item]
        extra = sorted(set(item) - {"question", "context"})
        if missing or extra:
            what = f"misses {' and '.join(map(repr, missing))}" if missing else f"has unknown keys {extra}"
            raise PipelineInputError(
                f"input {i} {what}; it must be a dict with 'question' and 'context' (strings)"
            )
        for k in ("question", "context"):
            value = item[k]
            if not isinstance(value, str):
                raise PipelineInputError(f"input {i}: {k!r} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise PipelineInputError(f"input {i}: {k!r} is an empty string; give some text")
        return {"question": item["question"], "context": item["context"]}

    # -- the four steps ---------------------------------------------------------------
    def _chunker(self, max_seq_len: int, stride: int) -> Any:
        key = (max_seq_len, stride)
        if key not in self._chunkers:
            from tokenizers import Tokenizer as Backend

            backend = Backend.from_str(self._plain.to_str())
            # only the context is cut; the question repeats in every chunk
            backend.enable_truncation(max_seq_len, stride=stride, strategy="only_second")
            self._chunkers[key] = backend
        return self._chunkers[key]

    def preprocess(self, item: dict[str, str], index: int, options: dict[str, Any]) -> list[Feature]:
        question, context = item["question"], item["context"]
        max_seq_len, stride = options["max_seq_len"], options["doc_stride"]
        max_question_len = options.get("max_question_len", 64)
        q = self._plain.encode(question, add_special_tokens=False)
        if len(q.ids) > max_question_len:
            if not options.get("truncation", False):
                raise PipelineInputError(
                    f"input {index}: the question is {len(q.ids)} tokens long, over max_question_len="
                    f"{max_question_len}; shorten it, raise max_question_len, or pass truncation=True "
                    f"to keep its first {max_question_len} tokens"
                )
            question = question[: q.offsets[max_question_len - 1][1]]
            q = self._plain.encode(question, add_special_tokens=False)
        full = self._plain.encode(question, context, add_special_tokens=True)
        if 1 not in full.sequence_ids:
            raise PipelineInputError(
                f"input {index}: the context has no tokens this model knows; give some text"
            )
        if len(full.ids) <= max_seq_len:
            encodings = [full]
        else:
            room = max_seq_len - len(q.ids) - self._plain.num_special_tokens_to_add(True)
            if room <= stride:
                raise PipelineInputError(
                    f"input {index}: with max_seq_len={max_seq_len}, a chunk has room for {max(room, 0)} context "
                    f"tokens beside this {len(q.ids)}-token question, which is not more than doc_stride={stride}, "
                    "so the chunks would not advance; pass a smaller doc_stride, a larger max_seq_len "
                    "or a shorter question"
                )
            enc = self._chunker(max_seq_len, stride).encode(question, context, add_special_tokens=True)
            encodings = [enc, *enc.overflowing]
        # A model with one token type takes only zeros (collate sends none); the tokenizers
        # library numbers the context of an overflowing chunk 1 even where the template says 0.
        return [Feature(list(e.ids), index, list(e.type_ids), {"encoding": e}) for e in encodings]

    def forward(
        self, batch: dict[str, torch.Tensor], features: list[Feature], options: dict[str, Any]
    ) -> list[Any]:
        start, end = self.model(**batch)  # (B, T) each
        return [
            (
                start[r, : len(f.input_ids)].float().cpu().numpy(),
                end[r, : len(f.input_ids)].float().cpu().numpy(),
            )
            for r, f in enumerate(features)
        ]

    def postprocess(
        self, item: dict[str, str], features: list[Feature], outputs: list[Any], options: dict[str, Any]
    ) -> Any:
        top_k = options.get("top_k", 1)
        align = options.get("align_to_words", True)
        impossible = options.get("handle_impossible_answer", False)
        context = item["context"]
        # more candidates than asked for: aligning to words can turn several spans into one answer
        pre_top_k = top_k * 2 + 10 if align else top_k
        min_null_score = 1000000.0
        answers: list[dict[str, Any]] = []
        for feature, (start_logits, end_logits) in zip(features, outputs):
            enc = feature.meta["encoding"]
            in_context = np.array([s == 1 for s in enc.sequence_ids])
            # 4.x keeps the CLS token in the softmax: models trained on SQuAD 2 answer "no answer" there
            in_softmax = in_context | (np.array(feature.input_ids) == self.cls_token_id)
            start = _softmax(np.where(in_softmax, start_logits, -10000.0))
            end = _softmax(np.where(in_softmax, end_logits, -10000.0))
            if impossible:
                min_null_score = min(min_null_score, float(start[0] * end[0]))
            start[0] = end[0] = 0.0
            for s, e, score in best_spans(
                start, end, in_context, pre_top_k, options.get("max_answer_len", 15)
            ):
                lo, hi = _char_span(enc, s, e, align)
                text = context[lo:hi]
                same = next((a for a in answers if a["answer"].lower() == text.lower()), None)
                if same is not None:
                    same["score"] += score
                else:
                    answers.append({"score": score, "start": lo, "end": hi, "answer": text})
        if impossible:
            answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
        answers = sorted(answers, key=lambda a: a["score"], reverse=True)[:top_k]
        return answers[0] if len(answers) == 1 else answers


def _softmax(x: np.ndarray) -> np.ndarray:
    x = np.exp(x - x.max())
    return x / x.sum()


def best_spans(
    start: np.ndarray, end: np.ndarray, in_context: np.ndarray, k: int, max_answer_len: int
) -> list[tuple[int, int, float]]:
    """The ``k`` best (start, end, score) token spans inside the context, best first.

    A span scores start[s] * end[e]; it must end at or after its start and be at most
    ``max_answer_len`` tokens long.
    """
    T = start.shape[0]
    s_idx, e_idx = np.arange(T)[:, None], np.arange(T)[None, :]
    valid = (e_idx >= s_idx) & (e_idx - s_idx < max_answer_len) & in_context[:, None] & in_context[None, :]
    scores = np.where(valid, np.outer(start, end), -1.0).ravel()  # (T * T,)
    if k == 1:
        order = np.array([scores.argmax()])
    elif scores.size <= k:
        order = np.argsort(-scores)
    else:
        top = np.argpartition(-scores, k)[:k]
        order = top[np.argsort(-scores[top])]
    return [(int(i) // T, int(i) % T, float(scores[i])) for i in order if scores[i] >= 0]


def _char_span(enc: Any, s: int, e: int, align_to_words: bool) -> tuple[int, int]:
    """Character offsets in the context of tokens s..e; whole words when ``align_to_words``."""
    if align_to_words:
        try:
            lo = enc.word_to_chars(enc.token_to_word(s), sequence_index=1)[0]
            hi = enc.word_to_chars(enc.token_to_word(e), sequence_index=1)[1]
            return lo, hi
        except TypeError:  # a tokenizer without words: keep to the tokens' offsets
            pass
    return enc.offsets[s][0], enc.offsets[e][1]
