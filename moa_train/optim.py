"""Optimizers. Parameters are sorted into roles once; each optimizer decides what a role gets.

Roles: `matrix` (2-D hidden weights), `embedding`, `head`, `vector` (norm gains and other
1-D tensors) and `no_decay` (parameters an FFN marks with `_no_weight_decay`, such as gates and
learnable-activation coefficients). Every param group carries `base_lr`; the schedule sets
`lr = base_lr * multiplier` each step.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn as nn

ROLES = ("matrix", "embedding", "head", "vector", "no_decay")


def mark_no_weight_decay(param: nn.Parameter) -> nn.Parameter:
    param._no_weight_decay = True  # read by parameter_roles
    return param


def parameter_roles(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    embedding = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    head_module = getattr(model, "output", None)
    head = {id(p) for p in head_module.parameters()} if head_module is not None else set()
    roles: dict[str, list[nn.Parameter]] = defaultdict(list)
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if getattr(p, "_no_weight_decay", False):
            roles["no_decay"].append(p)
        elif id(p) in embedding:  # checked before head: a tied weight is the embedding
            roles["embedding"].append(p)
        elif id(p) in head:
            roles["head"].append(p)
        elif p.ndim >= 2:
            roles["matrix"].append(p)
        else:
            roles["vector"].append(p)
    return dict(roles)


def build_adamw(model: nn.Module, cfg) -> torch.optim.Optimizer:
    roles = parameter_roles(model)
    decay = [p for role in ("matrix", "embedding", "head") for p in roles.get(role, [])]
    no_decay = [p for role in ("vector", "no_decay") for p in roles.get(role, [])]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr, "name": "no_decay"},
    ]
    groups = [g for g in groups if g["params"]]
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=on_cuda or None)  # fused kernel: one launch for all params on GPU


OPTIMIZERS: dict[str, Callable[[nn.Module, object], torch.optim.Optimizer]] = {"adamw": build_adamw}


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.name](model, cfg)


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * multiplier
