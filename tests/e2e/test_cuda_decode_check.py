"""The prepared GPU check of issue 4 (benchmarks/cuda_decode_check.py) runs end to end.

No GPU here: ``--tiny`` on the CPU exercises every step of the script (correctness on the
device, copy bandwidth, the decode limit and the throughput comparison) so that it does
not rot before a machine with a GPU runs it at full size.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")


@pytest.fixture
def script(monkeypatch):
    monkeypatch.syspath_prepend(os.path.abspath(BENCH))
    import cuda_decode_check

    yield cuda_decode_check
    sys.modules.pop("cuda_decode_check", None)


def test_tiny_run_on_cpu_reports_every_figure(script, tmp_path):
    out = tmp_path / "result.json"
    r = script.run("cpu", rounds=1, tiny=True, copy_gib=0.05, out=str(out))
    assert "errors" not in r
    assert json.loads(out.read_text())["targets"] == r["targets"]
    assert all(v["greedy_32_equal"] and v["max_abs_logit_err"] < 1e-4 for v in r["correctness"].values())
    q = r["quantized"]
    assert set(q) == {"int8", "w8a8", "int4", "w4a8"}
    # the CPU is both devices here: the same engine, the same tokens
    assert all(v["within_4_bf16_steps"] and v["greedy_equal_to_cpu_up_to"] == 32 for v in q.values())
    # against the layers' own reference the kernels are within rounding; against the
    # float model with the dequantized weights, w4a8 and w8a8 also pay for their rounded activations
    assert all(v["max_logit_err_rel"] < 2**-6 and v["vs_dequantized_float_model"] < 2**-5 for v in q.values())
    assert q["w4a8"]["kernels"] == ["tokenmill.int4a8_mm"] or q["w4a8"]["fallback"]
    assert q["w8a8"]["kernels"] == ["tokenmill.int8a8_mm"] or q["w8a8"]["fallback"]
    assert r["copy_bandwidth_gb_s"] > 0.1
    m = r["llama_1b"]
    # the tiny model: 2 layers of 64 wide, a 512-token vocabulary, tied embeddings counted once
    assert m["params"] == 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 512 * 64 + 64
    assert m["weight_bytes_per_token"] == 2 * m["params"]
    assert m["decode_limit_tok_s"] == pytest.approx(
        r["copy_bandwidth_gb_s"] * 1e9 / m["weight_bytes_per_token"]
    )
    assert m["decode_b1_tok_s"] > 0 and m["decode_fraction_of_limit"] > 0
    assert m["tokenmill_tok_s_4"] > 0 and m["transformers_tok_s_4"] > 0
    assert m["throughput_ratio"] == pytest.approx(m["tokenmill_tok_s_4"] / m["transformers_tok_s_4"])
    # on the CPU there are no graphs: the eager run is the same path and gives the same tokens
    assert m["cuda_graphs"] is None and m["graphs_off_reason"] == "CUDA graphs need a CUDA device"
    assert m["decode_b1_eager_tok_s"] > 0 and m["greedy_tokens_match_eager"] is True
    # the same engine path on both sides here: identical
    assert m["padded_graphs_identical_sequences"] == "5/5" and m["padded_graphs_max_logprob_diff"] == 0.0
    assert set(r["targets"]) == {
        "decode_at_least_70pct_of_limit",
        "throughput_at_least_5x_transformers",
        "graphs_give_the_eager_tokens",
        "padded_graphs_agree_with_eager",
        "quantized_logits_within_4_bf16_steps",
        "architectures_match_transformers",
    }
    assert r["targets"]["quantized_logits_within_4_bf16_steps"]


def test_a_failing_part_is_recorded_and_the_others_still_run(script, monkeypatch, tmp_path):
    import cuda_check

    def broken(device):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(cuda_check, "correctness", broken)
    out = tmp_path / "result.json"
    r = script.run("cpu", rounds=1, tiny=True, copy_gib=0.05, out=str(out))
    assert list(r["errors"]) == ["correctness"]
    assert "no kernel image is available" in r["errors"]["correctness"]
    saved = json.loads(out.read_text())
    assert saved["errors"] == r["errors"] and "llama_1b" in saved and "quantized" in saved
    assert "architectures_match_transformers" not in r["targets"]
    assert r["targets"]["quantized_logits_within_4_bf16_steps"]
