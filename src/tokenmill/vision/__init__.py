"""Images for the vision pipelines: loading (``io``) and the image processor (``image_processor``).

Pillow is imported inside functions only, so ``import tokenmill`` never needs it; it comes
with ``pip install 'tokenmill[vision]'``.
"""

from tokenmill.vision.image_processor import ImageProcessor, ImageProcessorConfigError
from tokenmill.vision.io import ImageInputError, check_image_input, load_image

__all__ = [
    "ImageInputError",
    "ImageProcessor",
    "ImageProcessorConfigError",
    "check_image_input",
    "load_image",
]
