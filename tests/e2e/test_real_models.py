"""Real weights from the packaged offline models, against transformers loading the same GGUF file."""

from __future__ import annotations

import os

import pytest
import torch

from tokenmill import LLM, BeamSearchParams, SamplingParams

pytestmark = [pytest.mark.real, pytest.mark.slow]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village,",
    "Les trois couleurs du drapeau français sont",
]


def _packaged(name: str) -> str:
    from tokenmill.weights.packaged import PACKAGED, packaged_path

    if not PACKAGED[name].is_installed():
        pytest.skip(f"{name} is not installed ({PACKAGED[name].install})")
    return packaged_path(name)


def _hf_from_gguf(path: str):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def smollm():
    return LLM("smollm2-135m-instruct", dtype="float32")


@pytest.fixture(scope="module")
def smollm_hf():
    return _hf_from_gguf(_packaged("smollm2-135m-instruct"))


def _hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    out = hf.generate(
        torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
    )
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_greedy_matches_transformers(smollm, smollm_hf, prompt):
    ids = smollm.get_tokenizer().encode(prompt)
    ours = smollm.generate([ids], SamplingParams(temperature=0, max_tokens=32, min_tokens=32))[0]
    assert ours.outputs[0].token_ids == _hf_greedy(smollm_hf, ids, 32)


def test_smollm2_knows_paris():
    llm = LLM()  # the embedded default, in its default dtype
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=16))[0]
    assert "Paris" in out.outputs[0].text
    reply = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=32),
    )[0]
    assert "Paris" in reply.outputs[0].text
    assert reply.outputs[0].finish_reason == "stop"


def test_smollm2_beam_search_matches_transformers(smollm, smollm_hf):
    for prompt in PROMPTS[:2]:
        ids = smollm.get_tokenizer().encode(prompt)
        ours = smollm.beam_search([ids], BeamSearchParams(beam_width=4, max_tokens=16, length_penalty=1.0))[0]
        ref = smollm_hf.generate(
            torch.tensor([ids]),
            num_beams=4,
            do_sample=False,
            early_stopping=True,
            length_penalty=1.0,
            max_new_tokens=16,
            pad_token_id=2,
        )[0, len(ids) :].tolist()
        if 2 in ref:
            ref = ref[: ref.index(2) + 1]
        assert ours.sequences[0].token_ids == ref


@pytest.mark.parametrize("prompt", ["My favourite emojis are 😀", "日本の首都は"], ids=["emoji", "cjk"])
def test_streaming_is_the_final_text_without_broken_utf8(smollm, prompt):
    params = SamplingParams(temperature=0, max_tokens=24)
    final = smollm.generate(prompt, params)[0].outputs[0]
    # The greedy output of these prompts has characters split over several tokens.
    pieces = smollm.get_tokenizer().convert_ids_to_tokens(final.token_ids)
    assert any(smollm.get_tokenizer().decode([t]).endswith("\ufffd") for t in final.token_ids), pieces
    deltas = list(smollm.stream(prompt, params))
    assert "".join(deltas) == final.text
    assert final.text == smollm.get_tokenizer().decode(final.token_ids)
    assert not any("\ufffd" in d for d in deltas)
    assert len(deltas) > 3


@pytest.fixture(scope="module")
def gemma():
    return LLM("gemma3-270m", dtype="float32")


def test_gemma3_greedy_matches_transformers(gemma):
    hf = _hf_from_gguf(_packaged("gemma3-270m"))
    for prompt in PROMPTS[:3]:
        ids = gemma.get_tokenizer().encode(prompt)
        ours = gemma.generate([ids], SamplingParams(temperature=0, max_tokens=32, min_tokens=32))[0]
        assert ours.outputs[0].token_ids == _hf_greedy(hf, ids, 32), prompt
