"""Validation: the loss over every token (or image) of the fixed validation set, and what the gates did meanwhile.

Each rank takes an equal share of the validation sequences (the last share padded with weight-0
copies, so that every rank runs the same number of forward passes, as FSDP needs); the losses and
the gate recordings are summed over ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import DistEnv
from .ffn import GateDetail, GateRecorder, recording_gates
from .mae import MaskedAutoencoder
from .parallel import unwrap


@torch.no_grad()
def evaluate(model, batches, env: DistEnv, autocast,
             detail: GateDetail | None = None) -> tuple[float, dict[str, GateRecorder]]:
    """(mean validation loss, {layer: GateRecorder}); with `detail`, histograms and per-token sums too."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=env.device)  # loss sum, token (or image) count
    vision = isinstance(unwrap(model), MaskedAutoencoder)
    with recording_gates(unwrap(model), detail) as recorders:  # names without DDP's `module.`
        for x, y, weight in batches:
            x, y, weight = x.to(env.device), y.to(env.device), weight.to(env.device)
            if vision:  # y: the mask noise; the loss is the reconstruction error of each image's masked patches
                with autocast:
                    losses = model(x, y, reduction="none").float()
                loss_sum, count = (losses * weight).sum(), weight.sum()
            else:
                if detail is not None:  # the padding copies (weight 0) stay out of the gate recordings
                    detail.tokens = torch.where(weight[:, None] > 0, x, -1).flatten()
                with autocast:
                    logits = model(x)
                losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
                loss_sum, count = (losses.sum(1) * weight).sum(), (weight * y.shape[1]).sum()
            for recorder in recorders.values():  # what this pass stashed, while detail.tokens holds its ids
                recorder.collect()
            total[0] += loss_sum.double()
            total[1] += count.double()
    if env.is_distributed:
        torch.distributed.all_reduce(total)
        for recorder in recorders.values():
            recorder.all_reduce()
    model.train()
    return (total[0] / total[1]).item(), recorders
