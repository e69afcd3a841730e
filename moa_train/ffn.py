"""Feed-forward blocks and their registry.

Every variant is an `FFN`: it is built from (dim, hidden, ffn config) and owns its projections
(`w1`, `w2`[, `w3`] as in DESIGN.md section 1) plus any extra parameters (gates, coefficients).
The model only ever calls `build_ffn`, so new variants register here without touching it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig

from .activations import get_activation


class FFN(nn.Module):
    # Name of the projection that writes back to the residual stream; it gets the depth-scaled init.
    output_projection = "w2"

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters beyond the linear projections (gates, LA coefficients)."""
        linear = {id(p) for m in self.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
        return [p for p in self.parameters() if id(p) not in linear]

    def reset_parameters(self, std: float, output_std: float) -> None:
        for name, module in self.named_children():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=output_std if name == self.output_projection else std)


@dataclass(frozen=True)
class FFNSpec:
    family: str  # "type1" (two matrices) or "type2" (three matrices, SwiGLU family)
    baseline: str  # the fixed FFN this variant is compared against
    build: Callable[[int, int, DictConfig], FFN]


FFN_REGISTRY: dict[str, FFNSpec] = {}


def register_ffn(name: str, family: str, baseline: str):
    def decorator(build: Callable[[int, int, DictConfig], FFN]):
        FFN_REGISTRY[name] = FFNSpec(family, baseline, build)
        return build

    return decorator


def ffn_hidden_dim(dim: int, ffn_name: str, hidden: int | None, multiple_of: int) -> int:
    if hidden is not None:
        return hidden
    if FFN_REGISTRY[ffn_name].family == "type1":
        return 4 * dim
    return multiple_of * math.ceil(8 * dim / 3 / multiple_of)


def build_ffn(cfg: DictConfig, dim: int, hidden: int) -> FFN:
    return FFN_REGISTRY[cfg.name].build(dim, hidden, cfg)


# ----------------------------------------------------------------------------- baselines


class FixedFFN(FFN):
    """Type-I baseline: W2 sigma(W1 x)."""

    def __init__(self, dim: int, hidden: int, activation: str):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.activation = get_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.activation(self.w1(x)))


class SwiGLU(FFN):
    """Type-II baseline: W3 (silu(W1 x) * W2 x)."""

    output_projection = "w3"

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


for _activation in ("relu2", "gelu", "silu", "relu"):
    register_ffn(_activation, family="type1", baseline="relu2")(
        lambda dim, hidden, cfg, _a=_activation: FixedFFN(dim, hidden, _a)
    )

register_ffn("swiglu", family="type2", baseline="swiglu")(lambda dim, hidden, cfg: SwiGLU(dim, hidden))
