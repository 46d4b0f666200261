"""The tokenizer every part of tokenmill uses: a thin layer over ``tokenizers.Tokenizer``.

Special tokens that a model adds to every prompt (BOS) live in the backend's
post-processor, so ``encode(text)`` gives the ids the model was trained on.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tokenmill.utils.errors import ModelLoadError


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization``: no space before punctuation and contractions."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


def _wants_clean_up(config: dict[str, Any], backend: Any) -> bool:
    """Whether transformers' decode cleans up spaces for this tokenizer: tokenizer_config's
    ``clean_up_tokenization_spaces`` (default False), ignored for BPE models by transformers 5
    because there it would eat real spaces."""
    if not config.get("clean_up_tokenization_spaces", False):
        return False
    bpe = json.loads(backend.to_str()).get("model", {}).get("type") == "BPE"
    return not bpe or bool(
        config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")
    )


class Tokenizer:
    """Encode, decode and chat-format text for one model."""

    def __init__(
        self,
        backend: Any,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        extra_eos_tokens: list[str] | None = None,
        special_tokens: dict[str, str] | None = None,
        model_max_length: int | None = None,
        clean_up_tokenization_spaces: bool = False,
        tokenizer_class: str | None = None,
    ) -> None:
        self.backend = backend  # tokenizers.Tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.chat_template = chat_template
        self.bos_token_id = self.token_to_id(bos_token)
        self.eos_token_id = self.token_to_id(eos_token)
        self.pad_token_id = self.token_to_id(pad_token)
        ids = [self.eos_token_id] + [self.token_to_id(t) for t in extra_eos_tokens or []]
        self.eos_token_ids = [i for i in dict.fromkeys(ids) if i is not None]
        #: named special tokens from tokenizer_config.json: mask_token, cls_token, sep_token, unk_token
        self.special_tokens = dict(special_tokens or {})
        #: the longest input the model was trained on, as its tokenizer config says (None: not said)
        self.model_max_length = model_max_length
        #: decoded text drops spaces before punctuation (transformers' clean_up_tokenization)
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        #: the transformers class that wrote the tokenizer ("MBart50Tokenizer", ...), if said
        self.tokenizer_class = tokenizer_class
        self._special_ids = {
            self.backend.token_to_id(t.content)
            for t in self.backend.get_added_tokens_decoder().values()
            if t.special
        }

    # -- basics ---------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def mask_token(self) -> str | None:
        return self.special_tokens.get("mask_token")

    @property
    def mask_token_id(self) -> int | None:
        return self.token_to_id(self.mask_token)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds BOS/EOS where the model expects them."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self.backend.id_to_token(i) for i in ids]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    # -- chat -----------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Format ``messages`` with the model's chat template (sandboxed Jinja)."""
        from tokenmill.tokenization.chat_template import render_chat

        if self.chat_template is None:
            raise ValueError(
                "this model has no chat template, so chat() cannot format messages; "
                "use generate() with a plain prompt, or pass chat_template= to chat()"
            )
        text = render_chat(
            kwargs.pop("chat_template", None) or self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )
        if not tokenize:
            return text
        # The template already wrote BOS where the model wants it.
        return self.encode(text, add_special_tokens=False)

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_dir(cls, model_dir: str) -> Tokenizer:
        """Load tokenizer.json and tokenizer_config.json from a Hugging Face model directory."""
        from tokenizers import Tokenizer as Backend

        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise ModelLoadError(
                f"no tokenizer.json in {model_dir}; tokenmill needs the fast-tokenizer file "
                "(save it with transformers' tokenizer.save_pretrained())"
            )
        try:
            backend = Backend.from_file(path)
        except Exception as e:
            raise ModelLoadError(f"{path} is not a readable tokenizer file: {e}") from e
        # A tokenizer.json may carry the truncation and padding of whoever saved it
        # (MiniLM's pads and cuts everything to 128); lengths are decided by the caller.
        backend.no_truncation()
        backend.no_padding()
        config: dict[str, Any] = {}
        cfg_path = os.path.join(model_dir, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            try:
                with open(cfg_path, encoding="utf-8") as f:
                    config = json.load(f)
            except json.JSONDecodeError as e:
                raise ModelLoadError(f"{cfg_path} is not valid JSON: {e}") from e
        template = config.get("chat_template")
        jinja_path = os.path.join(model_dir, "chat_template.jinja")
        if template is None and os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        if isinstance(template, list):  # named templates: take the default one
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default") or next(iter(named.values()), None)

        map_path = os.path.join(model_dir, "special_tokens_map.json")
        if os.path.isfile(map_path):  # older checkpoints name their special tokens only here
            try:
                with open(map_path, encoding="utf-8") as f:
                    config = {**json.load(f), **config}
            except json.JSONDecodeError as e:
                raise ModelLoadError(f"{map_path} is not valid JSON: {e}") from e

        def token(key: str) -> str | None:
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            return value if isinstance(value, str) else None

        named = ("mask_token", "cls_token", "sep_token", "unk_token")
        max_len = config.get("model_max_length")
        # transformers writes a huge sentinel (1e30) when the length is unknown.
        max_len = int(max_len) if isinstance(max_len, (int, float)) and 0 < max_len < 1e9 else None

        return cls(
            backend,
            bos_token=token("bos_token"),
            eos_token=token("eos_token"),
            pad_token=token("pad_token"),
            chat_template=template,
            special_tokens={k: v for k in named if (v := token(k)) is not None},
            model_max_length=max_len,
            clean_up_tokenization_spaces=_wants_clean_up(config, backend),
            tokenizer_class=config.get("tokenizer_class")
            if isinstance(config.get("tokenizer_class"), str)
            else None,
        )
