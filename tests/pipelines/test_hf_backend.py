"""Tasks served through the transformers backend, on tiny random models built here.

Each model is saved with a processor built locally (no Hub), run through
``tokenmill.pipeline()`` and compared with ``transformers.pipeline()`` on the same
directory: DETR object detection, Segformer segmentation, DPT depth, BLIP and a
ViT+BERT VisionEncoderDecoder for image-to-text (transformers 4.x's captioning, written
out), Llava for image-text-to-text, Wav2Vec2 audio classification, VITS text-to-audio and
ConvNeXT image classification. Then every input and option error, with its message.
"""

import base64
import io
import json
import os
import sys
import wave

import numpy as np
import pytest
import torch
import transformers as tf

pytest.importorskip("PIL")
pytest.importorskip("soundfile")

from PIL import Image  # noqa: E402

from tokenmill import pipeline as tokenmill_pipeline  # noqa: E402
from tokenmill.pipelines.base import PipelineInputError  # noqa: E402
from tokenmill.pipelines.hf_backend import (  # noqa: E402
    BackendNotInstalledError,
    HFBackendPipeline,
    to_json,
    to_wav,
)
from tokenmill.utils.errors import ModelLoadError  # noqa: E402

LABELS = {0: "cat", 1: "dog", 2: "car"}
WORDS = "a photo of the cat dog on red blue sitting and with two birds".split()


def pipeline(task, model=None, **kwargs):
    """tokenmill.pipeline on the CPU, where the reference runs (auto would pick a GPU)."""
    return tokenmill_pipeline(task, model, **{"device": "cpu", **kwargs})


def labels(cfg_kwargs=None):
    return dict(id2label=LABELS, label2id={v: k for k, v in LABELS.items()}, **(cfg_kwargs or {}))


def save(path, model, *processors):
    model.eval().save_pretrained(path)
    for p in processors:
        p.save_pretrained(path)
    return str(path)


def bert_tokenizer(path):
    os.makedirs(path, exist_ok=True)
    vocab = os.path.join(path, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return tf.BertTokenizer(vocab)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    torch.manual_seed(0)
    return tmp_path_factory.mktemp("hf-backend")


@pytest.fixture(scope="module")
def images(root):
    """Two random RGB images of different sizes, and the first one as a PNG file and bytes."""
    rng = np.random.RandomState(0)
    a = Image.fromarray((rng.rand(40, 50, 3) * 255).astype("uint8"))
    b = Image.fromarray((rng.rand(36, 30, 3) * 255).astype("uint8"))
    path = str(root / "a.png")
    a.save(path)
    with open(path, "rb") as f:
        data = f.read()
    return a, b, path, data


# -- model directories ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def detr_dir(root):
    backbone = tf.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], out_features=["stage1", "stage2"]
    )
    cfg = tf.DetrConfig(
        use_timm_backbone=False,
        backbone_config=backbone,
        use_pretrained_backbone=False,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        num_queries=5,
        **labels(),
    )
    proc = tf.DetrImageProcessor(size={"shortest_edge": 32, "longest_edge": 64})
    return save(root / "detr", tf.DetrForObjectDetection(cfg), proc)


@pytest.fixture(scope="module")
def segformer_dir(root):
    cfg = tf.SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        **labels(),
    )
    proc = tf.SegformerImageProcessor(size={"height": 32, "width": 32})
    return save(root / "segformer", tf.SegformerForSemanticSegmentation(cfg), proc)


@pytest.fixture(scope="module")
def dpt_dir(root):
    cfg = tf.DPTConfig(
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=16,
        image_size=32,
        patch_size=8,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=16,
        head_hidden_size=8,
        reassemble_factors=[4, 2, 1, 0.5],
    )
    proc = tf.DPTImageProcessor(size={"height": 32, "width": 32})
    return save(root / "dpt", tf.DPTForDepthEstimation(cfg), proc)


@pytest.fixture(scope="module")
def blip_dir(root):
    tok = bert_tokenizer(root / "blip")
    text = dict(
        vocab_size=len(WORDS) + 5,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=64,
        encoder_hidden_size=16,
        bos_token_id=2,
        sep_token_id=3,
        pad_token_id=0,
        eos_token_id=3,
    )
    vision = dict(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        image_size=32,
        patch_size=8,
    )
    cfg = tf.BlipConfig(text_config=text, vision_config=vision, projection_dim=16)
    proc = tf.BlipProcessor(
        image_processor=tf.BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok
    )
    return save(root / "blip", tf.BlipForConditionalGeneration(cfg), proc)


@pytest.fixture(scope="module")
def ved_dir(root):
    """ViT encoder + BERT decoder: the VisionEncoderDecoder captioners (vit-gpt2 style)."""
    tok = bert_tokenizer(root / "ved")
    enc = tf.ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        image_size=32,
        patch_size=8,
    )
    dec = tf.BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=64,
        is_decoder=True,
        add_cross_attention=True,
    )
    cfg = tf.VisionEncoderDecoderConfig(encoder=enc.to_dict(), decoder=dec.to_dict())
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 2, 0, 3
    model = tf.VisionEncoderDecoderModel(cfg)
    model.generation_config.decoder_start_token_id = 2
    model.generation_config.eos_token_id = 3
    model.generation_config.pad_token_id = 0
    return save(root / "ved", model, tf.ViTImageProcessor(size={"height": 32, "width": 32}), tok)


@pytest.fixture(scope="module")
def llava_dir(root):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    words = [
        *specials,
        *"user assistant : describe the image a photo of cat dog red blue what is this".split(),
    ]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([AddedToken(w, special=True) for w in specials])
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )
    chat = (
        "{% for m in messages %}{{ m['role'] }} : {% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}"
        "{{ c['text'] }} {% endif %}{% endfor %}{% endif %}</s> {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    proc = tf.LlavaProcessor(
        image_processor=tf.CLIPImageProcessor(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
        ),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=chat,
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    vision = tf.CLIPVisionConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        image_size=16,
        patch_size=8,
    )
    text = tf.LlamaConfig(
        vocab_size=len(words),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cfg = tf.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=4,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return save(root / "llava", tf.LlavaForConditionalGeneration(cfg), proc)


@pytest.fixture(scope="module")
def wav2vec2_dir(root):
    cfg = tf.Wav2Vec2Config(
        vocab_size=10,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        conv_dim=(8, 8),
        conv_stride=(5, 4),
        conv_kernel=(10, 8),
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2,
        classifier_proj_size=8,
        **labels(),
    )
    proc = tf.Wav2Vec2FeatureExtractor(sampling_rate=16000)
    return save(root / "wav2vec2", tf.Wav2Vec2ForSequenceClassification(cfg), proc)


@pytest.fixture(scope="module")
def vits_dir(root):
    path = root / "vits"
    os.makedirs(path)
    chars = list("_ abcdefghijklmnopqrstuvwxyz.,'")
    with open(path / "vocab.json", "w") as f:
        json.dump({c: i for i, c in enumerate(chars)}, f)
    tok = tf.VitsTokenizer(str(path / "vocab.json"), pad_token="_", unk_token="_", phonemize=False)
    cfg = tf.VitsConfig(
        vocab_size=len(chars),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        ffn_dim=16,
        flow_size=8,
        spectrogram_bins=17,
        upsample_initial_channel=16,
        upsample_rates=[4, 4],
        upsample_kernel_sizes=[8, 8],
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]],
        prior_encoder_num_flows=1,
        prior_encoder_num_wavenet_layers=1,
        posterior_encoder_num_wavenet_layers=1,
        duration_predictor_num_flows=1,
        duration_predictor_filter_channels=16,
        depth_separable_num_layers=1,
        wavenet_kernel_size=3,
        sampling_rate=16000,
    )
    return save(path, tf.VitsModel(cfg), tok)


@pytest.fixture(scope="module")
def convnext_dir(root):
    cfg = tf.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, **labels())
    proc = tf.ConvNextImageProcessor(size={"shortest_edge": 32})
    return save(root / "convnext", tf.ConvNextForImageClassification(cfg), proc)


def hf_pipe(task, path):
    return tf.pipeline(task, model=path, device="cpu", dtype=torch.float32)


def assert_close(got, want, path="result"):
    """Same structure, keys and values; floats within 1e-4; PIL images pixel-equal."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), f"{path}: keys {list(got)} != {list(want)}"
        for k in want:
            assert_close(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{path}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{path}[{i}]")
    elif isinstance(want, Image.Image):
        assert isinstance(got, Image.Image) and got.size == want.size, path
        assert np.array_equal(np.asarray(got), np.asarray(want)), path
    elif isinstance(want, (torch.Tensor, np.ndarray)):
        want = want.numpy() if isinstance(want, torch.Tensor) else want
        assert isinstance(got, np.ndarray) and got.shape == want.shape, path
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=path)
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-4), path
    else:
        assert got == want, path


# -- each task against transformers ---------------------------------------------------------


def test_object_detection(detr_dir, images):
    a, b, path, data = images
    pipe = pipeline("object-detection", detr_dir, threshold=0.0)
    assert isinstance(pipe, HFBackendPipeline)
    ref = hf_pipe("object-detection", detr_dir)
    want = ref(a, threshold=0.0)
    assert want, "the tiny DETR should find boxes at threshold 0"
    for source in (a, path, data, f"data:image/png;base64,{base64.b64encode(data).decode()}"):
        assert_close(pipe(source), want)
    assert_close(pipe([path, b], batch_size=1), [want, ref(b, threshold=0.0)])
    assert pipe(a, threshold=1.0) == []
    json.dumps(to_json(pipe(a)))


def test_image_segmentation(segformer_dir, images):
    a, b, path, _ = images
    pipe = pipeline("image-segmentation", segformer_dir)
    ref = hf_pipe("image-segmentation", segformer_dir)
    got = pipe(path)
    assert_close(got, ref(a))
    assert_close(pipe([a, b]), [ref(a), ref(b)])
    # to_json: masks as base64 PNG strings that decode to the same mask
    row = to_json(got)[0]
    mask = Image.open(io.BytesIO(base64.b64decode(row["mask"])))
    assert np.array_equal(np.asarray(mask), np.asarray(got[0]["mask"]))
    assert row["label"] == got[0]["label"] and row["score"] is None


def test_depth_estimation(dpt_dir, images):
    a, b, path, _ = images
    pipe = pipeline("depth-estimation", dpt_dir)
    ref = hf_pipe("depth-estimation", dpt_dir)
    got = pipe(path)
    assert isinstance(got["predicted_depth"], np.ndarray) and isinstance(got["depth"], Image.Image)
    assert_close(got, ref(a))
    assert_close(pipe([a, b], batch_size=2), [ref(a), ref(b)])
    plain = json.loads(json.dumps(to_json(got)))
    assert np.allclose(plain["predicted_depth"], got["predicted_depth"])
    assert isinstance(plain["depth"], str)


def caption_reference(path, images, max_new_tokens, prompt=None):
    """transformers 4.x's ImageToTextPipeline, written out: process, generate, decode."""
    model = tf.AutoModelForImageTextToText.from_pretrained(path).eval()
    proc = tf.AutoImageProcessor.from_pretrained(path)
    tok = tf.AutoTokenizer.from_pretrained(path)
    out = []
    for image in images:
        inputs = dict(proc(images=image.convert("RGB"), return_tensors="pt"))
        if prompt is not None:
            enc = tok(prompt, return_tensors="pt")
            inputs.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        pixels = inputs.pop(model.main_input_name)
        seqs = model.generate(pixels, **inputs, max_new_tokens=max_new_tokens)
        out.append([{"generated_text": tok.decode(s, skip_special_tokens=True)} for s in seqs])
    return out


@pytest.mark.parametrize("which", ["blip", "ved"])
def test_image_to_text(which, blip_dir, ved_dir, images):
    a, b, path, _ = images
    d = {"blip": blip_dir, "ved": ved_dir}[which]
    pipe = pipeline("image-to-text", d, max_new_tokens=6)
    want = caption_reference(d, [a, b], 6)
    assert pipe(path) == want[0]  # transformers 4.x's shape: [{"generated_text": ...}]
    assert pipe([a, b], batch_size=2) == want
    assert pipe([a, b], batch_size=1) == want
    if which == "blip":
        # transformers 5 serves captioning as image-text-to-text with an empty prompt
        new = hf_pipe("image-text-to-text", d)(a, text="", max_new_tokens=6)
        assert new[0]["generated_text"] == want[0][0]["generated_text"]
        prompted = caption_reference(d, [a], 6, prompt="a photo of")
        assert pipe(a, prompt="a photo of") == prompted[0]
    else:
        with pytest.raises(ValueError, match="captions without a prompt"):
            pipe(a, prompt="a photo of")


def test_image_text_to_text(llava_dir, images):
    a, b, path, _ = images
    pipe = pipeline("image-text-to-text", llava_dir, max_new_tokens=5)
    ref = hf_pipe("image-text-to-text", llava_dir)
    chat = [
        {
            "role": "user",
            "content": [{"type": "image", "image": a}, {"type": "text", "text": "describe the image"}],
        }
    ]
    want = ref(text=chat, max_new_tokens=5)
    assert_close(pipe(chat), want)
    assert want[0]["generated_text"][-1]["role"] == "assistant"
    # the image given as a path inside the chat is loaded here, to the same result
    by_path = [
        {
            "role": "user",
            "content": [{"type": "image", "path": path}, {"type": "text", "text": "describe the image"}],
        }
    ]
    assert pipe(by_path)[0]["generated_text"][-1] == want[0]["generated_text"][-1]
    assert_close(pipe([chat, chat], batch_size=1), [want, want])
    # an image with a prompt, as a dict or as transformers' pipe(image, text=...)
    prompt = "<image> what is this"
    want_plain = ref(a, text=prompt, max_new_tokens=5)
    assert_close(pipe({"image": path, "text": prompt}), want_plain)
    assert_close(pipe(a, text=prompt), want_plain)
    assert_close(pipe([a, path], text=prompt, batch_size=1), [want_plain, want_plain])
    assert_close(pipe([a, path], text=prompt), [want_plain, want_plain])  # one batch, same prompt
    assert_close(pipe(chat, return_full_text=False), ref(text=chat, max_new_tokens=5, return_full_text=False))
    json.dumps(to_json(pipe(chat)))  # the echoed chat holds a PIL image: base64 PNG in JSON


def test_audio_classification(wav2vec2_dir, root):
    import soundfile as sf

    rng = np.random.RandomState(1)
    wav = (0.1 * rng.randn(8000)).astype(np.float32)
    pipe = pipeline("audio-classification", wav2vec2_dir)
    ref = hf_pipe("audio-classification", wav2vec2_dir)
    want = ref(wav)
    assert_close(pipe(wav), want)
    assert_close(pipe(wav, top_k=2), ref(wav, top_k=2))
    assert_close(pipe({"array": wav, "sampling_rate": 16000}), want)
    # a 16 kHz WAV file (and its bytes) reads back to the same samples, within 16-bit PCM
    path = str(root / "clip.wav")
    sf.write(path, wav, 16000, subtype="FLOAT")
    with open(path, "rb") as f:
        data = f.read()
    assert_close(pipe([path, data, torch.from_numpy(wav)]), [want, want, want])
    # stereo files are averaged to mono
    stereo = str(root / "stereo.wav")
    sf.write(stereo, np.stack([wav, wav], axis=1), 16000, subtype="FLOAT")
    assert_close(pipe(stereo), want)
    # another rate is resampled to the feature extractor's 16 kHz
    from scipy.signal import resample_poly

    slow = (0.1 * rng.randn(4000)).astype(np.float32)
    assert_close(
        pipe({"array": slow, "sampling_rate": 8000}), ref(resample_poly(slow, 2, 1).astype(np.float32))
    )


def test_text_to_audio(vits_dir, root):
    pipe = pipeline("text-to-speech", vits_dir, seed=3)
    assert pipe.task == "text-to-audio"
    ref = hf_pipe("text-to-audio", vits_dir)
    torch.manual_seed(3)
    want = ref("hello there")
    got = pipe("hello there")
    assert list(got) == ["audio", "sampling_rate"] and got["sampling_rate"] == 16000
    assert_close(got, want)
    assert_close(pipe("hello there"), want)  # the seed makes each call repeat
    torch.manual_seed(3)
    want_two = ref(["hello there", "good day"], batch_size=1)
    # each call reseeds once, before the whole list, as the reference did
    assert_close(pipe(["hello there", "good day"], batch_size=1), want_two)
    # without a seed, calls draw from the global RNG (and so differ), as transformers' do
    unseeded = pipeline("text-to-audio", vits_dir)
    state = torch.get_rng_state()
    first, second = unseeded("hello there"), unseeded("hello there")
    assert not torch.equal(torch.get_rng_state(), state)
    assert first["audio"].shape != second["audio"].shape or not np.allclose(first["audio"], second["audio"])
    state = torch.get_rng_state()
    pipe("hello there")  # a seeded call leaves the global RNG as it was
    assert torch.equal(torch.get_rng_state(), state)
    wav = to_wav(got)
    with wave.open(io.BytesIO(wav)) as w:
        assert w.getframerate() == 16000 and w.getnframes() == got["audio"].shape[-1]
    # JSON carries the speech as the same WAV file, base64-encoded
    as_json = to_json(got)
    assert as_json["format"] == "wav" and as_json["sampling_rate"] == 16000
    assert base64.b64decode(as_json["audio"]) == wav


def test_convnext_image_classification(convnext_dir, images):
    a, b, path, _ = images
    pipe = HFBackendPipeline("image-classification", convnext_dir, device="cpu")
    ref = hf_pipe("image-classification", convnext_dir)
    assert_close(pipe(path), ref(a))
    assert_close(pipe([a, b], top_k=2), ref([a, b], top_k=2))
    assert_close(pipe(a, function_to_apply="sigmoid"), ref(a, function_to_apply="sigmoid"))


def test_image_classification_falls_back_to_the_backend(convnext_dir, images):
    """pipeline("image-classification") runs ViT natively and ConvNeXT through the backend."""
    pytest.importorskip("tokenmill.pipelines.image_classification")
    pipe = pipeline("image-classification", convnext_dir, top_k=1)
    assert isinstance(pipe, HFBackendPipeline)
    assert_close(pipe(images[0]), hf_pipe("image-classification", convnext_dir)(images[0], top_k=1))


def test_device_and_dtype_use_tokenmill_names(convnext_dir):
    pipe = HFBackendPipeline("image-classification", convnext_dir, device="cpu", dtype="bf16")
    assert pipe.model.dtype == torch.bfloat16 and pipe.device == torch.device("cpu")
    assert HFBackendPipeline("image-classification", convnext_dir, device="cpu").model.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        HFBackendPipeline("image-classification", convnext_dir, dtype="int3")
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        HFBackendPipeline("image-classification", convnext_dir, device="tpu")


# -- errors ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detector(detr_dir):
    return pipeline("object-detection", detr_dir)


@pytest.fixture(scope="module")
def audio_pipe(wav2vec2_dir):
    return pipeline("audio-classification", wav2vec2_dir)


def test_option_errors(detector, detr_dir):
    with pytest.raises(
        ValueError,
        match=r"object-detection got unknown option\(s\) 'top_k'; it accepts batch_size, threshold",
    ):
        detector("x.png", top_k=3)
    with pytest.raises(ValueError, match=r"threshold must be a number in \[0, 1\], got 2"):
        detector("x.png", threshold=2)
    with pytest.raises(ValueError, match="unknown option"):
        pipeline("object-detection", detr_dir, max_new_tokens=3)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        pipeline("object-detection", detr_dir, batch_size=0)


def test_image_input_errors(detector, root):
    cases = [
        (None, "object-detection got None; pass an image"),
        ([], "got an empty list of inputs"),
        ([None], "input 0 is None"),
        (3.5, "input 0 must be an image: a file path, the file's bytes or a PIL image, got float"),
        ("https://example.com/cat.png", "input 0 is a URL; tokenmill does not fetch URLs"),
        (str(root / "missing.png"), "input 0: no image file"),
        (b"not an image at all", "input 0: the bytes are not an image Pillow can read (an unknown format)"),
        (b"", "input 0 is empty bytes"),
        ("data:image/png,abc", "must be base64"),
        ("data:image/png;base64,@@@", "not valid base64"),
    ]
    for bad, message in cases:
        with pytest.raises(PipelineInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            detector(bad)
    text_file = str(root / "notes.txt")
    with open(text_file, "w") as f:
        f.write("hello")
    with pytest.raises(
        PipelineInputError, match="input 1: file .*notes.txt' is not an image Pillow can read"
    ):
        detector([Image.new("RGB", (8, 8)), text_file])


def test_audio_input_errors(audio_pipe, root):
    cases = [
        (
            b"RIFF....not audio",
            r"input 0: the bytes are not audio soundfile can read \(WAV, FLAC, OGG, MP3\): Format not recognised",
        ),
        (np.zeros((2, 100), dtype=np.float32), r"audio arrays must be 1-D \(mono\), got shape \(2, 100\)"),
        (np.zeros(100, dtype=np.int16), r"audio samples must be floats in \[-1, 1\], got dtype int16"),
        (
            {"array": np.zeros(10, np.float32)},
            "an audio dict needs 'array' \\(or 'raw'\\) and 'sampling_rate'",
        ),
        ({"array": np.zeros(10, np.float32), "sampling_rate": 0}, "sampling_rate must be a positive integer"),
        (np.zeros(0, dtype=np.float32), "input 0 holds no audio samples"),
        ("https://example.com/a.wav", "tokenmill does not fetch URLs"),
        (str(root / "missing.wav"), "no audio file"),
        (["a"], "no audio file 'a'"),
        (12, "input 0 must be audio: a file path, the file's bytes, a 1-D float array"),
    ]
    for bad, message in cases:
        with pytest.raises(PipelineInputError, match=message):
            audio_pipe(bad)


def test_text_and_chat_input_errors(vits_dir, llava_dir, images):
    tts = pipeline("text-to-audio", vits_dir)
    for bad, message in [(["  "], "input 0 is an empty string"), ([3], "input 0 must be a string, got int")]:
        with pytest.raises(PipelineInputError, match=message):
            tts(bad)
    itt = pipeline("image-text-to-text", llava_dir, max_new_tokens=2)
    a = images[0]
    url_chat = [{"role": "user", "content": [{"type": "image", "url": "https://x.org/a.png"}]}]
    cases = [
        (lambda: itt(url_chat), PipelineInputError, "tokenmill does not fetch URLs"),
        (
            lambda: itt([{"role": "user"}]),
            PipelineInputError,
            "every chat message needs 'role' and 'content'",
        ),
        (lambda: itt(a), PipelineInputError, "must be a chat .* or pass images with text="),
        (lambda: itt({"image": a}), PipelineInputError, "needs 'image' \\(or 'images'\\) and 'text'"),
        (lambda: itt([a, a], text=["one"]), PipelineInputError, "text= holds 1 prompts for 2 images"),
        (lambda: itt(a, text=["one", "two"]), PipelineInputError, "one image takes one prompt"),
        (lambda: itt(a, text=3), ValueError, "text must be a string or a non-empty list of strings"),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=message):
            call()


def test_model_errors(detr_dir, segformer_dir, root):
    with pytest.raises(ValueError, match="task 'depth-estimation' has no default model"):
        pipeline("depth-estimation")
    with pytest.raises(ModelLoadError, match="does not exist"):
        pipeline("object-detection", str(root / "nowhere" / "model"))
    with pytest.raises(
        ModelLoadError,
        match="holds a 'segformer' model, which does not do object-detection; object-detection takes one "
        "of transformers' object-detection models \\(.*detr",
    ):
        pipeline("object-detection", segformer_dir)
    # a checkpoint without the task's head: transformers would fill it with random weights
    headless = save(
        root / "segformer-base", tf.SegformerModel(tf.SegformerConfig.from_pretrained(segformer_dir))
    )
    tf.SegformerImageProcessor().save_pretrained(headless)
    with pytest.raises(
        ModelLoadError,
        match="checkpoint has no weights for SegformerForSemanticSegmentation's decode_head.* it lacks the "
        "image-segmentation head, so use a checkpoint fine-tuned for image-segmentation",
    ):
        pipeline("image-segmentation", headless)
    with pytest.raises(
        ValueError, match="the transformers backend serves object-detection, .*; got task 'fill-mask'"
    ):
        HFBackendPipeline("fill-mask", detr_dir)


def test_hub_ids_resolve_through_tokenmill_without_downloading(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(
        ModelLoadError, match="model facebook/detr-resnet-50 is not in the local Hugging Face cache"
    ):
        pipeline("object-detection", "facebook/detr-resnet-50")


def test_missing_transformers_says_how_to_install(monkeypatch, detr_dir):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(
        BackendNotInstalledError,
        match=r"object-detection runs through the transformers backend, "
        r"which needs transformers: pip install 'tokenmill\[hf\]'",
    ):
        pipeline("object-detection", detr_dir)
    monkeypatch.setitem(sys.modules, "soundfile", None)
    with pytest.raises(BackendNotInstalledError, match=r"needs soundfile: pip install 'tokenmill\[hf\]'"):
        from tokenmill.pipelines.hf_backend import load_audio

        load_audio(b"RIFF", 0, 16000, "audio-classification")
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(ImportError, match=r"needs Pillow: pip install 'tokenmill\[hf\]'"):
        from tokenmill.pipelines.hf_backend import load_image

        load_image("x.png", 0, "depth-estimation")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(detr_dir, blip_dir, images):
    a = images[0]
    on_gpu = pipeline("object-detection", detr_dir, device="cuda", threshold=0.0)
    assert on_gpu.model.device.type == "cuda"
    got, want = on_gpu(a), pipeline("object-detection", detr_dir, threshold=0.0)(a)
    assert [r["label"] for r in got] == [r["label"] for r in want]
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], abs=1e-3)
    caption = pipeline("image-to-text", blip_dir, device="cuda", dtype="bfloat16", max_new_tokens=4)(a)
    assert isinstance(caption[0]["generated_text"], str)
