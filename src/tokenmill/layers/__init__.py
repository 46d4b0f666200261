"""Torch building blocks that keep Hugging Face parameter names."""
