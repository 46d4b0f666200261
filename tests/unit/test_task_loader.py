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
    assert "classifier.weight" in msg and "fine-tuned for this task" in msg


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
