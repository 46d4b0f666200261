"""Images from what a user hands a pipeline, as upright RGB PIL images.

Accepted: a file path (str or ``os.PathLike``), the file's bytes, a ``data:image/...;base64,``
string, a PIL image, or a uint8 numpy array / torch tensor ((H, W), (H, W, C) or (C, H, W)
with C of 1, 3 or 4). URLs are refused: tokenmill never fetches anything.

Files, bytes and PIL images are prepared exactly as transformers' ``load_image`` prepares
them for its pipelines: the EXIF orientation applied, then ``convert("RGB")`` (an alpha
channel is dropped, not composited). Every input that cannot become an image is an
``ImageInputError`` whose message names the input and says what to pass instead.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import sys
from typing import Any

import numpy as np

#: an image narrower or shorter than this is refused: a 1-pixel line holds no picture
#: to classify, and resizing it up only smears one row of colour
MIN_SIDE = 2

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


class ImageInputError(ValueError):
    """An input that is not an image tokenmill can read (pipelines raise it as PipelineInputError)."""


def pil() -> Any:
    """The ``PIL.Image`` module, or an ImportError that says how to install it."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError(
            f"image inputs need Pillow: pip install 'tokenmill[vision]' (or pip install pillow) ({e})"
        ) from e
    return Image


def _is_tensor(item: Any) -> bool:
    torch = sys.modules.get("torch")  # a tensor can only exist if torch is imported
    return torch is not None and isinstance(item, torch.Tensor)


def _is_pil_image(item: Any) -> bool:
    module = sys.modules.get("PIL.Image")  # likewise a PIL image and Pillow
    return module is not None and isinstance(item, module.Image)


def check_image_input(item: Any, name: str = "input 0") -> Any:
    """Cheap checks of one image input, before anything is decoded.

    Args:
        name: how messages name the input ("input 3").

    Returns:
        the input, with a path-like turned into a string and a tensor into a numpy array.
    """
    if isinstance(item, os.PathLike):
        item = os.fspath(item)
    if isinstance(item, str):
        if _URL.match(item):
            raise ImageInputError(
                f"{name} is a URL; tokenmill does not fetch URLs: download the image and pass its path or bytes"
            )
        if item.startswith("data:"):
            if not re.match(r"^data:image/[^,;]*;base64,", item):
                raise ImageInputError(
                    f"{name}: a data URI image must be base64 with an image type (data:image/png;base64,...)"
                )
            return item
        if not item.strip():
            raise ImageInputError(f"{name} is an empty string; give an image path")
        if os.path.isdir(item):
            raise ImageInputError(f"{name}: {item!r} is a directory, not an image file")
        if not os.path.isfile(item):
            raise ImageInputError(f"{name}: no image file {item!r}")
        return item
    if isinstance(item, (bytes, bytearray, memoryview)):
        if len(item) == 0:
            raise ImageInputError(f"{name} is empty bytes; give an image file's contents")
        return item
    if _is_tensor(item):
        item = item.detach().cpu().numpy()
    if isinstance(item, np.ndarray):
        _array_layout(item, name)
        return item
    if _is_pil_image(item):
        return item
    raise ImageInputError(
        f"{name} must be an image: a file path, the file's bytes, a PIL image or a uint8 array, "
        f"got {type(item).__name__}"
    )


def _array_layout(a: np.ndarray, name: str) -> np.ndarray:
    """``a`` as (H, W, C) with C in (1, 3, 4), or an error saying which arrays are images."""
    if a.dtype != np.uint8:
        raise ImageInputError(
            f"{name}: image arrays must be uint8 (0-255), got dtype {a.dtype}; for floats in [0, 1] "
            "pass (x * 255).round().astype(numpy.uint8)"
        )
    if a.ndim == 2:
        a = a[:, :, None]
    elif a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = a.transpose(1, 2, 0)  # (C, H, W), as torch lays images out
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ImageInputError(
            f"{name}: an image array must be (H, W), (H, W, C) or (C, H, W) with 1, 3 or 4 channels, "
            f"got shape {tuple(a.shape)}"
        )
    return a


def _decode(source: Any, what: str, name: str) -> Any:
    Image = pil()
    try:
        image = Image.open(source)
        image.load()  # Pillow reads lazily: a truncated file fails here, not later
    except OSError as e:
        if isinstance(e, Image.UnidentifiedImageError):
            reason = "an unknown format"
        elif isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise ImageInputError(f"{name}: {what} unreadable ({e.strerror})") from None
        else:
            reason = str(e)
        raise ImageInputError(f"{name}: {what} not an image Pillow can read ({reason})") from None
    except Exception as e:  # Pillow raises several types for undecodable data (DecompressionBombError, ...)
        raise ImageInputError(f"{name}: {what} not an image Pillow can read ({e})") from None
    return image


def load_image(item: Any, name: str = "input 0") -> Any:
    """One input as an upright RGB ``PIL.Image`` (see the module docstring for what is accepted).

    Raises:
        ImageInputError: not an image, unreadable, or smaller than MIN_SIDE pixels on a side.
    """
    item = check_image_input(item, name)
    Image = pil()
    if isinstance(item, np.ndarray):
        a = np.ascontiguousarray(_array_layout(item, name))
        _check_size(a.shape[1], a.shape[0], name)
        image = Image.fromarray(a[:, :, 0] if a.shape[-1] == 1 else a)
    else:
        if isinstance(item, str) and item.startswith("data:"):
            try:
                data = base64.b64decode(item.partition(",")[2], validate=True)
            except (binascii.Error, ValueError) as e:
                raise ImageInputError(f"{name}: the data URI is not valid base64 ({e})") from None
            image = _decode(io.BytesIO(data), "the data URI is", name)
        elif isinstance(item, str):
            image = _decode(item, f"file {item!r} is", name)
        elif isinstance(item, (bytes, bytearray, memoryview)):
            image = _decode(io.BytesIO(bytes(item)), "the bytes are", name)
        else:
            try:
                item.load()
            except Exception as e:  # a lazily opened PIL image whose file is truncated
                raise ImageInputError(f"{name}: the PIL image cannot be decoded ({e})") from None
            image = item
        _check_size(*image.size, name)
        from PIL import ImageOps

        image = ImageOps.exif_transpose(image)  # as transformers' load_image: the upright picture
    return image if image.mode == "RGB" else image.convert("RGB")


def _check_size(width: int, height: int, name: str) -> None:
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ImageInputError(
            f"{name} is a {width}x{height} image (width x height); images need at least "
            f"{MIN_SIDE} pixels on each side"
        )
