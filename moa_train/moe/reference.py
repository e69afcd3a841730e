"""The naive MoE forward: for each expert, find its tokens by mask, run it, add back. The baseline
`moa-bench --moe` times the grouped path against, and a second reference for the tests."""

from __future__ import annotations

import torch

from .layer import MoE


def per_expert_loop(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    weights, experts, _ = moe.router(x)
    out = torch.zeros_like(x)
    for e in range(moe.n_experts):
        token, slot = torch.nonzero(experts == e, as_tuple=True)
        if token.numel():
            y = moe.experts.forward_expert(x[token], e)
            out = out.index_add(0, token, y * weights[token, slot].unsqueeze(-1).to(y.dtype))
    if moe.shared is not None:
        out = out + moe.shared(x)
    return out.view(shape)
