"""image-classification: labels and scores for images, natively for ViT.

Behaves as transformers' image-classification pipeline: each image gives a list of
``{"label", "score"}`` dicts, best first, ``top_k`` of them (default 5, and never more than
the model has labels; ``top_k=None`` also means 5, as in transformers). Scores are a
softmax over the labels, a sigmoid per label for multi-label models and models with one
label, or the raw logits for regression; ``function_to_apply`` overrides that.

Images are anything ``tokenmill.vision.load_image`` takes: a path, a file's bytes, a
``data:image/...;base64,`` string, a PIL image or a uint8 array; never a URL. The image
processor comes from the checkpoint's preprocessor_config.json (``vision.ImageProcessor``).
Architectures other than ViT (ConvNeXT, ...) are served by the transformers backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tokenmill.pipelines.base import Feature, Pipeline, PipelineInputError, check_top_k
from tokenmill.pipelines.text_classification import apply_function, check_function_option, default_function
from tokenmill.vision.image_processor import CONFIG_NAME, ImageProcessor
from tokenmill.vision.io import ImageInputError, check_image_input, load_image, pil
from tokenmill.weights.task_loader import LoadedTaskModel, NotNativeError

#: labels per image when the caller does not say (transformers' default)
DEFAULT_TOP_K = 5
#: the preprocessor classes whose steps (resize, rescale, normalize) ImageProcessor implements
NATIVE_PROCESSORS = {
    "",
    "ViTImageProcessor",
    "ViTImageProcessorFast",
    "ViTImageProcessorPil",
    "ViTFeatureExtractor",
}


class ImageClassificationPipeline(Pipeline):
    """``pipe(image | list of images, top_k=5, function_to_apply="default")``.

    Returns a list of ``{"label", "score"}`` dicts per image (a list of such lists for a list).

    Args (per call or as pipeline defaults):
        top_k: how many labels per image, best first (capped at the number of labels).
        function_to_apply: "softmax", "sigmoid", "none", or "default" (as the model says).
        timeout: accepted for compatibility with transformers, whose pipeline waits this
            long for a URL; tokenmill fetches nothing, so it never waits.
    """

    task = "image-classification"
    call_options = frozenset({"top_k", "function_to_apply", "timeout"})

    def __init__(self, loaded: LoadedTaskModel, *, batch_size: int = 8, **defaults: Any) -> None:
        pil()  # an ImportError naming Pillow now, not at the first image
        self.image_processor = ImageProcessor.from_pretrained(loaded.source)
        self._check_processor(loaded)
        super().__init__(loaded, batch_size=batch_size, **defaults)

    def _check_processor(self, loaded: LoadedTaskModel) -> None:
        proc, cfg = self.image_processor, loaded.config
        path = f"{loaded.source}/{CONFIG_NAME}"
        if proc.processor_type not in NATIVE_PROCESSORS:
            raise NotNativeError(
                f"{path} names {proc.processor_type}; tokenmill's native image classification "
                "implements ViTImageProcessor (resize, rescale, normalize) only; other processors "
                "run through the transformers backend (pip install 'tokenmill[hf]')"
            )
        if cfg.num_channels != 3:
            raise NotNativeError(
                f"{loaded.source}/config.json has num_channels={cfg.num_channels}; tokenmill's image "
                "pipelines feed RGB images (3 channels)"
            )
        if proc.do_resize and proc.size != cfg.image_size:
            raise NotNativeError(
                f"{path} resizes images to {proc.size[0]}x{proc.size[1]} but the model's config.json "
                f"has image_size {cfg.image_size[0]}x{cfg.image_size[1]}; ViT's position embeddings "
                "fit only the size it was trained at"
            )

    # -- options ----------------------------------------------------------------------
    def sanitize(self, options: dict[str, Any]) -> dict[str, Any]:
        # Images have no tokens to truncate: "truncation" is not an option here.
        return self.check_options(self.known_options(options, self.call_options | {"batch_size"}))

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        if "top_k" in options:
            check_top_k(options["top_k"])
            if options["top_k"] is None:  # transformers: None means "not given"
                del options["top_k"]
        check_function_option(options)
        if "timeout" in options:
            t = options.pop("timeout")
            if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0):
                raise ValueError(f"timeout must be None or a number of seconds >= 0, got {t!r}")
        return options

    def default_function(self) -> str:
        return default_function(self.config)

    # -- inputs -----------------------------------------------------------------------
    def check_input(self, item: Any, i: int) -> Any:
        try:
            return check_image_input(item, f"input {i}")
        except ImageInputError as e:
            raise PipelineInputError(str(e)) from None

    def preprocess(self, item: Any, index: int, options: dict[str, Any]) -> list[Feature]:
        try:
            image = load_image(item, f"input {index}")
        except ImageInputError as e:
            raise PipelineInputError(str(e)) from None
        pixels = self.image_processor.resize(image)  # (3, H, W) uint8
        if tuple(pixels.shape[1:]) != self.config.image_size:
            # only without do_resize: the image keeps its own size
            h, w = self.config.image_size
            raise PipelineInputError(
                f"input {index} is {image.width}x{image.height} (width x height); this model takes "
                f"{w}x{h} images and its {CONFIG_NAME} sets do_resize=false, so resize it first"
            )
        return [Feature([], index, meta={"pixels": pixels})]

    def collate(self, features: Sequence[Feature]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([f.meta["pixels"] for f in features])  # (B, 3, H, W) uint8
        values = self.image_processor.to_pixel_values(pixels)  # float32, as transformers computes it
        return {"pixel_values": values.to(device=self.device, dtype=self.loaded.dtype)}

    # -- model and results ------------------------------------------------------------
    def forward(
        self, batch: dict[str, torch.Tensor], features: list[Feature], options: dict[str, Any]
    ) -> list[Any]:
        logits = self.model(batch["pixel_values"])  # (B, num_labels)
        return list(logits.float().cpu())

    def postprocess(
        self, item: Any, features: list[Feature], outputs: list[Any], options: dict[str, Any]
    ) -> list[dict[str, Any]]:
        scores = apply_function(outputs[0], options.get("function_to_apply") or self.default_function())
        labels = self.config.id2label
        ranked = [{"label": labels[i], "score": s} for i, s in enumerate(scores.tolist())]
        ranked.sort(key=lambda d: d["score"], reverse=True)  # stable: ties keep label order
        return ranked[: min(options.get("top_k", DEFAULT_TOP_K), len(ranked))]
