"""The FFN variants by name: what each computes, its baseline, and the hidden width it gets.

Every `ffn=` option is one row of `FFN_REGISTRY`; `FeedForward` (feedforward.py) reads the row, so a
new variant is a new row here, never a new forward. Formulas: docs/design.md section 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class FFNSpec:
    ffn_type: str  # "type1": W2 h(W1 x), two matrices; "type2": W3 h(W1 x, W2 x), three (SwiGLU's layout)
    baseline: str  # the fixed FFN this variant is compared against (itself for a baseline)
    activation: str | None = None  # fixed FFNs: sigma (type1) or the gate branch's activation (type2)
    mixture: str | None = None  # "la" (constant coefficients) or "moa" (per-token gates); None: fixed
    form: str | None = None  # mixtures: "one", "bi" or "qd" (Type-I mixtures are "one")

    @property
    def is_baseline(self) -> bool:
        return self.mixture is None


FFN_REGISTRY: dict[str, FFNSpec] = {
    # fixed activations: Type-I W2 sigma(W1 x), and SwiGLU W3 (silu(W1 x) * W2 x)
    "relu2": FFNSpec("type1", "relu2", activation="relu2"),
    "gelu": FFNSpec("type1", "relu2", activation="gelu"),
    "silu": FFNSpec("type1", "relu2", activation="silu"),
    "relu": FFNSpec("type1", "relu2", activation="relu"),
    "swiglu": FFNSpec("type2", "swiglu", activation="silu"),
    # learnable activations (LA) and mixtures of activations (MoA) over the baselines' projections
    "la1": FFNSpec("type1", "relu2", mixture="la", form="one"),
    "moa1": FFNSpec("type1", "relu2", mixture="moa", form="one"),
    "one_la": FFNSpec("type2", "swiglu", mixture="la", form="one"),
    "one_moa": FFNSpec("type2", "swiglu", mixture="moa", form="one"),
    "bi_la": FFNSpec("type2", "swiglu", mixture="la", form="bi"),
    "bi_moa": FFNSpec("type2", "swiglu", mixture="moa", form="bi"),
    "qd_la": FFNSpec("type2", "swiglu", mixture="la", form="qd"),
    "qd_moa": FFNSpec("type2", "swiglu", mixture="moa", form="qd"),
}


def ffn_hidden_dim(dim: int, ffn_name: str, hidden: int | None, multiple_of: int) -> int:
    """4d for Type-I, 8d/3 rounded up for Type-II: both hold 8 d^2 projection parameters."""
    if hidden is not None:
        return hidden
    if FFN_REGISTRY[ffn_name].ffn_type == "type1":
        return 4 * dim
    return multiple_of * math.ceil(8 * dim / 3 / multiple_of)
