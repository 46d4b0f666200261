"""image-classification against transformers' pipeline on tiny random ViTs.

Every option (top_k, function_to_apply), every input form (path, bytes, PIL image, array),
single images and batches: the same labels in the same order and scores within 1e-4.
Then every input or option a user can get wrong, with its message.
"""

import io
import json
import os
import shutil
import sys

import numpy as np
import pytest

import tiny_vit
from tokenmill import pipeline
from tokenmill.pipelines.base import PipelineInputError
from tokenmill.pipelines.image_classification import ImageClassificationPipeline
from tokenmill.vision import ImageProcessorConfigError
from tokenmill.weights.task_loader import MissingHeadError, NotNativeError


def assert_same(got, want, path="result"):
    """Equal structure, keys and labels; scores within 1e-4."""
    assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, list):
        assert len(got) == len(want), f"{path}: {len(got)} items, transformers has {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{i}]")
    else:
        assert list(got) == list(want), f"{path}: keys {list(got)} != {list(want)}"
        assert got["label"] == want["label"], f"{path}: {got['label']!r} != {want['label']!r}"
        assert got["score"] == pytest.approx(want["score"], abs=1e-4, rel=1e-4), path


@pytest.fixture(scope="module")
def images():
    return list(tiny_vit.sample_images().values())


@pytest.fixture(scope="module")
def pipes():
    """(tokenmill, transformers) pipelines per label set, built once."""
    cache = {}

    def get(labels="animals", resample=2):
        if (labels, resample) not in cache:
            d = tiny_vit.tiny_vit_dir(labels=labels, resample=resample)
            theirs = tiny_vit.hf_pipeline(d)
            cache[labels, resample] = (pipeline("image-classification", model=d), theirs)
        return cache[labels, resample]

    return get


def test_native_pipeline_for_vit(pipes):
    ours, _ = pipes()
    assert isinstance(ours, ImageClassificationPipeline)
    assert ours.image_processor.size == (32, 32)


def test_default_top_5_single_and_batched(pipes, images):
    ours, theirs = pipes()
    single = ours(images[0])
    assert isinstance(single, list) and len(single) == 5 and list(single[0]) == ["label", "score"]
    assert [d["score"] for d in single] == sorted((d["score"] for d in single), reverse=True)
    assert_same(single, theirs(images[0]))
    want = theirs(images)
    assert_same(ours(images), want)
    assert_same(ours(images, batch_size=1), want)
    assert_same(ours(images, batch_size=3), want)
    assert_same(ours([images[1]]), theirs([images[1]]))


@pytest.mark.parametrize("top_k", [1, 3, 7, 20, None])
def test_top_k(pipes, images, top_k):
    """top_k is capped at the number of labels (7); None means transformers' default, 5."""
    ours, theirs = pipes()
    got = ours(images[2], top_k=top_k)
    assert len(got) == min(top_k or 5, 7)
    assert_same(got, theirs(images[2], top_k=top_k))
    assert_same(ours(images[:4], top_k=top_k), theirs(images[:4], top_k=top_k))


@pytest.mark.parametrize("function", ["softmax", "sigmoid", "none", "SIGMOID"])
def test_function_to_apply(pipes, images, function):
    ours, theirs = pipes()
    assert_same(ours(images[:3], function_to_apply=function), theirs(images[:3], function_to_apply=function))
    assert_same(
        ours(images[3], function_to_apply=function, top_k=7),
        theirs(images[3], function_to_apply=function, top_k=7),
    )


def test_function_to_apply_default_means_the_models_choice(pipes, images):
    ours, _ = pipes()
    assert_same(ours(images[:2], function_to_apply="default"), ours(images[:2], function_to_apply="softmax"))


@pytest.mark.parametrize("labels", ["binary", "multi-label", "regression", "one-label"])
def test_label_kinds_pick_transformers_function(pipes, images, labels):
    ours, theirs = pipes(labels)
    expected = {"binary": "softmax", "multi-label": "sigmoid", "regression": "none", "one-label": "sigmoid"}
    assert ours.default_function() == expected[labels]
    assert_same(ours(images), theirs(images))
    if labels == "multi-label":  # independent sigmoids: the scores need not sum to one
        scores = [d["score"] for d in ours(images[0])]
        assert len(scores) == 4 and all(0 < s < 1 for s in scores) and abs(sum(scores) - 1) > 1e-3


def test_bicubic_processor(pipes, images):
    ours, theirs = pipes(resample=3)
    assert ours.image_processor.resample == 3
    assert_same(ours(images, top_k=7), theirs(images, top_k=7))


def test_input_forms(pipes, images, tmp_path):
    """Paths (str and Path), bytes, PIL images and arrays of the same pictures agree with transformers."""
    ours, theirs = pipes()
    paths = []
    for i, image in enumerate(images[:4]):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    want = theirs(paths)
    assert_same(ours(paths), want)
    assert_same(ours([tmp_path / "0.png", tmp_path / "1.png"]), want[:2])
    blobs = [open(p, "rb").read() for p in paths]
    assert_same(ours(blobs), want)
    assert_same(ours(blobs[0]), want[0])
    arrays = [np.array(images[0].convert("RGB")), np.array(images[1].convert("RGB"))]
    assert_same(ours(arrays), theirs(arrays))
    assert_same(ours(arrays[0]), theirs(arrays[0]))
    mixed = [paths[0], blobs[1], images[2], arrays[0]]
    assert_same(ours(mixed), [want[0], want[1], theirs(images[2]), theirs(arrays[0])])


def test_jpeg_with_exif_rotation(pipes, images, tmp_path):
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 8
    path = tmp_path / "rotated.jpg"
    images[1].save(path, format="JPEG", exif=exif.tobytes())
    ours, theirs = pipes()
    assert_same(ours(str(path), top_k=7), theirs(str(path), top_k=7))
    assert_same(ours(path.read_bytes(), top_k=7), theirs(str(path), top_k=7))


def test_pipeline_defaults_and_bfloat16(images):
    d = tiny_vit.tiny_vit_dir()
    ours = pipeline("image-classification", model=d, top_k=2, function_to_apply="none")
    theirs = tiny_vit.hf_pipeline(d)
    assert_same(ours(images[:2]), theirs(images[:2], top_k=2, function_to_apply="none"))
    assert_same(ours(images[0], top_k=3), theirs(images[0], top_k=3, function_to_apply="none"))
    half = pipeline("image-classification", model=d, dtype="bfloat16")
    got = half(images[:3], top_k=7)
    want = theirs(images[:3], top_k=7)
    for g, w in zip(got, want):
        assert sorted(x["label"] for x in g) == sorted(x["label"] for x in w)
        assert {x["label"]: x["score"] for x in g} == pytest.approx(
            {x["label"]: x["score"] for x in w}, abs=0.05
        )


# -- errors -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ours():
    return pipeline("image-classification", model=tiny_vit.tiny_vit_dir())


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda d: b"%PDF-1.4 this is not an image",
            "input 0: the bytes are not an image Pillow can read (an unknown format)",
        ),
        (lambda d: b"", "input 0 is empty bytes; give an image file's contents"),
        (lambda d: os.path.join(d, "missing.png"), "input 0: no image file '"),
        (lambda d: d, "is a directory, not an image file"),
        (
            lambda d: "https://example.com/cat.png",
            "input 0 is a URL; tokenmill does not fetch URLs: download the image and pass its path or bytes",
        ),
        (lambda d: "", "input 0 is an empty string; give an image path"),
        (
            lambda d: 42,
            "input 0 must be an image: a file path, the file's bytes, a PIL image or a uint8 array, got int",
        ),
        (lambda d: {"image": "x.png"}, "got dict"),
        (
            lambda d: np.zeros((8, 8, 3), dtype=np.float32),
            "image arrays must be uint8 (0-255), got dtype float32",
        ),
        (lambda d: np.zeros((8, 8, 5), dtype=np.uint8), "with 1, 3 or 4 channels, got shape (8, 8, 5)"),
        (
            lambda d: np.zeros((0, 8, 3), dtype=np.uint8),
            "input 0 is a 8x0 image (width x height); images need at least 2 pixels on each side",
        ),
        (lambda d: "data:image/png;base64,%%%", "input 0: the data URI is not valid base64"),
        (lambda d: "data:text/plain,hello", "a data URI image must be base64 with an image type"),
    ],
)
def test_bad_inputs(ours, tmp_path, make, message):
    with pytest.raises(PipelineInputError) as e:
        ours(make(str(tmp_path)))
    assert message in str(e.value)


def test_bad_files_and_images(ours, images, tmp_path):
    from PIL import Image

    text = tmp_path / "notes.txt"
    text.write_text("not an image at all")
    with pytest.raises(
        PipelineInputError,
        match=r"input 0: file '.*notes\.txt' is not an image Pillow can read \(an unknown format\)",
    ):
        ours(str(text))
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(_png_bytes(images[2])[:200])
    with pytest.raises(
        PipelineInputError, match=r"input 0: file '.*cut\.png' is not an image Pillow can read"
    ):
        ours(str(truncated))
    with pytest.raises(
        PipelineInputError, match=r"input 1 is a 1x40 image \(width x height\); images need at least 2 pixels"
    ):
        ours([images[0], Image.new("RGB", (1, 40))])
    with pytest.raises(PipelineInputError, match="input 0 is a 7x1 image"):
        ours(_png_bytes(Image.new("L", (7, 1))))
    with pytest.raises(PipelineInputError, match="image-classification got an empty list of inputs"):
        ours([])


def test_unreadable_file(ours, images, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    path = tmp_path / "locked.png"
    images[0].save(path)
    path.chmod(0)
    with pytest.raises(
        PipelineInputError, match=r"input 0: file '.*locked\.png' is unreadable \(Permission denied\)"
    ):
        ours(str(path))


def test_an_error_names_the_input_and_runs_nothing(ours, images):
    with pytest.raises(PipelineInputError, match="input 2 is a URL"):
        ours([images[0], images[1], "http://example.com/x.jpg"])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"top_k": 0}, "top_k must be a positive integer or None, got 0"),
        ({"top_k": "3"}, "top_k must be a positive integer or None, got '3'"),
        (
            {"function_to_apply": "relu"},
            "function_to_apply must be one of 'softmax', 'sigmoid', 'none' or 'default', got 'relu'",
        ),
        (
            {"threshold": 0.5},
            "image-classification got unknown option(s) 'threshold'; it accepts batch_size, function_to_apply, timeout, top_k",
        ),
        ({"truncation": True}, "unknown option(s) 'truncation'"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"timeout": -1}, "timeout must be None or a number of seconds >= 0, got -1"),
    ],
)
def test_bad_options(ours, images, options, message):
    with pytest.raises(ValueError) as e:
        ours(images[0], **options)
    assert message in str(e.value)
    with pytest.raises(ValueError) as e:  # the same check for pipeline defaults
        pipeline("image-classification", model=tiny_vit.tiny_vit_dir(), **options)
    assert message in str(e.value)


def test_timeout_is_accepted_and_ignored(ours, images):
    assert ours(images[0], timeout=5) == ours(images[0])


def _copy(tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(tiny_vit.tiny_vit_dir(), dst)
    return dst


def test_missing_preprocessor_config(tmp_path):
    d = _copy(tmp_path)
    os.remove(d / "preprocessor_config.json")
    with pytest.raises(
        ImageProcessorConfigError, match=r"no preprocessor_config\.json in .*copy: an image model needs it"
    ):
        pipeline("image-classification", model=str(d))


def test_processor_that_does_not_fit_the_model(tmp_path):
    d = _copy(tmp_path)
    path = d / "preprocessor_config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "size": {"height": 64, "width": 64}}))
    with pytest.raises(
        NotNativeError, match="resizes images to 64x64 but the model's config.json has image_size 32x32"
    ):
        pipeline("image-classification", model=str(d))
    path.write_text(json.dumps({**cfg, "image_processor_type": "ConvNextImageProcessor"}))
    with pytest.raises(
        NotNativeError,
        match="names ConvNextImageProcessor; tokenmill's native image classification implements ViTImageProcessor",
    ):
        pipeline("image-classification", model=str(d))


def test_without_resizing_images_must_have_the_models_size(tmp_path, images):
    d = _copy(tmp_path)
    path = d / "preprocessor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "do_resize": False}))
    ours = pipeline("image-classification", model=str(d))
    theirs = tiny_vit.hf_pipeline(str(d))
    exact = images[3]  # 32x32
    assert exact.size == (32, 32)
    assert_same(ours(exact), theirs(exact))
    with pytest.raises(
        PipelineInputError,
        match=r"input 1 is 64x48 \(width x height\); this model takes 32x32 images and its preprocessor_config.json sets do_resize=false",
    ):
        ours([exact, images[0]])


def test_checkpoint_without_classifier():
    with pytest.raises(MissingHeadError, match="has no weights for an image classification head"):
        pipeline("image-classification", model=tiny_vit.tiny_vit_dir(head="base"))


def test_without_pillow(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # as if Pillow were not installed
    with pytest.raises(ImportError, match=r"image inputs need Pillow: pip install 'tokenmill\[vision\]'"):
        pipeline("image-classification", model=tiny_vit.tiny_vit_dir())
