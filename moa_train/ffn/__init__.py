"""Feed-forward blocks: the baselines and the LA / MoA family, one `FeedForward` built from the registry.

- registry.py     FFN_REGISTRY: every `ffn=` option, its type, baseline and activation or mixture
- feedforward.py  FeedForward: the one forward for dense FFNs and stacked experts; the ffn checks
- gates.py        Gates: where MoA gates and LA coefficients are computed; gate statistics
- kernels.py      the fused, recompute-in-backward mixing kernels (product_mix, pair_mix)
"""


import importlib

from .registry import FFN_REGISTRY, FFNSpec, ffn_hidden_dim

# The torch-backed names load on first use, so that the config schema (which reads the registry) and with it
# `moa-train --help` do not import torch.
_LAZY = {"FeedForward": "feedforward", "build_ffn": "feedforward", "validate_ffn_config": "feedforward",
         "GateDetail": "gates", "GateRecorder": "gates", "Gates": "gates", "gate_entry_names": "gates",
         "mean_gates": "gates", "recording_gates": "gates"}

__all__ = ["FFN_REGISTRY", "FFNSpec", "FeedForward", "GateDetail", "GateRecorder", "Gates", "build_ffn",
           "ffn_hidden_dim", "gate_entry_names", "mean_gates", "recording_gates", "validate_ffn_config"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
