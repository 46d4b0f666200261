"""Errors shared across layers."""


class ModelLoadError(ValueError):
    """A model could not be found or read; the message names the file or tensor and what to do."""
