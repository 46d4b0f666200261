"""Measurements of model quality: perplexity."""
