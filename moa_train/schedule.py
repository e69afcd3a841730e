"""Learning-rate schedules as pure functions: step -> multiplier of the peak learning rate.

`step` counts optimizer steps from 0; the multiplier returned is the one used for that step.
"""

from __future__ import annotations

import math

DECAY_SHAPES = ("linear", "sqrt", "cosine")


def warmup_steps(total_steps: int, warmup_steps: int | None, warmup_frac: float) -> int:
    if warmup_steps is not None:
        return min(warmup_steps, total_steps)
    return int(round(warmup_frac * total_steps))


def _warmup(step: int, warmup: int) -> float | None:
    if step < warmup:
        return (step + 1) / warmup  # reaches 1.0 on the last warmup step
    return None


def cosine(step: int, total_steps: int, warmup: int, min_lr_ratio: float, **_) -> float:
    if (w := _warmup(step, warmup)) is not None:
        return w
    span = max(1, total_steps - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def wsd(step: int, total_steps: int, warmup: int, min_lr_ratio: float, decay_frac: float,
        decay_shape: str = "linear", **_) -> float:
    """Warmup, stable at the peak, then decay over the last decay_frac of the steps to min_lr_ratio."""
    if (w := _warmup(step, warmup)) is not None:
        return w
    decay_steps = int(round(decay_frac * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start or decay_steps == 0:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay_steps)  # 1.0 on the last step
    if decay_shape == "linear":
        remaining = 1 - progress
    elif decay_shape == "sqrt":
        remaining = 1 - math.sqrt(progress)
    elif decay_shape == "cosine":
        remaining = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown decay shape {decay_shape!r}")
    return min_lr_ratio + (1 - min_lr_ratio) * remaining


SCHEDULES = {"cosine": cosine, "wsd": wsd}


def lr_multiplier(schedule_cfg, step: int, total_steps: int) -> float:
    warmup = warmup_steps(total_steps, schedule_cfg.warmup_steps, schedule_cfg.warmup_frac)
    return SCHEDULES[schedule_cfg.name](
        step, total_steps, warmup, min_lr_ratio=schedule_cfg.min_lr_ratio,
        decay_frac=schedule_cfg.decay_frac, decay_shape=schedule_cfg.decay_shape,
    )
