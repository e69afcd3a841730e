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


# The ffn keys only LA and MoA read; a baseline ignores them (and a mixture refuses match_params_of).
MIXTURE_KEYS = ("dict", "up_dict", "gate", "gate_bias", "gate_init_std", "gate_groups", "init", "kernel")


def unused_keys(name: str) -> tuple[str, ...]:
    """The ffn keys that do not change what the FFN `name` computes: two runs that differ only there are one run."""
    spec = FFN_REGISTRY.get(name)
    if spec is None:
        return ()
    return MIXTURE_KEYS if spec.is_baseline else ("match_params_of",)


def ffn_hidden_dim(dim: int, ffn_name: str, hidden: int | None, multiple_of: int) -> int:
    """4d for Type-I, 8d/3 rounded up for Type-II: both hold 8 d^2 projection parameters."""
    if hidden is not None:
        return hidden
    if FFN_REGISTRY[ffn_name].ffn_type == "type1":
        return 4 * dim
    return multiple_of * math.ceil(8 * dim / 3 / multiple_of)
