"""Feed-forward blocks: the baselines and the LA / MoA family, all built through `build_ffn`."""

from . import baselines, mixtures  # noqa: F401  (register the variants)
from .base import FFN, FFN_REGISTRY, build_ffn, ffn_hidden_dim, register_ffn

__all__ = ["FFN", "FFN_REGISTRY", "build_ffn", "ffn_hidden_dim", "register_ffn"]
