"""The activation dictionary: every function an FFN variant can use, by name or abbreviation."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

LEAKY_RELU_SLOPE = 0.01
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


def leaky_relu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, LEAKY_RELU_SLOPE)


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,  # exact (erf) GELU
    "silu": F.silu,
    "relu": F.relu,
    "relu2": relu2,
    "leaky_relu": leaky_relu,
    "tanh": torch.tanh,
    "identity": identity,
}

def _gelu_vd(x):
    cdf = 0.5 * (1.0 + torch.erf(x * _INV_SQRT2))
    return x * cdf, cdf + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


# SiLU and tanh are written over the same exp(-x), so that a fused kernel evaluating both (the
# default dictionaries hold both) computes one exponential instead of an exp and a tanh.
def _silu_vd(x):
    s = 1.0 / (1.0 + torch.exp(-x))
    return x * s, s * (1.0 + x * (1.0 - s))


def _relu_vd(x):
    return F.relu(x), (x > 0).to(x.dtype)


def _relu2_vd(x):
    r = F.relu(x)
    return r * r, 2.0 * r


def _leaky_relu_vd(x):
    positive = x > 0
    return torch.where(positive, x, LEAKY_RELU_SLOPE * x), torch.where(positive, 1.0, LEAKY_RELU_SLOPE).to(x.dtype)


def _tanh_vd(x):
    e = torch.exp(-x)
    t = 2.0 / (1.0 + e * e) - 1.0  # = tanh(x); finite at both infinities
    return t, 1.0 - t * t


def _identity_vd(x):
    return x, torch.ones_like(x)


# (value, derivative) in one go, written so that a fused kernel shares the sub-expressions.
VALUE_AND_DERIVATIVE: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
    "gelu": _gelu_vd, "silu": _silu_vd, "relu": _relu_vd, "relu2": _relu2_vd,
    "leaky_relu": _leaky_relu_vd, "tanh": _tanh_vd, "identity": _identity_vd,
}

# Values as the fused mixing kernels compute them: SiLU and tanh over the shared exp(-x).
MIXING_VALUE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    **ACTIVATIONS,
    "silu": lambda x: x / (1.0 + torch.exp(-x)),
    "tanh": lambda x: 2.0 / (1.0 + torch.exp(-x) ** 2) - 1.0,
}

ABBREVIATIONS = {"g": "gelu", "s": "silu", "r": "relu", "r2": "relu2", "l": "leaky_relu", "t": "tanh",
                 "id": "identity"}


def accepted_names() -> str:
    return ", ".join(f"{abbr} ({name})" for abbr, name in ABBREVIATIONS.items())


def canonical_name(name: str) -> str:
    """Map an abbreviation or full name to the full name; KeyError for unknown names."""
    if name in ACTIVATIONS:
        return name
    return ABBREVIATIONS[name]


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return ACTIVATIONS[canonical_name(name)]
