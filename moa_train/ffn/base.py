"""The FFN interface and registry.

Every variant is an `FFN`: it is built from (dim, hidden, ffn config) and owns its projections
(`w1`, `w2`[, `w3`] as in DESIGN.md section 1) plus any extra parameters (gates, coefficients).
The model only ever calls `build_ffn`, so new variants register without touching it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn
from omegaconf import DictConfig


class FFN(nn.Module):
    projections = ("w1", "w2")  # the shared d x m matrices, in the order of DESIGN.md's formulas
    output_projection = "w2"  # writes back to the residual stream: gets the depth-scaled init

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters beyond the projections (gates, LA coefficients): what `ffn_extra` counts."""
        shared = {id(p) for name in self.projections for p in getattr(self, name).parameters()}
        return [p for p in self.parameters() if id(p) not in shared]

    def reset_parameters(self, std: float, output_std: float) -> None:
        for name in self.projections:
            nn.init.normal_(getattr(self, name).weight, std=output_std if name == self.output_projection else std)
        self.reset_extra_parameters()

    def reset_extra_parameters(self) -> None:
        """Initialise gates and coefficients; baselines have none."""


@dataclass(frozen=True)
class FFNSpec:
    family: str  # "type1" (two matrices) or "type2" (three matrices, SwiGLU family)
    baseline: str  # the fixed FFN this variant is compared against
    mixture: str | None  # None for fixed baselines; "la" or "moa"
    form: str | None  # Type-II mixtures: "one", "bi" or "qd"; Type-I: "one"
    build: Callable[[int, int, DictConfig], FFN]


FFN_REGISTRY: dict[str, FFNSpec] = {}


def register_ffn(name: str, family: str, baseline: str, mixture: str | None = None, form: str | None = None):
    def decorator(build: Callable[[int, int, DictConfig], FFN]):
        FFN_REGISTRY[name] = FFNSpec(family, baseline, mixture, form, build)
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
