"""Tasks tokenmill does not run natively, served through transformers (``pip install tokenmill[hf]``).

Object detection, image segmentation, depth estimation, image-to-text, image-text-to-text,
audio classification, text-to-audio, and image classification for architectures without a
native tokenmill model (ConvNeXT): each wraps ``transformers.pipeline`` behind tokenmill's
surface, so a backend task takes the same inputs and raises the same errors as a native one:

- one input or a list of them (a list gives a list of results);
- images as a file path, the file's bytes, a ``data:image/...;base64,`` string or a PIL
  image; audio as a file path, bytes, a 1-D float array at the model's sampling rate or
  ``{"array": ..., "sampling_rate": ...}`` (resampled here). URLs are never fetched;
- unknown options are a ValueError listing the accepted ones; bad inputs a PipelineInputError;
- models load strictly: an architecture that does not do the task, or a checkpoint without
  the task's head (which transformers would fill with random weights), is a ModelLoadError;
- ``seed=`` makes the sampling tasks (text-to-audio, captioning, image-text-to-text) repeat.

Results are transformers' plain Python results: masks and depth maps stay PIL images,
waveforms and raw depth are numpy arrays, token ids lists of ints. ``to_json`` turns them
into what JSON can hold (images as base64 PNG strings); ``to_wav`` writes text-to-audio
output as a WAV file. "image-to-text", which transformers 5 folded into image-text-to-text,
keeps its 4.x behaviour here: a caption per image, ``[{"generated_text": ...}]``.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from tokenmill.pipelines.base import Pipeline, PipelineInputError

# -- option checks ------------------------------------------------------------------------


def _unit(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")


def _positive(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _flag(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be True or False, got {v!r}")


def _mapping(name: str, v: Any) -> None:
    if not isinstance(v, dict):
        raise ValueError(f"{name} must be a dict of keyword arguments, got {type(v).__name__}")


def _choice(*allowed: str) -> Callable[[str, Any], None]:
    def check(name: str, v: Any) -> None:
        if v not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {v!r}")

    return check


def _text(name: str, v: Any) -> None:
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{name} must be a non-empty string, got {v!r}")


def _texts(name: str, v: Any) -> None:
    if isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(s, str) for s in v)):
        return
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {v!r}")


def _seed(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {v!r}")


_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "batch_size": _positive,
    "threshold": _unit,
    "mask_threshold": _unit,
    "overlap_mask_area_threshold": _unit,
    "subtask": _choice("semantic", "instance", "panoptic"),
    "top_k": _positive,
    "function_to_apply": _choice("softmax", "sigmoid", "none"),
    "max_new_tokens": _positive,
    "generate_kwargs": _mapping,
    "forward_params": _mapping,
    "prompt": _text,
    "text": _texts,
    "return_full_text": _flag,
    "continue_final_message": _flag,
    "skip_special_tokens": _flag,
    "clean_up_tokenization_spaces": _flag,
    "stop_sequence": _texts,
    "seed": _seed,
}

#: task -> (what each input is, the options it takes besides batch_size)
TASKS: dict[str, tuple[str, frozenset[str]]] = {
    "object-detection": ("image", frozenset({"threshold"})),
    "image-segmentation": (
        "image",
        frozenset({"subtask", "threshold", "mask_threshold", "overlap_mask_area_threshold"}),
    ),
    "depth-estimation": ("image", frozenset()),
    "image-classification": ("image", frozenset({"top_k", "function_to_apply"})),
    "image-to-text": ("image", frozenset({"max_new_tokens", "generate_kwargs", "prompt", "seed"})),
    "image-text-to-text": (
        "image-text",
        frozenset(
            {
                "text",
                "max_new_tokens",
                "generate_kwargs",
                "return_full_text",
                "continue_final_message",
                "skip_special_tokens",
                "clean_up_tokenization_spaces",
                "stop_sequence",
                "seed",
            }
        ),
    ),
    "audio-classification": ("audio", frozenset({"top_k", "function_to_apply"})),
    "text-to-audio": ("text", frozenset({"forward_params", "generate_kwargs", "seed"})),
}
_ALIASES = {"text-to-speech": "text-to-audio"}
#: tasks whose result per input is one dict; the others give a list of dicts per input
_ONE_DICT = {"depth-estimation", "text-to-audio"}
#: options tokenmill handles itself rather than passing to transformers
_OWN = {"batch_size", "seed", "text"}


class BackendNotInstalledError(ImportError):
    """transformers (or Pillow / soundfile) is missing for a task served by the backend."""


def _require(module: str, task: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        package = {"PIL": "Pillow"}.get(top, top)
        raise BackendNotInstalledError(
            f"{task} runs through the transformers backend, which needs {package}: "
            f"pip install 'tokenmill[hf]' ({e})"
        ) from e


# -- inputs -------------------------------------------------------------------------------


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def _path(item: Any) -> Any:
    return os.fspath(item) if isinstance(item, os.PathLike) else item


def load_image(item: Any, i: int, task: str = "image") -> Any:
    """A PIL image from a path, bytes, a ``data:image/...;base64,`` string or a PIL image."""
    image_mod = _require("PIL.Image", task)
    item = _path(item)
    if isinstance(item, image_mod.Image):
        return item
    if isinstance(item, str):
        if _is_url(item):
            raise PipelineInputError(
                f"input {i} is a URL; tokenmill does not fetch URLs: download the image and pass "
                "its path or bytes"
            )
        if item.startswith("data:image/"):
            head, _, data = item.partition(",")
            if not head.endswith(";base64"):
                raise PipelineInputError(
                    f"input {i}: a data URI image must be base64 (data:image/png;base64,...)"
                )
            try:
                source, what = io.BytesIO(base64.b64decode(data, validate=True)), "the data URI is"
            except ValueError as e:
                raise PipelineInputError(f"input {i}: the data URI is not valid base64 ({e})") from None
        elif not item.strip():
            raise PipelineInputError(f"input {i} is an empty string; give an image path")
        elif not os.path.isfile(item):
            raise PipelineInputError(f"input {i}: no image file {item!r}")
        else:
            source, what = item, f"file {item!r} is"
    elif isinstance(item, (bytes, bytearray, memoryview)):
        if len(item) == 0:
            raise PipelineInputError(f"input {i} is empty bytes; give an image file's contents")
        source, what = io.BytesIO(bytes(item)), "the bytes are"
    else:
        raise PipelineInputError(
            f"input {i} must be an image: a file path, the file's bytes or a PIL image, got {type(item).__name__}"
        )
    try:
        image = image_mod.open(source)
        image.load()
    except Exception as e:  # Pillow raises several types for undecodable data
        reason = "an unknown format" if isinstance(e, image_mod.UnidentifiedImageError) else str(e)
        raise PipelineInputError(f"input {i}: {what} not an image Pillow can read ({reason})") from None
    return image


def load_audio(item: Any, i: int, sampling_rate: int, task: str = "audio") -> Any:
    """Mono float32 samples at ``sampling_rate`` from a path, bytes, an array or {"array", "sampling_rate"}."""
    from tokenmill.audio.io import AudioDecoderError, AudioInputError
    from tokenmill.audio.io import load_audio as read

    try:
        return read(_path(item), sampling_rate, name=f"input {i}")
    except AudioInputError as e:
        raise PipelineInputError(str(e)) from None
    except AudioDecoderError as e:
        _require("soundfile", task)  # soundfile itself missing: say it in the backend's words
        raise BackendNotInstalledError(f"{task}: {e}") from None


def _is_chat(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(m, dict) and "role" in m for m in x)


def _chat_images(chat: list[dict[str, Any]], i: int, task: str) -> list[dict[str, Any]]:
    """The chat with every image part loaded here (never fetched): {"type": "image", "image": PIL}."""
    out = []
    for m in chat:
        if "content" not in m:
            raise PipelineInputError(f"input {i}: every chat message needs 'role' and 'content'")
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image":
                    src = next((part[k] for k in ("image", "url", "path") if k in part), None)
                    if src is None:
                        raise PipelineInputError(f"input {i}: an image part needs 'image', 'url' or 'path'")
                    part = {"type": "image", "image": load_image(src, i, task)}
                parts.append(part)
            content = parts
        out.append({**m, "content": content})
    return out


# -- results ------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Tensors in transformers' results as numpy arrays (floats) or lists of ints (token ids)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.is_floating_point():
            return value.float().numpy()
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def to_json(result: Any) -> Any:
    """``result`` as JSON can hold it: PIL images as base64 PNG strings, speech
    ({"audio", "sampling_rate"}) as a base64 WAV file, arrays as lists."""
    if isinstance(result, dict):
        if "audio" in result and "sampling_rate" in result and hasattr(result["audio"], "shape"):
            wav = base64.b64encode(to_wav(result)).decode("ascii")
            return {"audio": wav, "format": "wav", "sampling_rate": int(result["sampling_rate"])}
        return {str(k): to_json(v) for k, v in result.items()}
    if isinstance(result, (list, tuple)):
        return [to_json(v) for v in result]
    if isinstance(result, (str, int, float, bool)) or result is None:
        return result
    if isinstance(result, torch.Tensor):
        return result.detach().cpu().tolist()
    if hasattr(result, "save") and hasattr(result, "mode"):  # a PIL image
        buf = io.BytesIO()
        result.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode("ascii")
    if hasattr(result, "tolist"):  # numpy arrays and scalars
        return result.tolist()
    raise TypeError(f"a {type(result).__name__} in a pipeline result cannot be written as JSON")


def to_wav(result: dict[str, Any]) -> bytes:
    """A text-to-audio result ({"audio", "sampling_rate"}) as a 16-bit PCM WAV file."""
    import wave

    import numpy as np

    audio = np.asarray(result["audio"], dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[None]  # (channels, samples)
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).round().astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(audio.shape[0])
        w.setsampwidth(2)
        w.setframerate(int(result["sampling_rate"]))
        w.writeframes(pcm.T.tobytes())
    return buf.getvalue()


# -- the pipeline -------------------------------------------------------------------------


class HFBackendPipeline(Pipeline):
    """``pipe(inputs, **options)`` for a task served by transformers; same surface as native pipelines.

    Args:
        task: a backend task (``TASKS``) or "text-to-speech".
        model: short name, model directory or Hub repo id (resolved by tokenmill; transformers
            only ever sees a local directory).
        device, dtype: tokenmill's names ("cpu", "cuda:0"; "float32", "bf16"); float32 by default.
        batch_size: inputs per forward pass, passed to transformers.
        options: default options for every call.
    """

    backend = "transformers"

    def __init__(
        self,
        task: str,
        model: str | None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        revision: str | None = None,
        batch_size: int = 8,
        **options: Any,
    ) -> None:
        task = _ALIASES.get(task, task)
        if task not in TASKS:
            raise ValueError(f"the transformers backend serves {', '.join(TASKS)}; got task {task!r}")
        self.task = task
        self.kind, self.call_options = TASKS[task]
        self.batch_size = self._check_batch_size(batch_size)
        self.defaults = self.sanitize(options) if options else {}
        model = os.fspath(model) if isinstance(model, os.PathLike) else model
        if not isinstance(model, str):
            raise ValueError(
                f"{task} has no default model in tokenmill; pass model= with a directory or a Hub repo id"
            )
        tf = _require("transformers", task)
        if self.kind != "text":
            _require("PIL.Image" if "image" in self.kind else "soundfile", task)

        from tokenmill.utils.devices import resolve_device
        from tokenmill.weights.model_loader import resolve_source
        from tokenmill.weights.task_loader import resolve_task_dtype

        self.device = resolve_device(device)
        self.dtype = resolve_task_dtype(dtype)
        self.source = resolve_source(model, revision)
        if not os.path.isdir(self.source):
            from tokenmill.weights.errors import ModelLoadError

            raise ModelLoadError(f"{self.source} is a single file; {task} loads a model directory")
        self.tokenizer, self.max_length = None, None
        model = _load_model(tf, task, self.source, self.dtype)
        try:
            if task == "image-to-text":
                self.hf = _Captioner(tf, model, self.source, self.device)
            else:
                # the model object, checked, and its processors from the same directory
                self.hf = tf.pipeline(
                    task, model=model, device=self.device, **_components(tf, task, self.source)
                )
        except (ValueError, OSError, KeyError, TypeError) as e:
            from tokenmill.weights.errors import ModelLoadError

            raise ModelLoadError(f"transformers could not load {self.source} for {task}: {e}") from e
        self.model = self.hf.model
        self.config = self.model.config

    # -- options ------------------------------------------------------------------------
    def sanitize(self, options: dict[str, Any]) -> dict[str, Any]:
        out = self.known_options(options, self.call_options | {"batch_size"})
        for name, value in out.items():
            _CHECKS[name](name, value)
        return out

    # -- inputs -------------------------------------------------------------------------
    def _split_inputs(self, inputs: Any) -> tuple[list[Any], bool]:
        if inputs is None:
            raise PipelineInputError(f"{self.task} got None; {self._wants()}")
        if self.kind == "image-text" and _is_chat(inputs):
            return [inputs], True
        if isinstance(inputs, (list, tuple)):
            if len(inputs) == 0:
                raise PipelineInputError(f"{self.task} got an empty list of inputs; pass at least one")
            return list(inputs), False
        return [inputs], True

    def _wants(self) -> str:
        return {
            "image": "pass an image (a file path, its bytes or a PIL image) or a list of them",
            "audio": "pass audio (a file path, its bytes, a float array or {'array', 'sampling_rate'}) "
            "or a list of them",
            "text": "pass a text or a list of texts",
            "image-text": "pass a chat, {'image': ..., 'text': ...}, or images with text=",
        }[self.kind]

    def check_input(self, item: Any, i: int) -> Any:
        if item is None:
            raise PipelineInputError(f"input {i} is None; {self._wants()}")
        if self.kind == "image":
            return load_image(item, i, self.task)
        if self.kind == "audio":
            return load_audio(item, i, self.hf.feature_extractor.sampling_rate, self.task)
        if self.kind == "text":
            if not isinstance(item, str):
                raise PipelineInputError(f"input {i} must be a string, got {type(item).__name__}")
            if not item.strip():
                raise PipelineInputError(f"input {i} is an empty string; give some text")
            return item
        # image-text-to-text: a chat, or an image with its prompt
        if _is_chat(item):
            return _chat_images(item, i, self.task)
        if isinstance(item, dict):
            images = item.get("images", item.get("image"))
            text = item.get("text")
            if images is None or not isinstance(text, str):
                raise PipelineInputError(
                    f"input {i}: an image-text input needs 'image' (or 'images') and 'text' (a string), "
                    f"got keys {sorted(item)}"
                )
            many = isinstance(images, (list, tuple))
            loaded = (
                [load_image(x, i, self.task) for x in images] if many else load_image(images, i, self.task)
            )
            return {"images": loaded, "text": text}
        raise PipelineInputError(
            f"input {i} must be a chat (a list of {{'role', 'content'}} dicts) or "
            f"{{'image': ..., 'text': ...}}, got {type(item).__name__}; or pass images with text="
        )

    def __call__(self, inputs: Any, **options: Any) -> Any:
        opts = {**self.defaults, **(self.sanitize(options) if options else {})}
        text = opts.pop("text", None)
        if text is not None:
            inputs = self._pair_text(inputs, text)
        items, single = self._split_inputs(inputs)
        items = [self.check_input(x, i) for i, x in enumerate(items)]
        results = self.run(items, opts)
        return results[0] if single else results

    def _pair_text(self, images: Any, text: str | list[str]) -> Any:
        """transformers' ``pipe(images, text=...)``: one prompt per image (or one for all)."""
        if _is_chat(images):
            raise PipelineInputError("a chat carries its own text and images; don't pass text= with it")
        if isinstance(images, (list, tuple)):
            prompts = [text] * len(images) if isinstance(text, str) else text
            if len(prompts) != len(images):
                raise PipelineInputError(f"text= holds {len(prompts)} prompts for {len(images)} images")
            return [{"image": x, "text": t} for x, t in zip(images, prompts)]
        if not isinstance(text, str):
            raise PipelineInputError("one image takes one prompt: pass text= as a string")
        return {"image": images, "text": text}

    # -- running ------------------------------------------------------------------------
    def run(self, items: list[Any], opts: dict[str, Any]) -> list[Any]:
        kwargs = {k: v for k, v in opts.items() if k not in _OWN}
        batch_size = opts.get("batch_size", self.batch_size)
        with self._seeded(opts.get("seed")), torch.inference_mode():
            if self.kind == "image-text":
                raw = self._image_text(items, batch_size, kwargs)
            elif len(items) == 1 and self.task != "image-to-text":
                # one input runs without transformers' DataLoader, which draws from the
                # global RNG: a seeded call then samples as transformers' own does
                raw = [self.hf(items[0], **kwargs)]
            else:
                raw = self.hf(items, batch_size=batch_size, **kwargs)
        return [_plain(r) for r in self._per_input(raw, len(items))]

    @contextlib.contextmanager
    def _seeded(self, seed: int | None) -> Iterator[None]:
        """A seeded call samples from its own RNG state and leaves the global one as it was;
        an unseeded call draws from the global state, as transformers does."""
        if seed is None:
            yield
            return
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield

    def _image_text(self, items: list[Any], batch_size: int, kwargs: dict[str, Any]) -> list[Any]:
        chats = [_is_chat(x) for x in items]
        if all(chats):
            if len(items) == 1:
                return [self.hf(text=items[0], **kwargs)]
            return self.hf(text=items, batch_size=batch_size, **kwargs)
        if any(chats):
            raise PipelineInputError("give chats or {'image', 'text'} inputs in one call, not both")
        # transformers reads a list of dicts as one chat: give images and prompts as two lists,
        # which it processes (padded) as one batch, batch_size inputs at a time
        out: list[Any] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            out.extend(
                self.hf(images=[x["images"] for x in chunk], text=[x["text"] for x in chunk], **kwargs)
            )
        return out

    def _per_input(self, raw: Any, n: int) -> list[Any]:
        """transformers' output for ``n`` inputs as one result per input (a list of dicts where
        the task gives several); it flattens some of them when there is one dict per input."""
        if self.task in _ONE_DICT:
            return list(raw)
        if all(isinstance(r, list) for r in raw) and len(raw) == n:
            return list(raw)
        flat = [d for r in raw for d in (r if isinstance(r, list) else [r])]
        k = len(flat) // n
        return [flat[j * k : (j + 1) * k] for j in range(n)]


def _auto_classes(tf: Any, task: str) -> tuple[Any, ...]:
    if task == "image-to-text":
        return (tf.AutoModelForImageTextToText,)
    from transformers.pipelines import SUPPORTED_TASKS

    return tuple(SUPPORTED_TASKS[task]["pt"])


def _load_model(tf: Any, task: str, source: str, dtype: torch.dtype) -> Any:
    """The model for ``task``, loaded strictly: the wrong architecture, or a checkpoint without
    the task's head (which transformers would fill with random weights), is an error."""
    from tokenmill.weights.errors import ModelLoadError

    try:
        config = tf.AutoConfig.from_pretrained(source)
    except (ValueError, OSError, KeyError) as e:
        raise ModelLoadError(f"transformers cannot read the config in {source}: {e}") from e
    classes = _auto_classes(tf, task)
    auto = next((c for c in classes if type(config) in c._model_mapping), None)
    if auto is None:
        kinds = sorted({k for c in classes for k in _mapping_names(c)})
        shown = ", ".join(kinds[:12]) + (", ..." if len(kinds) > 12 else "")
        raise ModelLoadError(
            f"{source} holds a {config.model_type!r} model, which does not do {task}; "
            f"{task} takes one of transformers' {task} models ({shown})"
        )
    try:
        model, info = auto.from_pretrained(source, dtype=dtype, output_loading_info=True)
    except ImportError as e:  # e.g. a DETR that wants timm for its backbone
        raise BackendNotInstalledError(f"{source} needs a package that is not installed: {e}") from e
    except (ValueError, OSError, KeyError) as e:
        raise ModelLoadError(f"transformers could not load {source} for {task}: {e}") from e
    # missing parameters were filled with random values; a missing buffer is recomputed or harmless
    params = {name for name, _ in model.named_parameters()}
    missing = sorted(k for k in info.get("missing_keys") or () if k in params)
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ModelLoadError(
            f"{source}: the checkpoint has no weights for {type(model).__name__}'s {shown}; "
            f"it lacks the {task} head, so use a checkpoint fine-tuned for {task}"
        )
    return model.eval()


def _mapping_names(auto: Any) -> list[str]:
    mapping = auto._model_mapping
    return list(getattr(mapping, "_model_mapping", {}))  # model_type -> class name


def _components(tf: Any, task: str, source: str) -> dict[str, Any]:
    """The processors transformers' pipeline class takes for ``task``, loaded from ``source`` as
    ``transformers.pipeline(task, model=source)`` would load them."""
    from transformers.pipelines import check_task

    impl = check_task(task)[1]["impl"]
    if isinstance(impl, str):
        import importlib

        module, _, name = impl.rpartition(".")
        impl = getattr(importlib.import_module(module), name)
    autos = {
        "tokenizer": tf.AutoTokenizer,
        "feature_extractor": tf.AutoFeatureExtractor,
        "image_processor": tf.AutoImageProcessor,
        "video_processor": getattr(tf, "AutoVideoProcessor", None),
        "processor": tf.AutoProcessor,
    }
    out: dict[str, Any] = {}
    for name, auto in autos.items():
        flag = getattr(impl, f"_load_{name}", False)  # True: needed; None: if there is one; False: never
        if flag is False or auto is None:
            continue
        try:
            part = auto.from_pretrained(source)
            if name == "processor" and not isinstance(part, tf.ProcessorMixin):
                raise TypeError(f"{source} has no multimodal processor (processor_config.json)")
        except Exception:
            if flag:
                raise
            continue
        out[name] = part
    return out


class _Captioner:
    """transformers 4.x's image-to-text: image processor -> ``generate`` -> decode each sequence."""

    def __init__(self, tf: Any, model: Any, source: str, device: torch.device) -> None:
        self.model = model.to(device)
        self.image_processor = tf.AutoImageProcessor.from_pretrained(source)
        self.tokenizer = tf.AutoTokenizer.from_pretrained(source)
        self.device, self.dtype = device, model.dtype
        from transformers.image_utils import load_image as hf_load_image

        self._load = hf_load_image  # upright RGB, as transformers' pipelines prepare every image

    def __call__(
        self,
        images: list[Any],
        *,
        batch_size: int = 8,
        max_new_tokens: int | None = None,
        generate_kwargs: dict[str, Any] | None = None,
        prompt: str | None = None,
    ) -> list[list[dict[str, str]]]:
        gen = dict(generate_kwargs or {})
        if max_new_tokens is not None:
            if "max_new_tokens" in gen:
                raise ValueError("max_new_tokens is given twice, directly and in generate_kwargs; use one")
            gen["max_new_tokens"] = max_new_tokens
        default = self.model.generation_config
        if "max_new_tokens" not in gen and "max_length" not in gen:
            if default.max_new_tokens is None and default.max_length == 20:  # transformers' own default
                gen["max_new_tokens"] = 256  # as transformers 4.x's pipeline, where the model sets none
        out: list[list[dict[str, str]]] = []
        for start in range(0, len(images), batch_size):
            chunk = [self._load(x) for x in images[start : start + batch_size]]
            inputs = self._inputs(chunk, prompt)
            pixels = inputs.pop(self.model.main_input_name)
            seqs = self.model.generate(pixels, **inputs, **gen)
            per = len(seqs) // len(chunk)
            texts = self.tokenizer.batch_decode(seqs, skip_special_tokens=True)
            out.extend(
                [{"generated_text": t} for t in texts[j * per : (j + 1) * per]] for j in range(len(chunk))
            )
        return out

    def _inputs(self, images: list[Any], prompt: str | None) -> dict[str, Any]:
        model_type = self.model.config.model_type
        if prompt is None:
            inputs = dict(self.image_processor(images=images, return_tensors="pt"))
        elif model_type == "vision-encoder-decoder":
            raise ValueError("a vision-encoder-decoder model captions without a prompt; leave prompt= out")
        elif model_type == "pix2struct":
            inputs = dict(self.image_processor(images=images, header_text=prompt, return_tensors="pt"))
        else:
            inputs = dict(self.image_processor(images=images, return_tensors="pt"))
            if model_type == "git":  # GIT's prompt follows [CLS], without the tokenizer's [SEP]
                ids = [
                    self.tokenizer.cls_token_id,
                    *self.tokenizer(prompt, add_special_tokens=False).input_ids,
                ]
                inputs["input_ids"] = torch.tensor([ids] * len(images))
            else:
                enc = self.tokenizer([prompt] * len(images), return_tensors="pt")
                # only ids and mask: captioners take no token_type_ids, which BERT tokenizers add
                inputs.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return {
            k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
            for k, v in inputs.items()
        }
