"""Tiny models shared by the audit tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def causal(llama_dir):
    from tokenmill.audit.models import open_model

    return open_model(llama_dir, generate=True)


@pytest.fixture(scope="session")
def mlm_dir():
    import tiny_encoders

    return tiny_encoders.tiny_encoder_dir("bert", "masked-lm")


@pytest.fixture(scope="session")
def masked(mlm_dir):
    from tokenmill.audit.models import open_model

    return open_model(mlm_dir, generate=False)


@pytest.fixture(scope="session")
def hf_mlm(mlm_dir):
    import transformers

    model = transformers.BertForMaskedLM.from_pretrained(mlm_dir, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(mlm_dir)
