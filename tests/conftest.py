import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny.py

# Two threads, as on the machines the suite is written for; keeps timings comparable.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def llama_dir(tiny_root):
    """A complete tiny Llama model directory (config, safetensors, tokenizer, chat template)."""
    import tiny

    return tiny.save_tiny_dir("llama", tiny_root)


@pytest.fixture(scope="session")
def llm(llama_dir):
    from tokenmill import LLM

    return LLM(llama_dir, dtype="float32")


@pytest.fixture(scope="session")
def hf(llama_dir):
    """transformers' model from the same directory: the reference."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
