"""Mixture of Experts: a router, stacked experts of any FFN variant, and dropless dispatch, kept apart."""

from .dispatch import Dispatch, combine, gather_tokens, sort_by_expert
from .experts import GROUPED_MM, GroupedExperts, expert_hidden_dim, grouped_mm, torch_grouped_mm_works
from .layer import MoE, expert_load_statistics, moe_layers, update_load_balance
from .router import SCORES, Router

__all__ = ["GROUPED_MM", "SCORES", "Dispatch", "GroupedExperts", "MoE", "Router", "combine",
           "expert_hidden_dim", "expert_load_statistics", "gather_tokens", "grouped_mm", "moe_layers",
           "sort_by_expert", "torch_grouped_mm_works", "update_load_balance"]
