"""feature-extraction and sentence-similarity against transformers, on tiny encoders and MiniLM."""

import os
import sys

import pytest
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
import tiny_encoders  # noqa: E402
from tokenmill import pipeline  # noqa: E402
from tokenmill.pipelines.base import PipelineInputError  # noqa: E402
from tokenmill.pipelines.feature_extraction import pool  # noqa: E402

TEXTS = ["Hello world.", "A somewhat longer sentence about the weather today.", "Short"]
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A monkey is playing drums.",
    "Stock markets fell sharply on Tuesday after the announcement.",
    "¿Dónde está la biblioteca? Está cerca.",
    "def add(a, b): return a + b",
]


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta", "xlm-roberta"])
def test_token_vectors_match_transformers(family):
    d = tiny_encoders.tiny_encoder_dir(family, "base")
    ours = pipeline("feature-extraction", model=d)
    theirs = transformers.pipeline("feature-extraction", model=d, dtype=torch.float32, device="cpu")
    got = ours(TEXTS)
    want = theirs(TEXTS)
    for g, w in zip(got, want):
        g, w = torch.tensor(g), torch.tensor(w)
        assert g.shape == w.shape and g.shape[0] == 1  # [1, tokens, hidden] per input
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    single = ours(TEXTS[0])
    assert torch.tensor(single).shape == torch.tensor(want[0]).shape


def test_pooling_modes_on_hand_made_states():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [-1.0, 0.0], [7.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(pool(h, mask, "mean"), torch.tensor([[2.0, 3.0], [11 / 3, 5.0]]))
    torch.testing.assert_close(pool(h, mask, "cls"), torch.tensor([[1.0, 2.0], [5.0, 6.0]]))
    torch.testing.assert_close(pool(h, mask, "max"), torch.tensor([[3.0, 4.0], [7.0, 9.0]]))
    torch.testing.assert_close(pool(h, mask, "last"), torch.tensor([[3.0, 4.0], [7.0, 9.0]]))


def test_pooled_and_normalized_options():
    d = tiny_encoders.tiny_encoder_dir("bert", "base")
    ours = pipeline("feature-extraction", model=d)
    theirs = transformers.pipeline("feature-extraction", model=d, dtype=torch.float32, device="cpu")
    tokens = torch.tensor(theirs(TEXTS[1])[0])
    mean = ours(TEXTS[1], pooling="mean")
    torch.testing.assert_close(torch.tensor(mean), tokens.mean(0), atol=1e-5, rtol=1e-5)
    normed = ours(TEXTS[1], pooling="cls", normalize=True, return_tensors=True)
    torch.testing.assert_close(normed, torch.nn.functional.normalize(tokens[0], dim=0), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def minilm():
    return pipeline("feature-extraction", model="all-minilm-l6-v2")


@pytest.mark.real
def test_minilm_embeddings_match_transformers(minilm):
    d = tiny_encoders.minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(d)
    model = transformers.AutoModel.from_pretrained(d, dtype=torch.float32).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)  # mean pooling, then Normalize
    got = torch.tensor(minilm(SENTENCES))
    cos = torch.nn.functional.cosine_similarity(got, want)
    assert cos.min().item() >= 0.9999
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(SENTENCES)))
    one_by_one = torch.tensor([minilm(s) for s in SENTENCES])
    torch.testing.assert_close(one_by_one, got, atol=1e-5, rtol=1e-5)  # batching changes nothing


@pytest.mark.real
def test_minilm_ranks_the_bread_sentence_closest():
    sim = pipeline("sentence-similarity", model="all-minilm-l6-v2")
    candidates = SENTENCES[1:6]
    scores = sim({"source_sentence": SENTENCES[0], "sentences": candidates})
    assert len(scores) == len(candidates)
    assert candidates[max(range(len(scores)), key=scores.__getitem__)] == "A man is eating a piece of bread."


@pytest.mark.real
def test_over_long_input_is_an_error_unless_truncation(minilm):
    long_text = "word " * 600
    with pytest.raises(PipelineInputError) as e:
        minilm(["fine", long_text])
    assert "input 1 is 602 tokens long, over this model's limit of 512" in str(e.value)
    assert "truncation=True" in str(e.value)
    cut = minilm(long_text, truncation=True)
    assert len(cut) == 384


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p: p([]), "empty list of inputs"),
        (lambda p: p(""), "input 0 is an empty string"),
        (lambda p: p(["ok", 5]), "input 1 must be a string, got int"),
        (lambda p: p("ok", pooling="median"), "pooling must be one of mean, cls, max, last, none"),
        (lambda p: p("ok", normalise=True), "unknown option(s) 'normalise'"),
        (lambda p: p("ok", batch_size=0), "batch_size must be a positive integer"),
    ],
)
def test_bad_inputs(call, message):
    p = pipeline("feature-extraction", model=tiny_encoders.tiny_encoder_dir("bert", "base"))
    with pytest.raises(ValueError) as e:
        call(p)
    assert message in str(e.value)


def test_sentence_similarity_bad_input():
    p = pipeline("sentence-similarity", model=tiny_encoders.tiny_encoder_dir("bert", "base"))
    with pytest.raises(PipelineInputError, match="'source_sentence'"):
        p("just a string")
    with pytest.raises(PipelineInputError, match="non-empty list of strings"):
        p({"source_sentence": "a", "sentences": []})


@pytest.mark.parametrize(
    "task, model, message",
    [
        (
            "text-clasification",
            "x",
            "unknown task 'text-clasification' (did you mean 'text-classification'?)",
        ),
        (3, None, "task must be a string"),
        ("fill-mask", None, "task 'fill-mask' has no default model in tokenmill; pass model="),
        ("feature-extraction", "/no/such/dir", "model path '/no/such/dir' does not exist"),
    ],
)
def test_pipeline_factory_errors(task, model, message):
    with pytest.raises(ValueError) as e:
        pipeline(task, model=model)
    assert message in str(e.value)


def test_a_gguf_model_is_refused_for_encoder_tasks():
    with pytest.raises(
        ValueError, match="pipelines load encoder and encoder-decoder models from a model directory"
    ):
        pipeline("feature-extraction", model="smollm2-135m-instruct")


def test_decoder_checkpoint_is_refused_with_the_families(llama_dir):
    with pytest.raises(ValueError, match="'llama' has no native encoder or encoder-decoder implementation"):
        pipeline("feature-extraction", model=llama_dir)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_sentence_similarity_matches_cosines_of_transformers_mean_pooling(family):
    d = tiny_encoders.tiny_encoder_dir(family, "base")
    tok = transformers.AutoTokenizer.from_pretrained(d)
    model = transformers.AutoModel.from_pretrained(d, dtype=torch.float32).eval()
    texts = [TEXTS[0], *TEXTS]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    vecs = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)  # no pooling config: mean
    want = (vecs[1:] @ vecs[0]).tolist()
    got = pipeline("sentence-similarity", model=d)({"source_sentence": texts[0], "sentences": texts[1:]})
    assert got == pytest.approx(want, abs=1e-5)
    assert got[0] == pytest.approx(1.0, abs=1e-6)  # the source sentence itself
