"""Optimizers. Parameters are sorted into roles once; each optimizer decides what a role gets.

Roles: `matrix` (hidden weights: attention and FFN projections, expert stacks), `embedding`,
`head`, `vector` (norm gains and other 1-D tensors) and `mixing` (the parameters a module names in
its class attribute `no_weight_decay`: MoA gates and LA coefficients, see ffn/gates.py). Each role
is one parameter group with its own learning rate and weight decay (`optim.groups.<role>.lr` and
`.weight_decay`; null: `optim.lr`, and `optim.weight_decay` for matrix, embedding and head but 0
for vector and mixing). Every group carries `base_lr`; the schedule sets `lr = base_lr * multiplier`.

`optim=adamw` gives every role to AdamW. `optim=muon` gives `matrix` to Muon and the rest to
AdamW, as two torch optimizers held by one `Optimizers`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn as nn

ROLES = ("matrix", "embedding", "head", "vector", "mixing")
DECAYED_ROLES = ("matrix", "embedding", "head")


def parameter_roles(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    model = getattr(model, "module", model)  # DDP wraps the Transformer; its head is model.module.output
    embedding = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    head_module = getattr(model, "output", None)
    head = {id(p) for p in head_module.parameters()} if head_module is not None else set()
    # Read from the module, not from a mark on the Parameter: FSDP2's fully_shard replaces every
    # Parameter by a sharded one, and attributes set on the old object would be lost with it.
    mixing = {id(p) for m in model.modules() for name, p in m.named_parameters(recurse=False)
              if name in getattr(m, "no_weight_decay", ())}
    roles: dict[str, list[nn.Parameter]] = defaultdict(list)
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if id(p) in mixing:
            roles["mixing"].append(p)
        elif p.ndim < 2:  # biases (a vision model's pixel head has one) and gains: never decayed
            roles["vector"].append(p)
        elif id(p) in embedding:  # checked before head: a tied weight is the embedding
            roles["embedding"].append(p)
        elif id(p) in head:
            roles["head"].append(p)
        elif p.ndim >= 2:
            roles["matrix"].append(p)
        else:
            roles["vector"].append(p)
    return dict(roles)


def role_groups(model: nn.Module, cfg, roles: tuple[str, ...] = ROLES) -> list[dict]:
    """One parameter group per non-empty role, with its learning rate and weight decay resolved."""
    params = parameter_roles(model)
    groups = []
    for role in roles:
        if not params.get(role):
            continue
        override = cfg.groups.get(role) or {}
        lr = override.get("lr") or cfg.lr
        weight_decay = override.get("weight_decay")
        if weight_decay is None:
            weight_decay = cfg.weight_decay if role in DECAYED_ROLES else 0.0
        groups.append({"params": params[role], "lr": lr, "base_lr": lr, "weight_decay": weight_decay, "name": role})
    return groups


class Optimizers:
    """Several torch optimizers stepped as one (Muon for matrices + AdamW for the rest).

    `optimizers` is what torch.distributed.checkpoint's get_state_dict / set_state_dict take.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)


def _adamw(groups: list[dict], cfg) -> torch.optim.AdamW:
    # fused (one pass over each parameter's memory, CPU and GPU alike) steps a 10M-parameter model in
    # 6-8 ms on a 2-core CPU against 28-49 ms for the per-tensor loop (docs/benchmarks.md)
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             **kernel[cfg.implementation])


def build_adamw(model: nn.Module, cfg) -> Optimizers:
    return Optimizers([_adamw(role_groups(model, cfg), cfg)])


def build_muon(model: nn.Module, cfg) -> Optimizers:
    from .muon import Muon

    matrices = role_groups(model, cfg, roles=("matrix",))
    rest = role_groups(model, cfg, roles=tuple(r for r in ROLES if r != "matrix"))
    muon = Muon(matrices, lr=cfg.lr, momentum=cfg.muon.momentum, nesterov=cfg.muon.nesterov,
                ns_steps=cfg.muon.ns_steps, update_scale=cfg.muon.update_scale, update_rms=cfg.muon.update_rms,
                ns_dtype={"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.muon.ns_dtype])
    return Optimizers([muon, _adamw(rest, cfg)] if rest else [muon])


OPTIMIZERS: dict[str, Callable[[nn.Module, object], Optimizers]] = {"adamw": build_adamw, "muon": build_muon}


def build_optimizer(model: nn.Module, cfg) -> Optimizers:
    return OPTIMIZERS[cfg.name](model, cfg)


def set_lr(optimizer: Optimizers, multiplier: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * multiplier
