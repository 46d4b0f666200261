"""Tiny random ViT models saved as model directories, and test images.

Each directory holds what a Hub snapshot of an image classifier holds: config.json (with
the labels), model.safetensors and preprocessor_config.json (written by transformers'
``ViTImageProcessor.save_pretrained``), so ``transformers.pipeline("image-classification",
model=dir)`` and tokenmill both load it. Images are 32x32, cut into 8x8 patches: 16
patches and a [CLS] token.

    tiny_vit_dir()                      # 7 animal labels, bilinear resize
    tiny_vit_dir(labels="multi-label")  # problem_type multi_label_classification
    tiny_vit_dir(head="base")           # a bare ViTModel (with pooler), no classifier
    sample_images()                     # name -> PIL image: non-square, grayscale, RGBA, ...
"""

from __future__ import annotations

import functools
import os
import tempfile

import numpy as np
import torch

IMAGE_SIZE = 32
PATCH_SIZE = 8

LABEL_SETS: dict[str, dict[int, str]] = {
    "animals": {0: "cat", 1: "dog", 2: "bird", 3: "fish", 4: "horse", 5: "sheep", 6: "cow"},
    "binary": {0: "indoor", 1: "outdoor"},
    "multi-label": {0: "sky", 1: "water", 2: "grass", 3: "road"},
    "regression": {0: "LABEL_0"},
    "one-label": {0: "hotdog"},
}
_PROBLEM_TYPES = {"multi-label": "multi_label_classification", "regression": "regression"}
#: not ViT's 0.5/0.5 default, so a channel mix-up would show
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@functools.cache
def _root() -> tempfile.TemporaryDirectory:
    # removed when the process exits (the object's finalizer)
    return tempfile.TemporaryDirectory(prefix="tokenmill-tiny-vit-")


def hf_config(labels: str = "animals", **overrides):
    """The transformers ViTConfig of a tiny model with ``labels`` (a LABEL_SETS name)."""
    import transformers

    id2label = LABEL_SETS[labels]
    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        problem_type=_PROBLEM_TYPES.get(labels),
        # wider than the default 0.02 so scores and top-k orders are not decided by float noise
        initializer_range=0.2,
    )
    kwargs.update(overrides)
    return transformers.ViTConfig(**kwargs)


def _pil_processor_class():
    # transformers 5 defaults to a torchvision backend where torchvision is installed; its
    # resize is not Pillow's. The Pillow backend is the reference tokenmill matches.
    import transformers

    return getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor


def hf_processor(**overrides):
    """transformers' ViT image processor (its Pillow backend) for the tiny models."""
    kwargs = dict(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=2,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    kwargs.update(overrides)
    return _pil_processor_class()(**kwargs)


def hf_processor_from(path: str):
    """transformers' Pillow-backed ViT image processor read from a model directory."""
    return _pil_processor_class().from_pretrained(path)


def hf_pipeline(path: str):
    """transformers' image-classification pipeline on ``path`` with the Pillow-backed processor."""
    import transformers

    return transformers.pipeline(
        "image-classification",
        model=path,
        image_processor=hf_processor_from(path),
        dtype=torch.float32,
        device="cpu",
    )


@functools.cache
def tiny_vit_dir(
    head: str = "image-classification",
    labels: str = "animals",
    resample: int = 2,
    seed: int = 0,
    qkv_bias: bool = True,
) -> str:
    """Build, save and return the directory of a tiny random ViT.

    Args:
        head: "image-classification" (ViTForImageClassification) or "base" (ViTModel).
        labels: a LABEL_SETS name (classification only).
        resample: the processor's Pillow filter (2 bilinear, 3 bicubic).
    """
    import transformers

    name = f"vit-{head}-{labels}-r{resample}-s{seed}" + ("" if qkv_bias else "-nobias")
    path = os.path.join(_root().name, name)
    torch.manual_seed(seed)
    cls = transformers.ViTForImageClassification if head == "image-classification" else transformers.ViTModel
    model = cls(hf_config(labels, qkv_bias=qkv_bias)).eval()
    model.save_pretrained(path)
    hf_processor(resample=resample).save_pretrained(path)
    return path


def tiny_hf_model(head: str = "image-classification", labels: str = "animals", **kw):
    """transformers' model from the same directory: the reference."""
    import transformers

    cls = transformers.ViTForImageClassification if head == "image-classification" else transformers.ViTModel
    return cls.from_pretrained(tiny_vit_dir(head, labels, **kw), dtype=torch.float32).eval()


def _pattern(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth picture with some noise: gradients and a disc, (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    cy, cx, r = height * rng.uniform(0.3, 0.7), width * rng.uniform(0.3, 0.7), min(height, width) / 3
    disc = ((y - cy) ** 2 + (x - cx) ** 2 < r**2).astype(np.float32)
    img = np.stack(
        [255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), 200 * disc + 30], axis=-1
    ) + rng.normal(0, 20, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def sample_images() -> dict[str, object]:
    """Name -> PIL image of several kinds (sizes are width x height, as PIL gives them)."""
    from PIL import Image

    rgba = _pattern(45, 60, 4)
    alpha = np.linspace(0, 255, 60, dtype=np.uint8)[None, :].repeat(45, axis=0)
    return {
        "rgb-landscape-64x48": Image.fromarray(_pattern(48, 64, 1)),
        "rgb-portrait-29x71": Image.fromarray(_pattern(71, 29, 2)),
        "rgb-large-300x200": Image.fromarray(_pattern(200, 300, 3)),
        "rgb-exact-32x32": Image.fromarray(_pattern(32, 32, 5)),
        "rgb-small-5x3": Image.fromarray(_pattern(3, 5, 6)),
        "grayscale-40x50": Image.fromarray(_pattern(50, 40, 7)[:, :, 0], "L"),
        "rgba-60x45": Image.fromarray(np.dstack([rgba, alpha]), "RGBA"),
        "palette-33x33": Image.fromarray(_pattern(33, 33, 8)).convert("P"),
    }
