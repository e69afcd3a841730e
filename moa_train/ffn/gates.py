"""Where the MoA gates and the LA coefficients are computed: `Gates`.

The coefficient vector of a layer weighs the entries of its activation dictionaries, laid out as
consecutive segments (docs/design.md section 1):

    la1 / moa1, one_la / one_moa   [K]             sigma_k(W1 x)
    bi_la / bi_moa                 [K1] + [K2]     gate branch, then up branch
    qd_la / qd_moa                 [K1 * K2]       pairs (k, l), row-major

LA: constants shared by all tokens. MoA: per-token gates phi(U x [+ b]) + offset, with phi sigmoid,
tanh, linear or a softmax per segment, U drawn from N(0, ffn.gate_init_std^2) (0: zeros). The fixed,
non-learned offset sets where the gates start (`ffn.init`, docs/design.md section 1): `uniform` at
phi(0) (no offset), `normalized` at 1/size so that each segment starts summing to 1, `baseline`
one-hot on the baseline's activation. LA constants start at the same values (phi(0) is 1/size for
them). For E stacked experts every weight gains a leading E axis.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..linear import linear

GATE_FUNCTIONS = ("sigmoid", "tanh", "softmax", "linear")
INITS = ("uniform", "normalized", "baseline")


def gate_at_zero(gate: str, size: int) -> float:
    """phi(0) for a segment of `size` entries: an MoA gate's value when U x + b = 0."""
    return {"sigmoid": 0.5, "tanh": 0.0, "linear": 0.0, "softmax": 1.0 / size}[gate]


def initial_coefficients(init: str, gate: str | None, segments: list[int], baseline: torch.Tensor) -> torch.Tensor:
    """Where the coefficients start (at U = 0, b = 0): phi(0) (uniform; 1/size for LA, gate None),
    1/size (normalized) or the baseline's one-hot."""
    if init == "baseline":
        return baseline.clone()
    per_entry = [gate_at_zero(gate, size) if gate is not None and init == "uniform" else 1.0 / size
                 for size in segments]
    return torch.cat([torch.full((size,), value) for size, value in zip(segments, per_entry)]).to(baseline)


class Gates(nn.Module):
    """Mixing weights of one FFN or of E stacked experts: (N, G, n) per token, or (1, G, n) shared.

    segments: the sizes of the coefficient vector's segments; baseline: its one-hot start for
    ffn.init=baseline; entry_names: a label per entry, for the gate statistics.
    """

    no_weight_decay = ("weight", "bias")  # gates and coefficients are never decayed (optim.py reads this)

    def __init__(self, dim: int, segments: list[int], baseline: torch.Tensor, entry_names: list[str], mixture: str,
                 groups: int, gate: str, gate_bias: bool, init: str, n_experts: int | None = None,
                 init_std: float = 0.0):
        super().__init__()
        self.segments, self.entry_names, self.mixture = segments, entry_names, mixture
        self.groups, self.gate_fn, self.init, self.init_std = groups, gate, init, init_std
        self.baseline_values = baseline.tolist()  # to recompute the buffer (reset_buffers)
        self.register_buffer("baseline", torch.tensor(self.baseline_values), persistent=False)
        n = sum(segments)
        stack = () if n_experts is None else (n_experts,)
        if mixture == "la":
            self.weight = nn.Parameter(torch.empty(*stack, groups, n))  # the constants themselves
            self.bias = None
        else:
            self.weight = nn.Parameter(torch.empty(*stack, groups * n, dim))  # U
            self.bias = nn.Parameter(torch.empty(*stack, groups * n)) if gate_bias else None
            self.register_buffer("offset", torch.zeros(n), persistent=False)
        # While an evaluation records the gates: a list of (coefficients, rows, in token order) per forward call,
        # which its GateRecorder empties after each forward pass. Appending is traced into a compiled block as
        # one more output; calling the recorder from here would break the block's graph in three.
        self.stash: list | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the buffers no checkpoint holds (the baseline one-hot, the MoA offset): for a model whose
        weights were loaded into uninitialised memory (transformers' from_pretrained)."""
        self.baseline.copy_(torch.tensor(self.baseline_values))
        if self.mixture == "moa":
            start = initial_coefficients(self.init, self.gate_fn, self.segments, self.baseline)
            self.offset.copy_(start - initial_coefficients("uniform", self.gate_fn, self.segments, self.baseline))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.mixture == "la":
            start = initial_coefficients(self.init, None, self.segments, self.baseline)
            self.weight.copy_(start.expand_as(self.weight))
            return
        nn.init.normal_(self.weight, std=self.init_std) if self.init_std else nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.reset_buffers()

    def forward(self, x: torch.Tensor, linear=linear, expert_ids: torch.Tensor | int | None = None) -> torch.Tensor:
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
        if self.stash is not None:
            self.stash.append((coefficients.detach(), x.shape[0], expert_ids is None))
        return coefficients

    def _phi(self, logits: torch.Tensor) -> torch.Tensor:
        if self.gate_fn == "sigmoid":
            return torch.sigmoid(logits)
        if self.gate_fn == "tanh":
            return torch.tanh(logits)
        if self.gate_fn == "linear":
            return logits
        return torch.cat([part.softmax(-1) for part in logits.split(self.segments, dim=-1)], dim=-1)

    def value_range(self) -> tuple[float, float]:
        """Where MoA gates can lie: phi's range moved by the offset (a linear gate: +-4 around it)."""
        low, high = {"sigmoid": (0.0, 1.0), "softmax": (0.0, 1.0), "tanh": (-1.0, 1.0), "linear": (-4.0, 4.0)}[
            self.gate_fn]
        return low + float(self.offset.min()), high + float(self.offset.max())


@dataclass
class GateDetail:
    """What a detailed recording adds to the means: histograms of `bins` bins, and per-vocabulary-entry
    sums over the token ids the caller puts in `tokens` before each forward pass (flattened (B, T);
    -1 marks a row to leave out, such as the padding copies of a distributed evaluation)."""

    vocab_size: int
    bins: int = 40
    tokens: torch.Tensor | None = None


class GateRecorder:
    """One Gates module's coefficients summed over an evaluation: the mean per entry; with a GateDetail
    the sum of squares, a histogram per entry, and per token id the sum and count (where the rows are in
    token order: dense FFNs and shared experts, not routed experts, whose rows are sorted by expert)."""

    def __init__(self, gates: Gates, detail: GateDetail | None = None):
        self.gates = gates
        n, device = sum(gates.segments), gates.baseline.device
        self.detail = detail if gates.mixture == "moa" else None  # LA coefficients are one value for all tokens
        self.count = 0
        self.sum = torch.zeros(n, dtype=torch.float64, device=device)
        if detail is not None:
            self.low, self.high = gates.value_range()
            self.sum_sq = torch.zeros(n, dtype=torch.float64, device=device)
            self.histogram = torch.zeros(n, detail.bins, dtype=torch.float64, device=device)
            self.token_sum = torch.zeros(detail.vocab_size, n, dtype=torch.float64, device=device)
            self.token_count = torch.zeros(detail.vocab_size, dtype=torch.float64, device=device)

    def collect(self) -> None:
        """Record what the Gates module stashed during the forward passes since the last call: call it after
        each forward pass, while GateDetail.tokens still holds that pass's token ids."""
        stash = self.gates.stash or []
        while stash:
            self.add(*stash.pop(0))

    @torch.no_grad()
    def add(self, coefficients: torch.Tensor, n_rows: int, in_token_order: bool) -> None:
        values = coefficients.detach().double().mean(1)  # (rows or 1, n): the mean over gate groups
        if self.detail is None or values.shape[0] != n_rows:  # LA: one constant for every row, no distribution
            self.sum += values.sum(0) * (n_rows / values.shape[0])
            self.count += n_rows
            return
        tokens = self.detail.tokens
        by_token = in_token_order and tokens is not None and tokens.numel() == n_rows
        if by_token:
            tokens = tokens.to(values.device)
            values, tokens = values[tokens >= 0], tokens[tokens >= 0]
        self.sum += values.sum(0)
        self.count += values.shape[0]
        self.sum_sq += (values ** 2).sum(0)
        width = (self.high - self.low) / self.detail.bins
        index = ((values - self.low) / width).long().clamp_(0, self.detail.bins - 1)  # (rows, n)
        self.histogram.scatter_add_(1, index.T, torch.ones_like(index.T, dtype=self.histogram.dtype))
        if by_token:
            self.token_sum.index_add_(0, tokens, values)
            self.token_count.index_add_(0, tokens, torch.ones_like(values[:, 0]))

    @torch.no_grad()
    def all_reduce(self) -> None:
        """Sum the recordings of every rank (each saw its share of the validation set)."""
        import torch.distributed as dist

        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum.device)
        extra = [self.sum_sq, self.histogram, self.token_sum, self.token_count] if self.detail is not None else []
        for tensor in (self.sum, count, *extra):
            dist.all_reduce(tensor)
        self.count = int(count.item())


def layer_name(module_path: str) -> str:
    """A Gates module's path without the `.ffn` / `.gates` parts: `layers.0` for a dense FFN,
    `layers.0.experts` and `layers.0.shared` in an MoE block."""
    return module_path.removesuffix(".gates").removesuffix(".ffn").replace(".ffn.", ".")


@contextlib.contextmanager
def recording_gates(model: nn.Module, detail: GateDetail | None = None):
    """Record every Gates module of `model` while the block runs; yields {layer name: GateRecorder}. Each forward
    pass stashes its coefficients (Gates.stash); GateRecorder.collect records them, to be called after each pass
    (the block's end collects what is left)."""
    modules = {layer_name(name): m for name, m in model.named_modules() if isinstance(m, Gates)}
    recorders = {name: GateRecorder(m, detail) for name, m in modules.items()}
    for module in modules.values():
        module.stash = []
    try:
        yield recorders
        for recorder in recorders.values():  # what the last forward pass stashed, if the caller did not collect it
            recorder.collect()
    finally:
        for module in modules.values():
            module.stash = None


def mean_gates(recorders: dict[str, GateRecorder], entry_names: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Mean coefficient per dictionary entry per layer: the `mix` column of metrics.jsonl."""
    return {layer: {entry: round(value, 5) for entry, value in zip(entry_names[layer], (r.sum / r.count).tolist())}
            for layer, r in recorders.items() if r.count}


def gate_entry_names(model: nn.Module) -> dict[str, list[str]]:
    return {layer_name(name): m.entry_names for name, m in model.named_modules() if isinstance(m, Gates)}
