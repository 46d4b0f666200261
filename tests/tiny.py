"""Tiny random models built by transformers, shared by the parity and engine tests."""

from __future__ import annotations

import os

import torch

VOCAB = 512

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def hf_config(arch: str):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**COMMON, rms_norm_eps=1e-5)
    if arch == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        return tf.LlamaConfig(**{**COMMON, "tie_word_embeddings": True}, rope_parameters=rope)
    if arch == "mistral":
        return tf.MistralConfig(**COMMON, sliding_window=16)
    if arch == "qwen2":
        return tf.Qwen2Config(**COMMON)
    if arch == "qwen3":
        return tf.Qwen3Config(**COMMON, head_dim=32)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(
            **{**COMMON, "num_hidden_layers": 3, "tie_word_embeddings": True},
            head_dim=32,
            sliding_window=12,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=24,
        )
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    raise KeyError(arch)


ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma3", "gpt2"]


def hf_model(arch: str, seed: int = 0, dtype=torch.float32):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = hf_config(arch)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    # Random init leaves small logits; widen them so greedy decoding is not decided by noise.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def native_from_hf(hf, dtype=torch.float32):
    """Our model built from the HF model's config and filled from its state dict."""
    from tokenmill.models.registry import family_for
    from tokenmill.weights.loader import load_weights

    hf_dict = hf.config.to_dict()
    family = family_for(hf_dict["model_type"], "test")
    cfg = family.from_hf(hf_dict)
    model = family.build(cfg).to(dtype).eval()
    load_weights(
        model,
        hf.state_dict().items(),
        source="test",
        ignore=lambda n: n.endswith(".attn.bias") or n.endswith(".attn.masked_bias"),
    )
    return model


def dequantized_copy(original, quantized):
    """``original`` with each linear weight replaced by the quantized layer's dequantized
    weight: the reference a quantized model is compared with."""
    import copy

    from torch import nn

    from tokenmill.layers.quantized import Int4Linear, Int8Linear

    ref = copy.deepcopy(original)
    for name, q in quantized.named_modules():
        if isinstance(q, (Int8Linear, Int4Linear)):
            lin = ref.get_submodule(name)
            w = q.dequantized_weight().to(device=lin.weight.device, dtype=lin.weight.dtype)
            lin.weight = nn.Parameter(w.t().contiguous() if getattr(lin, "weight_is_in_out", False) else w)
    return ref


def train_tokenizer(path: str, vocab_size: int = VOCAB) -> None:
    """A byte-level BPE tokenizer trained on a little text, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = [
        "The capital of France is Paris. The capital of Italy is Rome.",
        "Hello world! café naïve 中文 日本語 😀 👍🏽 code: def f(x):\n    return x * 2",
    ] * 20
    tok.train_from_iterator(text, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(path)


def save_tiny_dir(arch: str, root: str, seed: int = 0, generation_config: dict | None = None) -> str:
    """A complete model directory (config, safetensors, tokenizer) for ``arch``."""
    import json

    d = os.path.join(root, arch)
    model = hf_model(arch, seed)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 0, 1, 2
    model.save_pretrained(d)
    train_tokenizer(os.path.join(d, "tokenizer.json"))
    chat = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": chat}, f)
    gen_path = os.path.join(d, "generation_config.json")
    if generation_config is not None:
        with open(gen_path, "w") as f:
            json.dump(generation_config, f)
    elif os.path.exists(gen_path):
        os.remove(gen_path)
    return d
