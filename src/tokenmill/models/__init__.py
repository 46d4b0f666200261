"""Native PyTorch model architectures, one family per module."""
