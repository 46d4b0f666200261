"""Native ViT and its image processor against transformers.

The model: tiny random ViTs (tests/tiny_vit.py) loaded through the task loader give the
same logits, hidden states and pooler output as transformers within 1e-4 (fp32). The
processor: tokenmill's pixel values equal transformers' ViT image processor within 1e-5
on images of every kind (non-square, grayscale, RGBA, palette, tiny, EXIF-rotated) and
every preprocessor setting tokenmill reads.
"""

from __future__ import annotations

import io
import json
import os
import tempfile

import numpy as np
import pytest
import torch
import transformers
from transformers.image_utils import load_image as hf_load_image

import tiny_vit
from tokenmill.models.task_registry import TASK_FAMILIES
from tokenmill.models.vit import ViTConfig, ViTForImageClassification, vit_config_from_hf
from tokenmill.vision import ImageProcessor, ImageProcessorConfigError, load_image
from tokenmill.weights.loader import load_weights
from tokenmill.weights.safetensors_dir import iter_safetensors
from tokenmill.weights.task_loader import MissingHeadError, load_task_model

ATOL = 1e-4
PIXEL_ATOL = 1e-5


@pytest.fixture(scope="module")
def images():
    return tiny_vit.sample_images()


def pixel_batch(images, processor=None) -> torch.Tensor:
    """transformers' pixel values for the sample images, as its pipeline prepares them."""
    proc = processor or tiny_vit.hf_processor()
    loaded = [hf_load_image(im) for im in images.values()]
    return proc(images=loaded, return_tensors="pt")["pixel_values"].float()


# -- the model ------------------------------------------------------------------------------


@pytest.mark.parametrize("labels", ["animals", "multi-label", "one-label"])
def test_classifier_logits_match_transformers(images, labels):
    path = tiny_vit.tiny_vit_dir(labels=labels)
    ours = load_task_model(path, "image-classification").model
    theirs = tiny_vit.tiny_hf_model(labels=labels)
    x = pixel_batch(images)
    assert x.shape == (len(images), 3, 32, 32)
    with torch.inference_mode():
        want = theirs(pixel_values=x).logits
        got = ours(x)
    assert got.shape == want.shape == (len(images), len(tiny_vit.LABEL_SETS[labels]))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # one image alone gives the same row as in the batch
    with torch.inference_mode():
        torch.testing.assert_close(ours(x[2:3]), want[2:3], atol=ATOL, rtol=0)


def test_base_model_hidden_states_and_pooler_match_transformers(images):
    path = tiny_vit.tiny_vit_dir(head="base")
    loaded = load_task_model(path, "base")
    theirs = tiny_vit.tiny_hf_model(head="base")
    x = pixel_batch(images)
    with torch.inference_mode():
        want = theirs(pixel_values=x)
        hidden = loaded.model(x)
        pooled = loaded.model.pool(hidden)
    assert hidden.shape == (len(images), 17, 32)  # [CLS] + 4x4 patches
    torch.testing.assert_close(hidden, want.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(pooled, want.pooler_output, atol=ATOL, rtol=0)


def test_without_qkv_bias_and_with_a_non_square_grid():
    """qkv_bias=false, and a 24x40 image cut into 8x10 patches (3 x 4 grid, row-major)."""
    torch.manual_seed(3)
    cfg = tiny_vit.hf_config("animals", qkv_bias=False, image_size=[24, 40], patch_size=[8, 10])
    theirs = transformers.ViTForImageClassification(cfg).eval()
    ours = ViTForImageClassification(vit_config_from_hf(cfg.to_dict()))
    with tempfile.TemporaryDirectory() as d:
        theirs.save_pretrained(d)  # the checkpoint names, which the strict loader must fill
        report = load_weights(ours, iter_safetensors(d), source=d)
    assert not any("bias" in n and ".attention.attention." in n for n in report.loaded)
    x = torch.randn(3, 3, 24, 40)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), theirs(pixel_values=x).logits, atol=ATOL, rtol=0)


def test_bfloat16_runs_close_to_float32(images):
    path = tiny_vit.tiny_vit_dir()
    x = pixel_batch(images)
    with torch.inference_mode():
        want = load_task_model(path, "image-classification").model(x)
        got = load_task_model(path, "image-classification", dtype="bfloat16").model(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)


def test_registry_and_checkpoint_names():
    family = TASK_FAMILIES["vit"]
    assert family.model_class("image-classification") is ViTForImageClassification
    names = {n for n, _ in ViTForImageClassification(ViTConfig(num_layers=1)).named_parameters()}
    # checkpoint names, with q/k/v fused into one product
    assert "vit.encoder.layer.0.attention.attention.qkv.weight" in names
    assert "vit.encoder.layer.0.attention.output.dense.weight" in names
    assert "vit.encoder.layer.0.layernorm_before.weight" in names
    assert {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings", "classifier.weight"} <= names


def test_a_bare_vit_checkpoint_has_no_classifier():
    with pytest.raises(
        MissingHeadError, match=r"no weights for an image classification head.*classifier\.weight"
    ):
        load_task_model(tiny_vit.tiny_vit_dir(head="base"), "image-classification")


def test_a_classifier_checkpoint_serves_hidden_states(images):
    """A classifier's checkpoint loads as a bare ViT (no pooler in it, so none is built)."""
    loaded = load_task_model(tiny_vit.tiny_vit_dir(), "base")
    assert loaded.model.pooler is None
    theirs = tiny_vit.tiny_hf_model()
    x = pixel_batch(images)
    with torch.inference_mode():
        want = theirs(pixel_values=x, output_hidden_states=True)
        torch.testing.assert_close(loaded.model(x)[:, 0], _final_cls(theirs, want), atol=ATOL, rtol=0)
        with pytest.raises(ValueError, match="no pooler weights"):
            loaded.model.pool(loaded.model(x))


def _final_cls(theirs, out):
    return theirs.vit.layernorm(out.hidden_states[-1])[:, 0]


def test_wrong_pixel_size_is_an_error():
    model = load_task_model(tiny_vit.tiny_vit_dir(), "image-classification").model
    with pytest.raises(
        ValueError, match=r"pixel_values are 48x32 \(height x width\), this model takes 32x32"
    ):
        model(torch.zeros(1, 3, 48, 32))
    with pytest.raises(ValueError, match="pixel_values have 1 channels, this model takes 3"):
        model(torch.zeros(1, 1, 32, 32))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hidden_size", 30, r"hidden_size \(30\) must be a multiple of num_attention_heads \(4\)"),
        ("image_size", "big", "image_size must be a positive integer or \\[height, width\\]"),
        ("patch_size", 64, "smaller than patch_size"),
        ("hidden_act", "swoosh", "hidden_act must be one of"),
        ("pooler_act", "swoosh", "pooler_act must be 'tanh' or a hidden_act name"),
    ],
)
def test_config_errors_name_the_field(field, value, message):
    hf = tiny_vit.hf_config().to_dict()
    hf[field] = value
    with pytest.raises(ValueError, match=message):
        vit_config_from_hf(hf)


# -- the image processor --------------------------------------------------------------------

PROCESSOR_SETTINGS = {
    "tiny-bilinear-imagenet": {},
    "vit-base-default": dict(size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3),
    "bicubic-non-square": dict(size={"height": 40, "width": 24}, resample=3),
    "nearest": dict(resample=0),
    "lanczos": dict(resample=1),
    "no-normalize": dict(do_normalize=False),
    "no-rescale": dict(do_rescale=False),
    "odd-rescale-factor": dict(rescale_factor=1 / 127.5, image_mean=0.25, image_std=2.0),
}


@pytest.mark.parametrize("setting", list(PROCESSOR_SETTINGS))
def test_processor_matches_transformers(images, setting):
    theirs = tiny_vit.hf_processor(**PROCESSOR_SETTINGS[setting])
    ours = ImageProcessor.from_dict(theirs.to_dict())
    for name, image in images.items():
        want = theirs(images=hf_load_image(image), return_tensors="pt")["pixel_values"].float()
        got = ours(image)
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        torch.testing.assert_close(got, want, atol=PIXEL_ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_processor_reads_saved_and_legacy_configs(tmp_path, images):
    """From a saved directory, and from the old feature-extractor form (size: 224, no rescale keys)."""
    theirs = tiny_vit.hf_processor(resample=3)
    theirs.save_pretrained(tmp_path)
    ours = ImageProcessor.from_pretrained(str(tmp_path))
    assert ours.size == (32, 32) and ours.resample == 3 and ours.processor_type == "ViTImageProcessor"
    legacy = {
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "ViTFeatureExtractor",
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "resample": 2,
        "size": 224,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy))
    ours = ImageProcessor.from_pretrained(str(tmp_path))
    theirs = tiny_vit.hf_processor_from(str(tmp_path))
    image = images["rgb-large-300x200"]
    want = theirs(images=hf_load_image(image), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours(image), want, atol=PIXEL_ATOL, rtol=0)


def test_inputs_of_every_kind_give_the_same_pixels(tmp_path, images):
    """Path, bytes, data URI, PIL image and array of one picture: the same pixel values."""
    import base64

    image = images["rgb-landscape-64x48"]
    path = tmp_path / "x.png"
    image.save(path)
    data = path.read_bytes()
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    ours = ImageProcessor.from_dict(tiny_vit.hf_processor().to_dict())
    want = ours(image)
    for item in (
        str(path),
        path,
        data,
        bytearray(data),
        uri,
        np.asarray(image),
        torch.from_numpy(np.array(image)),
    ):
        torch.testing.assert_close(ours(item), want, atol=0, rtol=0)
    chw = np.asarray(image).transpose(2, 0, 1)
    torch.testing.assert_close(ours(chw), want, atol=0, rtol=0)
    assert ours([image, str(path)]).shape == (2, 3, 32, 32)


def test_exif_orientation_is_applied_as_transformers_does(tmp_path, images):
    from PIL import Image

    image = images["rgb-portrait-29x71"]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the stored pixels are sideways
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    upright = load_image(buf.getvalue())
    assert upright.size == (71, 29)  # width and height swapped
    theirs = tiny_vit.hf_processor()
    want = theirs(images=hf_load_image(Image.open(io.BytesIO(buf.getvalue()))), return_tensors="pt")
    got = ImageProcessor.from_dict(theirs.to_dict())(buf.getvalue())
    torch.testing.assert_close(got, want["pixel_values"], atol=PIXEL_ATOL, rtol=0)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"size": {"shortest_edge": 224}}, r"keeps each image's aspect ratio.*fixed \{\"height\": H"),
        ({"size": {"height": 0, "width": 5}}, r"size must be \{\"height\": H, \"width\": W\}"),
        (
            {"do_center_crop": True, "crop_size": 224},
            "sets do_center_crop=true; tokenmill's image processor does not center crop",
        ),
        ({"do_pad": True}, "sets do_pad=true"),
        ({"resample": 9}, "resample must be a Pillow filter number .*2 bilinear.*got 9"),
        ({"image_mean": [0.5, 0.5]}, r"image_mean must be a number or a list of 3 \(one per RGB channel\)"),
        ({"image_std": [0.5, 0, 0.5]}, "image_std must not contain 0"),
        ({"rescale_factor": -1}, "rescale_factor must be a positive number"),
        ({"do_resize": "yes"}, "do_resize must be true or false"),
    ],
)
def test_processor_config_errors_name_the_file_and_field(tmp_path, config, message):
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ImageProcessorConfigError, match=message) as e:
        ImageProcessor.from_pretrained(str(tmp_path))
    assert str(path) in str(e.value)


def test_missing_or_broken_processor_config(tmp_path):
    with pytest.raises(
        ImageProcessorConfigError,
        match=r"no preprocessor_config\.json in .*save the checkpoint's image processor",
    ):
        ImageProcessor.from_pretrained(str(tmp_path))
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ImageProcessorConfigError, match="preprocessor_config.json is not readable JSON"):
        ImageProcessor.from_pretrained(str(tmp_path))


def test_unresized_images_of_different_sizes_cannot_batch(images):
    ours = ImageProcessor.from_dict({"do_resize": False})
    assert ours(images["rgb-exact-32x32"]).shape == (1, 3, 32, 32)
    with pytest.raises(
        ValueError, match="images of different sizes .* cannot form one batch without resizing"
    ):
        ours([images["rgb-exact-32x32"], images["rgb-landscape-64x48"]])


def test_tiny_dir_is_a_hub_like_snapshot():
    path = tiny_vit.tiny_vit_dir()
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(os.listdir(path))
