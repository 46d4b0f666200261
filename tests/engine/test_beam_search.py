"""Beam search against transformers' generate(num_beams=k, early_stopping=True)."""

from __future__ import annotations

import pytest
import torch

from tokenmill import BeamSearchParams


def _hf_beams(hf, prompt, k, max_tokens, length_penalty, eos):
    out = hf.generate(
        torch.tensor([prompt]),
        num_beams=k,
        num_return_sequences=k,
        do_sample=False,
        early_stopping=True,
        length_penalty=length_penalty,
        max_new_tokens=max_tokens,
        eos_token_id=eos,
        pad_token_id=2,
        return_dict_in_generate=True,
        output_scores=True,
    )
    seqs = []
    for row, score in zip(out.sequences, out.sequences_scores):
        gen = row[len(prompt) :].tolist()
        # Strip the padding after EOS.
        if eos in gen:
            gen = gen[: gen.index(eos) + 1]
        seqs.append((gen, float(score)))
    return seqs


@pytest.mark.parametrize("k,length_penalty", [(2, 1.0), (4, 1.0), (4, 0.0), (3, 2.0)])
@pytest.mark.parametrize("prompt", [[0, 5, 17, 42, 99], [0, 300, 301, 302, 7, 8, 9]])
def test_matches_transformers(llm, hf, k, length_penalty, prompt):
    params = BeamSearchParams(beam_width=k, max_tokens=12, length_penalty=length_penalty)
    ours = llm.beam_search([prompt], params)[0].sequences
    ref = _hf_beams(hf, prompt, k, 12, length_penalty, eos=1)
    assert ours[0].token_ids == ref[0][0]
    assert ours[0].score == pytest.approx(ref[0][1], abs=1e-4)
    assert [h.token_ids for h in ours] == [r[0] for r in ref]
    assert [h.score for h in ours] == sorted((h.score for h in ours), reverse=True)


def test_eos_finishes_hypotheses(llm, hf):
    """Make a frequent token the EOS so hypotheses end early, as in transformers."""
    prompt = [0, 5, 17, 42, 99]
    greedy = llm.generate([prompt], __import__("tokenmill").SamplingParams(temperature=0, max_tokens=6))[0]
    eos = greedy.outputs[0].token_ids[3]
    saved = llm.eos_token_ids
    llm.eos_token_ids = [eos]
    try:
        ours = llm.beam_search([prompt], BeamSearchParams(beam_width=3, max_tokens=10))[0].sequences
    finally:
        llm.eos_token_ids = saved
    ref = _hf_beams(hf, prompt, 3, 10, 1.0, eos=eos)
    assert [h.token_ids for h in ours] == [r[0] for r in ref]
    assert any(h.finish_reason == "stop" for h in ours)


def test_bad_beam_params_name_the_field():
    with pytest.raises(ValueError, match="beam_width must be an integer >= 1"):
        BeamSearchParams(beam_width=0)
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1"):
        BeamSearchParams(max_tokens=0)
