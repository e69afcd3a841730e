"""Parameter accounting and the token budget: pure functions of a model and the config."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch.nn as nn

from .errors import ConfigError


def count_parameters(model: nn.Module) -> dict[str, int]:
    """total, active (per token), non_embedding (without token embedding and output head), ffn_extra.

    A module may define `inactive_parameter_count()` (routed experts a token does not visit);
    active is total minus those. Tied weights are counted once.
    """
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in params.values())
    embedding = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    head = getattr(model, "output", None)
    if head is not None:
        embedding |= {id(p) for p in head.parameters()}
    non_embedding = sum(p.numel() for i, p in params.items() if i not in embedding)
    inactive = sum(m.inactive_parameter_count() for m in model.modules()
                   if hasattr(m, "inactive_parameter_count"))
    ffn_extra = sum(p.numel() for m in model.modules() if hasattr(m, "extra_parameters")
                    for p in m.extra_parameters())
    return {"total": total, "active": total - inactive, "non_embedding": non_embedding, "ffn_extra": ffn_extra}


@dataclass(frozen=True)
class RunPlan:
    budget_tokens: int  # tokens_per_param * counted parameters
    tokens_per_step: int  # global batch in tokens
    steps: int
    batch_size: int  # global, sequences
    micro_batch_size: int  # per process, sequences
    grad_accum: int
    world_size: int
    budget_images: int | None = None  # vision budgets in images or epochs (budget.images / budget.epochs)

    def as_dict(self) -> dict:
        plan = asdict(self)
        if plan["budget_images"] is None:
            del plan["budget_images"]
        return plan


def plan_run(train_cfg, budget_cfg, counts: dict[str, int], world_size: int = 1,
             train_images: int | None = None) -> RunPlan:
    """Steps and batch shapes; a token is a sequence position, or for vision an image patch (train.seq_len is then
    the patches per image). budget.images / budget.epochs (of the `train_images` training images) replace the
    token budget."""
    batch = train_cfg.batch_size
    if batch % world_size:
        raise ConfigError("train.batch_size", f"{batch} is not divisible by the {world_size} processes.")
    per_rank = batch // world_size
    micro = train_cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise ConfigError("train.micro_batch_size",
                          f"{micro} does not divide the per-process batch {per_rank} "
                          f"(train.batch_size={batch} over {world_size} processes).")
    tokens_per_step = batch * train_cfg.seq_len
    images = budget_cfg.get("images")
    if budget_cfg.get("epochs") is not None:
        if train_images is None:
            raise ConfigError("budget.epochs", "needs the size of the training split, which only a run (or dry_run) "
                              "with its data reads.", "budget.images=N for a budget without the data")
        images = math.ceil(budget_cfg.epochs * train_images)
    if images is not None:
        budget_tokens = images * train_cfg.seq_len
        steps = train_cfg.max_steps or max(1, math.ceil(images / batch))
    else:
        budget_tokens = int(budget_cfg.tokens_per_param * counts[budget_cfg.count])
        steps = train_cfg.max_steps or max(1, math.ceil(budget_tokens / tokens_per_step))
    return RunPlan(budget_tokens, tokens_per_step, steps, batch, micro, per_rank // micro, world_size, images)


# ----------------------------------------------------------------------------- model FLOPs utilisation

# Dense bf16 tensor-core peaks (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def flops_per_token(active_params: int, vocab_size: int, dim: int, n_layers: int, seq_len: int,
                    tied_embeddings: bool = False) -> float:
    """Training FLOPs per token (PaLM, appendix B): 6 per matmul parameter, plus attention 12 * L * d * T.

    The embedding lookup is no matmul, so an untied embedding table is not counted; a tied one is,
    once, as the head.
    """
    matmul_params = active_params - (0 if tied_embeddings else vocab_size * dim)
    return 6.0 * matmul_params + 12.0 * n_layers * dim * seq_len


def peak_flops(device_name: str | None, override_tflops: float | None = None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device_name:
        for key, flops in PEAK_BF16_FLOPS.items():
            if key in device_name:
                return flops
    return None


def mfu(tokens_per_s: float, flops_token: float, peak: float | None, world_size: int = 1) -> float | None:
    return None if not peak else tokens_per_s * flops_token / (peak * world_size)
