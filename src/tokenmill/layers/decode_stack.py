"""A Llama-family or Gemma 3 decoder stack run as one C call for decode steps on CPU.

A decode step of a small model is dominated by dispatch, not by reading weights: with
SmolLM2-135M and int4 weights, the thirty layers' dozen PyTorch ops and kernel calls
each cost more per token than the weights take to stream. ``DecodeStack`` hands the
whole stack to ``kernels/decode_stack.c``, which calls the same kernels in the same
order with the same roundings as the layer-by-layer path, so the two agree bit for bit
(the tests check it). It takes steps whose rows are all single decode tokens over the
paged cache; anything else, and every model it cannot take, runs the layers as usual.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers import cpu_kernels
from tokenmill.layers.activations import gelu_tanh
from tokenmill.layers.linear import OneDNNPackedLinear
from tokenmill.layers.norms import RMSNorm, rmsnorm_lanes
from tokenmill.layers.quantized import Int4Linear, Int8Linear

log = logging.getLogger("tokenmill.kernels")

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class _Linear(ctypes.Structure):
    _fields_ = [
        ("weight", _ptr),
        ("scales_zeros", _ptr),
        ("bias", _ptr),
        ("N", _i64),
        ("K", _i64),
        ("group", _i64),
        ("act8", _i64),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("input_norm", _ptr),
        ("post_norm", _ptr),
        ("qkv", _Linear),
        ("o", _Linear),
        ("gate_up", _Linear),
        ("down", _Linear),
        ("window", _i64),
        ("pre_ff_norm", _ptr),
        ("post_ff_norm", _ptr),
        ("q_norm", _ptr),
        ("k_norm", _ptr),
        ("local_rope", _i64),
    ]


_DIM_NAMES = (
    "layers",
    "hidden",
    "heads",
    "kv_heads",
    "head_dim",
    "intermediate",
    "block_size",
    "lanes",
    "nthreads",
)


class _Dims(ctypes.Structure):
    _fields_ = [(n, _i64) for n in _DIM_NAMES] + [
        ("eps", ctypes.c_double),
        ("scale", ctypes.c_double),
        ("gemma", _i64),
    ]


def _linear(module: nn.Module, keep: list[torch.Tensor]) -> _Linear | None:
    """The C description of a linear layer the stack can run, or None."""
    bias = getattr(module, "bias", None)
    if bias is not None and not (bias.dtype == torch.bfloat16 and bias.is_contiguous()):
        return None
    if isinstance(module, Int4Linear):
        if not (module.own_kernel and module.scales_and_zeros.dtype == torch.bfloat16):
            return None
        w, sz, group, act8 = module.qweight, module.scales_and_zeros, module.group_size, module.act8
    elif isinstance(module, Int8Linear):
        # the layer path runs int8_mm (int8a8_mm with act8) on these, and only these
        if not (
            module.own_kernel and module.scales.dtype == torch.bfloat16 and module.scales.is_contiguous()
        ):
            return None
        w, sz, group, act8 = module.qweight, module.scales, -1, module.act8
    elif type(module) is OneDNNPackedLinear:
        # Only the packed layer: it is the one whose few-row path is bf16_gemv, as here (a
        # plain nn.Linear runs F.linear, which sums in another order).
        w, sz, group, act8 = module.weight, None, 0, False
        if not (w.dtype == torch.bfloat16 and w.is_contiguous() and cpu_kernels.bf16_gemv_available()):
            return None
    else:
        return None
    keep.extend(t for t in (w, sz, bias) if t is not None)
    return _Linear(
        w.data_ptr(),
        None if sz is None else sz.data_ptr(),
        None if bias is None else bias.data_ptr(),
        module.out_features,
        module.in_features,
        group,
        int(act8),
    )


def _norm_weight(norm: nn.Module, keep: list[torch.Tensor], offset: float = 0.0) -> int | None:
    if not (type(norm) is RMSNorm and norm.offset == offset):
        return None
    w = norm.weight
    if not (w.dtype == torch.bfloat16 and w.is_contiguous()):
        return None
    keep.append(w)
    return w.data_ptr()


def weights_fingerprint(model: nn.Module) -> tuple[int, ...]:
    """Where the first and last layers' weights live: it changes when the weights are moved
    or replaced by new tensors, after which a built stack would read the old ones."""
    layers = model.model.layers
    mods = (layers[0].self_attn.qkv_proj, layers[-1].mlp.down_proj, layers[0].input_layernorm)
    return tuple(_storage(m) for m in mods)


def _storage(module: nn.Module) -> int:
    # Looked up in the module's own tables: getattr on a missing name raises inside
    # nn.Module.__getattr__, and this runs every decode step.
    tables = (module._buffers, module._parameters, module.__dict__)
    for name in ("qweight", "weight", "packed"):  # quantized, plain, split fp32 layers
        for table in tables:
            t = table.get(name)
            if isinstance(t, torch.Tensor):
                return t.data_ptr()
    return id(module)


class DecodeStack:
    """The C description of a model's layers, built once; ``run`` takes one decode step."""

    def __init__(self, layers: Any, dims: _Dims, keep: list[torch.Tensor], max_rows: int) -> None:
        self.layers, self.dims, self.max_rows = layers, dims, max_rows
        self.needs_local = any(layer.local_rope for layer in layers)
        self._keep = keep  # the tensors whose pointers the C structures hold
        self._caches: tuple[tuple[int, ...], Any, Any] | None = None

    @classmethod
    def build(cls, model: nn.Module) -> tuple[DecodeStack | None, str]:
        """The stack of a LlamaForCausalLM (Qwen3's per-head q/k norms included) or a
        Gemma3ForCausalLM, or (None, why it cannot run)."""
        cfg = model.config
        lib = cpu_kernels._library()
        if lib is None:
            return None, "the CPU kernels are not available"
        if not cpu_kernels.paged_decode_available(torch.bfloat16):
            return None, "no CPU attention kernel"
        gemma = cfg.architecture == "gemma3"
        offset = 1.0 if gemma else 0.0
        act = gelu_tanh if gemma else F.silu
        keep: list[torch.Tensor] = []
        layers = (_Layer * cfg.num_layers)()
        max_rows = 256  # the int4 kernels' limit
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            if mlp.act is not act or attn.head_dim != cfg.head_dim:
                return None, f"layer {i} is not a {'GELU' if gemma else 'SiLU'}-gated layer of its family"
            names = ["input_layernorm", "post_attention_layernorm"]
            if gemma:
                names += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
            norms = [_norm_weight(getattr(layer, n, None), keep, offset) for n in names]
            qk = [_norm_weight(getattr(attn, n, None), keep, offset) for n in ("q_norm", "k_norm")]
            lins = [_linear(m, keep) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            if None in norms or None in lins or (attn.qk_norm and None in qk):
                return None, f"layer {i} has a norm or linear layer the C stack does not take"
            for lin, m in zip(lins, (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)):
                if lin.group == 0:  # bf16: the rows the layer itself sends to bf16_gemv
                    max_rows = min(max_rows, m.kernel_rows())
            ff = norms[2:] if gemma else [None, None]
            layers[i] = _Layer(
                *norms[:2],
                *lins,
                attn.window or 0,
                *ff,
                *(qk if attn.qk_norm else [None, None]),
                int(bool(getattr(layer, "is_sliding", False))),
            )
            scale = attn.scale
        lanes = rmsnorm_lanes(cfg.hidden_size, cfg.norm_eps)
        if lanes is None or (cfg.qk_norm and rmsnorm_lanes(cfg.head_dim, cfg.norm_eps, (lanes,)) is None):
            return None, "the C RMSNorm does not match PyTorch's on this machine"
        dims = _Dims(
            cfg.num_layers,
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.intermediate_size,
            0,
            lanes,
            1,
            cfg.norm_eps,
            scale,
            int(gemma),
        )
        return cls(layers, dims, keep, max_rows), ""

    def _cache_pointers(self, cache: Any) -> tuple[Any, Any]:
        key = tuple(t.data_ptr() for t in cache.k) + tuple(t.data_ptr() for t in cache.v)
        if self._caches is None or self._caches[0] != key:
            n = len(cache.k)
            self._caches = (key, (_ptr * n)(*key[:n]), (_ptr * n)(*key[n:]))
        return self._caches[1], self._caches[2]

    def accepts(self, x: torch.Tensor, ctx: Any) -> bool:
        """Whether this step is one the stack runs: every row a decode token on the CPU
        paged cache in bf16, and few enough rows."""
        cache = getattr(ctx, "cache", None)
        n = x.shape[1]
        return (
            getattr(ctx, "use_kernels", False)
            and getattr(ctx, "num_decode", 0) == n
            and not ctx.chunks
            and x.shape[0] == 1
            and 1 <= n <= self.max_rows
            and x.dtype == torch.bfloat16
            and x.device.type == "cpu"
            and cache.k[0].dtype == torch.bfloat16
            and cache.k[0].shape[-1] == cache.v[0].shape[-1] == self.dims.head_dim
            and cache.k[0].shape[-2] == self.dims.kv_heads
        )

    def run(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx: Any,
        local: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """x (1, M, C) embeddings -> the stack's output (1, M, C) before the final norm,
        writing the new keys and values to the cache; None when the kernel could not run.
        ``local``: the (cos, sin) of the layers with the local rope (Gemma 3)."""
        lib = cpu_kernels._library()
        assert lib is not None
        if self.needs_local and local is None:
            raise ValueError("this model's stack has layers with the local rope: pass their (cos, sin)")
        cache, M = ctx.cache, x.shape[1]
        slots, tables, lens = ctx.slot_mapping, ctx.decode_tables, ctx.decode_lens
        nb, bs = cache.k[0].shape[0], cache.k[0].shape[1]
        # The kernel trusts every index it is given: check them all, as the reference path does.
        if not (
            slots.dtype == tables.dtype == lens.dtype == torch.int64
            and slots.shape == (M,)
            and lens.shape == (M,)
            and tables.dim() == 2
            and tables.shape[0] == M
            and all(t.is_contiguous() for t in (slots, tables, lens, *cache.k, *cache.v))
            and all(
                t.shape == cos.shape
                and t.numel() == M * self.dims.head_dim
                and t.dtype == torch.bfloat16
                and t.is_contiguous()
                for t in (cos, sin, *(local or ()))
            )
        ):
            return None
        (s_lo, s_hi), (t_lo, t_hi), (l_lo, l_hi) = (map(int, torch.aminmax(t)) for t in (slots, tables, lens))
        if not (
            0 <= s_lo <= s_hi < nb * bs
            and 0 <= t_lo <= t_hi < nb
            and 1 <= l_lo <= l_hi <= tables.shape[1] * bs
        ):
            raise ValueError("decode step: a slot, block id or length is outside the KV cache")
        out = x.contiguous().clone()
        k_ptrs, v_ptrs = self._cache_pointers(cache)
        self.dims.block_size, self.dims.nthreads = bs, torch.get_num_threads()
        rc = lib.decode_stack_bf16(
            ctypes.byref(self.layers),
            ctypes.byref(self.dims),
            out.data_ptr(),
            M,
            cos.data_ptr(),
            sin.data_ptr(),
            slots.data_ptr(),
            tables.data_ptr(),
            tables.shape[1],
            lens.data_ptr(),
            k_ptrs,
            v_ptrs,
            *((t.data_ptr() for t in local) if local else (None, None)),
        )
        if rc:
            log.warning("the C decode stack could not run (code %d); using the layer-by-layer path", rc)
            return None
        return out
