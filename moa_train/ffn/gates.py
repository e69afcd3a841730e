"""Where the MoA gates and the LA coefficients are computed: `Gates`.

The coefficient vector of a layer weighs the entries of its activation dictionaries, laid out as
consecutive segments (docs/design.md section 1):

    la1 / moa1, one_la / one_moa   [K]             sigma_k(W1 x)
    bi_la / bi_moa                 [K1] + [K2]     gate branch, then up branch
    qd_la / qd_moa                 [K1 * K2]       pairs (k, l), row-major

LA: constants shared by all tokens. MoA: per-token gates phi(U x [+ b]), U zero-initialised, with
phi sigmoid, tanh, linear or a softmax per segment. `ffn.init=baseline` adds a constant offset so
that the gates start one-hot on the baseline's activation; `uniform` starts LA at 1/K per segment
and MoA at phi(0). For E stacked experts every weight gains a leading E axis.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

GATE_FUNCTIONS = ("sigmoid", "tanh", "softmax", "linear")
INITS = ("uniform", "baseline")


def gate_at_zero(gate: str, size: int) -> float:
    """phi(0) for a segment of `size` entries: every MoA gate's value at initialisation (U = 0)."""
    return {"sigmoid": 0.5, "tanh": 0.0, "linear": 0.0, "softmax": 1.0 / size}[gate]


class Gates(nn.Module):
    """Mixing weights of one FFN or of E stacked experts: (N, G, n) per token, or (1, G, n) shared.

    segments: the sizes of the coefficient vector's segments; baseline: its one-hot start for
    ffn.init=baseline; entry_names: a label per entry, for the gate statistics.
    """

    no_weight_decay = ("weight", "bias")  # gates and coefficients are never decayed (optim.py reads this)

    def __init__(self, dim: int, segments: list[int], baseline: torch.Tensor, entry_names: list[str], mixture: str,
                 groups: int, gate: str, gate_bias: bool, init: str, n_experts: int | None = None):
        super().__init__()
        self.segments, self.entry_names, self.mixture = segments, entry_names, mixture
        self.groups, self.gate_fn, self.init = groups, gate, init
        self.register_buffer("baseline", baseline, persistent=False)
        n = sum(segments)
        stack = () if n_experts is None else (n_experts,)
        if mixture == "la":
            self.weight = nn.Parameter(torch.empty(*stack, groups, n))  # the constants themselves
            self.bias = None
        else:
            self.weight = nn.Parameter(torch.empty(*stack, groups * n, dim))  # U
            self.bias = nn.Parameter(torch.empty(*stack, groups * n)) if gate_bias else None
            self.register_buffer("offset", torch.zeros(n), persistent=False)
        # evaluation-time statistics (see recording_gate_statistics)
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
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        at_zero = torch.cat([torch.full((s,), gate_at_zero(self.gate_fn, s)) for s in self.segments])
        self.offset.copy_(self.baseline - at_zero.to(self.baseline) if self.init == "baseline" else 0.0)

    def forward(self, x: torch.Tensor, linear=F.linear, expert_ids: torch.Tensor | int | None = None) -> torch.Tensor:
        """x: (N, d). `linear(x, weight)` projects each token with its own expert's matrix, and
        `expert_ids` (per token, or one int for a single expert) picks the experts' constants."""
        if self.mixture == "la":
            coefficients = self.weight.unsqueeze(0) if expert_ids is None else self.weight[expert_ids]
            coefficients = coefficients.view(-1, self.groups, self.weight.shape[-1])
        else:
            logits = linear(x, self.weight)
            if self.bias is not None:
                logits = logits + (self.bias if expert_ids is None else self.bias[expert_ids])
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


@contextlib.contextmanager
def recording_gate_statistics(model: nn.Module):
    gates = [m for m in model.modules() if isinstance(m, Gates)]
    for module in gates:
        module.reset_statistics()
        module.recording = True
    try:
        yield
    finally:
        for module in gates:
            module.recording = False


def gate_statistics(model: nn.Module) -> dict[str, dict[str, float]]:
    """Mean coefficient per dictionary entry per layer, from the last recorded pass.

    Keys are module paths without the `.ffn` / `.gates` parts: `layers.0` for a dense FFN,
    `layers.0.experts` and `layers.0.shared` in an MoE block.
    """
    stats = {}
    for name, module in model.named_modules():
        if isinstance(module, Gates) and module.stat_count:
            mean = (module.stat_sum / module.stat_count).tolist()
            layer = name.removesuffix(".gates").removesuffix(".ffn").replace(".ffn.", ".")
            stats[layer] = {entry: round(value, 5) for entry, value in zip(module.entry_names, mean)}
    return stats
