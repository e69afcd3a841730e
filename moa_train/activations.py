"""The activation dictionary: every function an FFN variant can use, by name or abbreviation."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LEAKY_RELU_SLOPE = 0.01


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
