"""Tokenizers over the `tokenizers` library, GGUF vocabularies, chat templates, detokenization."""
