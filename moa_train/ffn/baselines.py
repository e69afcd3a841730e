"""Fixed-activation baselines: Type-I `W2 sigma(W1 x)` and Type-II SwiGLU."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..activations import get_activation
from .base import FFN, register_ffn


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

    projections = ("w1", "w2", "w3")
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
