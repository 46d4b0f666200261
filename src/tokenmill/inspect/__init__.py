"""Looking inside the served model: token probabilities at each sampling stage and
attention weights, computed by forward passes separate from the engine's."""

from tokenmill.inspect.inspector import MAX_ATTENTION_TOKENS, MAX_TOP_N, Inspector
from tokenmill.inspect.tokens import Candidate, Step

__all__ = ["MAX_ATTENTION_TOKENS", "MAX_TOP_N", "Candidate", "Inspector", "Step"]
