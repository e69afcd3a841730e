"""`FeedForward`: the one FFN forward, for a dense FFN and for E stacked MoE experts alike.

    Type-I    W2 h(W1 x)            h = sigma(a), or the LA / MoA mixture of a = W1 x
    Type-II   W3 h(W1 x, W2 x)      h = silu(a) * b (SwiGLU), or a one / bi / qd mixture

A dense FFN stores each projection as nn.Linear, (out, in); stacked experts store (E, out, in), as
Muon orthogonalises and FSDP2 shards them. The forward takes `linear(x, weight)`: linear.linear for a
dense FFN, a grouped matrix product over tokens sorted by expert for experts (moe/experts.py).
What a variant computes comes from its row of FFN_REGISTRY; formulas in docs/design.md section 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from ..activations import ACTIVATIONS, accepted_names, canonical_name
from ..errors import ConfigError, check_choice, check_positive
from ..linear import Linear, linear
from .gates import GATE_FUNCTIONS, INITS, Gates, gate_at_zero
from .kernels import KERNELS, pair_mix, product_mix
from .registry import FFN_REGISTRY, FFNSpec, ffn_hidden_dim

DEFAULT_DICT = {"type1": ("r2", "g", "s", "t"), "type2": ("s", "g", "r2", "t")}
DEFAULT_UP_DICT = ("id", "t", "s")
# The baseline each type starts from with init=baseline: (gate-branch activation, up-branch one).
BASELINE_ENTRIES = {"type1": ("relu2", None), "type2": ("silu", "identity")}


@dataclass(frozen=True)
class ActivationMixture:
    """What a mixture FFN computes between its projections: h = mix(a = W1 x, b = W2 x, coefficients)."""

    ffn_type: str  # type1 | type2
    form: str  # one | bi | qd
    names_a: tuple[str, ...]  # the gate branch's dictionary (Type-I: the only one)
    names_b: tuple[str, ...] | None  # the up branch's (bi, qd)
    kernel: str

    @classmethod
    def from_config(cls, cfg: DictConfig, spec: FFNSpec) -> ActivationMixture:
        names_a = tuple(canonical_name(n) for n in (cfg.dict or DEFAULT_DICT[spec.ffn_type]))
        names_b = tuple(canonical_name(n) for n in (cfg.up_dict or DEFAULT_UP_DICT)) \
            if spec.form in ("bi", "qd") else None
        return cls(spec.ffn_type, spec.form, names_a, names_b, cfg.kernel)

    def layout(self, init: str) -> tuple[list[int], torch.Tensor]:
        """Segment sizes of the coefficient vector, and its baseline one-hot (see ffn/gates.py)."""
        first, second = BASELINE_ENTRIES[self.ffn_type]
        onehot_a = _onehot(self.names_a, first, init, "ffn.dict")
        if self.form == "qd":
            onehot_b = _onehot(self.names_b, second, init, "ffn.up_dict")
            return [len(self.names_a) * len(self.names_b)], torch.outer(onehot_a, onehot_b).flatten()
        if self.form == "bi":
            onehot_b = _onehot(self.names_b, second, init, "ffn.up_dict")
            return [len(self.names_a), len(self.names_b)], torch.cat([onehot_a, onehot_b])
        return [len(self.names_a)], onehot_a

    def entry_names(self) -> list[str]:
        if self.form == "qd":
            return [f"{a}*{b}" for a in self.names_a for b in self.names_b]
        if self.form == "bi":
            return list(self.names_a) + [f"up:{b}" for b in self.names_b]
        return list(self.names_a)

    def __call__(self, a: torch.Tensor, b: torch.Tensor | None, c: torch.Tensor) -> torch.Tensor:
        """a, b: (N, G, h) projections; c: (N or 1, G, n) coefficients -> (N, G, h)."""
        if self.ffn_type == "type1":
            return product_mix(a, c, self.names_a, kernel=self.kernel)
        if self.form == "one":
            return product_mix(a, c, self.names_a, b=b, kernel=self.kernel)
        if self.form == "bi":
            k1 = len(self.names_a)
            return product_mix(a, c[..., :k1], self.names_a, b=b, e=c[..., k1:], names_b=self.names_b,
                               kernel=self.kernel)
        return pair_mix(a, b, c, self.names_a, self.names_b, kernel=self.kernel)


class StackedLinear(nn.Module):
    """E projections of one shape, weight (E, out, in): nn.Linear's layout with an expert axis."""

    def __init__(self, n_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, out_features, in_features))


def _projection(in_features: int, out_features: int, n_experts: int | None) -> nn.Module:
    if n_experts is None:
        return Linear(in_features, out_features, bias=False)
    return StackedLinear(n_experts, in_features, out_features)


class FeedForward(nn.Module):
    """Any `ffn=` variant: projections w1, w2[, w3], and for LA / MoA the gates and the mixture.

    `hidden` is the width the variant gets; a baseline with ffn.match_params_of is widened from it
    (matched_hidden_dim)."""

    def __init__(self, dim: int, hidden: int, cfg: DictConfig, n_experts: int | None = None):
        super().__init__()
        spec = FFN_REGISTRY[cfg.name]
        hidden = matched_hidden_dim(dim, hidden, cfg)
        self.ffn_type, self.n_experts = spec.ffn_type, n_experts
        self.w1 = _projection(dim, hidden, n_experts)
        if spec.ffn_type == "type2":
            self.w2 = _projection(dim, hidden, n_experts)
            self.w3 = _projection(hidden, dim, n_experts)
            self.projections = ("w1", "w2", "w3")  # in the order of the formulas; the last writes the residual
        else:
            self.w2 = _projection(hidden, dim, n_experts)
            self.projections = ("w1", "w2")
        if spec.is_baseline:
            self.mixture, self.activation = None, ACTIVATIONS[spec.activation]
        else:
            self.mixture = ActivationMixture.from_config(cfg, spec)
            segments, baseline = self.mixture.layout(cfg.init)
            self.gate_groups = cfg.gate_groups
            self.gates = Gates(dim, segments, baseline, self.mixture.entry_names(), spec.mixture, cfg.gate_groups,
                               cfg.gate, cfg.gate_bias, cfg.init, n_experts, cfg.gate_init_std)

    @property
    def output_projection(self) -> nn.Module:
        return getattr(self, self.projections[-1])

    def reset_parameters(self, std: float, output_std: float) -> None:
        """Projections from N(0, std), the one writing the residual stream from N(0, output_std)."""
        for name in self.projections:
            nn.init.normal_(getattr(self, name).weight, std=output_std if name == self.projections[-1] else std)
        if self.mixture is not None:
            self.gates.reset_parameters()

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters beyond the projections (gates, LA coefficients): what `ffn_extra` counts."""
        return list(self.gates.parameters()) if self.mixture is not None else []

    def forward(self, x: torch.Tensor, linear=linear, expert_ids: torch.Tensor | int | None = None) -> torch.Tensor:
        """x (..., d) -> (..., d). For experts: rows sorted by expert, `linear` the grouped product and
        `expert_ids` each row's expert (or one int for a single expert)."""
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        n = x.shape[0]
        a = linear(x, self.w1.weight)
        b = linear(x, self.w2.weight) if self.ffn_type == "type2" else None
        if self.mixture is None:
            h = self.activation(a) if b is None else self.activation(a) * b
        else:
            c = self.gates(x, linear, expert_ids)
            h = self.mixture(a.view(n, self.gate_groups, -1), None if b is None else b.view(n, self.gate_groups, -1),
                             c).view(n, -1)
        return linear(h, self.output_projection.weight).view(*lead, -1)

    def entry_names(self) -> list[str]:
        return self.mixture.entry_names() if self.mixture is not None else []


def build_ffn(cfg: DictConfig, dim: int, hidden: int) -> FeedForward:
    return FeedForward(dim, hidden, cfg)


def matched_hidden_dim(dim: int, hidden: int, cfg: DictConfig) -> int:
    """The paper's parameter-matched control: a baseline with `ffn.match_params_of=V` gets the fewest
    extra hidden units that give it at least the parameters of V at width `hidden` (V's gates and
    coefficients, spread over whole hidden units of 2d (Type-I) or 3d (Type-II) weights each)."""
    target = cfg.get("match_params_of")
    if not target:
        return hidden
    variant = OmegaConf.merge(cfg, {"name": target, "match_params_of": None})
    with torch.device("meta"):
        extra = sum(p.numel() for p in FeedForward(dim, hidden, variant).extra_parameters())
    weights_per_unit = (3 if FFN_REGISTRY[cfg.name].ffn_type == "type2" else 2) * dim
    return hidden + math.ceil(extra / weights_per_unit)


def _onehot(names: tuple[str, ...], entry: str, init: str, key: str) -> torch.Tensor:
    onehot = torch.zeros(len(names), device="cpu")  # a constant of the layout, whatever device the model is built on
    if entry in names:
        onehot[names.index(entry)] = 1.0
    elif init == "baseline":
        raise ConfigError(key, f"ffn.init=baseline starts from the baseline activation '{entry}', which is not in "
                               f"{list(names)}.", f"add it to {key}, or use ffn.init=normalized")
    return onehot


def validate_ffn_config(cfg: DictConfig, model_cfg: DictConfig) -> None:
    """The ffn group's checks: the variant, its dictionaries, gate, init, kernel and gate groups."""
    check_choice("ffn.name", cfg.name, sorted(FFN_REGISTRY))
    spec = FFN_REGISTRY[cfg.name]
    hidden = ffn_hidden_dim(model_cfg.dim, cfg.name, model_cfg.ffn_hidden, model_cfg.ffn_multiple_of)
    if cfg.get("match_params_of"):
        variants = sorted(name for name, s in FFN_REGISTRY.items() if s.baseline == cfg.name and not s.is_baseline)
        if not spec.is_baseline:
            raise ConfigError("ffn.match_params_of", f"widens a baseline to a variant's size; '{cfg.name}' is itself "
                              "a variant.", "ffn=relu2 or ffn=swiglu with the name of one of their variants")
        check_choice("ffn.match_params_of", cfg.match_params_of, variants)
    if spec.is_baseline:
        for key in ("dict", "up_dict"):
            if cfg.get(key):
                mixtures = ", ".join(name for name, s in FFN_REGISTRY.items() if not s.is_baseline)
                raise ConfigError(f"ffn.{key}", f"the baseline '{cfg.name}' has a fixed activation and no dictionary.",
                                  f"{mixtures} take dictionaries")
        return
    for key in ("dict", "up_dict"):
        names = cfg.get(key)
        if names is None:
            continue
        if key == "up_dict" and spec.form not in ("bi", "qd"):
            kind = "Type-I" if spec.ffn_type == "type1" else "one-sided"
            two_sided = ", ".join(name for name, s in FFN_REGISTRY.items() if s.form in ("bi", "qd"))
            raise ConfigError("ffn.up_dict", f"'{cfg.name}' is {kind} and has no up-branch dictionary.", two_sided)
        if len(names) == 0:
            raise ConfigError(f"ffn.{key}", "is empty.", accepted_names())
        for name in names:
            try:
                canonical_name(name)
            except KeyError:
                raise ConfigError(f"ffn.{key}", f"unknown activation '{name}'.", accepted_names()) from None
        canonical = [canonical_name(n) for n in names]
        if len(set(canonical)) != len(canonical):
            raise ConfigError(f"ffn.{key}", f"{list(names)} names an activation twice.")
    check_choice("ffn.gate", cfg.gate, GATE_FUNCTIONS)
    check_choice("ffn.init", cfg.init, INITS)
    if spec.mixture == "moa" and cfg.init == "uniform" and gate_at_zero(cfg.gate, 2) == 0.0:
        raise ConfigError("ffn.init", f"'uniform' starts every gate at {cfg.gate}(0) = 0: the FFN would output 0 and "
                          "its projections get no gradient at the first step.",
                          "normalized (the gates start at 1/K) or baseline with this gate")
    check_choice("ffn.kernel", cfg.kernel, KERNELS)
    check_positive("ffn.gate_init_std", cfg.gate_init_std, allow_zero=True)
    if cfg.gate_groups < 1 or hidden % cfg.gate_groups:
        raise ConfigError("ffn.gate_groups", f"{cfg.gate_groups} must be >= 1 and divide the hidden width {hidden}.")
    if cfg.init == "baseline":
        ActivationMixture.from_config(cfg, spec).layout(cfg.init)  # raises if a dictionary lacks the baseline's
