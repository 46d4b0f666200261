"""`tokenmill run automatic-speech-recognition FILE...` on tiny random Whisper checkpoints:
the table and --json output equal the pipeline's results; the speech flags and their errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tiny_whisper as tw
from tokenmill import pipeline
from tokenmill.cli.main import main

sf = pytest.importorskip("soundfile")

SR = 16_000
TASK = "automatic-speech-recognition"
CAP = ["-o", "max_new_tokens=12"]  # random models write until the limit


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech")
    paths = []
    for k, seconds in enumerate((3.0, 5.0)):
        t = np.arange(int(seconds * SR)) / SR
        audio = (0.3 * np.sin(2 * np.pi * (200 + 100 * k + 300 * t) * t)).astype(np.float32)
        path = root / f"clip{k}.flac"
        sf.write(path, audio, SR, format="FLAC")
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def english():
    return tw.whisper_dir(multilingual=False)


@pytest.fixture(scope="module")
def multi():
    return tw.whisper_dir(multilingual=True)


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_output_is_the_pipelines(capsys, english, files):
    pipe = pipeline(TASK, english, max_new_tokens=12)
    code, out, _ = _cli(capsys, "run", TASK, *files, "--model", english, *CAP, "--json")
    assert code == 0
    assert json.loads(out) == pipe(files)
    code, out, _ = _cli(
        capsys, "run", "asr", files[0], "--model", english, *CAP, "--return-timestamps", "--json"
    )
    want = pipe(files[0], return_timestamps=True)
    chunks = [{**c, "timestamp": list(c["timestamp"])} for c in want["chunks"]]
    assert json.loads(out) == [{"text": want["text"], "chunks": chunks}]  # inputs from arguments: a list


def test_table_shows_text_and_segments(capsys, multi, files):
    pipe = pipeline(TASK, multi, max_new_tokens=12)
    want = pipe(files, return_timestamps=True, language="de", task="translate")
    code, out, _ = _cli(
        capsys,
        "run",
        TASK,
        *files,
        "-m",
        multi,
        *CAP,
        "--return-timestamps",
        "--language",
        "de",
        "--task",
        "translate",
    )
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"[1] {files[0]}"
    assert lines[1] == "    " + want[0]["text"].strip()
    c = want[0]["chunks"][0]
    assert lines[3] == f"    {c['timestamp'][0]:7.2f} -> {c['timestamp'][1]:7.2f}  {c['text'].strip()}"
    assert f"[2] {files[1]}" in lines
    assert out.count(" -> ") == sum(len(w["chunks"]) for w in want)
    # without timestamps: the text alone
    code, out, _ = _cli(capsys, "run", TASK, files[0], "-m", multi, *CAP, "--language", "de")
    assert out.splitlines() == [f"[1] {files[0]}", "    " + pipe(files[0], language="de")["text"].strip()]


def test_speech_flag_errors(capsys, english, files, tmp_path):
    code, _, err = _cli(capsys, "run", TASK, files[0], "-m", english, "--task", "translate")
    assert code == 2 and "task 'translate' needs a multilingual Whisper" in err
    code, _, err = _cli(capsys, "run", TASK, str(tmp_path / "none.wav"), "-m", english)
    assert code == 2 and "input 0: no audio file" in err
    code, _, err = _cli(capsys, "run", "text-classification", "hello", "--language", "en")
    assert code == 2 and "--language is for automatic-speech-recognition" in err
    with pytest.raises(SystemExit):
        main(["run", TASK, files[0], "--task", "summarize"])
