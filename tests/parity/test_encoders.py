"""Native BERT, DistilBERT, RoBERTa and XLM-RoBERTa against transformers, head by head.

Tiny random models (tests/tiny_encoders.py) run a right-padded batch of mixed lengths;
every output must match transformers within 1e-4 (fp32) on the unpadded positions. The
packaged all-MiniLM-L6-v2 checks the same on real weights.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from tiny_encoders import (
    FAMILIES,
    HEADS,
    hf_class,
    minilm_dir,
    tiny_encoder_dir,
    tiny_hf_model,
    tiny_tokenizer,
)
from tokenmill.models.bert import bert_config_from_hf
from tokenmill.models.distilbert import distilbert_config_from_hf
from tokenmill.models.roberta import roberta_config_from_hf
from tokenmill.models.task_registry import TASK_FAMILIES
from tokenmill.weights.loader import load_weights
from tokenmill.weights.safetensors_dir import iter_safetensors

ATOL = 1e-4
TEXTS = [
    "The keeper lit the lamp.",
    "A storm came in from the west, and every ship ran for the harbour before dark.",
    "Light.",
]
# BERT reads sentence pairs with segment ids; pairs make token_type_ids matter.
SECONDS = ["Who lit it?", "Where did the ships go?", "What?"]


def _config(path: str) -> dict:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def native(family: str, head: str, labels: str | None = None, dtype: torch.dtype = torch.float32):
    """tokenmill's model for the tiny directory, loaded strictly from its safetensors file."""
    path = tiny_encoder_dir(family, head, labels)
    fam = TASK_FAMILIES[family]
    model = fam.model_class(head)(fam.config(_config(path)))
    load_weights(model, iter_safetensors(path), source=path)
    return model.to(dtype).eval()


def batch(family: str) -> dict[str, torch.Tensor]:
    tok = tiny_tokenizer(family)
    enc = (
        tok(TEXTS, SECONDS, padding=True, return_tensors="pt")
        if family == "bert"
        else tok(TEXTS, padding=True, return_tensors="pt")
    )
    assert enc["attention_mask"].sum(1).unique().numel() == len(TEXTS), "lengths must differ"
    return dict(enc)


def run_native(model, enc: dict[str, torch.Tensor]):
    with torch.no_grad():
        return model(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))


def reference(hf, head: str, enc: dict[str, torch.Tensor]):
    with torch.no_grad():
        out = hf(**enc)
    if head == "base":
        return out.last_hidden_state
    if head == "question-answering":
        return out.start_logits, out.end_logits
    return out.logits


def assert_close(ours, ref, keep: torch.Tensor, atol: float = ATOL) -> None:
    """Compare on unpadded positions (per-token outputs) or whole rows (per-sequence)."""
    if isinstance(ref, tuple):
        for a, b in zip(ours, ref):
            assert_close(a, b, keep, atol)
        return
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    if ref.dim() >= 2 and ref.shape[:2] == keep.shape:
        ours, ref = ours[keep], ref[keep]
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_parity_fp32(family, head):
    enc = batch(family)
    ours = run_native(native(family, head), enc)
    ref = reference(tiny_hf_model(family, head), head, enc)
    assert_close(ours, ref, enc["attention_mask"].bool())


@pytest.mark.parametrize("labels", ["nli", "multi-label", "regression", "binary"])
def test_parity_label_sets(labels):
    enc = batch("bert")
    ours = run_native(native("bert", "sequence-classification", labels), enc)
    ref = reference(tiny_hf_model("bert", "sequence-classification", labels), "sequence-classification", enc)
    assert ours.shape[1] == len(
        _config(tiny_encoder_dir("bert", "sequence-classification", labels))["id2label"]
    )
    assert_close(ours, ref, enc["attention_mask"].bool())


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_lm_loads_from_state_dict_with_every_tied_name(family):
    # state_dict() names the tied decoder weight and bias too; the one shared parameter takes them all
    hf = tiny_hf_model(family, "masked-lm")
    fam = TASK_FAMILIES[family]
    model = fam.model_class("masked-lm")(fam.config(hf.config.to_dict()))
    load_weights(model, hf.state_dict().items(), source="state_dict")
    enc = batch(family)
    assert_close(run_native(model.eval(), enc), reference(hf, "masked-lm", enc), enc["attention_mask"].bool())


def test_masked_lm_from_a_pretraining_checkpoint():
    """bert-base-uncased is saved from BertForPreTraining: a pooler and a next-sentence head that
    BertForMaskedLM has no place for, skipped by the patterns the class declares."""
    import transformers

    hf_cfg = tiny_hf_model("bert", "masked-lm").config
    torch.manual_seed(0)
    pre = transformers.BertForPreTraining(hf_cfg).eval()
    model = TASK_FAMILIES["bert"].model_class("masked-lm")(bert_config_from_hf(hf_cfg.to_dict()))
    report = load_weights(
        model,
        pre.state_dict().items(),
        source="pretraining",
        ignore=lambda n: any(re.search(p, n) for p in model.ignore_on_load),
    )
    assert sorted(report.ignored) == [
        "bert.pooler.dense.bias",
        "bert.pooler.dense.weight",
        "cls.seq_relationship.bias",
        "cls.seq_relationship.weight",
    ]
    enc = batch("bert")
    with torch.no_grad():
        ref = pre(**enc).prediction_logits
    assert_close(run_native(model.eval(), enc), ref, enc["attention_mask"].bool())


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_lm_tied_decoder_is_one_parameter(family):
    model = native(family, "masked-lm")
    params = dict(model.named_parameters(remove_duplicate=False))
    decoder = {
        "bert": "cls.predictions.decoder",
        "distilbert": "vocab_projector",
        "roberta": "lm_head.decoder",
        "xlm-roberta": "lm_head.decoder",
    }[family]
    prefix = TASK_FAMILIES[family].base_model_prefix
    assert params[f"{decoder}.weight"] is params[f"{prefix}.embeddings.word_embeddings.weight"]
    if family != "distilbert":
        head = decoder.rsplit(".", 1)[0]
        assert params[f"{decoder}.bias"] is params[f"{head}.bias"]


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_lm_select_rows(family):
    model, enc = native(family, "masked-lm"), batch(family)
    full = run_native(model, enc)  # (B, T, V)
    mask = enc["input_ids"] == tiny_tokenizer(family).convert_tokens_to_ids(tiny_tokenizer(family).sep_token)
    with torch.no_grad():
        picked = model(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"), select=mask)
        flat = model(
            enc["input_ids"],
            enc["attention_mask"],
            enc.get("token_type_ids"),
            select=mask.flatten().nonzero()[:, 0],
        )
    assert picked.shape == (int(mask.sum()), full.shape[-1])
    torch.testing.assert_close(picked, full[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(flat, full[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", ["masked-lm", "sequence-classification", "question-answering"])
def test_bf16_smoke(family, head):
    enc = batch(family)
    keep = enc["attention_mask"].bool()
    ref = run_native(native(family, head), enc)
    out = run_native(native(family, head, dtype=torch.bfloat16), enc)
    for a, b in zip(out, ref) if isinstance(ref, tuple) else [(out, ref)]:
        assert a.dtype == torch.bfloat16 and a.shape == b.shape
        a, b = (a[keep], b[keep]) if b.shape[:2] == keep.shape else (a, b)
        assert torch.isfinite(a).all()
        # bf16 keeps ~3 significant digits; after two layers the logits stay within a few percent
        assert (a.float() - b).abs().max() <= 0.05 * (1 + b.abs().max())


@pytest.mark.parametrize("family", ["roberta", "xlm-roberta"])
def test_roberta_positions_skip_padding(family):
    from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

    model, enc = native(family, "base"), batch(family)
    ids = enc["input_ids"]
    ours = model.embeddings.position_ids(ids).expand_as(ids)
    assert torch.equal(ours, RobertaEmbeddings.create_position_ids_from_input_ids(ids, padding_idx=1))
    assert ours[:, 0].tolist() == [2, 2, 2]  # the first token sits at padding_idx + 1


def test_minilm_real_weights():
    """The packaged all-MiniLM-L6-v2 (a BertModel checkpoint) against transformers' AutoModel."""
    import transformers

    path = minilm_dir()
    model = TASK_FAMILIES["bert"].model_class("base")(bert_config_from_hf(_config(path)))
    # the checkpoint keeps the position_ids buffer older transformers saved; the class names it
    report = load_weights(
        model,
        iter_safetensors(path),
        source=path,
        ignore=lambda n: any(re.search(p, n) for p in model.ignore_on_load),
    )
    assert report.ignored == ["embeddings.position_ids"]
    hf = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    enc = dict(tok(TEXTS + ["Lighthouses warned ships away from rocks."], padding=True, return_tensors="pt"))
    ours = run_native(model.eval(), enc)
    assert_close(ours, reference(hf, "base", enc), enc["attention_mask"].bool())


# -- configs and inputs a user can get wrong ---------------------------------------------


def test_input_longer_than_positions_names_the_limit():
    model = native("bert", "base")
    ids = torch.full((1, 65), 1000)
    with pytest.raises(
        ValueError, match="input of 65 tokens is longer than the model's maximum of 64 positions"
    ):
        model(ids)


def test_roberta_max_input_length_counts_the_position_offset():
    cfg = roberta_config_from_hf(_config(tiny_encoder_dir("roberta", "base")))
    assert (cfg.max_position_embeddings, cfg.position_offset, cfg.max_input_length) == (66, 2, 64)
    model = native("roberta", "base")
    model(torch.full((1, 64), 10))  # the longest input fits
    with pytest.raises(ValueError, match="maximum of 64 positions"):
        model(torch.full((1, 65), 10))


def test_config_labels_read_as_transformers_does():
    cfg = bert_config_from_hf(_config(tiny_encoder_dir("bert", "sequence-classification", "nli")))
    assert cfg.id2label == {0: "contradiction", 1: "neutral", 2: "entailment"}
    assert cfg.label2id == {"contradiction": 0, "neutral": 1, "entailment": 2}
    assert cfg.num_labels == 3 and cfg.problem_type is None
    multi = bert_config_from_hf(_config(tiny_encoder_dir("bert", "sequence-classification", "multi-label")))
    assert multi.problem_type == "multi_label_classification"
    bare = bert_config_from_hf({"model_type": "bert", "num_labels": 4})
    assert bare.id2label == {i: f"LABEL_{i}" for i in range(4)} and bare.label2id["LABEL_3"] == 3
    dist = distilbert_config_from_hf(_config(tiny_encoder_dir("distilbert", "token-classification")))
    assert dist.type_vocab_size == 0 and dist.id2label[1] == "B-PER" and dist.max_input_length == 64


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": 30}, "hidden_size \\(30\\) must be a multiple of num_attention_heads \\(4\\)"),
        ({"num_hidden_layers": 0}, "num_layers must be a positive integer, got 0"),
        ({"problem_type": "ranking"}, "problem_type must be one of"),
        ({"id2label": {"0": "a", "2": "b"}}, "id2label must map the ids 0..n-1"),
        ({"id2label": {"x": "a"}}, "id2label must have integer keys"),
        ({"hidden_act": "swiglu"}, "hidden_act must be one of"),
        ({"pad_token_id": 5000}, "pad_token_id must be in \\[0, 1000\\)"),
        (
            {"position_embedding_type": "relative_key"},
            "position_embedding_type='relative_key' is not supported",
        ),
        ({"is_decoder": True}, "is_decoder=true is not supported"),
        ({"layer_norm_eps": 0}, "layer_norm_eps must be > 0"),
    ],
)
def test_config_validation_names_the_field(change, message):
    hf = {"model_type": "bert", "vocab_size": 1000, "hidden_size": 32, "num_attention_heads": 4, **change}
    with pytest.raises(ValueError, match=message):
        bert_config_from_hf(hf)


def test_roberta_config_needs_a_pad_token():
    with pytest.raises(ValueError, match="pad_token_id must be set"):
        roberta_config_from_hf({"model_type": "roberta", "pad_token_id": None})


def test_hf_classes_exist_for_every_family_and_head():
    for family in FAMILIES:
        for head in HEADS:
            assert hf_class(family, head).__name__.endswith(("Model", "LM", "Classification", "Answering"))


# -- through weights.task_loader, as the pipelines load them ------------------------------


def _task_loader():
    return pytest.importorskip("tokenmill.weights.task_loader")


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_load_task_model_each_head(family, head):
    loaded = _task_loader().load_task_model(tiny_encoder_dir(family, head), head)
    assert loaded.head == head and loaded.family is TASK_FAMILIES[family]
    assert type(loaded.model).__name__ == TASK_FAMILIES[family].classes[head]
    assert loaded.dtype == torch.float32 and not loaded.model.training
    enc = batch(family)
    assert_close(
        run_native(loaded.model, enc),
        reference(tiny_hf_model(family, head), head, enc),
        enc["attention_mask"].bool(),
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenmill_tokenizer_reads_the_tiny_tokenizers(family):
    loaded = _task_loader().load_task_model(tiny_encoder_dir(family, "masked-lm"), "masked-lm")
    tok = tiny_tokenizer(family)
    for text in TEXTS + [f"The keeper lit the {tok.mask_token} every night."]:
        assert loaded.tokenizer.encode(text) == tok(text)["input_ids"]
    assert loaded.tokenizer.mask_token == tok.mask_token
    assert loaded.tokenizer.model_max_length == loaded.config.max_input_length == 64


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_lm_from_a_base_checkpoint_names_the_missing_head(family):
    tl = _task_loader()
    path = tiny_encoder_dir(family, "base")
    with pytest.raises(
        tl.MissingHeadError, match="has no weights for a masked-language-model head \\(fill-mask\\)"
    ) as e:
        tl.load_task_model(path, "masked-lm")
    assert path in str(e.value) and "use a checkpoint saved with this head" in str(e.value)


@pytest.mark.parametrize("head", ["sequence-classification", "token-classification", "question-answering"])
@pytest.mark.parametrize("family", FAMILIES)
def test_task_heads_from_a_base_checkpoint_raise_missing_head(family, head):
    tl = _task_loader()
    purpose = {
        "sequence-classification": "a sequence classification head",
        "token-classification": "a token classification head",
        "question-answering": "a span prediction head",
    }[head]
    with pytest.raises(tl.MissingHeadError, match=purpose):
        tl.load_task_model(tiny_encoder_dir(family, "base"), head)


@pytest.mark.parametrize("family", ["distilbert", "bert"])
def test_question_answering_from_a_classifier_checkpoint_raises_missing_head(family):
    tl = _task_loader()
    with pytest.raises(tl.MissingHeadError, match="a span prediction head"):
        tl.load_task_model(tiny_encoder_dir(family, "sequence-classification"), "question-answering")


def _base_of(family: str, head: str, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    hf = tiny_hf_model(family, head)
    base = getattr(hf, hf.base_model_prefix)
    with torch.no_grad():
        return base(**enc).last_hidden_state


# BERT-style base models carry a pooler (as transformers builds BertModel); head checkpoints
# other than BERT's sequence classifier have none, so the loader drops it for "base".
@pytest.mark.parametrize(
    "head", ["masked-lm", "sequence-classification", "token-classification", "question-answering"]
)
@pytest.mark.parametrize("family", FAMILIES)
def test_base_from_a_head_checkpoint(family, head):
    loaded = _task_loader().load_task_model(tiny_encoder_dir(family, head), "base")
    enc = batch(family)
    assert_close(run_native(loaded.model, enc), _base_of(family, head, enc), enc["attention_mask"].bool())


def test_load_task_model_minilm_real_checkpoint():
    loaded = _task_loader().load_task_model(minilm_dir(), "base")
    assert "embeddings.position_ids" in loaded.report.ignored
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    enc = dict(tok(TEXTS, padding=True, return_tensors="pt"))
    hf = transformers.AutoModel.from_pretrained(minilm_dir(), dtype=torch.float32).eval()
    assert_close(run_native(loaded.model, enc), reference(hf, "base", enc), enc["attention_mask"].bool())


def test_tokenmill_tokenizer_minilm_has_no_fixed_padding():
    import transformers

    loaded = _task_loader().load_task_model(minilm_dir(), "base")
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    assert loaded.tokenizer.encode("hello world") == tok("hello world")["input_ids"]


def test_load_task_model_legacy_gamma_beta_names(tmp_path):
    import shutil

    from safetensors.torch import save_file

    src = tiny_encoder_dir("bert", "masked-lm")
    for name in os.listdir(src):
        if name != "model.safetensors":
            shutil.copy(os.path.join(src, name), tmp_path / name)
    renamed = {
        n.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ): t.contiguous()
        for n, t in iter_safetensors(src)
    }
    save_file(renamed, str(tmp_path / "model.safetensors"))
    loaded = _task_loader().load_task_model(str(tmp_path), "masked-lm")
    enc = batch("bert")
    ref = reference(tiny_hf_model("bert", "masked-lm"), "masked-lm", enc)
    assert_close(run_native(loaded.model, enc), ref, enc["attention_mask"].bool())
