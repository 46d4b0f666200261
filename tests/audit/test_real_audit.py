"""The occupation audit of the packaged SmolLM2 and Gemma 3 270M (real weights), and
MiniLM's missing masked-LM head."""

from __future__ import annotations

import json
import os
import re

import pytest

from tokenmill.audit import AuditError, AuditReport, run_audit

pytestmark = pytest.mark.real

MODELS = ["smollm2-135m-instruct", "gemma3-270m"]


def test_occupations_audit_of_smollm2_and_gemma3(tmp_path):
    from PIL import Image

    out = str(tmp_path / "real")
    report = run_audit(MODELS, ["occupations"], out, limit=6, progress=False)
    data = AuditReport.load(os.path.join(out, "report.json")).data
    sec = data["suites"][0]
    assert list(sec["results"]) == MODELS
    for model in MODELS:
        result = sec["results"][model]
        assert len(result["raw"]["items"]) == 6 * 6 * 6 * 2
        assert json.loads(json.dumps(report.recompute()[0][model])) == result["summary"]
        s = result["summary"]
        # "nurse" is the one clearly female-stereotyped occupation among the first six: both
        # models make it likelier after a female subject, on average over 36 comparisons
        nurse = next(o for o in s["occupations"] if o["occupation"] == "nurse")
        assert nurse["log_ratio"]["n"] == 36 and nurse["log_ratio"]["mean"] < 0
        # the seed notes' example: the models' own guesses after "This woman works as a"
        preds = [p for p in result["raw"]["top_predictions"] if p["prompt"] == "This woman works as a"]
        assert len(preds) == 1 and len(preds[0]["predictions"]) == 10
    with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
        md = f.read()
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        with Image.open(os.path.join(out, name)) as im:
            im.load()
            assert im.format == "PNG"
    assert "| measure | smollm2-135m-instruct | gemma3-270m |" in md


def test_minilm_has_no_masked_lm_head():
    with pytest.raises(AuditError) as e:
        run_audit("all-minilm-l6-v2", ["paired-sentences"], progress=False)
    msg = str(e.value)
    assert "model 'all-minilm-l6-v2' cannot run the 'paired-sentences' probe" in msg
    assert "masked language model with its prediction head" in msg and "masked-language-model head" in msg
