"""E experts of one FFN variant, weights stacked per layer, run as grouped matrix products.

Every expert is the FFN that `ffn=` names: a fixed baseline (relu2, gelu, silu, relu, swiglu) or
an LA / MoA mixture with its own coefficients, so `ffn=qd_moa` puts MoA gates in every expert.
Weights are stored like nn.Linear's, (E, out, in), so each expert's matrix is what Muon
orthogonalises and what FSDP2 shards (along E: whole experts per rank).

`grouped_mm` runs `torch._grouped_mm` where the build and device support it (CUDA, bf16 on
Hopper; float32 on CPU in recent builds, where it beats the loop by 15-25% at tiny_moe size) and
otherwise one matrix product per expert on its contiguous slice of the sorted tokens; both give
the same numbers to float tolerance.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig

from ..activations import get_activation
from ..ffn.base import FFN_REGISTRY
from ..ffn.mixtures import Coefficients, Mixing

GROUPED_MM = ("auto", "torch", "loop")


@functools.cache
def _torch_grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
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
    use_torch = backend == "torch" or (backend == "auto" and aligned and _torch_grouped_mm_works(x.device.type,
                                                                                                  x.dtype))
    if use_torch:
        offsets = counts.cumsum(0).to(torch.int32)
        return _contiguous_grad(torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets))
    pieces = x.split(counts.tolist())
    return torch.cat([F.linear(piece, weight[e]) for e, piece in enumerate(pieces)])


class GroupedExperts(nn.Module):
    def __init__(self, dim: int, hidden: int, n_experts: int, ffn_cfg: DictConfig, backend: str = "auto"):
        super().__init__()
        spec = FFN_REGISTRY[ffn_cfg.name]
        self.n_experts, self.backend, self.family = n_experts, backend, spec.family
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        if spec.family == "type2":
            self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))
            self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden))
            self.projections, self.output_projection = ("w1", "w2", "w3"), "w3"
        else:
            self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))
            self.projections, self.output_projection = ("w1", "w2"), "w2"
        if spec.mixture:
            self.mixing = Mixing.from_config(ffn_cfg)
            self.groups = ffn_cfg.gate_groups
            self.coefficients = Coefficients(dim, self.mixing, self.groups, ffn_cfg.gate, ffn_cfg.gate_bias,
                                             ffn_cfg.init, n_experts=n_experts)
        else:
            self.mixing = None
            self.activation = get_activation("silu" if spec.family == "type2" else ffn_cfg.name)

    def reset_parameters(self, std: float, output_std: float) -> None:
        for name in self.projections:
            nn.init.normal_(getattr(self, name), std=output_std if name == self.output_projection else std)
        if self.mixing is not None:
            self.coefficients.reset_parameters()

    def extra_parameters(self) -> list[nn.Parameter]:
        return list(self.coefficients.parameters()) if self.mixing is not None else []

    def per_expert_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters()) // self.n_experts

    def forward(self, x: torch.Tensor, counts: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """x (rows, d) sorted by expert with counts[e] rows each; expert_ids (rows,) the expert of each row."""
        return self._ffn(x, functools.partial(_grouped_linear, counts=counts, backend=self.backend), expert_ids)

    def forward_expert(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """Expert `expert` alone on x (rows, d): the reference the grouped path must equal."""
        return self._ffn(x, lambda t, w: F.linear(t, w[expert]), expert)

    def _ffn(self, x, linear, expert_ids):
        n = x.shape[0]
        a = linear(x, self.w1)
        if self.mixing is None:
            h = self.activation(a) if self.family == "type1" else self.activation(a) * linear(x, self.w2)
        else:
            c = self.coefficients(x, linear, expert_ids)
            a = a.view(n, self.groups, -1)
            b = linear(x, self.w2).view(n, self.groups, -1) if self.family == "type2" else None
            h = self.mixing(a, b, c).view(n, -1)
        return linear(h, self.w3 if self.family == "type2" else self.w2)


def _grouped_linear(x, weight, counts, backend):
    return grouped_mm(x, weight, counts, backend)


def expert_hidden_dim(expert_hidden: int, ffn_name: str, multiple_of: int) -> int:
    """Type-II experts use `expert_hidden`; Type-I (two matrices) 3/2 of it: the same parameters."""
    if FFN_REGISTRY[ffn_name].family == "type2":
        return expert_hidden
    return multiple_of * math.ceil(1.5 * expert_hidden / multiple_of)
