"""Dropless dispatch: tokens sorted by expert for grouped matrix products, and the way back.

Every (token, expert) assignment is kept (no capacity factor, no dropped tokens). Both directions
are permutations plus a sum over each token's k assignments, so forward and backward are
deterministic: no scatter-add with atomics, whose order varies run to run on GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Dispatch:
    order: torch.Tensor  # (N*k,) assignment index for each row of the sorted layout
    counts: torch.Tensor  # (E,) rows per expert, in expert order
    expert_ids: torch.Tensor  # (N*k,) the expert of each sorted row
    top_k: int


def sort_by_expert(experts: torch.Tensor, n_experts: int) -> Dispatch:
    """experts (N, k) -> the permutation that groups the N*k assignments by expert (stable)."""
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    return Dispatch(order, counts, flat[order], experts.shape[1])


class _GatherRows(torch.autograd.Function):
    """x[order // k] in one copy (the repeated (N*k, d) layout is never built); its gradient is the
    unpermuted rows summed over each token's k assignments: a permutation and a sum, no scatter-add."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, top_k: int) -> torch.Tensor:
        ctx.save_for_backward(order)
        ctx.top_k = top_k
        return x[order // top_k]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (order,) = ctx.saved_tensors
        unsorted = grad.new_empty(grad.shape).index_copy_(0, order, grad)  # (N*k, d) in (token, k) order, contiguous
        return unsorted.view(-1, ctx.top_k, grad.shape[-1]).sum(1), None, None


def gather_tokens(x: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
    """(N, d) -> (N*k, d) rows in expert order (each token repeated once per expert it visits)."""
    return _GatherRows.apply(x, dispatch.order, dispatch.top_k)


def combine(rows: torch.Tensor, dispatch: Dispatch, weights: torch.Tensor) -> torch.Tensor:
    """Expert outputs in expert order (N*k, d) -> per token sum_k weight_k * output_k, (N, d)."""
    unsorted = torch.empty_like(rows).index_copy(0, dispatch.order, rows)  # a permutation: no collisions
    n = weights.shape[0]
    return (unsorted.view(n, dispatch.top_k, -1) * weights.unsqueeze(-1).to(rows.dtype)).sum(1)
