"""SamplingParams validation and defaults, and the errors the LLM gives for bad requests."""

from __future__ import annotations

import pytest

import tiny
from tokenmill import LLM, SamplingParams

V = tiny.VOCAB  # 512
CONTEXT = 256  # max_position_embeddings of the tiny models


@pytest.mark.parametrize(
    "kw,fragments",
    [
        (dict(n=0), ["n must be an integer >= 1", "got 0"]),
        (dict(n=True), ["n must be an integer >= 1", "got True"]),
        (dict(max_tokens=0), ["max_tokens must be an integer >= 1", "got 0"]),
        (dict(max_tokens=2.5), ["max_tokens must be an integer >= 1", "got 2.5"]),
        (dict(min_tokens=-1), ["min_tokens must be an integer >= 0", "got -1"]),
        (
            dict(min_tokens=5, max_tokens=3),
            ["min_tokens must be <= max_tokens", "min_tokens=5", "max_tokens=3"],
        ),
        (dict(temperature=-1), ["temperature must be in [0.0, 100.0]", "got -1"]),
        (dict(temperature=float("nan")), ["temperature must be a number", "nan"]),
        (dict(temperature="hot"), ["temperature must be a number", "'hot'"]),
        (dict(top_p=0), ["top_p must be in (0.0, 1.0]", "got 0"]),
        (dict(top_p=1.5), ["top_p must be in (0.0, 1.0]", "got 1.5"]),
        (dict(top_k=-2), ["top_k must be -1, 0 (disabled) or a positive integer", "got -2"]),
        (dict(top_k=2.0), ["top_k must be", "got 2.0"]),
        (dict(min_p=2), ["min_p must be in [0.0, 1.0]", "got 2"]),
        (dict(min_p=-0.1), ["min_p must be in [0.0, 1.0]", "got -0.1"]),
        (dict(repetition_penalty=0), ["repetition_penalty must be in (0.0, 100.0]", "got 0"]),
        (dict(presence_penalty=3), ["presence_penalty must be in [-2.0, 2.0]", "got 3"]),
        (dict(frequency_penalty=-2.5), ["frequency_penalty must be in [-2.0, 2.0]", "got -2.5"]),
        (dict(logit_bias={"x": 1.0}), ["logit_bias keys must be token ids", "'x'"]),
        (dict(logit_bias={1.5: 1.0}), ["logit_bias keys must be token ids", "1.5"]),
        (dict(logit_bias={3: 200.0}), ["logit_bias[3] must be in [-100.0, 100.0]", "got 200.0"]),
        (dict(logit_bias=[(3, 1.0)]), ["logit_bias must be a dict", "list"]),
        (dict(logprobs=21), ["logprobs must be in [0, 20]", "got 21"]),
        (dict(logprobs=-1), ["logprobs must be an integer >= 0", "got -1"]),
        (dict(stop=""), ["stop strings must not be empty"]),
        (dict(stop=["a", ""]), ["stop strings must not be empty"]),
        (dict(stop=5), ["stop must be a string or a list of strings", "5"]),
        (dict(stop=["a", 3]), ["stop must be a string or a list of strings", "3"]),
        (dict(stop_token_ids=[-1]), ["stop_token_ids entries must be an integer >= 0", "got -1"]),
        (dict(stop_token_ids=7), ["stop_token_ids must be a list of token ids", "7"]),
        (dict(seed="x"), ["seed must be an integer", "'x'"]),
        (dict(seed=1.0), ["seed must be an integer", "1.0"]),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else "",
)
def test_invalid_values_name_field_and_range(kw, fragments):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kw)
    for f in fragments:
        assert f in str(e.value), (str(e.value), f)


def test_valid_edge_values():
    p = SamplingParams(
        max_tokens=None,
        min_tokens=0,
        temperature=0,
        top_k=-1,
        top_p=1.0,
        min_p=0.0,
        repetition_penalty=100,
        presence_penalty=-2,
        frequency_penalty=2,
        logit_bias={"5": 2, 7: -100},
        logprobs=20,
        stop="x",
        stop_token_ids=[0],
        seed=0,
    )
    assert p.logit_bias == {5: 2.0, 7: -100.0}
    assert p.stop == ["x"]
    assert p.greedy
    assert SamplingParams(min_tokens=4, max_tokens=4).min_tokens == 4


# -- resolved(): defaults from generation_config.json ---------------------------------------


def test_resolved_documented_defaults():
    p = SamplingParams().resolved({}, V)
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty) == (1.0, 0, 1.0, 0.0, 1.0)
    assert not p.greedy


def test_resolved_do_sample_false_is_greedy():
    gen = {"do_sample": False, "temperature": 0.7, "top_p": 0.8}
    p = SamplingParams().resolved(gen, V)
    assert p.temperature == 0.0 and p.greedy
    assert p.top_p == 0.8
    # a temperature the user gives wins over do_sample
    assert SamplingParams(temperature=0.9).resolved(gen, V).temperature == 0.9


def test_resolved_takes_sampling_values_from_generation_config():
    gen = {
        "do_sample": True,
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
    }
    p = SamplingParams().resolved(gen, V)
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty) == (0.6, 20, 0.95, 0.05, 1.1)
    # explicit values win; None in the config means "not set"
    q = SamplingParams(top_k=5, top_p=1.0).resolved({"top_k": 50, "top_p": None}, V)
    assert (q.top_k, q.top_p) == (5, 1.0)
    assert SamplingParams(top_k=-1).resolved({}, V).top_k == 0


def test_resolved_is_a_copy():
    p = SamplingParams(max_tokens=4)
    r = p.resolved({"temperature": 0.5}, V)
    assert p.temperature is None and r.temperature == 0.5 and r.max_tokens == 4


@pytest.mark.parametrize(
    "kw,bad",
    [
        (dict(logit_bias={V: 1.0}), V),
        (dict(logit_bias={"-3": 1.0}), -3),
        (dict(stop_token_ids=[4, V + 10]), V + 10),
    ],
)
def test_resolved_rejects_ids_outside_the_vocabulary(kw, bad):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kw).resolved({}, V)
    assert f"token id {bad} is outside the vocabulary [0, {V})" in str(e.value)


# -- LLM-level errors ---------------------------------------------------------------------------


def _ids(n: int) -> list[int]:
    return [0] + [5 + i % 300 for i in range(n - 1)]


def test_llm_uses_the_context_it_reports(llm):
    assert llm.max_model_len == CONTEXT


@pytest.mark.parametrize("n", [CONTEXT, CONTEXT + 44])
def test_prompt_longer_than_context(llm, n):
    with pytest.raises(ValueError) as e:
        llm.generate([_ids(n)], SamplingParams(max_tokens=1))
    assert f"the prompt has {n} tokens but the model's context holds {CONTEXT}" in str(e.value)


def test_text_prompt_longer_than_context(llm):
    text = "Hello world " * 200
    n = len(llm.tokenizer.encode(text))
    with pytest.raises(
        ValueError, match=f"the prompt has {n} tokens but the model's context holds {CONTEXT}"
    ):
        llm.generate(text)


def test_prompt_plus_max_tokens_beyond_context(llm):
    with pytest.raises(ValueError) as e:
        llm.generate([_ids(200)], SamplingParams(max_tokens=100))
    msg = str(e.value)
    assert "the prompt has 200 tokens and max_tokens is 100, together 300" in msg
    assert f"beyond the model's context of {CONTEXT} tokens" in msg
    assert "lower max_tokens to at most 56" in msg
    # the limit itself is allowed
    out = llm.generate([_ids(250)], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0].outputs[
        0
    ]
    assert len(out.token_ids) == 6


def test_max_tokens_none_fills_the_context(llm):
    out = llm.generate([_ids(252)], SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))[
        0
    ].outputs[0]
    assert len(out.token_ids) == CONTEXT - 252 and out.finish_reason == "length"


def test_empty_prompts(llm):
    with pytest.raises(ValueError, match="prompts is empty: give at least one prompt"):
        llm.generate([])
    with pytest.raises(ValueError, match="the prompt is empty"):
        llm.generate([[]])


@pytest.mark.parametrize("bad", [V, V + 100, -1])
def test_prompt_token_outside_vocab(llm, bad):
    with pytest.raises(ValueError) as e:
        llm.generate([[0, 5, bad]])
    assert f"prompt token id {bad} is outside the vocabulary [0, {V})" in str(e.value)


def test_out_of_vocab_ids_in_params_through_llm(llm):
    with pytest.raises(ValueError, match=rf"token id {V + 1} is outside the vocabulary \[0, {V}\)"):
        llm.generate("Hello", SamplingParams(stop_token_ids=[V + 1]))


@pytest.mark.parametrize("bad", [{"temperature": 0}, "greedy", 0.5])
def test_wrong_type_of_sampling_params(llm, bad):
    with pytest.raises(TypeError) as e:
        llm.generate("Hello", bad)
    assert f"sampling_params must be a SamplingParams, got {type(bad).__name__}" in str(e.value)


def test_empty_dict_is_not_taken_for_default_params(llm):
    with pytest.raises(TypeError, match="sampling_params must be a SamplingParams, got dict"):
        llm.generate("Hello", {})


def test_wrong_type_of_prompt(llm):
    with pytest.raises(TypeError, match="a prompt must be a string or a list of token ids, got float"):
        llm.generate([3.5])
    with pytest.raises(TypeError, match="a prompt must be a string or a list of token ids, got list"):
        llm.generate([[0, "a"]])


def test_mismatched_list_lengths(llm):
    with pytest.raises(ValueError) as e:
        llm.generate(["a", "b"], [SamplingParams()])
    assert "got 1 sampling_params for 2 prompts; give one or one per prompt" in str(e.value)
    with pytest.raises(ValueError, match="got 2 sampling_params for 1 prompts"):
        llm.generate("a", [SamplingParams(), SamplingParams()])


def test_stream_rejects_n_above_one(llm):
    with pytest.raises(ValueError, match="stream\\(\\) produces one sequence; got n=2"):
        llm.stream("Hello", SamplingParams(n=2))


def test_generation_config_defaults_reach_generate(tmp_path_factory, llm):
    # A model whose generation_config.json asks for greedy decoding: default params give the
    # greedy text of the same weights, whatever the seed.
    d = tiny.save_tiny_dir(
        "llama", str(tmp_path_factory.mktemp("gen-config")), generation_config={"do_sample": False}
    )
    greedy_llm = LLM(d, dtype="float32")
    assert greedy_llm.generation_defaults == {"do_sample": False}
    ref = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].token_ids
    for seed in (1, 2):
        out = greedy_llm.generate("Hello world", SamplingParams(max_tokens=8, seed=seed))[0].outputs[0]
        assert out.token_ids == ref
    # the plain model samples at temperature 1 by default
    sampled = {
        tuple(llm.generate("Hello world", SamplingParams(max_tokens=8, seed=s))[0].outputs[0].token_ids)
        for s in (1, 2)
    }
    assert len(sampled) == 2


def test_a_top_k_beyond_the_vocabulary_keeps_every_token():
    assert SamplingParams(top_k=2**70).resolved({}, 512).top_k == 0
    assert SamplingParams(top_k=511).resolved({}, 512).top_k == 511


@pytest.mark.parametrize("seed", [-1, 2**63, 2**80])
def test_a_seed_outside_the_generator_range_is_refused(seed):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        SamplingParams(seed=seed)
