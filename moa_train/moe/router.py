"""The router: which experts each token visits, and with what weight.

Scores are computed in float32 whatever the autocast dtype: top-k over near-equal bf16 scores
would flip between ranks and runs. The load-balancing bias shifts which experts are *selected*
(auxiliary-loss-free balancing, DeepSeek-V3) but never the weights the selected experts get.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

SCORES = ("softmax", "sigmoid")


class Router(nn.Module):
    def __init__(self, dim: int, n_experts: int, top_k: int, score: str = "sigmoid", renormalize: bool = True,
                 route_scale: float = 1.0):
        super().__init__()
        self.n_experts, self.top_k, self.score, self.renormalize, self.route_scale = (
            n_experts, top_k, score, renormalize, route_scale)
        self.weight = nn.Parameter(torch.empty(n_experts, dim))
        # selection bias, learned by the balancing rule rather than by gradients; saved in checkpoints
        self.register_buffer("expert_bias", torch.zeros(n_experts, dtype=torch.float32))

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.weight, std=std)
        self.expert_bias.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, d) -> weights (N, k), expert indices (N, k), scores (N, E), all but indices in float32."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        experts = torch.topk(scores + self.expert_bias, self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(-1, experts)
        if self.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, experts, scores
