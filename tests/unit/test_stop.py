"""Stop strings, stop ids, EOS and lengths: the matcher alone, the detokenizer alone, then the LLM."""

from __future__ import annotations

import random

import pytest

from tokenmill import SamplingParams
from tokenmill.generation.stop import StopStringMatcher
from tokenmill.tokenization.detokenizer import IncrementalDetokenizer

EOS = 1


def run_matcher(deltas: list[str], stops: list[str], include: bool = False) -> tuple[list[str], str | None]:
    """Feed ``deltas``; return what each feed released (plus the final flush) and the match."""
    m = StopStringMatcher(stops, include)
    outs = [m.feed(d) for d in deltas]
    if m.matched is None:
        outs.append(m.flush())
    return outs, m.matched


# -- StopStringMatcher ----------------------------------------------------------------------


def test_stop_across_token_boundaries():
    outs, matched = run_matcher(["Hel", "lo wor", "ld"], ["o w"])
    assert "".join(outs) == "Hell" and matched == "o w"
    outs, matched = run_matcher(["Hel", "lo w", "orld", "!"], ["world"])
    assert "".join(outs) == "Hello " and matched == "world"
    assert outs == ["Hel", "lo ", "", ""]  # "w" is held back until "orld" settles it; nothing after the match
    outs, matched = run_matcher(list("Hello world"), ["o w"])
    assert "".join(outs) == "Hell" and matched == "o w"


def test_include_stop_str_in_output():
    outs, matched = run_matcher(["Hel", "lo wor", "ld"], ["o w"], include=True)
    assert "".join(outs) == "Hello w" and matched == "o w"
    outs, _ = run_matcher(["a", "bXY", "Zc"], ["XYZ"], include=True)
    assert "".join(outs) == "abXYZ"


def test_partial_match_is_held_back_then_released():
    m = StopStringMatcher(["world"])
    assert m.feed("Hello w") == "Hello "
    assert m.feed("o") == ""  # "wo" may still become "world"
    assert m.feed("r") == ""
    assert m.feed("k") == "work"  # settled: not a stop string
    assert m.feed("s wo") == "s "
    assert m.flush() == "wo"  # generation ended without the stop
    assert m.matched is None


def test_multiple_stops_pick_the_earliest():
    outs, matched = run_matcher(["one two three"], ["three", "two"])
    assert "".join(outs) == "one " and matched == "two"
    outs, matched = run_matcher(["xx", "abc", "dyy"], ["cd", "bcd"])
    assert "".join(outs) == "xxa" and matched == "bcd"


def test_no_stops_releases_everything_at_once():
    m = StopStringMatcher(None)
    assert [m.feed(d) for d in ["a", "bc", ""]] == ["a", "bc", ""]
    assert m.flush() == ""


def test_can_stop_false_ignores_stops_but_leaks_nothing():
    m = StopStringMatcher(["ab"])
    assert m.feed("xaby", can_stop=False) == "xaby" and m.matched is None  # too early to stop
    assert m.feed("z") == "z"
    # a stop string completed once stops count ends the text, even if it began before; its
    # beginning was held back, so the shown text never contains part of it
    m = StopStringMatcher(["ab"])
    shown = m.feed("xa", can_stop=False)
    shown += m.feed("b")
    assert m.matched == "ab" and shown == "x"


def _random_stops(rng: random.Random, alphabet: str) -> list[str]:
    """One to three stop strings, none inside another, so "earliest" does not depend on how the
    text is split into deltas."""
    while True:
        stops = list(
            {
                "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
                for _ in range(rng.randint(1, 3))
            }
        )
        if not any(a != b and a in b for a in stops for b in stops):
            return stops


@pytest.mark.parametrize("include", [False, True])
def test_random_splits_never_leak_and_match_the_reference(include):
    rng = random.Random(0)
    alphabet = "ab c"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        stops = _random_stops(rng, alphabet)
        cuts = (
            sorted(rng.sample(range(1, len(text)), rng.randint(0, max(0, len(text) - 1))))
            if len(text) > 1
            else []
        )
        deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        hits = [(text.find(s), s) for s in stops if s in text]
        if hits:
            i, s = min(hits, key=lambda h: h[0])
            expected, expected_match = (text[: i + len(s)] if include else text[:i]), s
        else:
            expected, expected_match = text, None
        m = StopStringMatcher(stops, include)
        shown = ""
        for d in deltas:
            shown += m.feed(d)
            # whatever was shown is final: a prefix of the expected text, never retracted
            assert expected.startswith(shown), (text, stops, deltas, shown)
        if m.matched is None:
            shown += m.flush()
        assert (shown, m.matched) == (expected, expected_match), (text, stops, deltas)


# -- IncrementalDetokenizer ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["漢字🎉 café", "🎉🎊 𝄞 x", "中文 日本語 😀 👍🏽 naïve", "Hello 世界! ¿Qué? Ωmega €5"]
)
@pytest.mark.parametrize("prompt", ["", "Hello"])
def test_detokenizer_deltas_are_the_decoded_text(llm, text, prompt):
    tok = llm.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    if text.startswith("漢"):
        assert tok.decode(ids[:1]).endswith("\ufffd")  # really split inside a character
    detok = IncrementalDetokenizer(tok, tok.encode(prompt))
    deltas = [detok.step(t) for t in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_detokenizer_flush_releases_an_unfinished_character(llm):
    tok = llm.tokenizer
    ids = tok.encode("ab漢", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [0])
    deltas = [detok.step(t) for t in ids[:-1]]
    assert "".join(deltas) == "ab"
    assert detok.flush() == tok.decode(ids[:-1])[2:] and "\ufffd" in tok.decode(ids[:-1])


# -- through the LLM ------------------------------------------------------------------------

PROMPT = "Hello world"


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, **{"max_tokens": 24, **kw})


@pytest.fixture(scope="module")
def base(llm):
    """The greedy run without any stop."""
    out = llm.generate(PROMPT, greedy())[0].outputs[0]
    assert out.finish_reason == "length" and EOS not in out.token_ids
    return out


def _fresh_index(tok, ids: list[int], start: int) -> int:
    """An index at or after ``start`` whose token has not appeared before it and has text of its
    own (the tiny model's vocabulary runs past the tokenizer's, whose extra ids decode to "")."""
    return next(i for i in range(start, len(ids)) if ids[i] not in ids[:i] and tok.decode([ids[i]]))


@pytest.mark.parametrize("include", [False, True])
def test_stop_token_id(llm, base, include):
    i = _fresh_index(llm.tokenizer, base.token_ids, 4)  # the 5th generated token, or the next usable one
    stop_id = base.token_ids[i]
    out = llm.generate(PROMPT, greedy(stop_token_ids=[stop_id], include_stop_str_in_output=include))[
        0
    ].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == base.token_ids[: i + 1]
    # the stop token's text is part of the output only when asked for
    upto = "".join(llm.stream(PROMPT, greedy(max_tokens=i + 1 if include else i)))
    assert out.text == upto
    assert base.text.startswith(out.text)
    if not include:
        assert len(upto) < len("".join(llm.stream(PROMPT, greedy(max_tokens=i + 1))))


def test_eos_stops_with_no_stop_reason(llm):
    out = llm.generate(PROMPT, greedy(logit_bias={EOS: 100.0}))[0].outputs[0]
    assert (out.token_ids, out.text, out.finish_reason, out.stop_reason) == ([EOS], "", "stop", None)


def test_ignore_eos_runs_to_length(llm):
    out = llm.generate(PROMPT, greedy(logit_bias={EOS: 100.0}, ignore_eos=True, max_tokens=5))[0].outputs[0]
    assert (out.token_ids, out.text, out.finish_reason, out.stop_reason) == ([EOS] * 5, "", "length", None)


def test_min_tokens_delays_eos(llm, base):
    out = llm.generate(PROMPT, greedy(logit_bias={EOS: 100.0}, min_tokens=3))[0].outputs[0]
    assert len(out.token_ids) == 4 and out.token_ids[-1] == EOS and EOS not in out.token_ids[:3]
    assert out.finish_reason == "stop"
    # the suppressed EOS leaves the other logits alone: the first tokens are the greedy ones
    assert out.token_ids[0] == base.token_ids[0]


def test_min_tokens_delays_a_stop_id(llm, base):
    stop_id = base.token_ids[1]
    out = llm.generate(PROMPT, greedy(stop_token_ids=[stop_id], min_tokens=4))[0].outputs[0]
    assert len(out.token_ids) >= 5 and stop_id not in out.token_ids[:4]
    assert out.token_ids[0] == base.token_ids[0]
    if out.finish_reason == "stop":
        assert out.token_ids[-1] == stop_id and out.stop_reason == stop_id
    else:
        assert out.finish_reason == "length" and len(out.token_ids) == 24


def test_min_tokens_delays_a_stop_string(llm, base):
    # the first generated token with printable text gives the stop string
    tok = llm.tokenizer
    j, stop = next(
        (j, t.strip())
        for j, t in enumerate(tok.decode([i]) for i in base.token_ids)
        if t.strip() and "\ufffd" not in t
    )
    early = llm.generate(PROMPT, greedy(stop=stop))[0].outputs[0]
    assert early.finish_reason == "stop" and early.stop_reason == stop and len(early.token_ids) <= j + 1
    late = llm.generate(PROMPT, greedy(stop=stop, min_tokens=j + 3))[0].outputs[0]
    assert len(late.token_ids) >= j + 3
    assert late.token_ids == base.token_ids[: len(late.token_ids)]  # stop strings never change the tokens
    assert late.text.startswith(base.text[: base.text.find(stop) + len(stop)])


def test_max_tokens_is_length(llm, base):
    out = llm.generate(PROMPT, greedy(max_tokens=7))[0].outputs[0]
    assert out.finish_reason == "length" and out.stop_reason is None
    assert out.token_ids == base.token_ids[:7]


def _stop_from(text: str) -> tuple[str, int]:
    """A three-character stop string from the middle of ``text`` and where it first occurs."""
    for start in range(len(text) // 3, len(text) - 3):
        s = text[start : start + 3]
        if "\ufffd" not in s and s.strip():
            return s, text.find(s)
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_from_the_greedy_text(llm, base, include):
    stop, at = _stop_from(base.text)
    sp = greedy(stop=["never-there", stop], include_stop_str_in_output=include)
    out = llm.generate(PROMPT, sp)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == base.text[: at + len(stop) if include else at]
    assert len(out.token_ids) < len(base.token_ids)
    assert out.token_ids == base.token_ids[: len(out.token_ids)]
    # generation stopped at the token that completed the stop string
    shown = llm.generate(PROMPT, greedy(max_tokens=len(out.token_ids) - 1))[0].outputs[0].text
    assert stop not in shown


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(max_tokens=5),
        dict(stop="<set below>"),
        dict(stop="<set below>", include_stop_str_in_output=True),
        dict(logit_bias={EOS: 100.0}, min_tokens=2),
        dict(temperature=1.0, seed=5, stop=[" ", "a"]),
    ],
)
def test_stream_joins_to_the_generated_text(llm, base, kw):
    if kw.get("stop") == "<set below>":
        kw = {**kw, "stop": _stop_from(base.text)[0]}
    sp = SamplingParams(**{"temperature": 0, "max_tokens": 24, **kw})
    stream = llm.stream(PROMPT, sp)
    joined = "".join(stream)
    out = llm.generate(PROMPT, sp)[0].outputs[0]
    assert joined == out.text
    assert stream.output is not None and stream.output.outputs[0].text == out.text
    assert stream.output.outputs[0].finish_reason == out.finish_reason


def test_batched_stops_finish_independently(llm, base):
    stop, at = _stop_from(base.text)
    prompts = [PROMPT, PROMPT, PROMPT, "The capital of France is"]
    params = [greedy(stop=stop), greedy(max_tokens=3), greedy(logit_bias={EOS: 100.0}), greedy()]
    outs = [o.outputs[0] for o in llm.generate(prompts, params)]
    assert [o.finish_reason for o in outs] == ["stop", "length", "stop", "length"]
    assert outs[0].text == base.text[:at]
    assert outs[1].token_ids == base.token_ids[:3]
    assert outs[2].token_ids == [EOS]
    alone = llm.generate(prompts[3], greedy())[0].outputs[0]
    assert outs[3].token_ids == alone.token_ids
