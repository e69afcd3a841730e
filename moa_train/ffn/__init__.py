"""Feed-forward blocks: the baselines and the LA / MoA family, one `FeedForward` built from the registry.

- registry.py     FFN_REGISTRY: every `ffn=` option, its type, baseline and activation or mixture
- feedforward.py  FeedForward: the one forward for dense FFNs and stacked experts; the ffn checks
- gates.py        Gates: where MoA gates and LA coefficients are computed; gate statistics
- kernels.py      the fused, recompute-in-backward mixing kernels (product_mix, pair_mix)
"""

from .feedforward import FeedForward, build_ffn, validate_ffn_config
from .gates import GateDetail, GateRecorder, Gates, gate_entry_names, mean_gates, recording_gates
from .registry import FFN_REGISTRY, FFNSpec, ffn_hidden_dim

__all__ = ["FFN_REGISTRY", "FFNSpec", "FeedForward", "GateDetail", "GateRecorder", "Gates", "build_ffn",
           "ffn_hidden_dim", "gate_entry_names", "mean_gates", "recording_gates", "validate_ffn_config"]
