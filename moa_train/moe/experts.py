"""E experts of one FFN variant, weights stacked per layer, run as grouped matrix products.

Every expert is the FFN that `ffn=` names, computed by the same `FeedForward` forward as a dense
FFN (a fixed baseline, or an LA / MoA mixture with its own gates per expert); only the projection
differs: `grouped_mm` over tokens sorted by expert. Weights are (E, out, in), so each expert's
matrix is what Muon orthogonalises and what FSDP2 shards (along E: whole experts per rank).

`grouped_mm` runs `torch._grouped_mm` where the build and device support it (CUDA, bf16 on
Hopper; float32 on CPU in recent builds, where it beats the loop by 15-25% at tiny_moe size) and
otherwise one matrix product per expert on its contiguous slice of the sorted tokens; both give
the same numbers to float tolerance.
"""

from __future__ import annotations

import functools
import math

import torch
from omegaconf import DictConfig

from ..ffn import FFN_REGISTRY, FeedForward
from ..linear import linear

GROUPED_MM = ("auto", "torch", "loop")


@functools.cache
def torch_grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Probe once per (device, dtype): torch._grouped_mm is private and its support varies by build."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.randn(16, 16, device=device_type, dtype=dtype, requires_grad=True)
        w = torch.randn(2, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
        offsets = torch.tensor([8, 16], device=device_type, dtype=torch.int32)
        y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)
        y.backward(torch.ones_like(y))
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # torch._grouped_mm's backward refuses gradients with zero strides (as `.sum()` produces)
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Rows of x sorted by expert, counts[e] rows each; weight (E, out, in) -> (rows, out)."""
    if torch.is_autocast_enabled(x.device.type):  # autocast does not cover the private op: cast as it would
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    else:
        weight = weight.to(x.dtype)
    # torch._grouped_mm needs rows of whole 16-byte units in both operands
    aligned = all(n * x.element_size() % 16 == 0 for n in weight.shape[-2:])
    use_torch = backend == "torch" or (backend == "auto" and aligned and torch_grouped_mm_works(x.device.type,
                                                                                                 x.dtype))
    if use_torch:
        offsets = counts.cumsum(0).to(torch.int32)
        return _contiguous_grad(torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets))
    pieces = x.split(counts.tolist())
    return torch.cat([linear(piece, w) for piece, w in zip(pieces, weight.unbind(0))])


class GroupedExperts(FeedForward):
    """The `ffn=` variant with an expert axis on every weight, applied to tokens sorted by expert."""

    def __init__(self, dim: int, hidden: int, n_experts: int, ffn_cfg: DictConfig, backend: str = "auto"):
        super().__init__(dim, hidden, ffn_cfg, n_experts=n_experts)
        self.backend = backend

    def per_expert_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters()) // self.n_experts

    def forward(self, x: torch.Tensor, counts: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """x (rows, d) sorted by expert with counts[e] rows each; expert_ids (rows,) the expert of each row."""
        return super().forward(x, functools.partial(grouped_mm, counts=counts, backend=self.backend), expert_ids)

    def forward_expert(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """Expert `expert` alone on x (rows, d): the reference the grouped path must equal."""
        return super().forward(x, lambda rows, weight: linear(rows, weight[expert]), expert)


def expert_hidden_dim(expert_hidden: int, ffn_name: str, multiple_of: int) -> int:
    """Type-II experts use `expert_hidden`; Type-I (two matrices) 3/2 of it: the same parameters."""
    if FFN_REGISTRY[ffn_name].ffn_type == "type2":
        return expert_hidden
    return multiple_of * math.ceil(1.5 * expert_hidden / multiple_of)
