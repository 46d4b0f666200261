"""A CPU float32 linear layer laid out so a batch-1 GEMV uses every core.

PyTorch runs a float32 matrix-vector product on one thread. Splitting the output
features into P column blocks stored (P, in, out / P) turns it into a batched matmul
that runs the blocks in parallel: about 1.4x the bandwidth at batch 1 on two cores,
and no slower for prefill.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.layers import cpu_kernels


class SplitLinear(nn.Module):
    """Same result as ``nn.Linear`` (up to summation order), weights as (P, in, out / P)."""

    def __init__(self, linear: nn.Linear, parts: int) -> None:
        super().__init__()
        W = linear.weight.detach()  # (N, K)
        N, K = W.shape
        self.in_features, self.out_features, self.parts = K, N, parts
        # packed[p, k, j] = W[p * N / P + j, k]
        packed = W.t().reshape(K, parts, N // parts).permute(1, 0, 2).contiguous()
        self.packed = nn.Parameter(packed, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        M = x2.shape[0]
        out = torch.bmm(x2.expand(self.parts, M, self.in_features), self.packed)  # (P, M, N / P)
        out = out.permute(1, 0, 2).reshape(M, self.out_features)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*lead, self.out_features)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the original (N, K) weight: the embedding lookup of a tied LM head."""
        block = self.out_features // self.parts
        return self.packed[ids // block, :, ids % block]  # ids.shape + (K,)


class TiedSplitEmbedding(nn.Module):
    """An embedding that reads its rows from the split LM head it is tied to."""

    def __init__(self, head: SplitLinear) -> None:
        super().__init__()
        self.head = [head]  # a list, so the head is not registered twice as a submodule

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head[0].rows(ids)


def split_linears(model: nn.Module, parts: int) -> None:
    """Replace every ``nn.Linear`` whose width divides into ``parts`` by a SplitLinear."""
    replaced: dict[int, SplitLinear] = {}
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if parts > 1 and child.out_features % parts == 0:
                split = SplitLinear(child, parts)
                replaced[id(child.weight)] = split
                setattr(module, child_name, split)
            else:
                # Next best on one thread: an (in, out)-contiguous weight, twice as fast as (out, in).
                child.weight.data = child.weight.data.t().contiguous().t()
    # A tied embedding shares the LM head's weight: read it from the split copy.
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Embedding) and id(child.weight) in replaced:
                setattr(module, child_name, TiedSplitEmbedding(replaced[id(child.weight)]))


#: the largest weight (elements) the tiled bf16 product takes (OneDNNPackedLinear.kernel_rows)
_TILE_MAX_WEIGHTS = 1 << 23


class OneDNNPackedLinear(nn.Linear):
    """A CPU bfloat16 or float32 ``nn.Linear`` that also keeps its weight pre-packed for oneDNN.

    With a plain weight, oneDNN reorders it into its blocked layout on every call; for
    the few rows of a batched decode step that reorder costs more than the product.
    Packing once at load time removes it. A single row still takes the plain weight, so
    the layer holds both: in bfloat16, up to ``kernel_rows()`` rows go to the package's
    kernel (kernels/bf16_gemv.c: for 1-4 rows it streams the plain weight at 2.4-4.5x the
    speed of ATen's GEMV and 1.1-3x oneDNN's for one row on one core of this project's
    AVX-512 machine; for 5-64 rows a tiled product runs 1.1-1.3x oneDNN's up to 32 rows
    and 0.9x at 64), else one row goes to ATen's GEMV. In
    float32 the packed product is also about 1.7x faster than ATen's for the 10-40 rows of
    an encoder call on one sentence (measured on this project's 2-core AVX512 machine).
    """

    packed: torch.Tensor

    def kernel_rows(self) -> int:
        """Most rows this layer sends to ``cpu_kernels.bf16_gemv`` (the decode stack runs
        the same kernel for the same rows, so the two agree bit for bit). Past the
        streaming kernel's 4 rows, the tiled product takes layers of up to 8M weights: a
        bigger weight (an LM head) streams faster through oneDNN."""
        if self.in_features <= cpu_kernels.BF16_TILE_MAX_K and self.weight.numel() <= _TILE_MAX_WEIGHTS:
            return cpu_kernels.BF16_TILE_MAX_ROWS
        return cpu_kernels.BF16_GEMV_MAX_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.numel() // self.in_features
        if (
            1 <= rows <= self.kernel_rows()
            and x.dtype == self.weight.dtype == torch.bfloat16
            and x.is_contiguous()
            and self.weight.is_contiguous()
            and cpu_kernels.bf16_gemv_available()
        ):
            out = cpu_kernels.bf16_gemv(x.view(rows, self.in_features), self.weight, self.bias)
            return out.view(*lead, self.out_features)
        if rows <= 1 or not x.is_contiguous():
            return nn.functional.linear(x, self.weight, self.bias)
        out = torch.ops.mkldnn._linear_pointwise(
            x.reshape(rows, self.in_features), self.packed, self.bias, "none", [], ""
        )
        return out.view(*lead, self.out_features)


def pack_linears_for_onednn(
    model: nn.Module, rows_hint: int = 16, dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)
) -> bool:
    """Pre-pack every ``nn.Linear`` of a CPU model whose weight is one of ``dtypes`` for
    oneDNN. Returns False, changing nothing, where this PyTorch build has no packing op."""
    pack = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
    if pack is None or not torch.backends.mkldnn.is_available():
        return False
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype in dtypes:
            module.packed = pack(module.weight.detach(), rows_hint)
            module.__class__ = OneDNNPackedLinear
    return True
