"""text-generation pipeline: same text as transformers' pipeline on a tiny Llama."""

import os

import pytest
import torch
import transformers

import tiny
from tokenmill import pipeline
from tokenmill.pipelines.base import PipelineInputError

PROMPTS = ["The capital of France is", "Hello world! cafe", "code: def f(x):"]


@pytest.fixture(scope="module")
def ascii_llama_dir(tmp_path_factory):
    """The tiny Llama with a tokenizer whose every token is printable ASCII.

    A random model emits arbitrary tokens; with byte tokens of half a UTF-8 character,
    transformers' pipeline (which decodes prompt and reply together, then cuts the
    prompt's characters off) and tokenmill (which decodes the reply after the prompt)
    show the undecodable bytes differently. Whole characters compare exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    d = tiny.save_tiny_dir("llama", str(tmp_path_factory.mktemp("ascii-llama")))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Byte-level BPE writes printable ASCII as itself, space as "Ġ" and newline as "Ċ".
    alphabet = [chr(b) for b in range(0x21, 0x7F)] + ["Ġ", "Ċ"]
    trainer = trainers.BpeTrainer(
        vocab_size=tiny.VOCAB,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
    )
    text = [
        "The capital of France is Paris. The capital of Italy is Rome.",
        "Hello world! code: def f(x): return x * 2",
    ]
    tok.train_from_iterator(text * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(os.path.join(d, "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def ours(ascii_llama_dir):
    return pipeline("text-generation", model=ascii_llama_dir, dtype="float32")


@pytest.fixture(scope="module")
def theirs(ascii_llama_dir):
    return transformers.pipeline("text-generation", model=ascii_llama_dir, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("full", [True, False])
def test_greedy_matches_transformers(ours, theirs, full):
    got = ours(PROMPTS, do_sample=False, max_new_tokens=12, return_full_text=full)
    for prompt, rows in zip(PROMPTS, got):
        want = theirs(prompt, do_sample=False, max_new_tokens=12, return_full_text=full)
        assert rows == want


def test_single_prompt_gives_a_list_of_dicts(ours, theirs):
    got = ours(PROMPTS[0], do_sample=False, max_new_tokens=6)
    assert got == theirs(PROMPTS[0], do_sample=False, max_new_tokens=6)
    assert isinstance(got, list) and set(got[0]) == {"generated_text"}


def test_chat_input_appends_the_reply(ours, theirs):
    chat = [{"role": "user", "content": "The capital of France is"}]
    got = ours(chat, do_sample=False, max_new_tokens=8)
    want = theirs(chat, do_sample=False, max_new_tokens=8)
    assert got == want
    assert got[0]["generated_text"][-1]["role"] == "assistant"


def test_beam_search_matches_transformers(ours, theirs):
    got = ours(PROMPTS[0], num_beams=3, num_return_sequences=2, max_new_tokens=8, do_sample=False)
    want = theirs(PROMPTS[0], num_beams=3, num_return_sequences=2, max_new_tokens=8, do_sample=False)
    assert got[0] == want[0]  # the best beam; lower beams may tie on score
    assert len(got) == 2


def test_seeded_sampling_repeats(ours):
    a = ours(PROMPTS[1], do_sample=True, temperature=0.9, seed=7, max_new_tokens=10)
    b = ours(PROMPTS[1], do_sample=True, temperature=0.9, seed=7, max_new_tokens=10)
    assert a == b


def test_num_return_sequences(ours):
    got = ours(PROMPTS[0], do_sample=True, seed=1, num_return_sequences=3, max_new_tokens=4)
    assert len(got) == 3


@pytest.mark.parametrize(
    "inputs, options, message",
    [
        ([], {}, "non-empty list"),
        ([""], {}, "input 0 is an empty string"),
        ([3], {}, "input 0 must be a string or a chat"),
        ([[{"role": "user"}]], {}, "needs 'role' and 'content'"),
        ("hi", {"max_new_token": 3}, "unknown option(s) 'max_new_token'"),
        ("hi", {"do_sample": "yes"}, "do_sample must be True or False"),
        ("hi", {"num_beams": 2, "num_return_sequences": 3}, "between 1 and num_beams=2"),
    ],
)
def test_bad_input_messages(ours, inputs, options, message):
    with pytest.raises((ValueError, PipelineInputError)) as e:
        ours(inputs, **options)
    assert message in str(e.value)
