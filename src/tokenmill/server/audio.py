"""OpenAI's ``POST /v1/audio/transcriptions`` and ``/v1/audio/translations``, served by an
``--task automatic-speech-recognition[=MODEL]`` pipeline.

The body is multipart/form-data as OpenAI's: ``file`` (the audio: WAV, FLAC, OGG or MP3),
``model``, and optionally ``language`` (the spoken language, ISO-639-1), ``prompt`` (text
the model reads as what came before), ``response_format`` (json, text, verbose_json, srt,
vtt) and ``temperature`` (0, the default, decodes greedily). Translations write English.

The audio is decoded on the pipeline's worker thread, never on the event loop; requests
with the same options that arrive together are transcribed in one pipeline call.
"""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenmill.server.batching import Job
from tokenmill.server.errors import APIError, clip, invalid_param
from tokenmill.server.pipelines import PipelineSet, ServedPipeline, pick_model

TASK = "automatic-speech-recognition"
#: Whisper's transcribe defaults for skipping windows without speech
NO_SPEECH_THRESHOLD = 0.6
LOGPROB_THRESHOLD = -1.0
RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
#: form fields OpenAI defines; any other is an error naming them
FIELDS = {
    "file",
    "model",
    "language",
    "prompt",
    "response_format",
    "temperature",
    "timestamp_granularities[]",
}


def _field(form: Any, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid_param(f"{name} must be a text field, not a file", name)
    return value


async def _read_form(request: Request) -> tuple[bytes, str, dict[str, Any]]:
    kind = request.headers.get("content-type", "")
    # a form without a file part is sent url-encoded: read it, then say the file is missing
    if not kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise APIError(
            400,
            f"send the audio as multipart/form-data with a 'file' field (got content type {clip(kind or 'none')})",
        )
    try:
        form = await request.form()
    except Exception as e:  # malformed multipart bodies
        raise APIError(400, f"the multipart body cannot be read: {clip(str(e), 200)}") from None
    unknown = sorted(set(form.keys()) - FIELDS)
    if unknown:
        raise invalid_param(
            f"unknown field(s) {', '.join(map(repr, unknown))}; this route takes {', '.join(sorted(FIELDS))}",
            unknown[0],
        )
    upload = form.get("file")
    if upload is None:
        raise APIError(400, "'file' is required: the audio file to transcribe", param="file",
                       code="missing_required_parameter")  # fmt: skip
    if not isinstance(upload, UploadFile):
        raise invalid_param("file must be an uploaded audio file, not a text field", "file")
    data = await upload.read()
    if not data:
        raise invalid_param(f"the uploaded file {clip(upload.filename or '')!r} is empty", "file")
    fields = {
        name: _field(form, name) for name in ("model", "language", "prompt", "response_format", "temperature")
    }
    for granularity in form.getlist("timestamp_granularities[]"):
        if granularity != "segment":
            raise invalid_param(
                f"timestamp_granularities: only 'segment' is supported, got {clip(granularity)}",
                "timestamp_granularities[]",
            )
    return data, upload.filename or "", fields


def _options(fields: dict[str, Any], response_format: str, translate: bool) -> dict[str, Any]:
    options: dict[str, Any] = {"task": "translate" if translate else "transcribe"}
    if response_format in ("verbose_json", "srt", "vtt"):
        options["return_timestamps"] = True
    if response_format == "verbose_json":
        options["return_language"] = True
    if fields["language"]:
        options["language"] = fields["language"]
    if fields["prompt"]:
        options["prompt"] = fields["prompt"]
    raw = fields["temperature"]
    if raw is not None and raw != "":
        try:
            temperature = float(raw)
        except ValueError:
            raise invalid_param(f"temperature must be a number, got {clip(raw)}", "temperature") from None
        if not math.isfinite(temperature) or not 0 <= temperature <= 1:
            raise invalid_param(f"temperature must be between 0 and 1, got {clip(raw)}", "temperature")
        options["temperature"] = temperature
    return options


def _param_of(message: str) -> str | None:
    """The form field an option error is about."""
    for name in ("language", "prompt", "temperature", "task"):
        if message.startswith(name) or f" {name} " in message or f"{name} '" in message:
            return "model" if name == "task" else name
    return None


def _job(sp: ServedPipeline, data: bytes, opts: dict[str, Any], meta: dict[str, Any]) -> Job:
    from tokenmill.audio.io import AudioInputError, load_audio
    from tokenmill.pipelines.base import PipelineInputError

    pipe = sp.pipe
    if "no_speech_threshold" in getattr(pipe, "call_options", ()):
        # Whisper's own transcribe drops windows it hears as silence; without this a silent
        # tail comes back as a made-up " you" or "."
        opts = {"no_speech_threshold": NO_SPEECH_THRESHOLD, "logprob_threshold": LOGPROB_THRESHOLD, **opts}

    def prepare() -> tuple[list[Any], dict[str, Any]]:
        try:
            samples = load_audio(data, pipe.feature_config.sampling_rate, name="the uploaded file")
        except AudioInputError as e:
            raise PipelineInputError(str(e)) from None
        meta["duration"] = len(samples) / pipe.feature_config.sampling_rate
        return [samples], opts

    return Job(f"audio {json.dumps(opts, sort_keys=True)}", prepare, pipe.run, lambda results: results[0])


def _clock(seconds: float, separator: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{separator}{ms:03d}"


def subtitles(chunks: list[dict[str, Any]], kind: str) -> str:
    """The segments as SubRip (srt) or WebVTT (vtt) cues."""
    sep = "," if kind == "srt" else "."
    cues = []
    for i, c in enumerate(chunks, start=1):
        start, end = c["timestamp"]
        timing = f"{_clock(start, sep)} --> {_clock(end if end is not None else start, sep)}"
        text = c["text"].strip()
        cues.append(f"{i}\n{timing}\n{text}\n" if kind == "srt" else f"{timing}\n{text}\n")
    body = "\n".join(cues)
    return body if kind == "srt" else "WEBVTT\n\n" + body


async def transcription_route(pipelines: PipelineSet, request: Request, *, translate: bool) -> Response:
    models = pipelines.by_task.get(TASK)
    if not models:
        raise APIError(
            404,
            "this server serves no speech recognition model; start it with "
            "--task automatic-speech-recognition=MODEL (or --task automatic-speech-recognition for whisper-tiny.en)",
            param="model",
            code="model_not_found",
        )
    data, _name, fields = await _read_form(request)
    sp = pick_model(models, fields["model"], TASK)
    response_format = fields["response_format"] or "json"
    if response_format not in RESPONSE_FORMATS:
        raise invalid_param(
            f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got {clip(response_format)}",
            "response_format",
        )
    options = _options(fields, response_format, translate)
    try:
        opts = {
            **sp.pipe.defaults,
            **sp.pipe.sanitize(options),
        }  # the pipeline's defaults, as a call merges them
    except ValueError as e:
        raise invalid_param(str(e), _param_of(str(e))) from None
    meta: dict[str, Any] = {}
    try:
        result = await sp.batcher.submit(_job(sp, data, opts, meta))
    except ValueError as e:
        raise invalid_param(str(e), "file") from None
    text = result["text"].strip()
    if response_format == "json":
        return JSONResponse({"text": text})
    if response_format == "text":
        return Response(text + "\n", media_type="text/plain; charset=utf-8")
    chunks = result.get("chunks", [])
    if response_format in ("srt", "vtt"):
        media = "text/plain; charset=utf-8" if response_format == "srt" else "text/vtt; charset=utf-8"
        return Response(subtitles(chunks, response_format), media_type=media)
    segments = [
        {"id": i, "start": c["timestamp"][0], "end": c["timestamp"][1], "text": c["text"]}
        for i, c in enumerate(chunks)
    ]
    language = chunks[0]["language"] if chunks else _language_of(sp, opts)
    return JSONResponse(
        {
            "task": "translate" if translate else "transcribe",
            "language": language,
            "duration": round(meta.get("duration", 0.0), 2),
            "text": text,
            "segments": segments,
        }
    )


def _language_of(sp: ServedPipeline, opts: dict[str, Any]) -> str:
    from tokenmill.audio.languages import LANGUAGES

    code = opts.get("language") or "en"
    return LANGUAGES.get(code, code)
