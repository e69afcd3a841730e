"""The training path, top to bottom: check config, count, plan, prepare data, build, train, evaluate."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from .budget import RunPlan, count_parameters, plan_run
from .config import to_container, validate_config
from .data import PackedBatches, prepare_data, validation_batches
from .errors import DataError
from .ffn.mixtures import mixture_statistics, recording_mixture_statistics
from .metrics import MetricLoggers
from .model import Transformer
from .optim import build_optimizer, set_lr
from .parallel import autocast_context, configure_backends, parallelize, resolve_device
from .schedule import lr_multiplier

log = logging.getLogger("moa_train")


def describe(cfg: DictConfig) -> tuple[dict[str, int], RunPlan]:
    """Parameter counts and run plan, from a model built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.ffn)
    counts = count_parameters(model)
    return counts, plan_run(cfg.train, cfg.budget, counts, world_size=1)


@torch.no_grad()
def evaluate(model, batches, device, autocast) -> tuple[float, dict]:
    """Mean validation loss, and the mean LA / MoA coefficient per dictionary entry per layer."""
    model.eval()
    total, count = 0.0, 0
    with recording_mixture_statistics(model):
        for x, y in batches:
            with autocast:
                loss = model(x.to(device), y.to(device))
            total += loss.item() * y.numel()
            count += y.numel()
    model.train()
    return total / count, mixture_statistics(model)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    validate_config(cfg)
    counts, plan = describe(cfg)
    if cfg.dry_run:
        report = {"model": cfg.model.name, "ffn": cfg.ffn.name, **counts, **plan.as_dict()}
        print(json.dumps(report))
        return report

    # --- hardware and randomness
    device = resolve_device(cfg.train.device)
    configure_backends(device)
    autocast = autocast_context(device, cfg.train.dtype)
    torch.manual_seed(cfg.train.seed)

    # --- data (prepared once per corpus and tokenizer, then memory-mapped)
    data = prepare_data(cfg.data, cfg.data.tokenizer.vocab_size or cfg.model.vocab_size,
                        cfg.train.eval_tokens, cfg.train.seq_len, log=log.info)
    if data.vocab_size > cfg.model.vocab_size:
        raise DataError(f"the tokenizer at {data.tokenizer_path} has {data.vocab_size} entries but "
                        f"model.vocab_size is {cfg.model.vocab_size}; set model.vocab_size >= {data.vocab_size}.")
    train_batches = PackedBatches(data.train, cfg.train.seq_len, cfg.train.seed)
    val_batches = validation_batches(data.val, cfg.train.seq_len, cfg.train.eval_tokens, plan.micro_batch_size)

    # --- model and optimizer
    with device:
        model = Transformer(cfg.model, cfg.ffn)
    model.init_weights()
    model = parallelize(model, device, cfg.train.compile)
    optimizer = build_optimizer(model, cfg.optim)

    run_dir.mkdir(parents=True, exist_ok=True)
    config = to_container(cfg)
    loggers = MetricLoggers(cfg.logger, run_dir, config)
    log.info("model %s / ffn %s: %s parameters; %d steps of %d tokens (%d x %d micro-batches of %d)",
             cfg.model.name, cfg.ffn.name, f"{counts['total']:,}", plan.steps, plan.tokens_per_step,
             plan.world_size, plan.grad_accum, plan.micro_batch_size)

    start = time.perf_counter()
    initial_val_loss = val_loss = None
    if cfg.train.eval_at_start:
        initial_val_loss, mix = evaluate(model, val_batches, device, autocast)
        val_loss = initial_val_loss
        loggers.log({"step": 0, "tokens": 0, "val_loss": val_loss, "elapsed_s": time.perf_counter() - start,
                     **({"mix": mix} if mix else {})})
    status, train_loss = "completed", None
    progress = tqdm(range(plan.steps), disable=not cfg.train.progress, desc="train", dynamic_ncols=True)
    for step in progress:
        lr_scale = lr_multiplier(cfg.schedule, step, plan.steps)
        set_lr(optimizer, lr_scale)
        step_start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for micro in range(plan.grad_accum):
            first = step * plan.batch_size + micro * plan.micro_batch_size
            x, y = train_batches.samples(first, plan.micro_batch_size)
            with autocast:
                loss = model(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            (loss / plan.grad_accum).backward()
            loss_sum += loss.detach()
        grad_norm = None
        if cfg.optim.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = loss_sum.item() / plan.grad_accum  # .item() waits for the step to finish
        step_time = time.perf_counter() - step_start

        done = step + 1
        row = {"step": done, "tokens": done * plan.tokens_per_step, "lr": cfg.optim.lr * lr_scale,
               "train_loss": train_loss, "grad_norm": grad_norm,
               "tokens_per_s": plan.tokens_per_step / step_time}
        if not math.isfinite(train_loss):
            status = "diverged"
            loggers.log({**row, "elapsed_s": time.perf_counter() - start})
            log.error("training diverged at step %d (train loss %s); try a lower optim.lr", done, train_loss)
            break
        if done % cfg.train.eval_every == 0 or done == plan.steps:
            val_loss, mix = evaluate(model, val_batches, device, autocast)
            row["val_loss"] = val_loss
            if mix:
                row["mix"] = mix
        if "val_loss" in row or done % cfg.train.log_every == 0:
            loggers.log({**row, "elapsed_s": time.perf_counter() - start})
        progress.set_postfix(loss=f"{train_loss:.3f}", val=f"{val_loss:.3f}" if val_loss else "-")
    progress.close()
    wall = time.perf_counter() - start

    summary = {
        "status": status, "val_loss": val_loss if status == "completed" else None,
        "initial_val_loss": initial_val_loss, "train_loss": train_loss, "params": counts,
        "tokens": done * plan.tokens_per_step, "steps": done, "plan": plan.as_dict(), "wall_s": wall,
        "data": {k: data.meta[k] for k in ("source", "documents", "train_tokens", "val_tokens", "vocab_size")},
        "config": config,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    loggers.close()
    log.info("final validation loss %.4f (initial %s) after %d steps, %.1fs; run dir %s", val_loss or math.nan,
             f"{initial_val_loss:.4f}" if initial_val_loss else "-", done, wall, run_dir)
    return summary
