"""summarization, translation and text2text-generation on native encoder-decoder models.

Behaviour is transformers 4.57's (the last 4.x; transformers 5 removed these pipelines):
same option names, outputs, defaults and task prefixes. Generation settings come, lowest
first, from:

1. the pipeline's defaults: ``max_new_tokens=256, num_beams=4`` (transformers 4.57's);
2. the model's generation_config.json (config.json where there is none), where a value
   differs from transformers' global default (``num_beams=1`` there does not undo 2);
3. the config's ``task_specific_params`` for the task (T5 keeps its "summarize: " and
   "translate English to German: " prefixes and beam settings there);
4. ``pipeline()``'s keyword arguments and then the call's.

``max_length``/``min_length`` count the decoder start token, as transformers does;
``max_new_tokens``/``min_new_tokens`` count generated tokens. Two deliberate differences
from 4.57, where it crashes or ignores what was asked:

- the length a higher level sets wins over a lower level's (4.57 lets its own default
  ``max_new_tokens=256`` override a ``max_length`` from the call or task parameters);
  within one level, ``max_new_tokens`` wins over ``max_length`` as in transformers;
- the default 256 new tokens are capped at what the model's position table holds, and
  ``do_sample=True`` samples from one beam unless beams were asked for (4.57 would run
  beam sampling with its default 4 beams; tokenmill has no beam sampling).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tokenmill.generation.sampling_params import BeamSearchParams, SamplingParams
from tokenmill.pipelines.base import Feature, Pipeline
from tokenmill.tokenization.tokenizer import clean_up_tokenization

_GEN = frozenset(
    {
        "max_length",
        "max_new_tokens",
        "min_length",
        "min_new_tokens",
        "num_beams",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "repetition_penalty",
        "length_penalty",
        "early_stopping",
        "no_repeat_ngram_size",
        "num_return_sequences",
        "seed",
    }
)
#: transformers' GenerationConfig() values for the settings above
_HF_DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "min_length": 0,
    "num_beams": 1,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "early_stopping": False,
    "no_repeat_ngram_size": 0,
    "num_return_sequences": 1,
}
#: transformers 4.57's ``Text2TextGenerationPipeline._default_generation_config``
_PIPELINE_DEFAULTS: dict[str, Any] = {"max_new_tokens": 256, "num_beams": 4}
_LANG_CODE = re.compile(r"[a-z]{2,3}_[A-Z]{2}")


def _int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


def _number(name: str, value: Any, lo: float | None = None, hi: float | None = None, what: str = "") -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    ok = ok and (lo is None or value > lo) and (hi is None or value <= hi)
    if not ok:
        raise ValueError(f"{name} must be a number{what}, got {value!r}")


@dataclass
class _Settings:
    """Resolved generation settings of one call."""

    values: dict[str, Any]  # every _GEN key and "prefix"
    max_new: int
    min_new: int
    num_beams: int


class Text2TextGenerationPipeline(Pipeline):
    """``pipe(text or texts, **generate options)`` -> ``[{"generated_text": ...}]`` per input.

    A list of inputs gives a flat list of dicts when each input has one result, otherwise
    a list of lists (``num_return_sequences > 1``). ``return_tensors=True`` gives
    ``generated_token_ids`` instead of the text: the decoder start token, then the
    generated ids (transformers' output row, without its padding).
    """

    task = "text2text-generation"
    return_name = "generated"
    call_options = _GEN | {"return_text", "return_tensors", "clean_up_tokenization_spaces", "prefix"}

    # -- settings ---------------------------------------------------------------------
    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        for name in ("do_sample", "return_text", "return_tensors", "clean_up_tokenization_spaces"):
            if name in options and not isinstance(options[name], bool):
                raise ValueError(f"{name} must be True or False, got {options[name]!r}")
        for name in ("max_new_tokens", "num_beams", "num_return_sequences"):
            if name in options:
                _int(name, options[name], 1)
        if "max_length" in options:
            # it counts the decoder start token: 2 is one generated token
            _int("max_length", options["max_length"], 2)
        for name in ("min_length", "min_new_tokens", "no_repeat_ngram_size", "top_k", "seed"):
            if name in options:
                _int(name, options[name], 0)
        if "temperature" in options:
            _number("temperature", options["temperature"], lo=0.0, what=" > 0")
        if "top_p" in options:
            _number("top_p", options["top_p"], lo=0.0, hi=1.0, what=" in (0, 1]")
        if "repetition_penalty" in options:
            _number("repetition_penalty", options["repetition_penalty"], lo=0.0, what=" > 0")
        if "length_penalty" in options:
            _number("length_penalty", options["length_penalty"])
        if "prefix" in options and not isinstance(options["prefix"], str):
            raise ValueError(f"prefix must be a string, got {options['prefix']!r}")
        if "early_stopping" in options and options["early_stopping"] not in (True, False, "never"):
            raise ValueError(
                f"early_stopping must be True, False or 'never', got {options['early_stopping']!r}"
            )
        return options

    def task_key(self, opts: dict[str, Any]) -> str:
        """The ``task_specific_params`` entry this call reads."""
        return self.task

    def model_layers(self, opts: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """Settings below the caller's, lowest first (see the module docstring)."""
        gen = self.loaded.generation_defaults or self.loaded.hf_config  # as transformers reads them
        model = {
            k: gen[k] for k in _GEN if gen.get(k) is not None and gen[k] != _HF_DEFAULTS.get(k, object())
        }
        hf = self.loaded.hf_config
        if isinstance(hf.get("prefix"), str):
            model["prefix"] = hf["prefix"]
        task = (hf.get("task_specific_params") or {}).get(self.task_key(opts)) or {}
        task = {k: v for k, v in task.items() if (k in _GEN and v is not None) or k == "prefix"}
        return [("pipeline", dict(_PIPELINE_DEFAULTS)), ("model", model), ("task", task)]

    def settings(self, opts: dict[str, Any]) -> _Settings:
        caller = {k: v for k, v in opts.items() if k in _GEN or k == "prefix"}
        layers = [("transformers", dict(_HF_DEFAULTS)), *self.model_layers(opts), ("caller", caller)]
        values: dict[str, Any] = {}
        for _, layer in layers:
            values.update(layer)

        def length(new_key: str, total_key: str) -> tuple[int, str]:
            # The highest level that sets either decides; within a level the *_new_tokens wins.
            for name, layer in reversed(layers):
                if layer.get(new_key) is not None:
                    return layer[new_key], name
                if layer.get(total_key) is not None:
                    return max(layer[total_key] - 1, 0), name  # the decoder start token counts
            return 0, "transformers"

        max_new, max_from = length("max_new_tokens", "max_length")
        min_new, min_from = length("min_new_tokens", "min_length")
        limit = self.config.max_position_embeddings
        if limit is not None and max_new > limit - 1:
            if max_from == "caller":
                raise ValueError(
                    f"this model generates at most {limit - 1} tokens (its {limit} positions include "
                    f"the decoder start token); lower max_new_tokens/max_length (asked for {max_new} new tokens)"
                )
            max_new = limit - 1  # transformers would run past the position table and crash
        if min_new > max_new:
            if min_from == "caller" and max_from == "caller":
                raise ValueError(
                    f"the minimum length ({min_new} new tokens) is above the maximum ({max_new}); "
                    "lower min_new_tokens/min_length or raise max_new_tokens/max_length"
                )
            min_new = max_new  # transformers generates max_new tokens then (no EOS before)
        beams_from = next(name for name, layer in reversed(layers) if "num_beams" in layer)
        beams = values["num_beams"]
        if values["do_sample"] and beams_from == "pipeline":
            beams = 1
        return _Settings(values, max_new, min_new, beams)

    def _params(self, s: _Settings) -> tuple[SamplingParams | BeamSearchParams, dict[str, Any]]:
        o, beams, n = s.values, s.num_beams, s.values["num_return_sequences"]
        extra: dict[str, Any] = {"no_repeat_ngram_size": o["no_repeat_ngram_size"]}
        if beams > 1 and o["do_sample"]:
            raise ValueError(
                f"beam sampling (num_beams={beams} with do_sample=True) is not supported; "
                "pass num_beams=1 to sample, or do_sample=False for beam search"
            )
        if beams > 1:
            if n > beams:
                raise ValueError(
                    f"num_return_sequences ({n}) must be at most num_beams ({beams}); "
                    "raise num_beams or lower num_return_sequences"
                )
            if o["repetition_penalty"] != 1.0:
                raise ValueError(
                    "repetition_penalty is not supported with beam search; pass num_beams=1 for it"
                )
            extra.update(early_stopping=o["early_stopping"], min_tokens=s.min_new)
            params = BeamSearchParams(
                beam_width=beams, max_tokens=s.max_new, length_penalty=o["length_penalty"]
            )
            return params, extra
        if n > 1 and not o["do_sample"]:
            raise ValueError(
                f"greedy decoding gives one sequence, so num_return_sequences={n} needs "
                f"do_sample=True or num_beams >= {n}"
            )
        sample = o["do_sample"]
        params = SamplingParams(
            n=n,
            max_tokens=s.max_new,
            min_tokens=s.min_new,
            temperature=float(o["temperature"]) if sample else 0.0,
            top_k=o["top_k"] if sample else None,
            top_p=float(o["top_p"]) if sample else None,
            repetition_penalty=float(o["repetition_penalty"]),
            seed=o.get("seed"),
            skip_special_tokens=True,
        )
        return params, extra

    # -- steps ------------------------------------------------------------------------
    def preprocess(self, item: str, index: int, options: dict[str, Any]) -> list[Feature]:
        text = options.get("prefix", "") + item
        enc = self.encode(text, truncation=options.get("truncation", False), index=index)
        return [Feature(list(enc.ids), index)]

    def generation_ids(self, o: dict[str, Any]) -> dict[str, Any]:
        """Special ids of generation, as transformers reads them: from generation_config.json
        where the checkpoint has one (config.json's forced tokens then do not count), else
        from config.json."""
        gen, cfg = self.loaded.generation_defaults, self.config
        rules = gen or self.loaded.hf_config

        def pick(name: str) -> Any:
            return gen[name] if gen.get(name) is not None else getattr(cfg, name, None)

        eos = pick("eos_token_id")
        # transformers' bad_words_ids: single-token entries never come (Marian's [[pad]])
        bad = rules.get("bad_words_ids") or []
        return {
            "decoder_start_token_id": pick("decoder_start_token_id"),
            "eos_token_ids": eos if isinstance(eos, list) else [eos],
            "pad_token_id": self.pad_token_id,
            "forced_bos_token_id": rules.get("forced_bos_token_id"),
            "forced_eos_token_id": rules.get("forced_eos_token_id"),
            "suppress_token_ids": [w[0] for w in bad if isinstance(w, list) and len(w) == 1] or None,
        }

    def run(self, items: list[Any], opts: dict[str, Any]) -> list[Any]:
        from tokenmill.generation.seq2seq import generate

        s = self.settings(opts)
        params, extra = self._params(s)
        o = {**opts, "prefix": s.values.get("prefix", "")}
        features = [f for i, item in enumerate(items) for f in self.preprocess(item, i, o)]
        ids = self.generation_ids(o)
        outs = generate(
            self.model,
            [f.input_ids for f in features],
            params,
            batch_size=opts.get("batch_size", self.batch_size),
            **ids,
            **extra,
        )
        n = s.values["num_return_sequences"]
        # transformers 4.x pipelines decode with clean_up_tokenization_spaces=False by default
        clean = opts.get("clean_up_tokenization_spaces", False)
        results = []
        for seqs in outs:
            rows = []
            for seq in seqs[:n]:
                if opts.get("return_tensors"):
                    rows.append({f"{self.return_name}_token_ids": [ids["decoder_start_token_id"], *seq]})
                else:
                    text = self.tokenizer.decode(seq, skip_special_tokens=True)
                    rows.append({f"{self.return_name}_text": clean_up_tokenization(text) if clean else text})
            results.append(rows)
        return results

    def __call__(self, inputs: Any, **options: Any) -> Any:
        out = super().__call__(inputs, **options)
        # transformers: a list of inputs with one result each gives a flat list of dicts.
        if isinstance(inputs, (list, tuple)) and all(len(r) == 1 for r in out):
            return [r[0] for r in out]
        return out


class SummarizationPipeline(Text2TextGenerationPipeline):
    """``pipe(text or texts)`` -> ``[{"summary_text": ...}]``."""

    task = "summarization"
    return_name = "summary"


class TranslationPipeline(Text2TextGenerationPipeline):
    """``pipe(text or texts, src_lang=, tgt_lang=)`` -> ``[{"translation_text": ...}]``.

    ``translation_en_to_de`` style task names set both languages, and T5 takes its task
    prefix ("translate English to German: ") from ``task_specific_params`` under that
    name (languages given to a call pick the prefix too). Multilingual models (mBART)
    take language codes ("en_XX", or "en" when one code starts with it): the source code
    is added to the input as the model's tokenizer does ("X </s> en_XX"; mBART-50:
    "en_XX X </s>"), the target code forced as the first generated token. Other models
    ignore the languages, as transformers does.
    """

    task = "translation"
    return_name = "translation"
    call_options = Text2TextGenerationPipeline.call_options | {"src_lang", "tgt_lang"}

    def __init__(self, loaded: Any, **kwargs: Any) -> None:
        self.multilingual = loaded.hf_config.get("model_type") == "mbart"
        super().__init__(loaded, **kwargs)
        self.code_first = self.multilingual and self._code_first()

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        for name in ("src_lang", "tgt_lang"):
            if name in options and not (isinstance(options[name], str) and options[name]):
                raise ValueError(f"{name} must be a language code string, got {options[name]!r}")
        return super().check_options(options)

    def task_key(self, opts: dict[str, Any]) -> str:
        if opts.get("src_lang") and opts.get("tgt_lang"):
            return f"translation_{opts['src_lang']}_to_{opts['tgt_lang']}"
        return self.task

    def _language_codes(self) -> list[str]:
        return sorted(
            t.content
            for t in self.tokenizer.backend.get_added_tokens_decoder().values()
            if _LANG_CODE.fullmatch(t.content)
        )

    def _lang_code(self, lang: str, which: str) -> str:
        codes = self._language_codes()
        if lang in codes:
            return lang
        matches = [c for c in codes if c.split("_")[0] == lang]
        if len(matches) == 1:
            return matches[0]
        raise ValueError(
            f"{which}={lang!r} is not a language code of this model; it knows {', '.join(codes) or 'none'}"
        )

    def run(self, items: list[Any], opts: dict[str, Any]) -> list[Any]:
        if self.multilingual:
            src, tgt = opts.get("src_lang"), opts.get("tgt_lang")
            if not src or not tgt:
                raise ValueError(
                    "this multilingual model needs src_lang= and tgt_lang= (language codes such as "
                    f"'en_XX'; it knows {', '.join(self._language_codes())})"
                )
            opts = {
                **opts,
                "_src": self._lang_code(src, "src_lang"),
                "_tgt": self._lang_code(tgt, "tgt_lang"),
            }
        return super().run(items, opts)

    def preprocess(self, item: str, index: int, options: dict[str, Any]) -> list[Feature]:
        src = options.get("_src")
        if src is None:
            return super().preprocess(item, index, options)
        # transformers' mBART path ignores the prefix. The saved tokenizer adds the code it was
        # saved with: keep the text's tokens (not the added specials) and add this call's code.
        enc = self.encode(item, truncation=options.get("truncation", False), index=index)
        body = [t for t, special in zip(enc.ids, enc.special_tokens_mask) if not special]
        code, eos = self.tokenizer.token_to_id(src), self.tokenizer.token_to_id("</s>")
        ids = [code, *body, eos] if self.code_first else [*body, eos, code]
        return [Feature(ids, index)]

    def _code_first(self) -> bool:
        """mBART-50's tokenizer puts the language code first; mBART's puts it last."""
        single = (json.loads(self.tokenizer.backend.to_str()).get("post_processor") or {}).get("single") or []
        first = single[0].get("SpecialToken", {}).get("id", "") if single else ""
        return bool(_LANG_CODE.fullmatch(first)) or "50" in str(self.tokenizer.tokenizer_class or "")

    def generation_ids(self, o: dict[str, Any]) -> dict[str, Any]:
        ids = super().generation_ids(o)
        if "_tgt" in o:
            ids["forced_bos_token_id"] = self.tokenizer.token_to_id(o["_tgt"])
        return ids
