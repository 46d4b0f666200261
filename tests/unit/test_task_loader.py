"""load_task_model: heads, prefixes and the messages for checkpoints without a head."""

import pytest

from tiny_encoders import minilm_dir, tiny_encoder_dir
from tokenmill.weights.errors import ModelLoadError
from tokenmill.weights.task_loader import MissingHeadError, load_task_model


def test_masked_lm_checkpoint_has_no_classifier():
    with pytest.raises(MissingHeadError) as e:
        load_task_model(tiny_encoder_dir("bert", "masked-lm"), "sequence-classification")
    msg = str(e.value)
    assert "has no weights for a sequence classification head (text-classification" in msg
    assert "classifier.weight" in msg and "use a checkpoint saved with this head" in msg


def test_minilm_has_no_masked_lm_head():
    with pytest.raises(MissingHeadError, match=r"masked-language-model head \(fill-mask\)"):
        load_task_model(minilm_dir(), "masked-lm")


def test_head_checkpoint_loads_as_base_without_its_head():
    loaded = load_task_model(tiny_encoder_dir("roberta", "token-classification"), "base")
    assert loaded.model.pooler is None  # the checkpoint has none; feature extraction never needs it
    assert any(name.startswith("classifier.") for name in loaded.report.ignored)


def test_unknown_head_and_family_without_it():
    with pytest.raises(ValueError, match="head must be one of base, masked-lm"):
        load_task_model(minilm_dir(), "classifier")


def test_missing_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json in"):
        load_task_model(str(tmp_path), "base")


def test_bad_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "wav2vec2"}')
    with pytest.raises(
        ModelLoadError, match="'wav2vec2' has no native encoder or encoder-decoder implementation"
    ):
        load_task_model(str(tmp_path), "base")


def test_untied_t5_head_is_loaded_as_its_own_matrix(tmp_path):
    """FLAN-T5-style checkpoints carry their own lm_head; transformers 5 still writes
    tie_word_embeddings=true in their config, so the loader must look at the tensors."""
    import json
    import shutil

    import torch
    import transformers

    import tiny_seq2seq

    src = tiny_seq2seq.t5_dir("gated-gelu")
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(src, dtype=torch.float32)
    cfg = hf.config
    cfg.tie_word_embeddings = False
    torch.manual_seed(3)
    untied = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # as in real FLAN-T5: both stacks read the shared embedding
        untied.encoder.embed_tokens.weight.copy_(untied.shared.weight)
        untied.decoder.embed_tokens.weight.copy_(untied.shared.weight)
    untied.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{src}/{name}", tmp_path / name)
    config = json.loads((tmp_path / "config.json").read_text())
    config["tie_word_embeddings"] = True  # what the config may say; the tensors decide
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_task_model(str(tmp_path), "seq2seq-lm")
    assert loaded.config.tie_word_embeddings is False
    ids = torch.tensor([[5, 6, 7, 1]])
    start = torch.tensor([[0, 8, 9]])
    with torch.no_grad():
        want = untied(input_ids=ids, decoder_input_ids=start).logits
        got = loaded.model(ids, torch.ones_like(ids), start)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
