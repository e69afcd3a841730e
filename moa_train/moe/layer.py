"""The MoE block that replaces a dense FFN: router, routed experts, shared experts, load balance.

    out = sum_{e in topk(x)} w_e(x) * expert_e(x) + shared(x)

Load balance, two mechanisms (either or both):
- auxiliary-loss-free (DeepSeek-V3): after every optimizer step each layer's selection bias moves
  by `bias_update_coef * sign(mean load - load_e)` and is re-centred to mean 0. The loads are
  summed over the step's micro-batches and over all ranks first, so every rank holds the same bias.
- an auxiliary loss `aux_loss_coef * E * sum_e f_e P_e` (Switch Transformer), f_e the share of
  assignments and P_e the mean normalised score of expert e, added to the training loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from omegaconf import DictConfig

from ..ffn import build_ffn
from ..utils import in_recomputation
from .dispatch import combine, gather_tokens, sort_by_expert
from .experts import GroupedExperts, expert_hidden_dim
from .router import Router


class MoE(nn.Module):
    has_forward_side_effects = True  # the load counts: parallel.apply_activation_checkpointing keeps them single

    def __init__(self, dim: int, moe_cfg: DictConfig, ffn_cfg: DictConfig, multiple_of: int):
        super().__init__()
        hidden = expert_hidden_dim(moe_cfg.expert_hidden, ffn_cfg.name, multiple_of)
        self.n_experts, self.top_k = moe_cfg.n_experts, moe_cfg.top_k
        self.bias_update_coef, self.aux_loss_coef = moe_cfg.bias_update_coef, moe_cfg.aux_loss_coef
        self.router = Router(dim, moe_cfg.n_experts, moe_cfg.top_k, moe_cfg.score, moe_cfg.renormalize,
                             moe_cfg.route_scale)
        self.experts = GroupedExperts(dim, hidden, moe_cfg.n_experts, ffn_cfg, moe_cfg.grouped_mm)
        # the shared experts form one always-active FFN of the same variant, n_shared times as wide
        self.shared = build_ffn(ffn_cfg, dim, hidden * moe_cfg.n_shared_experts) \
            if moe_cfg.n_shared_experts else None
        self.register_buffer("step_load", torch.zeros(moe_cfg.n_experts), persistent=False)  # since the last update
        self.register_buffer("logged_load", torch.zeros(moe_cfg.n_experts), persistent=False)  # since the last log
        self.aux_loss: torch.Tensor | None = None

    def reset_buffers(self) -> None:
        """The load counters, which no checkpoint holds, back at zero."""
        self.step_load.zero_()
        self.logged_load.zero_()

    def reset_parameters(self, std: float, output_std: float) -> None:
        self.router.reset_parameters(std)
        self.experts.reset_parameters(std, output_std)
        if self.shared is not None:
            self.shared.reset_parameters(std, output_std)

    def inactive_parameter_count(self) -> int:
        """Routed experts a token does not visit: what `active` leaves out of `total`."""
        return (self.n_experts - self.top_k) * self.experts.per_expert_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts, scores = self.router(x)
        dispatch = sort_by_expert(experts, self.n_experts)
        if self.training and not in_recomputation():  # counted once, also under activation checkpointing
            self.step_load += dispatch.counts.to(self.step_load.dtype)
            self.aux_loss = self._aux_loss(dispatch.counts, scores) if self.aux_loss_coef else None
        rows = self.experts(gather_tokens(x, dispatch), dispatch.counts, dispatch.expert_ids)
        out = combine(rows, dispatch, weights)
        if self.shared is not None:
            out = out + self.shared(x)
        return out.view(shape)

    def _aux_loss(self, counts: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        share = counts.float() / counts.sum()  # f_e (not differentiable: a count)
        probability = (scores / scores.sum(-1, keepdim=True)).mean(0)  # P_e
        return self.aux_loss_coef * self.n_experts * (share * probability).sum()

    @torch.no_grad()
    def update_bias(self) -> None:
        load = self.step_load
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(load)
        if self.bias_update_coef and load.sum() > 0:
            bias = self.router.expert_bias
            bias += self.bias_update_coef * torch.sign(load.mean() - load)
            bias -= bias.mean()
        self.logged_load += load
        load.zero_()


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    return [(name.removesuffix(".ffn"), m) for name, m in model.named_modules() if isinstance(m, MoE)]


def update_load_balance(model: nn.Module) -> None:
    """After each optimizer step: every MoE layer's selection bias follows its load (all ranks alike)."""
    for _, layer in moe_layers(model):
        layer.update_bias()


def expert_load_statistics(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per layer, max/mean and min/mean of the expert loads since the last call (then reset)."""
    stats = {}
    for name, layer in moe_layers(model):
        load = layer.logged_load
        if load.sum() > 0:
            mean = load.mean()
            stats[name] = {"max": round((load.max() / mean).item(), 4), "min": round((load.min() / mean).item(), 4)}
        load.zero_()
    return stats
