"""Which native class runs which architecture, and how each reads its config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tokenmill.models.config import DecoderConfig


@dataclass(frozen=True)
class Family:
    build: Callable[[DecoderConfig], torch.nn.Module]
    from_hf: Callable[[dict[str, Any]], DecoderConfig]
    from_gguf: Callable[[dict[str, Any], set[str]], DecoderConfig] | None = None
    gguf_names: dict[str, str] | None = None
    gguf_transform: Callable[[DecoderConfig, str], Callable[[str, torch.Tensor], torch.Tensor]] | None = None


def _families() -> dict[str, Family]:
    from tokenmill.models import gemma3, gpt2, llama

    llama_family = Family(
        build=llama.LlamaForCausalLM,
        from_hf=llama.llama_config_from_hf,
        from_gguf=llama.llama_config_from_gguf,
        gguf_names=llama.GGUF_NAMES,
        gguf_transform=llama.llama_gguf_tensor_transform,
    )
    return {
        "llama": llama_family,
        "mistral": llama_family,
        "qwen2": llama_family,
        "qwen3": llama_family,
        "gemma3": Family(
            build=gemma3.Gemma3ForCausalLM,
            from_hf=gemma3.gemma3_config_from_hf,
            from_gguf=gemma3.gemma3_config_from_gguf,
            gguf_names=gemma3.GGUF_NAMES,
            gguf_transform=gemma3.gemma3_gguf_tensor_transform,
        ),
        "gemma3_text": Family(build=gemma3.Gemma3ForCausalLM, from_hf=gemma3.gemma3_config_from_hf),
        "gpt2": Family(
            build=gpt2.GPT2LMHeadModel,
            from_hf=gpt2.gpt2_config_from_hf,
            from_gguf=gpt2.gpt2_config_from_gguf,
            gguf_names=gpt2.GGUF_NAMES,
            gguf_transform=gpt2.gpt2_gguf_tensor_transform,
        ),
    }


def family_for(model_type: str, source: str) -> Family:
    families = _families()
    if model_type not in families:
        raise ValueError(
            f"{source}: architecture {model_type!r} is not supported; "
            f"tokenmill runs {', '.join(sorted(families))}"
        )
    return families[model_type]
