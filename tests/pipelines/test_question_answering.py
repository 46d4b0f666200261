"""question-answering against transformers 4.x's pipeline, written out here over transformers' model.

transformers 5 has no question-answering pipeline, so ``reference`` below restates what 4.x's
did on its fast-tokenizer path: chunk (question, context) with truncation="only_second" and
the stride, softmax the start/end logits of each chunk over its context tokens and CLS,
score spans start x end, keep the top ones per chunk, align them to words, merge answers with
the same text and sort. The tiny models take 64 tokens, so long contexts span many chunks.
"""

import os
import sys

import numpy as np
import pytest
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
import tiny_encoders  # noqa: E402
from tokenmill import pipeline  # noqa: E402
from tokenmill.pipelines.base import PipelineInputError  # noqa: E402
from tokenmill.pipelines.question_answering import QuestionAnsweringPipeline  # noqa: E402
from tokenmill.weights.task_loader import MissingHeadError  # noqa: E402

SHORT = [
    ("Where do I live?", "My name is Wolfgang and I live in Berlin."),
    ("What is the capital of France?", "Paris is the capital and most populous city of France."),
    ("Who wrote it?", "The novel, first published in 1813, was written by Jane Austen in Hampshire."),
    ("Wo?", "  Zürich's café — naïve ☃ déjà vu, 1813.  "),
]
FILLER = (
    "The committee met on Tuesday to discuss the budget for the coming year. "
    "Several members raised concerns about the cost of maintaining the old bridge. "
    "After a long debate, they agreed to postpone the decision until the spring. "
)
NEEDLE = "zebra"
FAMILIES = ["bert", "distilbert", "roberta", "xlm-roberta"]
# about 300 tokens for every tokenizer (the BPE and Unigram ones of the tiny models split
# words finer), the needle well past the first 64-token chunk
LONG_CONTEXT = FILLER * 4 + f"Everyone agreed that the {NEEDLE} was the best mascot. " + FILLER * 2
SHORTER_LONG_CONTEXT = FILLER * 2 + f"Everyone agreed that the {NEEDLE} was the best mascot. " + FILLER


SHORT_OPTIONS = [
    {"top_k": 3},
    {"top_k": 2, "align_to_words": False},
    {"handle_impossible_answer": True, "top_k": 2},
    {"max_answer_len": 2, "top_k": 3},
]
LONG_OPTIONS = [
    {},
    {"top_k": 3, "doc_stride": 10},
    {"max_seq_len": 48, "doc_stride": 16, "handle_impossible_answer": True},
]


def long_context(family):
    return LONG_CONTEXT if family in ("bert", "distilbert") else SHORTER_LONG_CONTEXT


# -- the reference: transformers 4.x's QuestionAnsweringPipeline, restated ----------------------
def reference(
    tok,
    model,
    question,
    context,
    top_k=1,
    max_answer_len=15,
    max_seq_len=None,
    doc_stride=None,
    handle_impossible_answer=False,
    align_to_words=True,
):
    max_seq_len = max_seq_len or min(tok.model_max_length, 384)
    doc_stride = min(max_seq_len // 2, 128) if doc_stride is None else doc_stride
    enc = tok(
        text=question,
        text_pair=context,
        truncation="only_second",
        max_length=max_seq_len,
        stride=doc_stride,
        return_token_type_ids=True,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    min_null_score = 1000000
    answers = []
    for span in range(len(enc["input_ids"])):
        ids = np.array(enc["input_ids"][span])
        p_mask = np.array([sid != 1 for sid in enc.sequence_ids(span)], dtype=np.int64)
        p_mask[ids == tok.cls_token_id] = 0  # CLS stays in (unanswerable questions point there)
        with torch.no_grad():
            out = model(**{k: torch.tensor([enc[k][span]]) for k in tok.model_input_names})
        start, end = out.start_logits.numpy(), out.end_logits.numpy()  # (1, T)
        wanted = np.abs(p_mask[None] - 1) & np.array([enc["attention_mask"][span]])
        start = np.where(wanted == 0, -10000.0, start)
        end = np.where(wanted == 0, -10000.0, end)
        start = np.exp(start - start.max(axis=-1, keepdims=True))
        start = start / start.sum()
        end = np.exp(end - end.max(axis=-1, keepdims=True))
        end = end / end.sum()
        if handle_impossible_answer:
            min_null_score = min(min_null_score, (start[0, 0] * end[0, 0]).item())
        start[0, 0] = end[0, 0] = 0.0
        # decode_spans
        k = top_k * 2 + 10 if align_to_words else top_k
        candidates = np.tril(np.triu(np.matmul(start[:, :, None], end[:, None, :])), max_answer_len - 1)
        flat = candidates.flatten()
        if k == 1:
            order = [np.argmax(flat)]
        elif len(flat) < k:
            order = np.argsort(-flat)
        else:
            part = np.argpartition(-flat, k)[0:k]
            order = part[np.argsort(-flat[part])]
        starts, ends = np.unravel_index(order, candidates.shape)[1:]
        keep = np.isin(starts, wanted.nonzero()) & np.isin(ends, wanted.nonzero())
        starts, ends = starts[keep], ends[keep]
        scores = candidates[0, starts, ends]
        encoding = enc.encodings[span]
        for s, e, score in zip(starts, ends, scores):
            try:
                if not align_to_words:
                    raise TypeError
                lo = encoding.word_to_chars(encoding.token_to_word(s), sequence_index=1)[0]
                hi = encoding.word_to_chars(encoding.token_to_word(e), sequence_index=1)[1]
            except TypeError:
                lo, hi = encoding.offsets[s][0], encoding.offsets[e][1]
            same = [a for a in answers if a["answer"].lower() == context[lo:hi].lower()]
            if same:
                same[0]["score"] += score.item()
            else:
                answers.append({"score": score.item(), "start": lo, "end": hi, "answer": context[lo:hi]})
    if handle_impossible_answer:
        answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
    answers = sorted(answers, key=lambda x: x["score"], reverse=True)[:top_k]
    return answers[0] if len(answers) == 1 else answers


def assert_same(got, want):
    got, want = (got, want) if isinstance(want, list) else ([got], [want])
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want):
        assert list(g) == ["score", "start", "end", "answer"]
        assert (g["start"], g["end"], g["answer"]) == (w["start"], w["end"], w["answer"]), (got, want)
        assert isinstance(g["score"], float) and abs(g["score"] - w["score"]) < 1e-4


@pytest.fixture(scope="module")
def models():
    """(ours, transformers' tokenizer, transformers' model) per family, built once."""
    cache = {}

    def get(family):
        if family not in cache:
            d = tiny_encoders.tiny_encoder_dir(family, "question-answering")
            tok = transformers.AutoTokenizer.from_pretrained(d)
            cache[family] = (
                pipeline("question-answering", model=d),
                tok,
                tiny_encoders.tiny_hf_model(family, "question-answering"),
            )
        return cache[family]

    return get


@pytest.fixture(scope="module")
def needle_dir(tmp_path_factory):
    """A tiny BERT whose start and end logits peak on the token "zebra", wherever it stands.

    The layers' output projections are zeroed, so each position's final state is its
    normalised embedding; "zebra" gets a spike on hidden unit 0, the only unit qa_outputs reads.
    """
    tok = tiny_encoders.tiny_tokenizer("bert")
    torch.manual_seed(0)
    model = transformers.BertForQuestionAnswering(
        tiny_encoders.hf_config("bert", "question-answering")
    ).eval()
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            for proj in (layer.attention.output.dense, layer.output.dense):
                proj.weight.zero_()
                proj.bias.zero_()
        emb = model.bert.embeddings
        for table in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
            table.weight[:, 0] = 0.0
        emb.word_embeddings.weight[tok.convert_tokens_to_ids(NEEDLE), 0] = 3.0
        model.qa_outputs.weight.zero_()
        model.qa_outputs.weight[:, 0] = 4.0
        model.qa_outputs.bias.zero_()
    path = str(tmp_path_factory.mktemp("needle-qa"))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_short_contexts_match_4x(models, family):
    ours, tok, hf = models(family)
    got = ours([{"question": q, "context": c} for q, c in SHORT])  # one padded batch
    for (q, c), g in zip(SHORT, got):
        assert_same(g, reference(tok, hf, q, c))
        assert c[g["start"] : g["end"]] == g["answer"]
        for kwargs in SHORT_OPTIONS:
            assert_same(ours(question=q, context=c, **kwargs), reference(tok, hf, q, c, **kwargs))


@pytest.mark.parametrize("family", FAMILIES)
def test_long_context_is_chunked_as_4x(models, family):
    ours, tok, hf = models(family)
    question, context = "What was the best mascot?", long_context(family)
    n_chunks = len(ours.preprocess({"question": question, "context": context}, 0, ours._resolve({})))
    assert n_chunks >= 8  # several times the model's 64 tokens, chunks overlapping by 32
    for kwargs in LONG_OPTIONS:
        want = reference(tok, hf, question, context, **kwargs)
        assert_same(ours(question=question, context=context, **kwargs), want)


def test_answer_past_the_first_chunk_is_found(needle_dir):
    ours = pipeline("question-answering", model=needle_dir)
    question = "What was the best mascot?"
    features = ours.preprocess({"question": question, "context": LONG_CONTEXT}, 0, ours._resolve({}))
    at = LONG_CONTEXT.index(NEEDLE)
    first = features[0].meta["encoding"]
    first_chunk_end = max(e for (_, e), sid in zip(first.offsets, first.sequence_ids) if sid == 1)
    assert len(features) >= 4 and first_chunk_end < at  # the needle is not in the first chunk
    got = ours(question=question, context=LONG_CONTEXT)
    assert (got["answer"], got["start"], got["end"]) == (NEEDLE, at, at + len(NEEDLE))
    # it is in two overlapping chunks, each nearly sure: 4.x adds the scores of equal answers
    assert got["score"] > 1.9
    tok = transformers.AutoTokenizer.from_pretrained(needle_dir)
    hf = transformers.BertForQuestionAnswering.from_pretrained(needle_dir).eval()
    assert_same(got, reference(tok, hf, question, LONG_CONTEXT))
    top = ours(question=question, context=LONG_CONTEXT, top_k=3)
    assert top[0]["answer"] == NEEDLE and top[1]["score"] < 0.1
    assert_same(top, reference(tok, hf, question, LONG_CONTEXT, top_k=3))


def test_every_way_of_passing_inputs(models):
    ours, _, _ = models("bert")
    (q1, c1), (q2, c2) = SHORT[:2]
    one = ours(question=q1, context=c1)
    assert isinstance(one, dict)
    assert ours({"question": q1, "context": c1}) == one
    assert ours(q1, c1) == one
    # batches are padded, so their scores may differ from one-by-one in the last float bits
    two = ours([{"question": q1, "context": c1}, {"question": q2, "context": c2}])
    assert len(two) == 2
    assert_same(two[0], one)
    assert_same(ours(question=[q1, q2], context=[c1, c2]), two)
    same_context = ours(question=[q1, q2], context=c1)
    assert len(same_context) == 2
    assert_same(same_context[0], one)
    # a list always gives a list, even of one input
    assert ours([{"question": q1, "context": c1}]) == [one]
    qa = pipeline(
        "question-answering", model=tiny_encoders.tiny_encoder_dir("bert", "question-answering"), top_k=2
    )
    assert isinstance(qa, QuestionAnsweringPipeline) and len(qa(question=q1, context=c1)) == 2


def test_long_question_is_an_error_unless_truncation(models):
    ours, _, _ = models("bert")
    question = "what " * 20 + "?"
    with pytest.raises(PipelineInputError) as e:
        ours(question=question, context=SHORT[0][1], max_question_len=10)
    assert "input 0: the question is 21 tokens long, over max_question_len=10" in str(e.value)
    assert "truncation=True" in str(e.value)
    cut = ours(question=question, context=SHORT[0][1], max_question_len=10, truncation=True)
    assert cut == ours(question="what " * 10, context=SHORT[0][1])
    # the default max_question_len (64) is more than fits beside a context in 64 tokens
    with pytest.raises(PipelineInputError, match="chunks would not advance; pass a smaller doc_stride"):
        ours(question="what " * 40, context=LONG_CONTEXT)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p: p(question="Where?"), "question= was given without context=; pass both"),
        (lambda p: p(context="Here."), "context= was given without question=; pass both"),
        (lambda p: p({"question": "Where?"}), "input 0 misses 'context'"),
        (
            lambda p: p({"question": "a", "context": "b", "answer": "c"}),
            "input 0 has unknown keys ['answer']",
        ),
        (lambda p: p({"question": "", "context": "b"}), "input 0: 'question' is an empty string"),
        (lambda p: p(question="Where?", context="   "), "input 0: 'context' is an empty string"),
        (lambda p: p({"question": 3, "context": "b"}), "input 0: 'question' must be a string, got int"),
        (lambda p: p("just a string"), "input 0 must be a dict {'question': ..., 'context': ...}"),
        (lambda p: p([]), "empty list of inputs"),
        (lambda p: p(question=["a", "b"], context=["c"]), "question= has 2 questions but context= has 1"),
        (lambda p: p(question=1, context="c"), "question= must be a string or a list of strings"),
        (lambda p: p("q", "c", question="q", context="c"), "pass the inputs once"),
        (lambda p: p(question="q", context="c", top_k=0), "top_k must be a positive integer, got 0"),
        (
            lambda p: p(question="q", context="c", max_answer_len=0),
            "max_answer_len must be a positive integer",
        ),
        (
            lambda p: p(question="q", context="c", max_seq_len=512),
            "max_seq_len=512 is over this model's limit of 64",
        ),
        (
            lambda p: p(question="q", context="c", doc_stride=64),
            "doc_stride (64) must be smaller than max_seq_len (64)",
        ),
        (lambda p: p(question="q", context="c", align_to_words=1), "align_to_words must be True or False"),
        (lambda p: p(question="q", context="c", topk=2), "unknown option(s) 'topk'"),
    ],
)
def test_bad_inputs(models, call, message):
    ours, _, _ = models("bert")
    with pytest.raises(ValueError) as e:
        call(ours)
    assert message in str(e.value)


def test_model_without_the_head():
    with pytest.raises(MissingHeadError) as e:
        pipeline("question-answering", model=tiny_encoders.tiny_encoder_dir("bert", "base"))
    assert "has no weights for a span prediction head (question-answering)" in str(e.value)
    assert "qa_outputs.weight" in str(e.value)
