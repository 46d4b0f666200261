"""The ViT image processor: resize, rescale, normalize, as the checkpoint's preprocessor_config.json says.

Equal to transformers' ``ViTImageProcessor`` (its Pillow backend, which transformers uses
where torchvision is not installed) within float32 rounding: the same Pillow resize, then
``uint8 * rescale_factor`` in float64 cast to float32, then ``(x - mean) / std`` in float32.

The work is split so a pipeline can batch it: ``resize`` turns one RGB image into a
(3, H, W) uint8 tensor (a quarter of the float32 size, kept until its batch runs) and
``to_pixel_values`` rescales and normalizes a whole (B, 3, H, W) batch at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tokenmill.utils.errors import ModelLoadError

CONFIG_NAME = "preprocessor_config.json"
#: Pillow's resampling filters by the numbers preprocessor configs store (PILImageResampling)
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
#: ViTImageProcessor's defaults (IMAGENET_STANDARD_MEAN / STD), used where the config is silent
VIT_MEAN = (0.5, 0.5, 0.5)
VIT_STD = (0.5, 0.5, 0.5)


class ImageProcessorConfigError(ModelLoadError):
    """A preprocessor_config.json that is missing, unreadable, or asks for steps tokenmill lacks."""


def _flag(d: dict[str, Any], key: str, default: bool, source: str) -> bool:
    value = d.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ImageProcessorConfigError(f"{source}: {key} must be true or false, got {value!r}")
    return value


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _size(value: Any, source: str) -> tuple[int, int]:
    """(height, width) from the forms transformers reads: an int, [h, w], or {"height", "width"}."""
    if _positive_int(value):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_positive_int, value)):
        return value[0], value[1]
    if isinstance(value, dict) and set(value) == {"height", "width"}:
        if _positive_int(value["height"]) and _positive_int(value["width"]):
            return value["height"], value["width"]
    if isinstance(value, dict) and set(value) & {"shortest_edge", "longest_edge", "max_height", "min_pixels"}:
        raise ImageProcessorConfigError(
            f"{source}: size {value} keeps each image's aspect ratio, so images come out in "
            'different sizes; tokenmill\'s image processor resizes to a fixed {"height": H, "width": W}'
        )
    raise ImageProcessorConfigError(
        f'{source}: size must be {{"height": H, "width": W}} (or one int for a square) with positive '
        f"integers, got {value!r}"
    )


def _per_channel(d: dict[str, Any], key: str, default: tuple[float, ...], source: str) -> tuple[float, ...]:
    value = d.get(key)
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise ImageProcessorConfigError(
            f"{source}: {key} must be a number or a list of 3 (one per RGB channel), got {value!r}"
        )
    return tuple(float(v) for v in value)


@dataclass(frozen=True)
class ImageProcessor:
    """Resize to ``size``, multiply by ``rescale_factor``, subtract ``image_mean`` and divide by ``image_std``.

    Fields mirror preprocessor_config.json; each ``do_*`` switches its step.
    """

    #: (height, width) every image is resized to
    size: tuple[int, int] = (224, 224)
    #: a Pillow filter number (2 bilinear, 3 bicubic, ...; see RESAMPLE)
    resample: int = 2
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = VIT_MEAN
    image_std: tuple[float, ...] = VIT_STD
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    #: the class transformers would build (image_processor_type), "" where the config names none
    processor_type: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = CONFIG_NAME) -> ImageProcessor:
        """From a preprocessor_config.json dict; ``source`` is named in errors."""
        if not isinstance(d, dict):
            raise ImageProcessorConfigError(f"{source} must hold a JSON object, got {type(d).__name__}")
        for key in ("do_center_crop", "do_pad"):
            if d.get(key):
                step = key.removeprefix("do_").replace("_", " ")
                raise ImageProcessorConfigError(
                    f"{source} sets {key}=true; tokenmill's image processor does not {step} "
                    "(it resizes, rescales and normalizes)"
                )
        resample = d.get("resample", 2)
        resample = 2 if resample is None else resample
        if isinstance(resample, bool) or resample not in RESAMPLE:
            raise ImageProcessorConfigError(
                f"{source}: resample must be a Pillow filter number "
                f"({', '.join(f'{k} {v}' for k, v in RESAMPLE.items())}), got {resample!r}"
            )
        factor = d.get("rescale_factor", 1 / 255)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise ImageProcessorConfigError(
                f"{source}: rescale_factor must be a positive number, got {factor!r}"
            )
        std = _per_channel(d, "image_std", VIT_STD, source)
        if any(s == 0 for s in std):
            raise ImageProcessorConfigError(f"{source}: image_std must not contain 0, got {list(std)}")
        kind = d.get("image_processor_type") or d.get("feature_extractor_type") or ""
        return cls(
            size=_size(224 if d.get("size") is None else d["size"], source),
            resample=resample,
            rescale_factor=float(factor),
            image_mean=_per_channel(d, "image_mean", VIT_MEAN, source),
            image_std=std,
            do_resize=_flag(d, "do_resize", True, source),
            do_rescale=_flag(d, "do_rescale", True, source),
            do_normalize=_flag(d, "do_normalize", True, source),
            processor_type=str(kind),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str) -> ImageProcessor:
        """From ``model_dir``/preprocessor_config.json (an error naming the file when it is missing)."""
        path = os.path.join(model_dir, CONFIG_NAME)
        if not os.path.isfile(path):
            raise ImageProcessorConfigError(
                f"no {CONFIG_NAME} in {model_dir}: an image model needs it to know how to resize and "
                "normalize images (save the checkpoint's image processor with save_pretrained)"
            )
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ImageProcessorConfigError(f"{path} is not readable JSON: {e}") from e
        return cls.from_dict(d, path)

    # -- the steps ----------------------------------------------------------------------
    def resize(self, image: Any) -> torch.Tensor:
        """One RGB ``PIL.Image`` -> (3, H, W) uint8, resized to ``size`` where ``do_resize``."""
        if image.mode != "RGB":
            raise ValueError(f"resize takes RGB images (vision.load_image makes them), got mode {image.mode}")
        if self.do_resize:
            height, width = self.size
            image = image.resize((width, height), resample=self.resample)  # PIL sizes are (width, height)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)

    def to_pixel_values(self, pixels: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) uint8 -> float32 pixel values, rescaled and normalized."""
        x = pixels
        if self.do_rescale:
            # transformers multiplies in float64 and rounds once to float32; so do we
            x = (x.to(torch.float64) * self.rescale_factor).to(torch.float32)
        else:
            x = x.to(torch.float32)
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1)
            std = torch.tensor(self.image_std, dtype=torch.float32).view(3, 1, 1)
            x = (x - mean) / std
        return x

    def __call__(self, images: Any | Sequence[Any]) -> torch.Tensor:
        """Images (anything ``vision.load_image`` takes), one or a list -> (B, 3, H, W) float32."""
        from tokenmill.vision.io import load_image

        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError("no images given")
        pixels = [self.resize(load_image(x, f"image {i}")) for i, x in enumerate(items)]
        shapes = {tuple(p.shape) for p in pixels}
        if len(shapes) > 1:
            raise ValueError(
                f"images of different sizes {sorted(s[1:] for s in shapes)} cannot form one batch "
                "without resizing (the preprocessor config sets do_resize=false)"
            )
        return self.to_pixel_values(torch.stack(pixels))
