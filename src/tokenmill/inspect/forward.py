"""Forward passes of their own over a served model: every position's logits, and
attention weights kept per layer and head.

The engine's fast path is never touched: these passes run without a KV cache, through
an attention context built for each call, on a copy of the model's top module that
shares every parameter (weights are only read) but has rope tables of its own (the
one piece of state a forward pass writes: the tables grow on demand).
"""

from __future__ import annotations

import copy

import torch

from tokenmill.layers.attention import DenseAttention


def private_copy(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with the same parameters but its own rope tables.

    Another thread can run this copy while the engine runs ``model``: the engine's rope
    tables may be growing at that moment, and a reader on another thread could find the
    new cos table beside the old cast cache.
    """
    clone = copy.copy(model)  # shallow: parameters and layers are shared, read-only
    clone._modules = dict(model._modules)  # a module table of its own, so rotary can differ
    build_rotary = getattr(model, "build_rotary", None)
    if "rotary" in clone._modules and build_rotary is not None:
        clone._modules["rotary"] = build_rotary(model.config)
    return clone


class AttentionRecorder:
    """An attention context that computes softmax(q k^T * scale + mask) explicitly and keeps
    the probabilities: the reference definition, with each layer's own projections, norms,
    rope, scale and sliding window (the model hands them over in ``attend``).

    One sequence, no cache: query i sees keys 0..i (and, in a sliding-window layer, only the
    last ``window`` of them).
    """

    def __init__(self, num_tokens: int, keep: set[int] | None = None) -> None:
        self.num_tokens = num_tokens
        self.max_position = num_tokens - 1
        self.keep = keep
        #: layer -> attention probabilities (H, T, T), float32
        self.weights: dict[int, torch.Tensor] = {}

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor:
        """q: (1, T, H, D); k, v: (1, T, H_kv, D). Returns (1, T, H * Dv)."""
        B, T, H, _ = q.shape
        group = H // k.shape[2]
        qh = q.transpose(1, 2).float()  # (B, H, T, D)
        kh = k.transpose(1, 2).float().repeat_interleave(group, dim=1)  # (B, H, T, D)
        vh = v.transpose(1, 2).repeat_interleave(group, dim=1)  # (B, H, T, Dv)
        scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # (B, H, T, T)
        pos = torch.arange(T, device=q.device)
        allowed = pos[None, :] <= pos[:, None]  # (T, T): key <= query
        if window is not None:
            allowed = allowed & (pos[:, None] - pos[None, :] < window)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)  # float32
        if self.keep is None or layer in self.keep:
            self.weights[layer] = probs[0]
        out = torch.matmul(probs.to(vh.dtype), vh)  # (B, H, T, Dv)
        return out.transpose(1, 2).reshape(B, T, -1)


class InspectionModel:
    """The served model behind inspection passes (see the module docstring)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = private_copy(model)
        param = next(model.parameters())
        self.device = param.device
        self.num_layers: int = model.config.num_layers
        self.num_heads: int = model.config.num_heads

    def _inputs(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)
        positions = torch.arange(len(ids), device=self.device).unsqueeze(0)  # (1, T)
        return input_ids, positions

    @torch.inference_mode()
    def logits(self, ids: list[int], start: int = 0) -> torch.Tensor:
        """float32 logits (T - start, V) at positions start..T-1 of ``ids``: row j is the
        model's distribution over the token after position start + j."""
        T = len(ids)
        input_ids, positions = self._inputs(ids)
        ctx = DenseAttention(None, 0, T, T - 1)
        select = torch.arange(start, T, device=self.device)
        return self.model(input_ids, positions, ctx, select).float()

    @torch.inference_mode()
    def attention(self, ids: list[int], layers: list[int] | None = None) -> dict[int, torch.Tensor]:
        """Attention probabilities (H, T, T) per layer (all, or those in ``layers``)."""
        input_ids, positions = self._inputs(ids)
        ctx = AttentionRecorder(len(ids), set(layers) if layers is not None else None)
        # Only the last position's logits: the LM head is not what is looked at here.
        self.model(input_ids, positions, ctx, "last")
        return ctx.weights
