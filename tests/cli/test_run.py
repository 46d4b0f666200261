"""`tokenmill run TASK INPUT...` and the tasks `tokenmill models` lists, on tiny encoders.

Most runs call the command's ``main()`` in this process (the models load in a moment
and torch is imported once); a few run it as a process, as a user does, to check
standard input, exit codes and the one-line errors.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

import tiny_encoders
from tokenmill import pipeline
from tokenmill.cli.main import main
from tokenmill.cli.run import parse_options
from tokenmill.pipelines.model_tasks import (
    DECODER_MODEL_TYPES,
    tasks_for_config,
    tasks_for_model_dir,
    tasks_for_packaged,
)

TEXTS = ["I loved this film, it was wonderful.", "Terrible.", "The plot was fine but the acting was wooden."]


def _cli(capsys, monkeypatch, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _process(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tokenmill.cli.main", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )


def assert_close(got, want, path="result"):
    """Same structure, strings and ints; floats within 1e-5."""
    if isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-5), path
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{path}[{i}]")
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), path
        for k in want:
            assert_close(got[k], want[k], f"{path}.{k}")
    else:
        assert got == want, path


@pytest.fixture(scope="module")
def cls_dir():
    return tiny_encoders.tiny_encoder_dir("bert", "sequence-classification")


@pytest.fixture(scope="module")
def cls_pipe(cls_dir):
    return pipeline("text-classification", model=cls_dir)


# -- options and inputs ------------------------------------------------------------


def test_options_are_json_when_they_parse_and_strings_otherwise():
    got = parse_options(["top_k=3", "aggregation_strategy=simple", 'targets=["a", "b"]', "x=true", "s=a=b"])
    assert got == {"top_k": 3, "aggregation_strategy": "simple", "targets": ["a", "b"], "x": True, "s": "a=b"}
    with pytest.raises(ValueError, match=r"--option takes name=value \(e.g. --option top_k=3\), got 'top_k'"):
        parse_options(["top_k"])


def test_text_classification_json_equals_the_python_api(capsys, monkeypatch, cls_dir, cls_pipe):
    code, out, err = _cli(
        capsys, monkeypatch, "run", "text-classification", *TEXTS, "--model", cls_dir, "--json"
    )
    assert code == 0, err
    assert_close(json.loads(out), cls_pipe(TEXTS))
    code, out, err = _cli(
        capsys, monkeypatch, "run", "sentiment-analysis", *TEXTS[:2], "-m", cls_dir, "-o", "top_k=2", "--json"
    )
    assert code == 0, err
    assert_close(json.loads(out), cls_pipe(TEXTS[:2], top_k=2))


def test_inputs_may_follow_the_options(capsys, monkeypatch, cls_dir, cls_pipe):
    args = ["run", "text-classification", TEXTS[0], "-m", cls_dir, TEXTS[1], "--json", "--", "-5 degrees"]
    code, out, err = _cli(capsys, monkeypatch, *args)
    assert code == 0, err
    assert_close(json.loads(out), cls_pipe([TEXTS[0], TEXTS[1], "-5 degrees"]))
    with pytest.raises(SystemExit):
        main(["run", "text-classification", "x", "-m", cls_dir, "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_the_table_shows_each_input_with_its_labels(capsys, monkeypatch, cls_dir, cls_pipe):
    code, out, _ = _cli(
        capsys, monkeypatch, "run", "text-classification", *TEXTS[:2], "-m", cls_dir, "-o", "top_k=3"
    )
    assert code == 0
    want = cls_pipe(TEXTS[:2], top_k=3)
    lines = out.splitlines()
    assert lines[0] == f"[1] {TEXTS[0]}"
    assert lines[1].split() == ["label", "score"]
    assert lines[2].split() == [want[0][0]["label"], f"{want[0][0]['score']:.4f}"]
    assert lines[5] == f"[2] {TEXTS[1]}"
    assert len(lines) == 10


def test_inputs_come_from_stdin_one_per_line(capsys, monkeypatch, cls_dir, cls_pipe):
    stdin = f"{TEXTS[0]}\n\n{TEXTS[1]}\n"
    code, out, err = _cli(
        capsys, monkeypatch, "run", "text-classification", "-m", cls_dir, "--json", stdin=stdin
    )
    assert code == 0, err
    assert_close(json.loads(out), cls_pipe(TEXTS[:2]))  # the blank line is skipped
    # "-" reads standard input in its place among the arguments
    code, out, err = _cli(
        capsys, monkeypatch, "run", "text-classification", TEXTS[2], "-", "-m", cls_dir, "--json", stdin=stdin
    )
    assert code == 0, err
    assert_close(json.loads(out), cls_pipe([TEXTS[2], *TEXTS[:2]]))


def test_text_pairs_come_as_json_lines(capsys, monkeypatch, cls_dir, cls_pipe):
    pairs = [{"text": "A man eats.", "text_pair": "Someone eats."}, {"text": "Just one."}]
    stdin = "\n".join(json.dumps(p) for p in pairs)
    code, out, err = _cli(
        capsys,
        monkeypatch,
        "run",
        "text-classification",
        "-m",
        cls_dir,
        "--json-input",
        "--json",
        stdin=stdin,
    )
    assert code == 0, err
    assert_close(json.loads(out), cls_pipe(pairs))
    code, _, err = _cli(
        capsys, monkeypatch, "run", "text-classification", "{not json", "-m", cls_dir, "--json-input"
    )
    assert code == 2 and "input 0 is not valid JSON" in err and "{not json" in err


def test_token_classification_with_options(capsys, monkeypatch):
    d = tiny_encoders.tiny_encoder_dir("bert", "token-classification")
    args = [
        "run",
        "ner",
        "Angela Merkel lives in Berlin.",
        "-m",
        d,
        "--option",
        "aggregation_strategy=simple",
    ]
    code, out, err = _cli(capsys, monkeypatch, *args, "--json")
    assert code == 0, err
    want = pipeline("ner", model=d)(["Angela Merkel lives in Berlin."], aggregation_strategy="simple")
    assert_close(json.loads(out), want)
    code, out, err = _cli(capsys, monkeypatch, *args)
    assert code == 0 and out.splitlines()[1].split()[:2] == ["entity_group", "score"]


def test_fill_mask_table(capsys, monkeypatch):
    d = tiny_encoders.tiny_encoder_dir("bert", "masked-lm")
    code, out, err = _cli(capsys, monkeypatch, "run", "fill-mask", "Paris is the [MASK] of France.", "-m", d)
    assert code == 0, err
    want = pipeline("fill-mask", model=d)("Paris is the [MASK] of France.")
    assert out.splitlines()[1].split() == ["score", "token", "token_str", "sequence"]
    assert len(out.splitlines()) == 2 + len(want)


def test_zero_shot_takes_candidate_labels(capsys, monkeypatch):
    d = tiny_encoders.tiny_encoder_dir("bert", "sequence-classification", "nli")
    args = [
        "run",
        "zero-shot-classification",
        TEXTS[0],
        "-m",
        d,
        "--candidate-labels",
        "film, sports,politics",
    ]
    code, out, err = _cli(capsys, monkeypatch, *args, "--json")
    assert code == 0, err
    want = pipeline("zero-shot-classification", model=d)(
        [TEXTS[0]], candidate_labels=["film", "sports", "politics"]
    )
    assert_close(json.loads(out), want)
    code, out, _ = _cli(capsys, monkeypatch, *args)
    assert out.splitlines()[1].split() == ["label", "score"] and len(out.splitlines()) == 5
    code, _, err = _cli(capsys, monkeypatch, "run", "zero-shot-classification", TEXTS[0], "-m", d)
    assert code == 2 and "zero-shot-classification needs --candidate-labels a,b,c" in err


def test_question_answering_takes_the_question_once(capsys, monkeypatch):
    pytest.importorskip("tokenmill.pipelines.question_answering")
    d = tiny_encoders.tiny_encoder_dir("bert", "question-answering")
    contexts = ["Paris is the capital of France.", "Berlin is in Germany."]
    code, out, err = _cli(
        capsys, monkeypatch, "run", "question-answering", *contexts, "-m", d, "--question", "Where?", "--json"
    )
    assert code == 0, err
    want = pipeline("question-answering", model=d)([{"question": "Where?", "context": c} for c in contexts])
    assert_close(json.loads(out), want)
    code, out, err = _cli(
        capsys, monkeypatch, "run", "question-answering", *contexts, "-m", d, "--question", "Where?"
    )
    assert code == 0 and out.startswith("[1] Where? | Paris is the capital")
    code, _, err = _cli(capsys, monkeypatch, "run", "question-answering", contexts[0], "-m", d)
    assert code == 2 and "question-answering needs --question Q" in err


def test_sentence_similarity_compares_inputs_to_the_source(capsys, monkeypatch):
    d = tiny_encoders.tiny_encoder_dir("bert", "base")
    sentences = ["A man is eating a piece of bread.", "A girl plays the violin."]
    args = ["run", "sentence-similarity", *sentences, "-m", d, "--source", "A man is eating food."]
    code, out, err = _cli(capsys, monkeypatch, *args, "--json")
    assert code == 0, err
    want = pipeline("sentence-similarity", model=d)(
        {"source_sentence": "A man is eating food.", "sentences": sentences}
    )
    assert_close(json.loads(out), want)
    code, out, _ = _cli(capsys, monkeypatch, *args)
    lines = out.splitlines()
    assert lines[0] == "source: A man is eating food." and lines[1].split() == ["sentence", "score"]
    assert lines[2].endswith(f"{want[0]:.4f}")


def test_feature_extraction_prints_vectors(capsys, monkeypatch):
    d = tiny_encoders.tiny_encoder_dir("bert", "base")
    code, out, err = _cli(
        capsys,
        monkeypatch,
        "run",
        "feature-extraction",
        "Hello world.",
        "-m",
        d,
        "-o",
        "pooling=mean",
        "--json",
    )
    assert code == 0, err
    assert len(out.splitlines()) == 1  # vectors stay on one line
    assert_close(json.loads(out), pipeline("feature-extraction", model=d)(["Hello world."], pooling="mean"))
    code, out, _ = _cli(capsys, monkeypatch, "run", "feature-extraction", "Hello world.", "-m", d)
    assert out.splitlines() == ["[1] Hello world.", "    5 tokens x 32 values"]  # [CLS] hello world . [SEP]


# -- errors: one line on stderr, exit code 2 -------------------------------------------


def test_user_errors_are_one_clear_line(capsys, monkeypatch, cls_dir):
    cases = [
        (
            ["run", "text-clasification", "x", "-m", cls_dir],
            "unknown task 'text-clasification' (did you mean 'text-classification'?)",
        ),
        (
            ["run", "text-classification", "x", "-m", cls_dir, "-o", "topk=2"],
            "text-classification got unknown option(s) 'topk'; it accepts",
        ),
        (
            ["run", "text-classification", "x", "-m", cls_dir, "-o", "top_k=0"],
            "top_k must be a positive integer",
        ),
        (
            ["run", "fill-mask", "x [MASK]", "-m", cls_dir],
            "has no weights for a masked-language-model head (fill-mask)",
        ),
        (
            ["run", "fill-mask", "x [MASK]"],
            "task 'fill-mask' has no default model in tokenmill; pass --model",
        ),
        (
            ["run", "text-classification", "x", "-m", cls_dir, "--question", "q"],
            "--question is for question-answering; text-classification does not take it",
        ),
        (
            ["run", "question-answering", "{}", "-m", cls_dir, "--question", "q", "--json-input"],
            "--question and --json-input both give the inputs; use one of them",
        ),
        (
            ["run", "text-classification", "x", "-m", cls_dir, "--batch-size", "0"],
            "--batch-size must be a positive integer, got 0",
        ),
        (
            ["run", "text-classification", "x", "-m", "/no/such/dir"],
            "model path '/no/such/dir' does not exist",
        ),
    ]
    for args, message in cases:
        code, out, err = _cli(capsys, monkeypatch, *args)
        assert code == 2, (args, err)
        assert err.startswith("tokenmill run: error: ") and message in err, (args, err)
        assert out == "" and len(err.strip().splitlines()) == 1


def test_empty_stdin_is_an_error(capsys, monkeypatch, cls_dir):
    code, _, err = _cli(capsys, monkeypatch, "run", "text-classification", "-m", cls_dir, stdin="\n  \n")
    assert code == 2 and "no inputs: standard input held no non-empty line" in err


def test_an_input_too_long_says_to_pass_truncation(capsys, monkeypatch, cls_dir, cls_pipe):
    long = " ".join(["word"] * 100)  # the tiny models take 64 tokens
    code, _, err = _cli(capsys, monkeypatch, "run", "text-classification", "short", long, "-m", cls_dir)
    assert code == 2
    assert "input 1 is 102 tokens long, over this model's limit of 64; shorten it or pass --truncation" in err
    code, out, err = _cli(
        capsys, monkeypatch, "run", "text-classification", long, "-m", cls_dir, "--truncation", "--json"
    )
    assert code == 0, err
    assert_close(json.loads(out), cls_pipe([long], truncation=True))


def test_as_a_process_stdin_and_exit_codes(cls_dir, cls_pipe):
    res = _process(
        "run", "text-classification", "--model", cls_dir, "--json", stdin=f"{TEXTS[0]}\n{TEXTS[1]}\n"
    )
    assert res.returncode == 0, res.stderr
    assert_close(json.loads(res.stdout), cls_pipe(TEXTS[:2]))
    res = _process("run", "text-classification", "x", "--model", cls_dir, "--option", "nope=1")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "tokenmill run: error: text-classification got unknown option(s) 'nope'" in res.stderr


# -- which tasks each model serves (tokenmill models) ------------------------------


def test_packaged_models_list_only_registered_tasks():
    assert tasks_for_packaged("smollm2-135m-instruct") == ["text-generation"]
    assert tasks_for_packaged("gemma3-270m") == ["text-generation"]
    assert tasks_for_packaged("all-minilm-l6-v2") == ["feature-extraction", "sentence-similarity"]
    # speech tasks are listed once registered
    assert tasks_for_packaged("whisper-tiny.en") == _registered(["automatic-speech-recognition"])
    assert tasks_for_model_dir(tiny_encoders.minilm_dir()) == ["feature-extraction", "sentence-similarity"]


def test_decoder_families_match_the_engine_registry():
    from tokenmill.models.registry import _families

    assert set(DECODER_MODEL_TYPES) == set(_families())


@pytest.mark.parametrize(
    ("config", "tasks"),
    [
        ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, ["feature-extraction", "fill-mask"]),
        (
            {"model_type": "bert", "architectures": ["BertModel"]},
            ["feature-extraction", "sentence-similarity"],
        ),
        (
            {
                "model_type": "roberta",
                "architectures": ["RobertaForSequenceClassification"],
                "id2label": {"0": "NEG", "1": "POS"},
            },
            ["text-classification"],
        ),
        (
            {
                "model_type": "bart",
                "architectures": ["BartForSequenceClassification"],
                "label2id": {"contradiction": 0, "neutral": 1, "entailment": 2},
            },
            ["text-classification", "zero-shot-classification"],
        ),
        (
            {"model_type": "distilbert", "architectures": ["DistilBertForTokenClassification"]},
            ["token-classification"],
        ),
        (
            {"model_type": "xlm-roberta", "architectures": ["XLMRobertaForQuestionAnswering"]},
            ["question-answering"],
        ),
        (
            {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]},
            ["summarization", "translation", "text2text-generation"],
        ),
        (
            {"model_type": "marian", "architectures": ["MarianMTModel"]},
            ["summarization", "translation", "text2text-generation"],
        ),
        (
            {"model_type": "mbart", "architectures": ["MBartForConditionalGeneration"]},
            ["summarization", "translation", "text2text-generation"],
        ),
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, ["text-generation"]),
        ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, ["text-generation"]),
        ({"model_type": "electra", "architectures": ["ElectraForSequenceClassification"]}, []),
        ({"model_type": "bart", "architectures": ["BartForQuestionAnswering"]}, []),  # no native BART QA head
        ({"architectures": ["BertForMaskedLM"]}, []),
        (
            {"model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"]},
            ["automatic-speech-recognition"],
        ),
        ({"model_type": "vit", "architectures": ["ViTForImageClassification"]}, ["image-classification"]),
        ({"model_type": "vit", "architectures": ["ViTModel"]}, []),  # image features are no text task
        # no native implementation: the transformers backend's tasks
        (
            {"model_type": "convnext", "architectures": ["ConvNextForImageClassification"]},
            ["image-classification"],
        ),
        ({"model_type": "detr", "architectures": ["DetrForObjectDetection"]}, ["object-detection"]),
    ],
)
def test_tasks_from_config(config, tasks):
    # in the order of tokenmill.pipelines.TASKS; tasks appear once they are registered
    assert tasks_for_config(config) == _registered(tasks)


def _registered(tasks: list[str]) -> list[str]:
    from tokenmill.pipelines.registry import TASKS

    return [t for t in tasks if t in TASKS]


def test_tasks_of_model_directories(tmp_path):
    nli = tiny_encoders.tiny_encoder_dir("bert", "sequence-classification", "nli")
    assert tasks_for_model_dir(nli) == ["text-classification", "zero-shot-classification"]
    ner = tiny_encoders.tiny_encoder_dir("distilbert", "token-classification")
    assert tasks_for_model_dir(ner) == ["token-classification"]
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert tasks_for_model_dir(str(gguf)) == ["text-generation"]
    assert tasks_for_model_dir(str(tmp_path)) == ["text-generation"]  # a directory holding a .gguf
    assert tasks_for_model_dir(str(tmp_path / "nothing")) == []


def _cache_repo(root, repo_id: str, files: dict[str, str]) -> None:
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for name, text in files.items():
        (snap / name).write_text(text)


def test_models_lists_tasks_of_packaged_and_cached_models(capsys, monkeypatch, tmp_path):
    _cache_repo(
        tmp_path,
        "org/bert-ner",
        {"config.json": json.dumps({"model_type": "bert", "architectures": ["BertForTokenClassification"]})},
    )
    _cache_repo(tmp_path, "org/tiny-gguf", {"tiny.Q4_0.gguf": "GGUF"})
    _cache_repo(
        tmp_path,
        "org/electra",
        {"config.json": json.dumps({"model_type": "electra", "architectures": ["ElectraModel"]})},
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    code, out, err = _cli(capsys, monkeypatch, "models", "--json")
    assert code == 0, err
    data = json.loads(out)
    packaged = {m["name"]: m["tasks"] for m in data["packaged"]}
    assert packaged["smollm2-135m-instruct"] == ["text-generation"]
    assert packaged["all-minilm-l6-v2"] == ["feature-extraction", "sentence-similarity"]
    cached = {c["repo_id"]: c["tasks"] for c in data["hub_cache"]}
    assert cached == {
        "org/bert-ner": ["token-classification"],
        "org/electra": [],
        "org/tiny-gguf": ["text-generation"],
    }
    code, out, _ = _cli(capsys, monkeypatch, "models")
    assert "tasks: feature-extraction, sentence-similarity" in out
    assert "org/bert-ner" in out and "tasks: token-classification" in out
    assert "tasks: none (not a model tokenmill runs)" in out
