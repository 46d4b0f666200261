"""Inspection passes against references: token probabilities hand-computed with torch from
the model's logits, attention weights against transformers' eager output_attentions."""

from __future__ import annotations

import threading

import pytest
import torch

import tiny
from tokenmill import SamplingParams
from tokenmill.inspect import Inspector
from tokenmill.inspect.forward import InspectionModel
from tokenmill.inspect.tokens import FILTERS

# A prompt of 40 tokens: longer than gemma3's sliding window of 12, so the window shows.
IDS = [(i * 37 + 11) % tiny.VOCAB for i in range(40)]


@pytest.fixture(scope="module")
def engine(llm):
    return llm.engine


@pytest.fixture(scope="module")
def inspector(engine):
    return Inspector(engine)


# -- attention -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "mistral", "qwen3"])
def test_attention_equals_transformers_output_attentions(arch):
    hf = tiny.hf_model(arch)
    hf.config._attn_implementation = "eager"
    model = InspectionModel(tiny.native_from_hf(hf))
    with torch.no_grad():
        ref = hf(torch.tensor([IDS]), output_attentions=True).attentions  # L x (1, H, T, T)
    got = model.attention(IDS)
    assert sorted(got) == list(range(len(ref)))
    T = len(IDS)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for layer, want in enumerate(ref):
        w = got[layer]
        assert w.shape == want[0].shape == (model.num_heads, T, T)
        torch.testing.assert_close(w, want[0].float(), atol=1e-5, rtol=0)
        torch.testing.assert_close(w.sum(-1), torch.ones(model.num_heads, T), atol=1e-5, rtol=0)
        assert (w[:, ~causal] == 0).all()
    if arch == "gemma3":
        # Layer 0 slides over the last 12 keys; layer 1 sees them all.
        assert (got[0][:, 30, :19] == 0).all() and (got[0][:, 30, 19:31] > 0).all()
        assert (got[1][:, 30, :31] > 0).all()


def test_attention_of_some_layers_only(inspector):
    every = inspector.attention(IDS[:10])
    some = inspector.attention(IDS[:10], layers=[1])
    assert list(some) == [1] and torch.equal(some[1], every[1])


def test_inspection_logits_equal_transformers(engine, hf):
    model = InspectionModel(engine.runner.model)
    with torch.no_grad():
        want = hf(torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(model.logits(IDS), want, atol=1e-4, rtol=0)
    torch.testing.assert_close(model.logits(IDS, start=30), want[30:], atol=1e-4, rtol=0)


def test_weights_are_shared_and_rope_tables_are_not(engine):
    model = engine.runner.model
    copy = InspectionModel(model).model
    assert copy.rotary is not model.rotary
    mine = dict(copy.named_parameters())
    for name, p in model.named_parameters():
        assert mine[name] is p


# -- token probabilities ---------------------------------------------------------------


def _reference(raw: torch.Tensor, seen: set[int], counts: dict[int, int], p: SamplingParams):
    """One step, written out with torch: (prob_temperature, prob_final, removed_by per token)."""
    x = raw.clone()
    for t in seen:  # repetition penalty on prompt and output tokens
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, c in counts.items():
        x[t] -= p.frequency_penalty * c + p.presence_penalty
    V = x.shape[0]
    removed: list[str | None] = [None] * V
    if p.temperature == 0:
        onehot = torch.zeros(V)
        onehot[x.argmax()] = 1
        return onehot, onehot, removed
    x = x / p.temperature
    probs = x.softmax(-1)
    keep = torch.ones(V, dtype=torch.bool)
    if p.top_k:
        kth = x.sort(descending=True).values[p.top_k - 1]
        for t in range(V):
            if x[t] < kth:
                keep[t], removed[t] = False, "top_k"
    if p.top_p < 1:
        q = torch.where(keep, x, torch.tensor(float("-inf"))).softmax(-1)
        total = 0.0
        for rank, t in enumerate(q.argsort(descending=True).tolist()):
            if keep[t] and rank > 0 and total >= p.top_p:
                keep[t], removed[t] = False, "top_p"
            total += float(q[t])
    if p.min_p:
        q = torch.where(keep, x, torch.tensor(float("-inf"))).softmax(-1)
        for t in range(V):
            if keep[t] and q[t] < p.min_p * q.max():
                keep[t], removed[t] = False, "min_p"
    final = torch.where(keep, x, torch.tensor(float("-inf"))).softmax(-1)
    return probs, final, removed


PARAMS = [
    dict(temperature=0.7),
    dict(temperature=0.7, top_k=40),
    dict(temperature=1.3, top_p=0.5),
    dict(temperature=0.9, min_p=0.6),
    dict(temperature=0.05, top_k=30, top_p=0.8, min_p=0.5),
    dict(
        temperature=1.0,
        top_k=200,
        top_p=0.3,
        repetition_penalty=1.5,
        presence_penalty=1.0,
        frequency_penalty=0.5,
    ),
    dict(temperature=0.0, repetition_penalty=2.0),
]


@pytest.mark.parametrize("kw", PARAMS, ids=[",".join(f"{k}={v}" for k, v in kw.items()) for kw in PARAMS])
def test_stages_equal_a_hand_computation(engine, inspector, kw):
    prompt, completion = IDS[:20], [IDS[3], 7, IDS[3], 7, 99]
    params = SamplingParams(**kw).resolved({}, tiny.VOCAB)
    steps = inspector.token_probabilities(prompt, completion, params, top_n=20)
    raw = InspectionModel(engine.runner.model).logits(prompt + completion[:-1], start=len(prompt) - 1)
    seen, counts = set(prompt), {}
    removed_seen = set()
    for i, (step, token) in enumerate(zip(steps, completion)):
        assert step.index == i and step.token.id == token
        logp = raw[i].log_softmax(-1)
        p_temp, p_final, removed = _reference(
            raw[i], seen if params.repetition_penalty != 1 else set(), counts, params
        )
        top = logp.topk(20).indices.tolist()
        assert [a.id for a in step.alternatives] == top
        for c in [step.token, *step.alternatives]:
            assert c.logprob == pytest.approx(float(logp[c.id]), abs=1e-6)
            assert c.prob == pytest.approx(float(logp[c.id].exp()), abs=1e-6)
            assert c.prob_temperature == pytest.approx(float(p_temp[c.id]), abs=1e-5)
            assert c.prob_final == pytest.approx(float(p_final[c.id]), abs=1e-5)
            assert c.removed_by == removed[c.id]
            assert (c.prob_final == 0) == (c.removed_by is not None or params.greedy and p_final[c.id] == 0)
            removed_seen.add(c.removed_by)
        seen.add(token)
        counts[token] = counts.get(token, 0) + 1
    want = {None} | {f for f in FILTERS if kw.get(f)}
    assert removed_seen <= want
    if kw.get("temperature") and len(want) > 1:
        assert removed_seen - {None}, "the parameters remove some of the top 20 tokens"


def test_engine_samples_survive_the_filters(llm, inspector):
    """Every token the engine sampled has a non-zero final probability at its step."""
    p = SamplingParams(
        temperature=0.8, top_k=20, top_p=0.7, min_p=0.1, seed=5, max_tokens=24, ignore_eos=True
    )
    out = llm.generate([IDS[:12]], p)[0]
    steps = inspector.token_probabilities(out.prompt_token_ids, out.outputs[0].token_ids, p, top_n=5)
    assert len(steps) == 24
    assert all(s.token.prob_final > 0 and s.token.removed_by is None for s in steps)


def test_token_probability_errors(inspector):
    p = SamplingParams()
    with pytest.raises(ValueError, match="completion_ids must hold at least one token"):
        inspector.token_probabilities([1, 2], [], p)
    with pytest.raises(ValueError, match=r"top_n must be an integer in \[1, 20\], got 21"):
        inspector.token_probabilities([1, 2], [3], p, top_n=21)
    with pytest.raises(
        ValueError, match=r"completion_ids: token id 512 is outside the vocabulary \[0, 512\)"
    ):
        inspector.token_probabilities([1, 2], [512], p)
    with pytest.raises(ValueError, match="attention inspection takes at most 256 tokens, got 257"):
        inspector.attention([1] * 257)
    with pytest.raises(ValueError, match=r"layer 2 does not exist; the model has layers 0..1"):
        inspector.attention([1, 2], layers=[2])


def test_inspection_beside_the_engine_changes_no_output(llm, inspector):
    """Inspections on their own thread while the engine generates: same greedy text."""
    prompts = [IDS[:8], IDS[5:30], IDS[10:14]]
    p = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, p)]
    ref = inspector.attention(IDS)
    stop = threading.Event()
    seen: list = []

    def inspect() -> None:
        while not stop.is_set():
            seen.append(inspector.submit(inspector.attention, IDS).result())

    t = threading.Thread(target=inspect)
    t.start()
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, p)]
    finally:
        stop.set()
        t.join()
    assert got == want and seen
    assert all(torch.equal(s[1], ref[1]) for s in seen)
