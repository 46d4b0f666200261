"""Whisper's decode step on float16 copies of the decoder weights (CPU, float32 compute).

A greedy decode step of a few rows reads every decoder weight and the 51,865-row output
projection once, and on CPU its time is the time that reading takes. Whisper's released
weights are float16 (the CTranslate2 files hold nothing else), so a float16 copy of each
decoder linear layer is exact; the kernel (layers/half_linear.py) widens it and computes
in float32, giving the float32 model's logits up to summation order at half the bytes.

The step also fuses self-attention's q, k and v into one product (k has no bias: zeros).
Models whose weights are not all exact float16 values keep the float32 path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tokenmill.layers.encoder_decoder import EncoderDecoderCache, attend, causal_mask, split_heads
from tokenmill.layers.half_linear import HalfWeight, half_linear, half_linear_available


@dataclass
class _HalfLayer:
    qkv: HalfWeight  # (3C, C): q, k, v stacked
    qkv_bias: torch.Tensor  # (3C,) float32, zeros for k
    out: HalfWeight
    out_bias: torch.Tensor
    cross_q: HalfWeight
    cross_q_bias: torch.Tensor
    cross_out: HalfWeight
    cross_out_bias: torch.Tensor
    fc1: HalfWeight
    fc1_bias: torch.Tensor
    fc2: HalfWeight
    fc2_bias: torch.Tensor


def _weights(model: nn.Module) -> list[torch.Tensor]:
    """The tensors the half copies are made of: the decoder's layers and the output projection."""
    return [*model.model.decoder.layers.parameters(), model.proj_out.weight]


def weights_key(model: nn.Module) -> tuple:
    """Changes when any of those tensors is replaced or written in place."""
    return tuple((id(p), p.data_ptr(), p._version, p.dtype, p.device) for p in _weights(model))


class HalfDecoder:
    """float16 copies of a Whisper decoder's linear weights and output projection."""

    def __init__(self, layers: list[_HalfLayer], lm_head: HalfWeight) -> None:
        self.layers = layers
        self.lm_head = lm_head

    @staticmethod
    def build(model: nn.Module) -> HalfDecoder | None:
        """The copies, or None where one would not be exact or this CPU has no kernel."""
        if not half_linear_available() or any(w.device.type != "cpu" for w in _weights(model)):
            return None
        linears = [m for m in model.model.decoder.layers.modules() if isinstance(m, nn.Linear)]
        if any(m.in_features % 16 for m in linears) or model.proj_out.in_features % 16:
            return None
        if any(m.bias is not None and m.bias.dtype != torch.float32 for m in linears):
            return None
        lm_head = HalfWeight.of(model.proj_out.weight)  # the largest: refused first when inexact
        if lm_head is None:
            return None
        layers = []
        for layer in model.model.decoder.layers:
            sa, ca = layer.self_attn, layer.encoder_attn
            qkv = HalfWeight.of(torch.cat([sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight]))
            parts = [_pair(m) for m in (sa.out_proj, ca.q_proj, ca.out_proj, layer.fc1, layer.fc2)]
            if qkv is None or any(w is None for w, _ in parts):
                return None
            qkv_bias = torch.cat([sa.q_proj.bias, torch.zeros_like(sa.q_proj.bias), sa.v_proj.bias])
            layers.append(
                _HalfLayer(qkv, qkv_bias.detach().contiguous(), *(t for pair in parts for t in pair))
            )
        return HalfDecoder(layers, lm_head)


def _pair(linear: nn.Linear) -> tuple[HalfWeight | None, torch.Tensor]:
    bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
    return HalfWeight.of(linear.weight), bias.detach().contiguous()


def decode_step(
    model: nn.Module, half: HalfDecoder, input_ids: torch.Tensor, cache: EncoderDecoderCache
) -> torch.Tensor:
    """``model.decode`` on the float16 copies: logits (B, T, V) float32; grows ``cache``."""
    dec = model.model.decoder
    T, past = input_ids.shape[1], cache.length
    dec.check_length(past + T)
    x = dec.embed_tokens(input_ids) + dec.embed_positions.weight[past : past + T]  # (B, T, C)
    C = x.shape[-1]
    self_mask = causal_mask(T, past, x.device)
    cross_mask = cache.cross_mask()
    for i, (layer, hw) in enumerate(zip(dec.layers, half.layers)):
        heads = layer.self_attn.num_heads
        qkv = half_linear(layer.self_attn_layer_norm(x), hw.qkv, hw.qkv_bias)  # (B, T, 3C)
        q, k, v = (split_heads(t, heads) for t in qkv.split(C, dim=-1))
        k, v = cache.append(i, k, v)
        x = x + half_linear(attend(q, k, v, self_mask), hw.out, hw.out_bias)
        q = split_heads(half_linear(layer.encoder_attn_layer_norm(x), hw.cross_q, hw.cross_q_bias), heads)
        ctx = attend(q, cache.cross_k[i], cache.cross_v[i], cross_mask)
        x = x + half_linear(ctx, hw.cross_out, hw.cross_out_bias)
        h = layer.act(half_linear(layer.final_layer_norm(x), hw.fc1, hw.fc1_bias))
        x = x + half_linear(h, hw.fc2, hw.fc2_bias)
    cache.advance(T)
    return half_linear(dec.layer_norm(x), half.lm_head)
