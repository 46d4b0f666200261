"""Inspection of the real SmolLM2-135M-Instruct (packaged GGUF weights)."""

from __future__ import annotations

import json

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.inspect import Inspector

pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm():
    from tokenmill.weights.packaged import PACKAGED

    if not PACKAGED["smollm2-135m-instruct"].is_installed():
        pytest.skip(f"smollm2-135m-instruct is not installed ({PACKAGED['smollm2-135m-instruct'].install})")
    return LLM("smollm2-135m-instruct", dtype="float32")


def test_smollm2_token_probabilities_and_attention(smollm):
    inspector = Inspector(smollm.engine)
    params = SamplingParams(temperature=0, max_tokens=3, logprobs=5)
    out = smollm.generate(["The capital of France is"], params)[0]
    completion = out.outputs[0]
    assert completion.text.startswith(" Paris")
    steps = inspector.token_probabilities(out.prompt_token_ids, completion.token_ids, params, top_n=5)
    for step, lp in zip(steps, completion.logprobs):
        assert step.token.id == lp.token_id and step.alternatives[0].id == lp.token_id  # greedy
        assert step.token.logprob == pytest.approx(lp.logprob, abs=1e-3)
        assert [a.id for a in step.alternatives] == list(lp.top_logprobs)
        assert step.token.prob_final == 1.0
    assert steps[0].token.prob > 0.5  # " Paris" is no guess

    ids = out.prompt_token_ids + completion.token_ids
    weights = inspector.attention(ids)
    T = len(ids)
    assert sorted(weights) == list(range(30))
    for w in weights.values():
        assert w.shape == (9, T, T)
        torch.testing.assert_close(w.sum(-1), torch.ones(9, T), atol=1e-5, rtol=0)
        assert (w.triu(1) == 0).all()


def test_smollm2_attention_json_of_the_longest_input(smollm):
    from tokenmill.server.inspect import attention_json

    inspector = Inspector(smollm.engine)
    ids = smollm.get_tokenizer().encode("The quick brown fox jumps over the lazy dog. " * 30)[:256]
    weights = inspector.attention(ids, layers=[0, 29])
    data = json.loads(attention_json(list(weights.values())))
    assert len(data) == 2 and len(data[0]) == 9 and len(data[0][0]) == 256 == len(data[0][0][255])
    got = torch.tensor(data, dtype=torch.float64)
    want = torch.stack(list(weights.values())).double()
    torch.testing.assert_close(got, want, atol=5e-5 + 1e-7, rtol=0)
