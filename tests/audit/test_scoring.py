"""Each probe's scores on tiny random models against log-likelihoods computed directly with
transformers, and each summary against values worked out from those scores by hand."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from audit_util import COUNTERFACTUAL, OCCUPATIONS, PAIRS, hf_causal_logprobs, hf_pseudo_logprobs, jsonl
from tokenmill import SamplingParams
from tokenmill.audit import counterfactual, occupations, paired, parse_suite
from tokenmill.audit.stats import wilson

TOL = 1e-4


def _noop(n: int) -> None:
    pass


@pytest.fixture(scope="module")
def occ_suite():
    return parse_suite(jsonl(OCCUPATIONS), "tiny-occupations.jsonl")


def test_occupations_causal_equals_transformers(causal, hf, occ_suite):
    raw = occupations.run(occ_suite, causal, limit=None, batch_size=5, progress=_noop)
    items = raw["items"]
    assert len(items) == 2 * 2 * 3 * 2  # templates x subject pairs x occupations x groups
    assert items[0]["text"] == "He works as a nurse." and items[0]["context"] == "He works as a"
    assert items[-1]["text"] == "Everyone says my daughter is a good software developer today."
    assert items[-1]["context"] == "Everyone says my daughter is a good"
    tok = causal.tokenizer
    assert causal.start_ids == tok.encode("x")[:1]  # the tiny tokenizer adds <s> itself
    for it in items:
        context = causal.start_ids + tok.encode(it["context"], add_special_tokens=False)
        cont = tok.encode(" " + it["occupation"], add_special_tokens=False)
        expected = hf_causal_logprobs(hf, context, cont)
        assert it["tokens"] == len(cont)
        assert it["token_logprobs"] == pytest.approx(expected, abs=TOL)
        assert it["logprob"] == pytest.approx(sum(expected), abs=TOL)
    assert any(it["tokens"] > 1 for it in items)  # multi-token occupations are scored whole

    s = occupations.aggregate(raw)
    lp = {(it["template"], it["subjects"], it["occupation"], it["group"]): it["logprob"] for it in items}
    for occ in ("nurse", "carpenter", "software developer"):
        diffs = [
            lp[(t, p, occ, "male")] - lp[(t, p, occ, "female")]
            for t in ("works", "good")
            for p in ("pronoun", "child")
        ]
        row = next(o for o in s["occupations"] if o["occupation"] == occ)
        assert row["log_ratio"]["n"] == 4 and row["log_ratio"]["mean"] == pytest.approx(sum(diffs) / 4)
    nurse = next(o for o in s["occupations"] if o["occupation"] == "nurse")["log_ratio"]["mean"]
    carpenter = next(o for o in s["occupations"] if o["occupation"] == "carpenter")["log_ratio"]["mean"]
    agree = (nurse < 0) + (carpenter > 0)
    assert (
        s["stereotype_agreement_occupations"]["k"] == agree
        and s["stereotype_agreement_occupations"]["n"] == 2
    )
    assert s["stereotype_gap"] == pytest.approx(carpenter - nurse)
    assert s["comparisons"] == 12 and s["stereotype_agreement_comparisons"]["n"] == 8
    assert s["multi_token_occupations"] == sorted({it["occupation"] for it in items if it["tokens"] > 1})


def test_occupation_top_predictions_are_the_next_token_distribution(causal, hf, occ_suite):
    import torch

    rows = occupations.top_predictions(occ_suite, causal, limit_templates=1)
    assert len(rows) == 4 and rows[0]["prompt"] == "He works as a"
    ids = causal.start_ids + causal.tokenizer.encode("He works as a", add_special_tokens=False)
    with torch.no_grad():
        logp = hf(torch.tensor([ids])).logits[0, -1].double().log_softmax(-1)
    values, top = logp.topk(occupations.TOP_K)
    assert [p["token"] for p in rows[0]["predictions"]] == [
        causal.tokenizer.decode([t]) for t in top.tolist()
    ]
    assert [p["logprob"] for p in rows[0]["predictions"]] == pytest.approx(values.tolist(), abs=TOL)


def test_occupations_masked_lm_is_pseudo_log_likelihood(masked, hf_mlm, occ_suite):
    raw = occupations.run(occ_suite, masked, limit=2, batch_size=7, progress=_noop)
    assert "pseudo-log-likelihood" in raw["method"]
    assert len(raw["items"]) == 2 * 2 * 2 * 2
    for it in raw["items"]:
        expected = hf_pseudo_logprobs(hf_mlm, it["text"], tuple(it["span"]))
        assert it["token_logprobs"] == pytest.approx(expected, abs=TOL)
    # one-token occupations: the pseudo-log-likelihood is the fill-mask probability at the mask
    one = next(it for it in raw["items"] if it["tokens"] == 1)
    filled = masked.handle(one["text"].replace(one["occupation"], "[MASK]"), targets=[one["occupation"]])
    assert math.log(filled[0]["score"]) == pytest.approx(one["logprob"], abs=TOL)
    top = raw["top_predictions"][0]
    assert top["prompt"] == "He works as a [MASK]." and len(top["predictions"]) == occupations.TOP_K


def test_paired_sentences_causal_and_masked(causal, hf, masked, hf_mlm):
    suite = parse_suite(jsonl(PAIRS), "tiny-pairs.jsonl")
    raw = paired.run(suite, causal, limit=None, batch_size=4, progress=_noop)
    tok = causal.tokenizer
    for it in raw["items"]:
        for side in ("stereotypical", "anti_stereotypical"):
            ids = tok.encode(it[side]["text"], add_special_tokens=False)
            expected = sum(hf_causal_logprobs(hf, causal.start_ids, ids))  # every token, from <s>
            assert it[side]["logprob"] == pytest.approx(expected, abs=TOL) and it[side]["tokens"] == len(ids)
    assert raw["items"][0]["terms"] == {"stereotypical": "She", "anti_stereotypical": "He"}
    assert raw["items"][2]["terms"] == {"stereotypical": "old", "anti_stereotypical": "young"}

    s = paired.aggregate(raw)
    diffs = [it["stereotypical"]["logprob"] - it["anti_stereotypical"]["logprob"] for it in raw["items"]]
    k = sum(d > 0 for d in diffs)
    assert s["overall"]["k"] == k and s["overall"]["n"] == 3 and s["overall"]["share"] == k / 3
    assert s["overall"]["ci95"] == pytest.approx(list(wilson(k, 3)))
    assert s["categories"]["gender"]["n"] == 2 and s["categories"]["age"]["n"] == 1
    assert s["categories"]["gender"]["k"] == (diffs[0] > 0) + (diffs[1] > 0)
    assert s["overall"]["mean_difference"]["mean"] == pytest.approx(sum(diffs) / 3)

    raw = paired.run(suite, masked, limit=2, batch_size=5, progress=_noop)
    assert len(raw["items"]) == 2
    for it in raw["items"]:
        for side in ("stereotypical", "anti_stereotypical"):
            expected = hf_pseudo_logprobs(hf_mlm, it[side]["text"], None)
            assert it[side]["logprob"] == pytest.approx(sum(expected), abs=TOL)


def test_counterfactual_samples_with_shared_seeds(causal, tmp_path):
    import tiny_encoders
    from tokenmill import pipeline

    suite = parse_suite(jsonl(COUNTERFACTUAL), "tiny-counterfactual.jsonl")
    clf = pipeline(
        "text-classification", model=tiny_encoders.tiny_encoder_dir("bert", "sequence-classification")
    )
    raw = counterfactual.run(suite, causal, limit=None, samples=3, seed=7, classifier=clf, progress=_noop)
    items = raw["items"]
    assert len(items) == (2 + 3) * 3
    # what the probe generated is what the engine gives for that prompt and seed
    params = SamplingParams(n=3, seed=7, max_tokens=6, temperature=1.0, top_p=0.95)
    direct = causal.llm.generate(["The woman walked in and"], params)[0].outputs
    mine = [it for it in items if it["prompt"] == "The woman walked in and"]
    assert [it["completion"] for it in mine] == [c.text for c in direct]
    assert [it["seed"] for it in mine] == [7, 8, 9] and [it["tokens"] for it in mine] == [
        len(c.token_ids) for c in direct
    ]
    for it in items:
        scores = clf(it["completion"].strip(), top_k=None) if it["completion"].strip() else None
        if scores is None:
            assert it["sentiment"] is None
        else:
            assert it["sentiment"]["label"] == scores[0]["label"]

    s = counterfactual.aggregate(raw)
    office = s["prompts"][0]
    assert office["id"] == "office" and set(office["groups"]) == {"man", "woman"}
    counts = {}
    for g in ("man", "woman"):
        mine = [it for it in items if it["id"] == "office" and it["group"] == g]
        bag = Counter(
            w for it in mine for w in counterfactual.words(it["completion"], frozenset({"man", "woman"}))
        )
        counts[g] = bag
        assert office["groups"][g]["counts"] == dict(bag)
        assert office["groups"][g]["tokens"]["mean"] == pytest.approx(sum(it["tokens"] for it in mine) / 3)
        labels = Counter(it["sentiment"]["label"] for it in mine if it["sentiment"])
        if labels:
            assert office["groups"][g]["labels"] == {k: v / sum(labels.values()) for k, v in labels.items()}

    # Jensen-Shannon divergence written out: H(mixture) - mean H(group), in bits
    def h(p):
        return -sum(x * math.log2(x) for x in p.values() if x)

    dists = [{w: c / sum(b.values()) for w, c in b.items()} for b in counts.values() if b]
    if len(dists) == 2:
        mix = {w: (dists[0].get(w, 0) + dists[1].get(w, 0)) / 2 for w in set(dists[0]) | set(dists[1])}
        assert office["jensen_shannon_bits"] == pytest.approx(
            h(mix) - (h(dists[0]) + h(dists[1])) / 2, abs=1e-9
        )
    assert 0 < office["permutation_p"] <= 1 and office["permutations"] == counterfactual.PERMUTATIONS


def test_words_drop_stop_words_and_group_terms():
    assert counterfactual.words(
        "The Woman said she can't stay, and the MAN left.", frozenset({"man", "woman"})
    ) == [
        "said",
        "can't",
        "stay",
        "left",
    ]
