"""The sampler against hand-computed distributions and formulas, and the LLM against transformers."""

from __future__ import annotations

import math

import pytest
import torch

from tokenmill import SamplingParams
from tokenmill.generation import logits_processors as lp
from tokenmill.generation.sampler import SamplingBatch

CPU = torch.device("cpu")
EOS = 1
# Eight hand-picked logits with clear gaps, so no filter boundary sits on a rounding edge.
LOGITS = [2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]
V = len(LOGITS)
ROWS = 20_000  # one batch of identical rows: frequencies are within ~0.0035 (1 sigma) of the truth
TOL = 0.015


def make_batch(params, prompts=None, V=V, eos=(EOS,), generators=None) -> SamplingBatch:
    resolved = [p.resolved({}, V) for p in params]
    prompts = prompts if prompts is not None else [[0]] * len(params)
    return SamplingBatch(resolved, prompts, V, list(eos), CPU, generators or [None] * len(params))


def softmax(xs: list[float]) -> list[float]:
    m = max(x for x in xs if x != -math.inf)
    e = [math.exp(x - m) if x != -math.inf else 0.0 for x in xs]
    s = sum(e)
    return [v / s for v in e]


def reference(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> list[float]:
    """The filtered, renormalised distribution, computed in plain Python in the documented
    order: temperature, top-k, top-p, min-p."""
    x = [v / temperature for v in logits]
    order = sorted(range(len(x)), key=lambda i: -x[i])
    if top_k:
        x = [v if i in order[:top_k] else -math.inf for i, v in enumerate(x)]
    if top_p < 1.0:
        p = softmax(x)
        keep, mass = [], 0.0
        for i in order:
            if mass >= top_p:
                break
            keep.append(i)
            mass += p[i]
        x = [v if i in keep else -math.inf for i, v in enumerate(x)]
    if min_p:
        p = softmax(x)
        x = [v if p[i] >= min_p * max(p) else -math.inf for i, v in enumerate(x)]
    return softmax(x)


def frequencies(tokens: list[int], V: int = V) -> list[float]:
    counts = torch.bincount(torch.tensor(tokens), minlength=V)
    return (counts.double() / len(tokens)).tolist()


# -- the draw ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=1.0),
        dict(temperature=0.5),
        dict(temperature=2.0),
        dict(temperature=1.0, top_k=3),
        dict(temperature=1.0, top_p=0.7),
        dict(temperature=1.0, min_p=0.2),
        dict(temperature=1.5, top_k=7, top_p=0.95, min_p=0.2),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_draws_follow_the_filtered_distribution(kw):
    torch.manual_seed(0)
    ref = reference(LOGITS, **kw)
    allowed = {i for i, p in enumerate(ref) if p > 0}
    if len(kw) > 1:
        assert len(allowed) < V  # the filter really removes tokens
    sb = make_batch([SamplingParams(**kw)] * ROWS)
    tokens = sb.sample(torch.tensor([LOGITS]).expand(ROWS, V), [0] * ROWS).tokens
    assert set(tokens) <= allowed
    freq = frequencies(tokens)
    assert max(abs(f - r) for f, r in zip(freq, ref)) < TOL, (freq, ref)


def test_reference_sets_are_the_documented_ones():
    # Hand check of the reference itself: softmax(LOGITS) = .405 .245 .149 .090 .055 .033 .020 .003
    p = softmax(LOGITS)
    assert [round(v, 3) for v in p] == [0.405, 0.245, 0.149, 0.09, 0.055, 0.033, 0.02, 0.003]
    assert [i for i, v in enumerate(reference(LOGITS, top_k=3)) if v] == [0, 1, 2]
    # .405 + .245 = .650 < .7, + .149 = .799 >= .7: three tokens
    assert [i for i, v in enumerate(reference(LOGITS, top_p=0.7)) if v] == [0, 1, 2]
    # min_p 0.2: threshold .081 keeps .090 and drops .055
    assert [i for i, v in enumerate(reference(LOGITS, min_p=0.2)) if v] == [0, 1, 2, 3]
    assert reference(LOGITS, top_k=3)[0] == pytest.approx(p[0] / sum(p[:3]))
    # Combined at T=1.5 (probs .310 .222 .159 .114 .082 .059 .042 .011), each filter bites:
    # top-k 7 drops token 7; top-p .95 over the renormalised seven reaches .958 at token 5 and
    # drops token 6; min-p .2 over the six (max .328, threshold .066) drops token 5 (.062).
    combined = reference(LOGITS, temperature=1.5, top_k=7, top_p=0.95, min_p=0.2)
    assert [i for i, v in enumerate(combined) if v] == [0, 1, 2, 3, 4]
    assert [i for i, v in enumerate(reference(LOGITS, temperature=1.5, top_k=7, top_p=0.95)) if v] == list(
        range(6)
    )


def test_mixed_rows_each_follow_their_own_filter():
    torch.manual_seed(1)
    kinds = [dict(temperature=1.0, top_k=2), dict(temperature=1.0, top_p=0.5), dict(temperature=1.0)]
    R = 6000
    params = [SamplingParams(**kinds[r % 3]) for r in range(3 * R)]
    sb = make_batch(params)
    tokens = sb.sample(torch.tensor([LOGITS]).expand(3 * R, V), [0] * (3 * R)).tokens
    for j, kw in enumerate(kinds):
        ref = reference(LOGITS, **kw)
        mine = tokens[j::3]
        assert {t for t in mine} <= {i for i, p in enumerate(ref) if p > 0}
        assert max(abs(f - r) for f, r in zip(frequencies(mine), ref)) < 0.025


def test_top_p_one_keeps_every_token_next_to_a_nucleus_row():
    # Rounding in the cumulative sum reaches 1.0 before the tail of a 512-token row; a row
    # that asked for top_p = 1.0 must still keep its whole vocabulary.
    torch.manual_seed(0)
    logits = torch.randn(64, 512) * 3
    top_p = torch.tensor([1.0, 0.5] * 32)
    out = lp.apply_top_k_top_p(logits, None, top_p)
    assert not torch.isinf(out[0::2]).any()
    assert torch.isinf(out[1::2]).any(dim=1).all()


def test_top_k_keeps_ties_and_never_modifies_its_input():
    logits = torch.tensor([[3.0, 1.0, 3.0, 2.0, 2.0, 0.0]])
    before = logits.clone()
    out = lp.apply_top_k_top_p(logits, torch.tensor([3]), None)
    assert torch.equal(logits, before)
    assert torch.isinf(out[0]).tolist() == [False, True, False, False, False, True]  # 2.0 ties at k=3
    out = lp.apply_min_p(logits, torch.tensor([0.3]))  # exp(2 - 3) = .37 >= .3, exp(1 - 3) = .14 < .3
    assert torch.isinf(out[0]).tolist() == [False, True, False, False, False, True]


# -- greedy and temperature -----------------------------------------------------------------


def test_temperature_divides_the_logits():
    logits = torch.tensor([LOGITS, LOGITS])
    T = torch.tensor([0.5, 2.0])
    probs = lp.apply_temperature(logits, T).softmax(-1)
    for r, t in enumerate(T.tolist()):
        expected = softmax([v / t for v in LOGITS])
        assert probs[r].tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("temperature", [0.0, 1e-6])
def test_temperature_zero_is_argmax(temperature):
    torch.manual_seed(0)
    logits = torch.randn(50, 32)
    sb = make_batch([SamplingParams(temperature=temperature, top_k=5)] * 50, V=32)
    assert sb.sample(logits, [0] * 50).tokens == logits.argmax(-1).tolist()


def test_top_k_one_is_argmax_and_greedy_rows_ignore_their_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(200, 32) * 0.3  # flat rows: sampling would wander
    params = [
        SamplingParams(temperature=0.8, top_k=1) if r % 2 else SamplingParams(temperature=0)
        for r in range(200)
    ]
    params[0] = SamplingParams(temperature=5.0)  # one true sampler keeps the batch off the all-greedy path
    tokens = make_batch(params, V=32).sample(logits, [0] * 200).tokens
    argmax = logits.argmax(-1).tolist()
    assert tokens[1:] == argmax[1:]


# -- penalties and bias ---------------------------------------------------------------------


def test_repetition_penalty_is_ctrl():
    logits = torch.tensor([[2.0, -1.0, 0.5, -2.0, 3.0, 0.0], [2.0, -1.0, 0.5, -2.0, 3.0, 0.0]])
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=1.5), SamplingParams(repetition_penalty=2.0)]
    sb = make_batch(params, prompts=[[0, 3], [1, 5]], V=6)
    sb.record(torch.tensor([4, 2]))  # row 0 generated token 4, row 1 token 2
    out = sb.process(logits, [1, 1])
    assert torch.equal(logits, before)
    # seen: row 0 {0, 3, 4}, row 1 {1, 2, 5}; positive / p, negative * p, others unchanged
    assert out[0].tolist() == pytest.approx([2.0 / 1.5, -1.0, 0.5, -2.0 * 1.5, 3.0 / 1.5, 0.0])
    assert out[1].tolist() == pytest.approx([2.0, -1.0 * 2.0, 0.5 / 2.0, -2.0, 3.0, 0.0])


def test_presence_and_frequency_penalties_are_openai():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]] * 2)
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(presence_penalty=-1.0, frequency_penalty=1.0),
    ]
    sb = make_batch(params, prompts=[[2, 2, 4], [0]], V=5)  # prompt tokens do not count
    for step in ([1, 3], [1, 3], [3, 0]):
        sb.record(torch.tensor(step))
    out = sb.process(logits, [3, 3])
    # row 0 counts {1: 2, 3: 1}: logit - count * 0.25 - 0.5 for counted tokens
    assert out[0].tolist() == pytest.approx([1.0, 2.0 - 0.5 - 0.5, 3.0, 4.0 - 0.25 - 0.5, 5.0])
    # row 1 counts {3: 2, 0: 1}: logit - count * 1.0 + 1.0
    assert out[1].tolist() == pytest.approx([1.0 - 1.0 + 1.0, 2.0, 3.0, 4.0 - 2.0 + 1.0, 5.0])
    # the formula as written in logits_processors
    counts = torch.tensor([[0.0, 2.0, 0.0, 1.0, 0.0]])
    out = lp.apply_presence_frequency(logits[:1], counts, torch.tensor([0.5]), torch.tensor([0.25]))
    assert out[0].tolist() == pytest.approx([1.0, 1.0, 3.0, 3.25, 5.0])


def test_logit_bias_adds():
    logits = torch.tensor([[0.5, 1.0, -1.0, 2.0]] * 2)
    params = [SamplingParams(logit_bias={2: 5.0, "0": -3.0}), SamplingParams()]
    out = make_batch(params, V=4).process(logits, [0, 0])
    assert out[0].tolist() == pytest.approx([-2.5, 1.0, 4.0, 2.0])
    assert out[1].tolist() == pytest.approx([0.5, 1.0, -1.0, 2.0])
    # a bias that large decides the greedy choice
    assert make_batch([SamplingParams(temperature=0, logit_bias={2: 5.0})], V=4).sample(
        logits[:1], [0]
    ).tokens == [2]


def test_min_tokens_suppresses_eos_and_stop_ids_until_reached():
    logits = torch.zeros(3, 6)
    params = [
        SamplingParams(min_tokens=2, stop_token_ids=[3]),
        SamplingParams(min_tokens=2, stop_token_ids=[3], ignore_eos=True),
        SamplingParams(stop_token_ids=[3]),
    ]
    sb = make_batch(params, V=6)
    probs = sb.process(logits, [1, 1, 1]).softmax(-1)
    assert probs[0, EOS] == 0 and probs[0, 3] == 0 and probs[0, 0] > 0
    assert probs[1, EOS] > 0 and probs[1, 3] == 0  # ignore_eos leaves EOS alone
    assert probs[2, EOS] > 0 and probs[2, 3] > 0  # no min_tokens
    probs = sb.process(logits, [2, 2, 2]).softmax(-1)
    assert (probs > 0).all()
    # drawn: EOS dominates the logits, yet never comes before min_tokens
    R = 500
    biased = torch.zeros(R, 6)
    biased[:, EOS] = 20.0
    sb = make_batch([SamplingParams(temperature=1.0, min_tokens=3)] * R, V=6)
    assert EOS not in sb.sample(biased, [2] * R).tokens
    assert set(sb.sample(biased, [3] * R).tokens) == {EOS}


# -- through the LLM on a tiny model --------------------------------------------------------

PROMPTS = ["The capital of France is", "Hello world", [0, 5, 17, 42, 99]]


def _ids(out):
    return out.outputs[0].token_ids


def test_llm_top_k_one_equals_greedy(llm):
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12))
    for seed in (0, 7):
        top1 = llm.generate(PROMPTS, SamplingParams(top_k=1, temperature=0.8, seed=seed, max_tokens=12))
        assert [_ids(o) for o in top1] == [_ids(o) for o in greedy]


@pytest.mark.parametrize("prompt", [[0, 5, 17, 42, 99], [0, 300, 301, 302, 7, 8, 9]])
def test_greedy_repetition_penalty_matches_transformers(llm, hf, prompt):
    ours = _ids(
        llm.generate([prompt], SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=32))[0]
    )
    ref = hf.generate(
        torch.tensor([prompt]), do_sample=False, repetition_penalty=1.3, max_new_tokens=32, pad_token_id=2
    )[0, len(prompt) :].tolist()
    # both stop at EOS (id 1) when it comes: the generated lists must agree in full
    assert ours == ref
    # the penalty changes the path (else this test would only check greedy decoding)
    assert ours != _ids(llm.generate([prompt], SamplingParams(temperature=0, max_tokens=32))[0])


def test_same_seed_same_text_alone_and_batched(llm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate("Hello world", seeded)[0].outputs[0]
    again = llm.generate("Hello world", seeded)[0].outputs[0]
    assert (again.text, again.token_ids) == (alone.text, alone.token_ids)
    others = [
        ("The capital of France is", SamplingParams(temperature=1.0, max_tokens=16)),
        ([0, 5, 17, 42, 99, 100, 101, 102, 7], SamplingParams(temperature=1.0, seed=99, max_tokens=9)),
        ("Rome", SamplingParams(temperature=0, max_tokens=4)),
    ]
    torch.manual_seed(5)
    outs = llm.generate(
        [others[0][0], "Hello world", others[1][0], others[2][0]],
        [others[0][1], seeded, others[1][1], others[2][1]],
    )
    assert outs[1].outputs[0].token_ids == alone.token_ids
    assert outs[1].outputs[0].text == alone.text


def test_different_seeds_give_different_text(llm):
    texts = {
        llm.generate("Hello world", SamplingParams(temperature=1.0, seed=s, max_tokens=16))[0].outputs[0].text
        for s in range(4)
    }
    assert len(texts) == 4


def test_n_samples_get_distinct_streams(llm):
    out = llm.generate("Hello world", SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=12))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    # sample j uses seed + j: the second sample equals a lone request seeded 4
    lone = llm.generate("Hello world", SamplingParams(temperature=1.0, seed=4, max_tokens=12))[0]
    assert out.outputs[1].token_ids == _ids(lone)


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=0.0),
        dict(temperature=1.0),
        dict(temperature=0.7, repetition_penalty=1.5, logit_bias={7: 5.0}),
    ],
)
def test_logprobs_are_the_model_log_softmax(llm, hf, kw):
    # the model's own distribution, before penalties, bias or temperature
    prompt = [0, 5, 17, 42, 99]
    sp = SamplingParams(**kw, seed=11, max_tokens=8, logprobs=3, ignore_eos=True)
    out = llm.generate([prompt], sp)[0].outputs[0]
    ids = out.token_ids
    assert len(out.logprobs) == len(ids) == 8
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + ids[:-1]])).logits[0, len(prompt) - 1 :]
    ref = logits.float().log_softmax(-1)  # (8, V)
    for step, (tok, lp_) in enumerate(zip(ids, out.logprobs)):
        assert lp_.token_id == tok
        assert lp_.logprob == pytest.approx(ref[step, tok].item(), abs=1e-4)
        assert len(lp_.top_logprobs) == 3
        top_vals, top_ids = ref[step].topk(3)
        assert sorted(lp_.top_logprobs) == sorted(top_ids.tolist())
        for t, v in lp_.top_logprobs.items():
            assert v == pytest.approx(ref[step, t].item(), abs=1e-4)
    assert out.cumulative_logprob == pytest.approx(sum(lp_.logprob for lp_ in out.logprobs), abs=1e-5)


# -- the greedy fast path -----------------------------------------------------------------------
def test_bf16_argmax_kernel_gives_torchs_index():
    from tokenmill.layers import cpu_kernels

    nan, inf = float("nan"), float("inf")
    g = torch.Generator().manual_seed(0)
    cases = [
        torch.randn(64, 49152, generator=g),
        torch.randn(3, 17, generator=g),
        torch.tensor([[1.0, 3, 3, 2], [nan, 1, nan, 5], [-inf] * 4, [0.0, -0.0, 0.0, -1]]),
        torch.zeros(2, 40).index_put_(
            (torch.tensor([0, 1, 1]), torch.tensor([35, 20, 37])), torch.tensor([nan, 1, 1])
        ),
    ]
    for x in cases:
        x = x.to(torch.bfloat16)
        got = cpu_kernels.argmax_rows(x)
        if got is None:
            pytest.skip("no C compiler here")
        # ties: the first; a NaN beats everything, the first NaN wins; -0.0 equals 0.0
        assert torch.equal(got, x.argmax(-1)) and torch.equal(got, x.float().argmax(-1))
    assert cpu_kernels.argmax_rows(torch.randn(4, 6).to(torch.bfloat16).t()) is None  # not contiguous
    assert cpu_kernels.argmax_rows(torch.randn(4, 6)) is None  # float32: torch's own argmax


@pytest.mark.parametrize(
    "params, fast",
    [
        (SamplingParams(temperature=0), True),
        (SamplingParams(temperature=0, logprobs=2), True),
        (SamplingParams(temperature=0, repetition_penalty=1.3), False),
        (SamplingParams(temperature=0, min_tokens=3), False),
        (SamplingParams(temperature=0, logit_bias={3: 5.0}), False),
    ],
)
def test_greedy_batches_take_the_raw_argmax_only_when_nothing_changes_the_logits(params, fast, monkeypatch):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 300, generator=g).to(torch.bfloat16)
    batch = make_batch([params] * 5, V=300)
    calls = []
    real = SamplingBatch.process
    monkeypatch.setattr(SamplingBatch, "process", lambda self, *a: calls.append(1) or real(self, *a))
    got = batch.sample(logits, [0] * 5)
    assert (not calls) == fast
    want = real(make_batch([params] * 5, V=300), logits, [0] * 5).argmax(-1).tolist()
    assert got.tokens == want
    if params.logprobs:
        top = logits.float().log_softmax(-1).topk(2, dim=-1)
        assert [lp_[1][0][0] for lp_ in got.logprobs] == top.indices[:, 0].tolist()
