"""run_audit end to end on tiny models: the report's JSON, its Markdown and charts, the
numbers recomputed from the raw items, the command line, and every user error's message."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from audit_util import COUNTERFACTUAL, OCCUPATIONS, PAIRS, write_suite
from tokenmill.audit import AuditError, AuditReport, run_audit, summarize


@pytest.fixture(scope="module")
def audit(llama_dir, mlm_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    suites = [write_suite(tmp, OCCUPATIONS), write_suite(tmp, PAIRS)]
    out = str(tmp / "report")
    report = run_audit([llama_dir, mlm_dir], suites, out, batch_size=8, progress=False)
    return report, out


def test_report_json_holds_raw_items_and_summaries(audit, llama_dir, mlm_dir):
    report, out = audit
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        data = json.load(f)
    assert data == json.loads(report.to_json())
    assert [m["name"] for m in data["models"]] == [llama_dir, mlm_dir]
    assert [m["kind"] for m in data["models"]] == ["causal-lm", "masked-lm"]
    assert data["models"][0]["context_start"]["ids"] == [0]
    assert data["settings"]["dtype"] == "float32" and data["settings"]["seed"] == 0
    occ, pairs = data["suites"]
    assert occ["suite"]["name"] == "tiny-occupations" and occ["suite"]["items_used"] == {
        "used": 3,
        "available": 3,
    }
    assert set(occ["results"]) == {llama_dir, mlm_dir} and occ["skipped"] == []
    for result in occ["results"].values():
        assert len(result["raw"]["items"]) == 24 and result["seconds"] > 0
        assert result["raw"]["method"] and result["summary"]["comparisons"] == 12
    assert pairs["results"][llama_dir]["summary"]["overall"]["n"] == 3
    assert data["total_seconds"] > 0


def test_every_summary_recomputes_from_the_raw_items(audit):
    report, out = audit
    loaded = AuditReport.load(os.path.join(out, "report.json"))
    recomputed = loaded.recompute()
    for sec, again in zip(loaded.data["suites"], recomputed):
        for model, result in sec["results"].items():
            # through JSON, as a reader of the file recomputes them
            assert json.loads(json.dumps(again[model])) == result["summary"]
            assert summarize(sec["suite"]["probe"], result["raw"]) == again[model]


def test_markdown_references_charts_that_exist_and_decode(audit, llama_dir, mlm_dir):
    from PIL import Image, ImageStat

    _, out = audit
    with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
        md = f.read()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert images == ["01-tiny-occupations.png", "02-tiny-pairs.png"]
    for name in images:
        with Image.open(os.path.join(out, name)) as im:
            im.load()
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
            # a chart, not a blank canvas: many distinct colours and real contrast
            assert len(im.convert("RGB").getcolors(1 << 20)) > 20
            assert max(ImageStat.Stat(im.convert("L")).stddev) > 10
    assert "## Limitations of these probes" in md
    assert f"| measure | {llama_dir} | {mlm_dir} |" in md  # models side by side
    assert "(n=4)" in md and "Wilson 95% CI" in md and "pseudo-log-likelihood" in md
    assert "| category |" in md and "(n=" in md


def test_counterfactual_report_and_default_suites_skip_what_a_model_cannot_run(llama_dir, mlm_dir, tmp_path):
    out = str(tmp_path / "cf")
    suite = write_suite(tmp_path, COUNTERFACTUAL)
    report = run_audit(llama_dir, [suite], out, samples=2, seed=3, progress=False)
    sec = report.data["suites"][0]
    assert len(sec["results"][llama_dir]["raw"]["items"]) == 10
    with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
        md = f.read()
    assert "2 samples per group and prompt (seeds 3..4" in md and "01-tiny-counterfactual.png" in md
    assert os.path.isfile(os.path.join(out, "01-tiny-counterfactual.png"))
    # no suites named: the masked LM runs the scoring probes and skips generation, saying why
    report = run_audit(mlm_dir, None, limit=1, progress=False)
    names = [s["suite"]["name"] for s in report.data["suites"]]
    assert names == ["occupations", "paired-sentences", "counterfactual"]
    cf = report.data["suites"][2]
    assert cf["results"] == {} and cf["skipped"][0]["model"] == mlm_dir
    assert "causal language model that generates text" in cf["skipped"][0]["reason"]
    assert report.data["suites"][0]["suite"]["items_used"] == {"used": 1, "available": 44}


def test_errors_name_what_was_wrong(llama_dir, mlm_dir, tmp_path):
    import tiny_encoders

    with pytest.raises(AuditError, match="unknown suite 'nope': the known suites are occupations"):
        run_audit(llama_dir, ["nope"], progress=False)
    with pytest.raises(AuditError) as e:
        run_audit("no-such-model", ["occupations"], progress=False)
    assert "unknown model 'no-such-model'" in str(e.value) and "smollm2-135m-instruct" in str(e.value)
    base = tiny_encoders.tiny_encoder_dir("bert", "base")
    with pytest.raises(AuditError) as e:
        run_audit(base, ["occupations"], progress=False)
    msg = str(e.value)
    assert f"model {base!r} cannot run the 'occupations' probe" in msg
    assert "masked language model with its prediction head" in msg
    assert "encoder without a masked-language-model head" in msg
    with pytest.raises(AuditError) as e:
        run_audit(mlm_dir, ["counterfactual"], progress=False)
    assert (
        "cannot run the 'counterfactual' probe: the probe needs a causal language model that generates"
        in str(e.value)
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PAIRS[0]) + "\n" + '{"id": "x", "category": "g", "stereotypical": "a"}\n')
    with pytest.raises(AuditError, match=r"bad.jsonl, line 2: field 'anti_stereotypical' is missing"):
        run_audit(llama_dir, [str(bad)], progress=False)
    with pytest.raises(AuditError, match="samples must be an integer >= 1, got 0"):
        run_audit(llama_dir, ["counterfactual"], samples=0, progress=False)
    with pytest.raises(AuditError, match="limit must be an integer >= 1 or None, got -2"):
        run_audit(llama_dir, ["occupations"], limit=-2, progress=False)
    with pytest.raises(AuditError, match="a model is named twice"):
        run_audit([llama_dir, llama_dir], ["occupations"], progress=False)
    with pytest.raises(
        AuditError, match=f"classifier {llama_dir!r} cannot be loaded as a text-classification"
    ):
        run_audit(llama_dir, ["counterfactual"], classifier=llama_dir, progress=False)


def test_an_unwritable_out_dir_fails_before_any_model_loads(tmp_path, monkeypatch):
    import tokenmill.audit.models as audit_models

    def never(*a, **k):
        raise AssertionError("a model was loaded before the output directory was checked")

    monkeypatch.setattr(audit_models, "open_model", never)
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    with pytest.raises(AuditError, match=r"cannot write the report into --out '.*taken': "):
        run_audit("any-model", ["occupations"], str(a_file), progress=False)
    with pytest.raises(AuditError, match=r"cannot write the report into --out '.*taken/sub': "):
        run_audit("any-model", ["occupations"], str(a_file / "sub"), progress=False)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "tokenmill.cli.main", "audit", "bias", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_command_line(llama_dir, tmp_path):
    out = tmp_path / "cli"
    suite = write_suite(tmp_path, PAIRS)
    res = _cli(
        "--model", llama_dir, "--suite", suite, "--suite", "occupations", "--limit", "1", "--out", str(out)
    )
    assert res.returncode == 0, res.stderr
    assert "tiny-pairs / " in res.stdout and "pairs" in res.stdout and "report: " in res.stdout
    assert "occupations / " in res.stdout and "leans to the stereotype" in res.stdout
    assert "item/s" in res.stderr or "it/s" in res.stderr  # the progress bar, on stderr
    assert {"report.json", "report.md", "01-tiny-pairs.png", "02-occupations.png"} <= set(os.listdir(out))
    res = _cli("--model", llama_dir, "--suite", "ocupations", "--out", str(out))
    assert res.returncode == 2
    assert "tokenmill audit: error: unknown suite 'ocupations'" in res.stderr
