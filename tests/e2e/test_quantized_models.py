"""Quantized SmolLM2-135M-Instruct (the packaged Q4_1 GGUF) against its bf16 self.

Perplexity is measured on the first 2,048 tokens of the shipped essay (of about 3,500),
windows of 1,024 advancing by 512, to keep each test near 10-30 s of CPU on two cores.
Acceptance: int8 (and w8a8, int8 weights with int8 activations) within 2% of bf16, int4
(and w4a8) within 6%, "gguf" (each matrix at the precision its file stores it in) within 2%.
"""

from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.eval.perplexity import perplexity
from tokenmill.layers.quantized import Int4Linear, Int8Linear
from tokenmill.weights.model_loader import load_model

pytestmark = [pytest.mark.real, pytest.mark.slow]

NAME = "smollm2-135m-instruct"
PPL = dict(max_tokens=2048, window=1024, stride=512)


def _installed(name: str = NAME) -> None:
    from tokenmill.weights.packaged import PACKAGED

    if not PACKAGED[name].is_installed():
        pytest.skip(f"{name} is not installed ({PACKAGED[name].install})")


def _within_bf16_rounding_of_its_blocks(module: Int4Linear, ref: torch.Tensor) -> bool:
    """Half a bf16 step of the scale (times the largest |q - 8|) and of the zero point."""
    sz = module.scales_and_zeros.float()
    s = sz[..., 0].t().repeat_interleave(32, 1)
    z = sz[..., 1].t().repeat_interleave(32, 1)
    return bool(((module.dequantized_weight() - ref).abs() <= (8 * s.abs() + z.abs()) * 2**-8 + 1e-7).all())


@pytest.fixture(scope="module")
def bf16_ppl() -> float:
    _installed()
    return perplexity(load_model(NAME, dtype="bfloat16", device="cpu"), **PPL).perplexity


@pytest.mark.parametrize(
    "mode,limit", [("int8", 0.02), ("w8a8", 0.02), ("int4", 0.06), ("w4a8", 0.06), ("gguf", 0.02)]
)
def test_quantized_perplexity_is_close_to_bf16(bf16_ppl, mode, limit):
    loaded = load_model(NAME, dtype="bfloat16", device="cpu", quantization=mode)
    assert loaded.quantization.fallback == {}  # every SmolLM2 layer runs a packed kernel
    r = perplexity(loaded, **PPL)
    assert r.tokens == 2047
    assert bf16_ppl < 40  # the model reads the essay as English
    assert abs(r.perplexity / bf16_ppl - 1) < limit, (mode, r.perplexity, bf16_ppl)


def test_int4_layers_come_from_the_q4_1_blocks():
    """Every transformer layer's int4 weights are the GGUF Q4_1 blocks themselves, within the
    rounding of their scales and zero points to bf16; only the LM head, tied to the Q8_0
    embedding, is quantized from floats."""
    _installed()
    from tokenmill.models.llama import _unpermute_qk
    from tokenmill.weights.gguf_file import GGUFFile

    loaded = load_model(NAME, dtype="bfloat16", device="cpu", quantization="int4")
    report = loaded.quantization
    assert len(report.layers) == 30 * 4 + 1
    assert set(report.layers) - set(report.from_source) == {"lm_head"}
    f, cfg = GGUFFile(loaded.source), loaded.config
    layer = loaded.model.model.layers[29]
    refs = {
        layer.self_attn.qkv_proj: torch.cat(
            [
                _unpermute_qk(f.tensor("blk.29.attn_q.weight"), cfg.num_heads),
                _unpermute_qk(f.tensor("blk.29.attn_k.weight"), cfg.num_kv_heads),
                f.tensor("blk.29.attn_v.weight"),
            ]
        ),
        layer.mlp.down_proj: f.tensor("blk.29.ffn_down.weight"),
    }
    for module, ref in refs.items():
        assert isinstance(module, Int4Linear) and module.kernel in (
            "_weight_int4pack_mm_for_cpu",
            "tokenmill.int4_mm",
        )
        assert _within_bf16_rounding_of_its_blocks(module, ref)


def test_gemma3_int4_layers_come_from_its_q4_k_blocks():
    """The packaged Gemma 3 file stores every attention output and half the MLP down
    projections as Q4_K: those become int4 layers from their own codes; the Q5_0, Q6_K and
    Q8_0 matrices are quantized from floats."""
    _installed("gemma3-270m")
    from tokenmill.weights.gguf_file import GGUFFile

    loaded = load_model("gemma3-270m", dtype="bfloat16", device="cpu", quantization="int4")
    f = GGUFFile(loaded.source)
    q4k = {n for n in f.tensor_info if n.startswith("blk.") and f.qtype_name(n) == "Q4_K"}
    assert len(q4k) == 18 + 9
    expected = {
        "model.layers.{}.{}".format(
            n.split(".")[1], "self_attn.o_proj" if "attn_output" in n else "mlp.down_proj"
        )
        for n in q4k
    }
    assert set(loaded.quantization.from_source) == expected
    for n in sorted(q4k)[:4] + sorted(q4k)[-4:]:
        i = int(n.split(".")[1])
        layer = loaded.model.model.layers[i]
        module = layer.self_attn.o_proj if "attn_output" in n else layer.mlp.down_proj
        assert isinstance(module, Int4Linear) and module.group_size == 32
        assert _within_bf16_rounding_of_its_blocks(module, f.tensor(n)), n


@pytest.mark.parametrize("mode", ["int8", "w8a8", "int4", "w4a8", "gguf"])
def test_quantized_smollm2_still_knows_paris(mode):
    _installed()
    llm = LLM(NAME, dtype="bfloat16", quantization=mode)
    # "gguf": the head is tied to the Q8_0 embedding
    assert isinstance(
        llm.loaded.model.lm_head, Int8Linear if mode in ("int8", "w8a8", "gguf") else Int4Linear
    )
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=12))[0]
    assert "Paris" in out.outputs[0].text


def test_gemma3_gguf_mode_keeps_its_file_precision_and_quality():
    """Gemma 3's Q4_K_M file is mostly Q5_0 (its 640 inputs do not fill Q4_K's 256-blocks),
    which int4 rounds again at a 25% perplexity cost: "gguf" keeps those at int8 and the
    Q4_K matrices as their own 4-bit codes, within 2% of bf16."""
    _installed("gemma3-270m")
    from tokenmill.layers.quantized import a8_runs
    from tokenmill.weights.gguf_file import GGUFFile, weight_format

    loaded = load_model("gemma3-270m", dtype="bfloat16", device="cpu", quantization="gguf")
    report, f = loaded.quantization, GGUFFile(loaded.source)
    assert report.fallback == {} and report.kept == []
    four = {n for n, m in report.modes.items() if m in ("int4", "w4a8")}
    assert four == set(report.from_source) and len(four) == 18 + 9
    eight = "w8a8" if a8_runs("w8a8", torch.bfloat16, "cpu") else "int8"
    assert report.modes["lm_head"] == eight  # tied to the Q8_0 embedding
    for i in (0, 7, 17):  # q, k and v (Q5_0, Q8_0) fused: 8 bits; gate and up (Q5_0): 8 bits
        names = [f"blk.{i}.attn_{x}.weight" for x in "qkv"] + [
            f"blk.{i}.ffn_{x}.weight" for x in ("gate", "up")
        ]
        assert {weight_format(f.qtype_name(n)) for n in names} == {"int8"}
        assert report.modes[f"model.layers.{i}.self_attn.qkv_proj"] == eight
        assert report.modes[f"model.layers.{i}.mlp.gate_up_proj"] == eight
    ppl = perplexity(loaded, **PPL).perplexity
    ref = perplexity(load_model("gemma3-270m", dtype="bfloat16", device="cpu"), **PPL).perplexity
    assert ref < 60 and abs(ppl / ref - 1) < 0.02, (ppl, ref)
