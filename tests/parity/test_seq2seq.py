"""Encoder-decoder models (T5, BART, mBART, Marian) and their generation against transformers.

Tiny random models from tests/tiny_seq2seq.py, fp32 on CPU: encoder states and decoder
logits within 1e-4, greedy and beam search token for token, on padded batches.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import tiny_seq2seq as ts
from tokenmill.generation.sampling_params import BeamSearchParams, SamplingParams
from tokenmill.generation.seq2seq import generate
from tokenmill.models.task_registry import TASK_FAMILIES
from tokenmill.weights.loader import load_weights

FAMILIES = list(ts.SEQ2SEQ_BUILDERS)
TEXTS = [
    "The keeper climbed the narrow stairs to light the lamp.",
    "A good summary is short.",
    "Ships came in from the north with wool, timber and letters for distant cities.",
]
ATOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: a second thread costs more in synchronisation than it saves
    (several times over on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Pair:
    name: str
    path: str
    hf: Any
    ours: Any
    tokenizer: Any
    gen: dict[str, Any]  # generation_config.json

    @property
    def config(self):
        return self.ours.config


def _read(path: str, name: str) -> dict[str, Any]:
    with open(os.path.join(path, name), encoding="utf-8") as f:
        return json.load(f)


def native_from_hf(path: str, hf, dtype=torch.float32):
    """Our model from the directory's config.json, filled from the transformers model's state dict."""
    hf_cfg = _read(path, "config.json")
    family = TASK_FAMILIES[hf_cfg["model_type"]]
    head = "seq2seq-lm" if "seq2seq-lm" in family.classes and hasattr(hf, "lm_head") else None
    if head is None:
        head = "sequence-classification" if hasattr(hf, "classification_head") else "base"
    model = family.model_class(head)(family.config(hf_cfg)).to(dtype).eval()
    buffers = dict(model.named_buffers())
    tensors = []
    for name, t in hf.state_dict().items():
        if name in buffers:  # final_logits_bias is a saved buffer, not a parameter
            buffers[name].copy_(t)
        else:
            tensors.append((name, t))
    # Marian's sinusoid table is computed, not loaded; T5EncoderModel ignores the decoder.
    load_weights(
        model,
        tensors,
        source=path,
        ignore=lambda n: "embed_positions" in n and hf_cfg["model_type"] == "marian",
    )
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request) -> Pair:
    import transformers as tf

    path = ts.seq2seq_dir(request.param)
    hf = tf.AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = tf.AutoTokenizer.from_pretrained(path)
    return Pair(request.param, path, hf, native_from_hf(path, hf), tok, _read(path, "generation_config.json"))


def _batch(p: Pair) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    enc = p.tokenizer(TEXTS, return_tensors="pt", padding=True)
    ids = [row[: int(m.sum())].tolist() for row, m in zip(enc.input_ids, enc.attention_mask)]
    assert len({len(x) for x in ids}) == len(TEXTS), "the batch must mix lengths"
    return enc.input_ids, enc.attention_mask, ids


def _gen_kwargs(p: Pair) -> dict[str, Any]:
    """Our generate() keywords from generation_config.json, as transformers reads them."""
    g = p.gen
    eos = g["eos_token_id"]
    return dict(
        decoder_start_token_id=g["decoder_start_token_id"],
        eos_token_ids=eos if isinstance(eos, list) else [eos],
        pad_token_id=g["pad_token_id"],
        forced_bos_token_id=g.get("forced_bos_token_id"),
        forced_eos_token_id=g.get("forced_eos_token_id"),
        suppress_token_ids=[w[0] for w in g.get("bad_words_ids") or [] if len(w) == 1] or None,
    )


def _hf_sequences(p: Pair, out: torch.Tensor, per_input: int) -> list[list[list[int]]]:
    """transformers' output rows -> generated ids without the start token, cut after EOS."""
    eos = set(_gen_kwargs(p)["eos_token_ids"])
    seqs = []
    for row in out[:, 1:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        seqs.append(row[:cut])
    return [seqs[i : i + per_input] for i in range(0, len(seqs), per_input)]


def _decoder_ids(p: Pair, T: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    dec = torch.randint(3, p.config.vocab_size - 1, (len(TEXTS), T), generator=g)
    dec[:, 0] = p.config.decoder_start_token_id
    return dec


def test_encoder_and_logits_match_transformers(pair):
    ids, mask, _ = _batch(pair)
    dec = _decoder_ids(pair)
    with torch.no_grad():
        ref = pair.hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        enc = pair.ours.encode(ids, mask)
        logits = pair.ours(ids, mask, dec)
    real = mask.bool()
    torch.testing.assert_close(enc[real], ref.encoder_last_hidden_state[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, ref.logits, atol=ATOL, rtol=0)


def test_cached_decoding_equals_uncached(pair):
    """One token per step over the cache, rows reordered and dropped midway (beam search and
    finished requests), gives the logits of one full pass."""
    ids, mask, _ = _batch(pair)
    dec = _decoder_ids(pair)
    m = pair.ours
    with torch.no_grad():
        full = m(ids, mask, dec)
        cache = m.start_decoding(m.encode(ids, mask), mask)
        steps = [m.decode(dec[:, i : i + 1], cache)[:, 0] for i in range(4)]
        torch.testing.assert_close(torch.stack(steps, 1), full[:, :4], atol=ATOL, rtol=0)
        order = torch.tensor([2, 0, 0])  # reorder, fork row 0, drop row 1
        cache.select_rows(order)
        rest = torch.stack([m.decode(dec[order, i : i + 1], cache)[:, 0] for i in range(4, 9)], 1)
        torch.testing.assert_close(rest, full[order, 4:], atol=ATOL, rtol=0)


def test_greedy_matches_transformers(pair):
    ids, mask, prompts = _batch(pair)
    kw = _gen_kwargs(pair)
    # 20 tokens each (EOS suppressed until then), and a run that stops where the model does
    for min_new in (20, 0):
        ref = pair.hf.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=20, min_new_tokens=min_new
        )
        params = SamplingParams(temperature=0.0, max_tokens=20, min_tokens=min_new)
        got = generate(pair.ours, prompts, params, **kw)
        assert got == _hf_sequences(pair, ref, 1)
        if min_new:
            assert all(len(s[0]) == 20 for s in got)


def test_greedy_with_no_repeat_ngram_matches_transformers(pair):
    """Random tiny models repeat themselves; banning repeated bigrams walks many positions."""
    ids, mask, prompts = _batch(pair)
    ref = pair.hf.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=16, no_repeat_ngram_size=2
    )
    got = generate(
        pair.ours,
        prompts,
        SamplingParams(temperature=0.0, max_tokens=16),
        no_repeat_ngram_size=2,
        **_gen_kwargs(pair),
    )
    assert got == _hf_sequences(pair, ref, 1)


# beam widths 3 and 4, length penalties 1.0 and others, early stopping True / False / "never"
BEAM_CASES = [(3, 1.0, True), (4, 1.0, False), (4, 2.0, True), (3, -0.5, False), (4, 1.5, "never")]


@pytest.mark.parametrize("beams,length_penalty,early_stopping", BEAM_CASES)
def test_beam_search_matches_transformers(pair, beams, length_penalty, early_stopping):
    ids, mask, prompts = _batch(pair)
    ref = pair.hf.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        num_beams=beams,
        num_return_sequences=beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        max_new_tokens=12,
    )
    params = BeamSearchParams(beam_width=beams, max_tokens=12, length_penalty=length_penalty)
    got = generate(pair.ours, prompts, params, early_stopping=early_stopping, **_gen_kwargs(pair))
    assert got == _hf_sequences(pair, ref, beams)


def test_beam_search_min_tokens_and_batching(pair):
    ids, mask, prompts = _batch(pair)
    ref = pair.hf.generate(
        input_ids=ids,
        attention_mask=mask,
        num_beams=3,
        num_return_sequences=2,
        max_new_tokens=10,
        min_new_tokens=6,
    )
    params = BeamSearchParams(beam_width=3, max_tokens=10)
    kw = _gen_kwargs(pair)
    got = generate(pair.ours, prompts, params, min_tokens=6, **kw)
    assert [g[:2] for g in got] == _hf_sequences(pair, ref, 2)
    # one input at a time: the same hypotheses (padding and batch neighbours change nothing)
    assert generate(pair.ours, prompts, params, min_tokens=6, batch_size=1, **kw) == got


def test_sampling_seeds_rows_independently(pair):
    _, _, prompts = _batch(pair)
    kw = _gen_kwargs(pair)
    params = SamplingParams(n=2, temperature=1.5, top_k=50, top_p=0.95, max_tokens=8, seed=1234)
    together = generate(pair.ours, prompts, params, **kw)
    alone = generate(pair.ours, prompts[1:2], params, **kw)
    assert alone[0] == together[1]  # a seeded request draws the same tokens whatever runs beside it
    assert all(len(s) == 2 and all(1 <= len(x) <= 8 for x in s) for s in together)
    other = generate(pair.ours, prompts, SamplingParams(n=2, temperature=1.5, max_tokens=8, seed=99), **kw)
    assert other != together


def test_min_tokens_ignore_eos_and_stop_ids(pair):
    _, _, prompts = _batch(pair)
    kw = _gen_kwargs(pair)
    eos = kw["eos_token_ids"][0]
    out = generate(pair.ours, prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), **kw)
    assert all(len(s[0]) == 6 for s in out)
    greedy = generate(pair.ours, prompts, SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12), **kw)
    # EOS is suppressed before min_tokens (a forced EOS at max_tokens still ends the sequence)
    assert all(eos not in s[0][:-1] for s in greedy)
    # a stop id ends the sequence at its first occurrence, and is kept
    ref = generate(
        pair.ours, prompts[:1], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), **kw
    )
    ref = ref[0][0]
    stop = ref[2]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop])
    first = generate(pair.ours, prompts[:1], params, **kw)[0][0]
    assert first == ref[: ref.index(stop) + 1]


def test_bfloat16_smoke(pair):
    """bf16 rounds differently from transformers; compare as vLLM's check_logprobs_close does."""
    import transformers as tf

    ids, mask, prompts = _batch(pair)
    hf = tf.AutoModelForSeq2SeqLM.from_pretrained(pair.path, dtype=torch.bfloat16).eval()
    ours = native_from_hf(pair.path, hf, dtype=torch.bfloat16)
    got = generate(ours, prompts[:1], SamplingParams(temperature=0.0, max_tokens=10), **_gen_kwargs(pair))[0][
        0
    ]
    ref = pair.hf.generate(input_ids=ids[:1, : len(prompts[0])], do_sample=False, max_new_tokens=10)
    ref = _hf_sequences(pair, ref, 1)[0][0]
    dec = torch.tensor([[pair.config.decoder_start_token_id] + ref])
    with torch.no_grad():
        ours_logits = ours(ids[:1, : len(prompts[0])], None, dec)[0].float()
        ref_logits = pair.hf(input_ids=ids[:1, : len(prompts[0])], decoder_input_ids=dec).logits[0]
    for i, (a, b) in enumerate(zip(got, ref)):
        if a != b:  # at the first divergence each side's choice is among the other's top 5
            assert (
                a in ref_logits[i].topk(5).indices.tolist() and b in ours_logits[i].topk(5).indices.tolist()
            )
            break
    assert (ours_logits.log_softmax(-1) - ref_logits.log_softmax(-1)).abs().max() < 0.15


def test_load_task_model_matches_transformers(pair):
    from tokenmill.weights.task_loader import load_task_model

    loaded = load_task_model(pair.path, "seq2seq-lm", dtype="float32")
    assert type(loaded.model) is type(pair.ours)
    ids, mask, _ = _batch(pair)
    dec = _decoder_ids(pair)
    with torch.no_grad():
        ref = pair.hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        out = loaded.model(ids, mask, dec)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_mbart_forced_bos_is_the_target_language():
    import transformers as tf

    path = ts.mbart_dir()
    hf = tf.AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = tf.AutoTokenizer.from_pretrained(path)
    p = Pair("mbart", path, hf, native_from_hf(path, hf), tok, _read(path, "generation_config.json"))
    ids, mask, prompts = _batch(p)
    assert all(x[-2:] == [2, tok.convert_tokens_to_ids(ts.SRC_LANG)] for x in prompts)  # "... </s> en_XX"
    kw = _gen_kwargs(p)
    for lang in (ts.TGT_LANG, "de_DE"):
        lang_id = tok.convert_tokens_to_ids(lang)
        kw["forced_bos_token_id"] = lang_id
        for params, hf_kw in (
            (SamplingParams(temperature=0.0, max_tokens=8), {}),
            (BeamSearchParams(beam_width=3, max_tokens=8), dict(num_beams=3, num_return_sequences=3)),
        ):
            ref = hf.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=8, forced_bos_token_id=lang_id, **hf_kw
            )
            got = generate(p.ours, prompts, params, **kw)
            assert got == _hf_sequences(p, ref, hf_kw.get("num_beams", 1))
            assert all(seq[0] == lang_id for seqs in got for seq in seqs)


def test_t5_encoder_model_matches_transformers():
    import transformers as tf

    from tokenmill.weights.task_loader import load_task_model

    path = ts.t5_dir("gated-gelu")
    hf = tf.T5EncoderModel.from_pretrained(path, dtype=torch.float32).eval()
    tok = tf.AutoTokenizer.from_pretrained(path)
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    loaded = load_task_model(path, "base")
    with torch.no_grad():
        ref = hf(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
        out = loaded.model(enc.input_ids, enc.attention_mask)
    real = enc.attention_mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=ATOL, rtol=0)


def test_bart_sequence_classification_matches_transformers():
    import transformers as tf

    from tokenmill.weights.task_loader import load_task_model

    path = ts.bart_nli_dir()
    hf = tf.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    tok = tf.AutoTokenizer.from_pretrained(path)
    premises = [
        "The keeper climbed the stairs.",
        "Ships came in from the north with wool and timber.",
        "Bread.",
    ]
    hypotheses = ["This example is about a lighthouse.", "This example is about trade.", "This is food."]
    enc = tok(premises, hypotheses, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = hf(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
        ours = native_from_hf(path, hf)
        out = ours(enc.input_ids, enc.attention_mask)
        loaded = load_task_model(path, "sequence-classification").model(enc.input_ids, enc.attention_mask)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(loaded, ref, atol=ATOL, rtol=0)
    assert ours.config.id2label == ts.NLI_LABELS and ours.config.num_labels == 3
    with pytest.raises(ValueError, match=r"every input must contain the EOS token 2; rows \[0\] do not"):
        ours(torch.tensor([[0, 5, 6]]), torch.ones(1, 3, dtype=torch.long))


def test_variants_outside_the_saved_models():
    """T5 with more decoder than encoder layers; Marian with its own target vocabulary."""
    import transformers as tf

    from tokenmill.models.marian import MarianMTModel, marian_config_from_hf
    from tokenmill.models.t5 import T5ForConditionalGeneration, t5_config_from_hf

    torch.manual_seed(0)
    t5 = tf.T5ForConditionalGeneration(
        tf.T5Config(
            vocab_size=90, d_model=32, d_kv=16, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=3
        )
    ).eval()
    marian = tf.MarianMTModel(
        tf.MarianConfig(
            vocab_size=90,
            decoder_vocab_size=70,
            share_encoder_decoder_embeddings=False,
            pad_token_id=60,
            decoder_start_token_id=60,
            bos_token_id=None,
            **{**ts._SMALL_BART, "max_position_embeddings": 40},
        )
    ).eval()
    ids = torch.randint(3, 55, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    dec = torch.randint(3, 55, (2, 5))
    for hf, cls, cfg_fn in (
        (t5, T5ForConditionalGeneration, t5_config_from_hf),
        (marian, MarianMTModel, marian_config_from_hf),
    ):
        ours = cls(cfg_fn(hf.config.to_dict())).eval()
        tensors = [
            (n, t)
            for n, t in hf.state_dict().items()
            if "embed_positions" not in n and n != "final_logits_bias"
        ]
        load_weights(ours, tensors, source=type(hf).__name__)
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits
            torch.testing.assert_close(ours(ids, mask, dec), ref, atol=ATOL, rtol=0)


def test_user_errors_name_the_problem():
    import transformers as tf

    from tokenmill.models.bart import bart_config_from_hf
    from tokenmill.models.t5 import t5_config_from_hf

    path = ts.bart_dir()
    hf = tf.AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = native_from_hf(path, hf)
    kw = dict(decoder_start_token_id=2, eos_token_ids=[2], pad_token_id=1)
    with pytest.raises(ValueError, match="stop strings are not supported by encoder-decoder generation"):
        generate(ours, [[0, 5, 2]], SamplingParams(stop=["x"]), **kw)
    with pytest.raises(
        ValueError, match=r"max_tokens must be at most 63 for this model \(max_position_embeddings=64"
    ):
        generate(ours, [[0, 5, 2]], SamplingParams(max_tokens=64), **kw)
    with pytest.raises(ValueError, match="an input has 70 tokens; the model reads at most 64"):
        generate(ours, [[5] * 70], SamplingParams(max_tokens=4), **kw)
    with pytest.raises(ValueError, match="early_stopping must be True, False or 'never', got 'sometimes'"):
        generate(ours, [[0, 5, 2]], BeamSearchParams(), early_stopping="sometimes", **kw)
    with pytest.raises(ValueError, match="min_tokens is a beam search argument"):
        generate(ours, [[0, 5, 2]], SamplingParams(max_tokens=4), min_tokens=2, **kw)
    with pytest.raises(ValueError, match=r"forced_bos_token_id must be token ids in \[0, 400\), got \[400\]"):
        generate(ours, [[0, 5, 2]], SamplingParams(max_tokens=4), forced_bos_token_id=400, **kw)
    t5_cfg = _read(ts.t5_dir(), "config.json")
    with pytest.raises(
        ValueError, match="config field feed_forward_proj must be 'ACT' or 'gated-ACT', got 'gelu-gated'"
    ):
        t5_config_from_hf({**t5_cfg, "feed_forward_proj": "gelu-gated"})
    with pytest.raises(
        ValueError, match=r"config field d_model \(32\) must be a multiple of encoder_attention_heads \(5\)"
    ):
        bart_config_from_hf({**_read(path, "config.json"), "encoder_attention_heads": 5})
    with pytest.raises(ValueError, match="max_tokens must be set for t5: its decoder has no length limit"):
        t5 = tf.AutoModelForSeq2SeqLM.from_pretrained(ts.t5_dir(), dtype=torch.float32).eval()
        generate(native_from_hf(ts.t5_dir(), t5), [[5, 1]], SamplingParams(max_tokens=None), **kw)
