"""``POST /v1/audio/transcriptions`` and ``/v1/audio/translations`` on tiny random Whisper.

Every answer is checked against the same pipeline called directly; the openai client
talks to a real server once. Random models write nonsense, so the pipelines cap
``max_new_tokens`` (a pipeline default the routes keep).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from server_util import ServerThread

import tiny_whisper as tw
from tokenmill import pipeline
from tokenmill.server.app import create_app
from tokenmill.server.pipelines import PipelineSet

sf = pytest.importorskip("soundfile")

SR = 16_000
TASK = "automatic-speech-recognition"


def _wav(seconds: float, seed: int) -> tuple[bytes, np.ndarray]:
    t = np.arange(int(seconds * SR)) / SR
    rng = np.random.default_rng(seed)
    audio = (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.02 * rng.standard_normal(t.size)).astype(
        np.float32
    )
    buf = io.BytesIO()
    sf.write(buf, audio, SR, format="WAV", subtype="FLOAT")
    return buf.getvalue(), audio


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipes():
    return {
        "tiny-en": pipeline(TASK, tw.whisper_dir(multilingual=False), max_new_tokens=12),
        "tiny-multi": pipeline(TASK, tw.whisper_dir(multilingual=True), max_new_tokens=12),
    }


@pytest.fixture(scope="module")
def client(pipes):
    app = create_app(None, pipelines=PipelineSet([(TASK, name, p) for name, p in pipes.items()]))
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def clip():
    return _wav(4.0, 1)


def _post(client, route="transcriptions", data=None, file=None, **fields):
    files = {"file": ("clip.wav", file, "audio/wav")} if file is not None else None
    return client.post(f"/v1/audio/{route}", data={"model": "tiny-en", **fields, **(data or {})}, files=files)


def test_json_and_text(client, pipes, clip):
    wav, audio = clip
    want = pipes["tiny-en"](audio)["text"].strip()
    r = _post(client, file=wav)
    assert r.status_code == 200, r.text
    assert r.json() == {"text": want}
    r = _post(client, file=wav, response_format="text")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert r.text == want + "\n"


def test_verbose_json_has_segments(client, pipes, clip):
    wav, audio = clip
    want = pipes["tiny-multi"](audio, return_timestamps=True, language="de")
    r = _post(client, file=wav, model="tiny-multi", language="de", response_format="verbose_json")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "transcribe" and body["language"] == "german"
    assert body["duration"] == 4.0
    assert body["text"] == want["text"].strip()
    assert body["segments"] == [
        {"id": i, "start": c["timestamp"][0], "end": c["timestamp"][1], "text": c["text"]}
        for i, c in enumerate(want["chunks"])
    ]
    assert len(body["segments"]) >= 2


def test_srt_and_vtt(client, pipes, clip):
    wav, audio = clip
    chunks = pipes["tiny-en"](audio, return_timestamps=True)["chunks"]
    srt = _post(client, file=wav, response_format="srt").text
    first = chunks[0]
    start, end = first["timestamp"]

    def clock(s, sep):
        ms = round(s * 1000)
        return f"00:00:{ms // 1000:02d}{sep}{ms % 1000:03d}"

    assert srt.startswith(f"1\n{clock(start, ',')} --> {clock(end, ',')}\n{first['text'].strip()}\n\n2\n")
    assert srt.count(" --> ") == len(chunks)
    vtt = _post(client, file=wav, response_format="vtt")
    assert vtt.headers["content-type"].startswith("text/vtt")
    assert vtt.text.startswith(f"WEBVTT\n\n{clock(start, '.')} --> {clock(end, '.')}\n")


def test_translations_and_prompt(client, pipes, clip):
    wav, audio = clip
    want = pipes["tiny-multi"](audio, task="translate", language="fr", prompt="hello")["text"].strip()
    r = _post(client, "translations", file=wav, model="tiny-multi", language="fr", prompt="hello")
    assert r.status_code == 200, r.text
    assert r.json() == {"text": want}
    assert (
        want != pipes["tiny-multi"](audio, task="transcribe", language="fr", prompt="hello")["text"].strip()
    )


def test_requests_together_give_their_own_answers(client, pipes):
    import concurrent.futures

    clips = [_wav(2.0 + k, k) for k in range(3)]
    with concurrent.futures.ThreadPoolExecutor(3) as ex:
        answers = list(ex.map(lambda c: _post(client, file=c[0]).json(), clips))
    assert answers == [{"text": pipes["tiny-en"](a)["text"].strip()} for _, a in clips]


def _error(r, status, param, message, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert message in err["message"], err["message"]
    if code is not None:
        assert err["code"] == code


def test_errors_are_openai_shaped(client, clip):
    wav, _ = clip
    _error(_post(client), 400, "file", "'file' is required", "missing_required_parameter")
    _error(_post(client, data={"file": "not a file"}), 400, "file", "file must be an uploaded audio file")
    _error(
        _post(client, file=b"RIFF....not audio"), 400, "file", "the uploaded file: the bytes are not audio"
    )
    _error(_post(client, file=b""), 400, "file", "is empty")
    _error(
        _post(client, file=wav, response_format="mp4"),
        400,
        "response_format",
        "response_format must be one of",
    )
    _error(_post(client, file=wav, model="whisper-1"), 404, "model", "the model 'whisper-1' does not exist")
    _error(
        client.post("/v1/audio/transcriptions", files={"file": ("a.wav", wav)}),
        400,
        "model",
        "model is required",
    )
    _error(
        _post(client, "translations", file=wav), 400, "model", "task 'translate' needs a multilingual Whisper"
    )
    _error(
        _post(client, file=wav, model="tiny-multi", language="xx"),
        400,
        "language",
        "language 'xx' is not one",
    )
    _error(_post(client, file=wav, language="de"), 400, "language", "this model is English-only")
    _error(_post(client, file=wav, temperature="hot"), 400, "temperature", "temperature must be a number")
    _error(_post(client, file=wav, temperature="1.5"), 400, "temperature", "between 0 and 1")
    _error(_post(client, file=wav, stream="true"), 400, "stream", "unknown field(s) 'stream'")
    _error(
        _post(client, file=wav, data={"timestamp_granularities[]": "word"}),
        400,
        "timestamp_granularities[]",
        "only 'segment' is supported",
    )
    r = client.post("/v1/audio/transcriptions", json={"file": "clip.wav", "model": "tiny-en"})
    _error(r, 400, None, "send the audio as multipart/form-data")


def test_a_server_without_speech_says_how_to_serve_it(tmp_path):
    import tiny_encoders

    pipe = pipeline("text-classification", tiny_encoders.tiny_encoder_dir("bert", "sequence-classification"))
    with TestClient(create_app(None, pipelines=PipelineSet([("text-classification", "cls", pipe)]))) as c:
        r = c.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF")}, data={"model": "m"})
    _error(r, 404, "model", "--task automatic-speech-recognition=MODEL", "model_not_found")


def test_openai_client(pipes, clip):
    openai = pytest.importorskip("openai")
    wav, audio = clip
    app = create_app(None, pipelines=PipelineSet([(TASK, "tiny-en", pipes["tiny-en"])]))
    server = ServerThread(app).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        got = client.audio.transcriptions.create(
            model="tiny-en", file=("clip.wav", wav), response_format="verbose_json"
        )
        want = pipes["tiny-en"](audio, return_timestamps=True)
        assert got.text == want["text"].strip()
        assert [(s.start, s.end, s.text) for s in got.segments] == [
            (c["timestamp"][0], c["timestamp"][1], c["text"]) for c in want["chunks"]
        ]
        assert got.language == "english" and got.duration == 4.0
        text = client.audio.transcriptions.create(
            model="tiny-en", file=("clip.wav", wav), response_format="text"
        )
        assert text.strip() == pipes["tiny-en"](audio)["text"].strip()  # decoded without timestamps
    finally:
        server.stop()


def test_windows_heard_as_silence_give_no_text(client, pipes, clip, monkeypatch):
    """The route drops windows as Whisper's transcribe does (no-speech probability over 0.6
    and average log-probability under -1); a threshold no window passes shows it is applied."""
    from tokenmill.server import audio

    wav, audio_array = clip
    want = pipes["tiny-en"](audio_array, no_speech_threshold=0.6, logprob_threshold=-1.0)["text"].strip()
    assert _post(client, file=wav).json() == {"text": want}
    monkeypatch.setattr(audio, "NO_SPEECH_THRESHOLD", 1e-12)
    monkeypatch.setattr(audio, "LOGPROB_THRESHOLD", 0.0)
    r = _post(client, file=wav, response_format="verbose_json")
    assert r.status_code == 200, r.text
    assert r.json()["text"] == "" and r.json()["segments"] == []
