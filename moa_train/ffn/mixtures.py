"""Learnable activations (LA) and Mixture of Activations (MoA), Type-I and Type-II (DESIGN.md s. 1).

A mixture FFN keeps the baseline's projections and adds only mixing coefficients: constants shared
by all tokens (LA) or per-token gates `phi(U x [+ b])` (MoA), O(d) parameters per layer. The
coefficient vector of a layer is laid out as consecutive segments, one per dictionary it weighs:

    la1 / moa1, one_la / one_moa   [K]             sigma_k(W1 x)
    bi_la / bi_moa                 [K1] + [K2]     gate branch, then up branch
    qd_la / qd_moa                 [K1 * K2]       pairs (k, l), row-major

`ffn.init=baseline` makes the FFN start exactly as its baseline (relu2 for Type-I, SwiGLU for
Type-II): LA coefficients are one-hot, and MoA gates get a constant offset so that
`phi(U x) + offset` is one-hot while U = 0. With `uniform` LA coefficients are 1/K and MoA gates
start at phi(0) (0.5 for sigmoid).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig

from ..activations import accepted_names, canonical_name
from ..errors import ConfigError
from ..optim import mark_no_weight_decay
from .base import FFN, register_ffn
from .mixing import KERNELS, pair_mix, product_mix

GATE_FUNCTIONS = ("sigmoid", "tanh", "softmax", "linear")
INITS = ("uniform", "baseline")
DEFAULT_DICT = {"type1": ("r2", "g", "s", "t"), "type2": ("s", "g", "r2", "t")}
DEFAULT_UP_DICT = ("id", "t", "s")
# The baseline each family starts from with init=baseline: (gate-branch activation, up-branch one).
BASELINE_ENTRIES = {"type1": ("relu2", None), "type2": ("silu", "identity")}


def gate_at_zero(gate: str, size: int) -> float:
    return {"sigmoid": 0.5, "tanh": 0.0, "linear": 0.0, "softmax": 1.0 / size}[gate]


@dataclass(frozen=True)
class Mixing:
    """What a mixture FFN computes between its projections: h = mix(A = W1 x, B = W2 x, coefficients).

    Shared by the dense FFN and by stacked MoE experts, which differ only in how they project.
    """

    family: str  # type1 | type2
    form: str  # one | bi | qd
    mixture: str  # la | moa
    names_a: tuple[str, ...]
    names_b: tuple[str, ...] | None
    kernel: str

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Mixing:
        from .base import FFN_REGISTRY

        spec = FFN_REGISTRY[cfg.name]
        names_a = tuple(canonical_name(n) for n in (cfg.dict or DEFAULT_DICT[spec.family]))
        names_b = tuple(canonical_name(n) for n in (cfg.up_dict or DEFAULT_UP_DICT)) \
            if spec.form in ("bi", "qd") else None
        return cls(spec.family, spec.form, spec.mixture, names_a, names_b, cfg.kernel)

    def layout(self, init: str) -> tuple[list[int], torch.Tensor]:
        """Segment sizes of the coefficient vector, and its baseline one-hot (see the module docstring)."""
        first, second = BASELINE_ENTRIES[self.family]
        onehot_a = _onehot(self.names_a, first, init, "ffn.dict")
        if self.form == "qd":
            onehot_b = _onehot(self.names_b, second, init, "ffn.up_dict")
            return [len(self.names_a) * len(self.names_b)], torch.outer(onehot_a, onehot_b).flatten()
        if self.form == "bi":
            return [len(self.names_a), len(self.names_b)], torch.cat([onehot_a, _onehot(self.names_b, second, init,
                                                                                         "ffn.up_dict")])
        return [len(self.names_a)], onehot_a

    def entry_names(self) -> list[str]:
        if self.form == "qd":
            return [f"{a}*{b}" for a in self.names_a for b in self.names_b]
        if self.form == "bi":
            return list(self.names_a) + [f"up:{b}" for b in self.names_b]
        return list(self.names_a)

    def __call__(self, a: torch.Tensor, b: torch.Tensor | None, c: torch.Tensor) -> torch.Tensor:
        """a, b: (N, G, h) projections; c: (N or 1, G, n) coefficients -> (N, G, h)."""
        if self.family == "type1":
            return product_mix(a, c, self.names_a, kernel=self.kernel)
        if self.form == "one":
            return product_mix(a, c, self.names_a, b=b, kernel=self.kernel)
        if self.form == "bi":
            k1 = len(self.names_a)
            return product_mix(a, c[..., :k1], self.names_a, b=b, e=c[..., k1:], names_b=self.names_b,
                               kernel=self.kernel)
        return pair_mix(a, b, c, self.names_a, self.names_b, kernel=self.kernel)


class Coefficients(nn.Module):
    """Mixing weights of one FFN, or of a stack of E experts (`n_experts`).

    LA: learned constants, (G, n) or (E, G, n). MoA: gates phi(U x [+ b]) with U (G*n, d), or a
    stack (E, G*n, d) applied to tokens sorted by expert. Returned as (N, G, n), or (1, G, n) for
    the constants of one dense FFN.
    """

    def __init__(self, dim: int, mixing: Mixing, groups: int, gate: str, gate_bias: bool, init: str,
                 n_experts: int | None = None):
        super().__init__()
        segments, baseline = mixing.layout(init)
        self.segments, self.groups, self.mixture, self.gate_fn, self.init = segments, groups, mixing.mixture, gate, init
        self.entry_names = mixing.entry_names()
        self.register_buffer("baseline", baseline, persistent=False)  # one-hot per segment
        n = sum(segments)
        stack = () if n_experts is None else (n_experts,)
        if self.mixture == "la":
            self.weight = nn.Parameter(torch.empty(*stack, groups, n))
            mark_no_weight_decay(self, "weight")
        else:
            self.gate_weight = nn.Parameter(torch.empty(*stack, groups * n, dim))
            self.gate_bias = nn.Parameter(torch.empty(*stack, groups * n)) if gate_bias else None
            mark_no_weight_decay(self, "gate_weight", "gate_bias")
            self.register_buffer("offset", torch.zeros(n), persistent=False)
        # Evaluation-time statistics of the coefficients (see recording_mixture_statistics).
        self.register_buffer("stat_sum", torch.zeros(n), persistent=False)
        self.stat_count = 0
        self.recording = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        uniform = torch.cat([torch.full((size,), 1.0 / size) for size in self.segments]).to(self.baseline)
        if self.mixture == "la":
            self.weight.copy_((self.baseline if self.init == "baseline" else uniform).expand_as(self.weight))
            return
        nn.init.zeros_(self.gate_weight)
        if self.gate_bias is not None:
            nn.init.zeros_(self.gate_bias)
        at_zero = torch.cat([torch.full((s,), gate_at_zero(self.gate_fn, s)) for s in self.segments])
        self.offset.copy_(self.baseline - at_zero.to(self.baseline) if self.init == "baseline" else 0.0)

    def forward(self, x: torch.Tensor, linear=F.linear, expert_ids: torch.Tensor | int | None = None) -> torch.Tensor:
        """x: (N, d). For experts, `linear(x, stacked weight)` projects each token with its expert's
        matrix and `expert_ids` (per token, or one int for a single expert) picks the constants."""
        if self.mixture == "la":
            coefficients = self.weight.unsqueeze(0) if expert_ids is None else self.weight[expert_ids]
            coefficients = coefficients.view(-1, self.groups, self.weight.shape[-1])
        else:
            logits = linear(x, self.gate_weight)
            if self.gate_bias is not None:
                logits = logits + (self.gate_bias if expert_ids is None else self.gate_bias[expert_ids])
            logits = logits.view(x.shape[0], self.groups, -1)
            coefficients = self._phi(logits) + self.offset.to(logits.dtype)
        if self.recording:
            self.stat_sum += coefficients.detach().float().mean(1).sum(0) * (x.shape[0] / coefficients.shape[0])
            self.stat_count += x.shape[0]
        return coefficients

    def _phi(self, logits: torch.Tensor) -> torch.Tensor:
        if self.gate_fn == "sigmoid":
            return torch.sigmoid(logits)
        if self.gate_fn == "tanh":
            return torch.tanh(logits)
        if self.gate_fn == "linear":
            return logits
        return torch.cat([part.softmax(-1) for part in logits.split(self.segments, dim=-1)], dim=-1)

    def reset_statistics(self) -> None:
        self.stat_sum.zero_()
        self.stat_count = 0


class MixtureFFN(FFN):
    """A dense LA / MoA FFN: the baseline's projections, coefficients, and the mixing between them."""

    def __init__(self, dim: int, hidden: int, cfg: DictConfig):
        super().__init__()
        self.mixing = Mixing.from_config(cfg)
        self.groups = cfg.gate_groups
        family = self.mixing.family
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(dim, hidden, bias=False) if family == "type2" else nn.Linear(hidden, dim, bias=False)
        if family == "type2":
            self.w3 = nn.Linear(hidden, dim, bias=False)
            self.projections, self.output_projection = ("w1", "w2", "w3"), "w3"
        self.coefficients = Coefficients(dim, self.mixing, self.groups, cfg.gate, cfg.gate_bias, cfg.init)

    @property
    def names_a(self) -> tuple[str, ...]:
        return self.mixing.names_a

    @property
    def names_b(self) -> tuple[str, ...] | None:
        return self.mixing.names_b

    def entry_names(self) -> list[str]:
        return self.mixing.entry_names()

    def reset_extra_parameters(self) -> None:
        self.coefficients.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        n = x.shape[0]
        c = self.coefficients(x)
        a = self.w1(x).view(n, self.groups, -1)
        if self.mixing.family == "type1":
            return self.w2(self.mixing(a, None, c).view(n, -1)).view(*lead, -1)
        b = self.w2(x).view(n, self.groups, -1)
        return self.w3(self.mixing(a, b, c).view(n, -1)).view(*lead, -1)


def _onehot(names: tuple[str, ...], entry: str, init: str, key: str) -> torch.Tensor:
    onehot = torch.zeros(len(names))
    if entry in names:
        onehot[names.index(entry)] = 1.0
    elif init == "baseline":
        raise ConfigError(key, f"ffn.init=baseline starts from the baseline activation '{entry}', which is not in "
                               f"{list(names)}.", f"add it to {key}, or use ffn.init=uniform")
    return onehot


# ----------------------------------------------------------------------------- registration

VARIANTS = {
    "la1": ("type1", "one", "la"), "moa1": ("type1", "one", "moa"),
    "one_la": ("type2", "one", "la"), "one_moa": ("type2", "one", "moa"),
    "bi_la": ("type2", "bi", "la"), "bi_moa": ("type2", "bi", "moa"),
    "qd_la": ("type2", "qd", "la"), "qd_moa": ("type2", "qd", "moa"),
}

for _name, (_family, _form, _mixture) in VARIANTS.items():
    register_ffn(_name, family=_family, baseline="relu2" if _family == "type1" else "swiglu", mixture=_mixture,
                 form=_form)(MixtureFFN)


# ----------------------------------------------------------------------------- checks and statistics


def validate_ffn_config(cfg: DictConfig, hidden: int) -> None:
    from .base import FFN_REGISTRY

    spec = FFN_REGISTRY[cfg.name]
    if spec.mixture is None:
        for key in ("dict", "up_dict"):
            if cfg.get(key):
                raise ConfigError(f"ffn.{key}", f"the baseline '{cfg.name}' has a fixed activation and no dictionary.",
                                  "la1, moa1, one_la, one_moa, bi_la, bi_moa, qd_la, qd_moa take dictionaries")
        return
    for key in ("dict", "up_dict"):
        names = cfg.get(key)
        if names is None:
            continue
        if key == "up_dict" and spec.form not in ("bi", "qd"):
            kind = "Type-I" if spec.family == "type1" else "one-sided"
            raise ConfigError("ffn.up_dict", f"'{cfg.name}' is {kind} and has no up-branch dictionary.",
                              "bi_la, bi_moa, qd_la, qd_moa")
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
    if cfg.gate not in GATE_FUNCTIONS:
        raise ConfigError("ffn.gate", f"unknown gate function '{cfg.gate}'.", ", ".join(GATE_FUNCTIONS))
    if cfg.init not in INITS:
        raise ConfigError("ffn.init", f"unknown value '{cfg.init}'.", ", ".join(INITS))
    if cfg.kernel not in KERNELS:
        raise ConfigError("ffn.kernel", f"unknown value '{cfg.kernel}'.", ", ".join(KERNELS))
    if cfg.gate_groups < 1 or hidden % cfg.gate_groups:
        raise ConfigError("ffn.gate_groups", f"{cfg.gate_groups} must be >= 1 and divide the hidden width {hidden}.")
    if cfg.init == "baseline":
        Mixing.from_config(cfg).layout(cfg.init)  # raises if the dictionary lacks the baseline's activation


@contextlib.contextmanager
def recording_mixture_statistics(model: nn.Module):
    coefficients = [m for m in model.modules() if isinstance(m, Coefficients)]
    for module in coefficients:
        module.reset_statistics()
        module.recording = True
    try:
        yield
    finally:
        for module in coefficients:
            module.recording = False


def mixture_statistics(model: nn.Module) -> dict[str, dict[str, float]]:
    """Mean coefficient per dictionary entry per layer, from the last recorded pass.

    Keys are module paths without the `.ffn` / `.coefficients` parts: `layers.0` for a dense FFN,
    `layers.0.experts` and `layers.0.shared` in an MoE block.
    """
    stats = {}
    for name, module in model.named_modules():
        if isinstance(module, Coefficients) and module.stat_count:
            mean = (module.stat_sum / module.stat_count).tolist()
            layer = name.removesuffix(".coefficients").removesuffix(".ffn").replace(".ffn.", ".")
            stats[layer] = {entry: round(value, 5) for entry, value in zip(module.entry_names, mean)}
    return stats
