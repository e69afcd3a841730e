"""The training path, top to bottom: check, plan, start processes, prepare data, build, resume, train.

The global batch is fixed by `train.batch_size`: sample k of the run is the same sequence whatever
the number of processes (rank r of W takes its contiguous share of each step's samples), so one
process and N processes follow the same curve, and a resumed run continues on the next unseen
batch from the step number alone.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from .budget import RunPlan, count_parameters, flops_per_token, mfu, peak_flops, plan_run
from .checkpoint import Checkpointer, check_compatible, config_differences, read_meta, resume_path, set_aside
from .config import NOT_THE_RUN, to_container, validate_config
from .data import PackedBatches, prepare_data, resolve_vocab_size, validation_batches
from .distributed import (
    DistEnv,
    any_rank,
    barrier,
    init_distributed,
    launched_ranks,
    mean_across_ranks,
    same_on_all_ranks,
    shutdown,
)
from .errors import DataError, UserError
from .ffn import FFN_REGISTRY
from .ffn.mixtures import mixture_statistics, recording_mixture_statistics
from .metrics import MetricLoggers, read_summary, write_summary
from .model import Transformer
from .moe import expert_load_statistics, update_load_balance
from .optim import build_optimizer, set_lr
from .parallel import autocast_context, clip_grad_norm, configure_backends, gradient_sync, parallelize, unwrap
from .schedule import lr_multiplier

log = logging.getLogger("moa_train")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SIGUSR1: what Slurm sends before preemption


def describe(cfg: DictConfig, world_size: int = 1) -> tuple[dict[str, int], RunPlan]:
    """Parameter counts and run plan, from models built on the meta device (no memory, no init).

    The token budget counts the baseline's parameters by default (budget.params_of), so a variant
    and its baseline are compared at the same number of tokens.
    """
    with torch.device("meta"):
        counts = count_parameters(Transformer(cfg.model, cfg.ffn))
        baseline = FFN_REGISTRY[cfg.ffn.name].baseline
        budget_counts = counts
        if cfg.budget.params_of == "baseline" and baseline != cfg.ffn.name:
            budget_counts = count_parameters(Transformer(cfg.model, OmegaConf.create({"name": baseline})))
    return counts, plan_run(cfg.train, cfg.budget, budget_counts, world_size=world_size)


def finished_summary(run_dir: Path, config: dict, steps: int) -> dict | None:
    """The summary of a completed run of this configuration in run_dir, if there is one."""
    summary = read_summary(run_dir) or {}
    if summary.get("status") != "completed" or summary.get("steps") != steps or "config" not in summary:
        return None
    return None if config_differences(summary["config"], config, only=None, ignore=NOT_THE_RUN) else summary


class StopRequest:
    """Remembers a SIGTERM / SIGUSR1 so the loop can checkpoint at the next step boundary and exit 0."""

    def __init__(self):
        self.signal: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some launchers): no handler, no early stop
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


@torch.no_grad()
def evaluate(model, batches, env: DistEnv, autocast) -> tuple[float, dict]:
    """Mean validation loss over every token of the fixed set, and the mean mixing coefficients.

    Each rank takes an equal share of the sequences (the last share padded with weight-0 copies, so
    every rank runs the same number of forward passes, as FSDP needs).
    """
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=env.device)  # loss sum, token count
    with recording_mixture_statistics(model):
        for x, y, weight in batches:
            x, y, weight = x.to(env.device), y.to(env.device), weight.to(env.device)
            with autocast:
                logits = model(x)
            losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
            total[0] += (losses.sum(1) * weight).sum().double()
            total[1] += (weight * y.shape[1]).sum().double()
    if env.is_distributed:
        torch.distributed.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item(), mixture_statistics(unwrap(model))  # names without DDP's module.


def run(cfg: DictConfig, run_dir: Path) -> dict:
    validate_config(cfg)
    cfg.model.vocab_size = resolve_vocab_size(cfg.data, cfg.model.vocab_size)  # null: the tokenizer's size
    if cfg.dry_run:
        counts, plan = describe(cfg, world_size=launched_ranks()[1])
        report = {"model": cfg.model.name, "ffn": cfg.ffn.name, **counts, **plan.as_dict()}
        if cfg.model.family == "moe":
            report["moe"] = to_container(cfg.model.moe)
        print(json.dumps(report))
        return report
    env = init_distributed(cfg.dist.name, cfg.train.device)
    try:
        return train(cfg, run_dir, env)
    finally:
        shutdown()


def train(cfg: DictConfig, run_dir: Path, env: DistEnv) -> dict:
    counts, plan = describe(cfg, env.world_size)
    directories = same_on_all_ranks(str(run_dir.resolve()))
    if len(set(directories)) > 1:
        raise UserError(f"the processes resolved different run directories {sorted(set(directories))}; "
                        "set hydra.run.dir explicitly for distributed runs.")

    # --- a finished run in this directory (a sweep rerun after an interruption skips it)
    config = to_container(cfg)
    if cfg.train.resume == "auto" and (done := finished_summary(run_dir, config, plan.steps)):
        log.info("the run in %s is already complete (%d steps, summary.json): nothing to train. Use "
                 "train.resume=never to train it again, or another hydra.run.dir.", run_dir, done["steps"])
        return done

    # --- hardware and randomness
    configure_backends(env.device)
    autocast = autocast_context(env.device, cfg.train.dtype, env.mode)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank

    # --- data (prepared once per corpus and tokenizer by rank 0, then memory-mapped by every rank)
    def load_data():
        return prepare_data(cfg.data, cfg.model.vocab_size, cfg.train.eval_tokens, cfg.train.seq_len, log=log.info)

    data = load_data() if env.is_main else None
    barrier()
    data = data or load_data()
    if data.vocab_size > cfg.model.vocab_size:
        raise DataError(f"the tokenizer at {data.tokenizer_path} has {data.vocab_size} entries but "
                        f"model.vocab_size is {cfg.model.vocab_size}; set model.vocab_size >= {data.vocab_size}.")
    train_batches = PackedBatches(data.train, cfg.train.seq_len, cfg.train.seed)
    val_batches = validation_batches(data.val, cfg.train.seq_len, cfg.train.eval_tokens, plan.micro_batch_size,
                                     env.rank, env.world_size)

    # --- resume point: checked before the model is built, so a refused checkpoint costs nothing
    checkpoint = resume_path(run_dir, cfg.train.resume)
    meta = read_meta(checkpoint) if checkpoint else None
    if meta:
        check_compatible(checkpoint, meta, config)
    elif cfg.train.resume == "never" and env.is_main and (moved := set_aside(run_dir)):
        log.warning("train.resume=never: the earlier checkpoints of %s were moved to %s", run_dir, moved)

    # --- model and optimizer
    with env.device:
        model = Transformer(cfg.model, cfg.ffn)
    model.init_weights()
    model = parallelize(model, env, cfg.train.compile, cfg.train.dtype)
    optimizer = build_optimizer(model, cfg.optim)
    checkpointer = Checkpointer(run_dir, env, cfg.train.keep_checkpoints)
    start_step = 0
    if meta:
        checkpointer.load(checkpoint, model, optimizer.optimizers)
        start_step = meta["step"]
        log.info("resumed from %s (step %d)", checkpoint, start_step)
        if start_step >= plan.steps:
            log.info("the run in %s is already complete (%d of %d steps): nothing to train. Use "
                     "train.resume=never to train it again from scratch, or another hydra.run.dir.",
                     run_dir, start_step, plan.steps)

    run_dir.mkdir(parents=True, exist_ok=True)
    if env.is_main:  # the run records the tokenizer its tokens were made with
        shutil.copy(data.tokenizer_path, run_dir / "tokenizer.json")
    loggers = MetricLoggers(cfg.logger, run_dir, config, enabled=env.is_main,
                            resume_step=start_step if meta else None)
    flops_token = flops_per_token(counts["active"], cfg.model.vocab_size, cfg.model.dim, cfg.model.n_layers,
                                  cfg.train.seq_len, cfg.model.tie_embeddings)
    peak = peak_flops(torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else None,
                      cfg.train.peak_tflops)
    log.info("model %s / ffn %s: %s parameters; %d steps of %d tokens (%d processes x %d micro-batches of %d); "
             "dist=%s on %s", cfg.model.name, cfg.ffn.name, f"{counts['total']:,}", plan.steps, plan.tokens_per_step,
             plan.world_size, plan.grad_accum, plan.micro_batch_size, env.mode, env.device)

    start = time.perf_counter() - (meta or {}).get("elapsed_s", 0.0)
    initial_val_loss = (meta or {}).get("initial_val_loss")
    val_loss = (meta or {}).get("val_loss")
    def step_samples(step: int):
        """This rank's micro-batches of a step: contiguous shares of the step's samples, the same for any world size."""
        for micro in range(plan.grad_accum):
            first = step * plan.batch_size + (env.rank * plan.grad_accum + micro) * plan.micro_batch_size
            x, y = train_batches.samples(first, plan.micro_batch_size)
            yield micro, x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)

    if cfg.train.eval_at_start and not meta:
        initial_val_loss, mix = evaluate(model, val_batches, env, autocast)
        val_loss = initial_val_loss
        model.eval()  # measured, not trained on: MoE load statistics and balance losses stay untouched
        with torch.no_grad(), autocast:
            first_loss = torch.stack([model(x, y) for _, x, y in step_samples(0)]).mean()
        model.train()
        # The row before training, as nanoGPT's iter 0: the losses of the untrained model on the first step's
        # samples and on the validation set; no step has run, so there is no throughput or gradient norm.
        loggers.log({"step": 0, "tokens": 0, "lr": cfg.optim.lr * lr_multiplier(cfg.schedule, 0, plan.steps),
                     "train_loss": mean_across_ranks(first_loss).item(), "grad_norm": None, "tokens_per_s": None,
                     "val_loss": val_loss, "elapsed_s": time.perf_counter() - start, **({"mix": mix} if mix else {})})

    def save_checkpoint(step: int) -> None:
        saved = time.perf_counter()
        checkpointer.save(step, model, optimizer.optimizers, {
            "config": config, "tokens": step * plan.tokens_per_step, "samples": step * plan.batch_size,
            "elapsed_s": time.perf_counter() - start, "initial_val_loss": initial_val_loss, "val_loss": val_loss,
            "train_loss": train_loss,
        })
        log.info("checkpoint step-%d written in %.1fs", step, time.perf_counter() - saved)

    status, train_loss, done = "completed", (meta or {}).get("train_loss"), start_step
    progress = tqdm(range(start_step, plan.steps), initial=start_step, total=plan.steps, desc="train",
                    dynamic_ncols=True, disable=not (cfg.train.progress and env.is_main))
    with StopRequest() as stop:
        for step in progress:
            lr_scale = lr_multiplier(cfg.schedule, step, plan.steps)
            set_lr(optimizer, lr_scale)
            step_start = time.perf_counter()
            loss_sum = torch.zeros((), device=env.device)
            for micro, x, y in step_samples(step):
                with gradient_sync(model, enabled=micro == plan.grad_accum - 1):
                    with autocast:
                        loss = model(x, y)
                    (loss / plan.grad_accum).backward()
                loss_sum += loss.detach()
            grad_norm = clip_grad_norm(model, cfg.optim.grad_clip) if cfg.optim.grad_clip > 0 else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update_load_balance(model)  # MoE: expert selection biases follow the step's loads
            train_loss = mean_across_ranks(loss_sum / plan.grad_accum).item()  # .item() waits for the step
            step_time = time.perf_counter() - step_start

            done = step + 1
            tokens_per_s = plan.tokens_per_step / step_time
            row = {"step": done, "tokens": done * plan.tokens_per_step, "lr": cfg.optim.lr * lr_scale,
                   "train_loss": train_loss, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s}
            if (utilisation := mfu(tokens_per_s, flops_token, peak, env.world_size)) is not None:
                row["mfu"] = utilisation
            if not math.isfinite(train_loss):
                status = "diverged"
                loggers.log({**row, "elapsed_s": time.perf_counter() - start})
                log.error("training diverged at step %d (train loss %s); try a lower optim.lr", done, train_loss)
                break
            if done % cfg.train.eval_every == 0 or done == plan.steps:
                val_loss, mix = evaluate(model, val_batches, env, autocast)
                row["val_loss"] = val_loss
                if mix:
                    row["mix"] = mix
                if load := expert_load_statistics(unwrap(model)):
                    row["expert_load"] = load  # max/mean and min/mean per layer since the last evaluation
            if "val_loss" in row or done % cfg.train.log_every == 0:
                loggers.log({**row, "elapsed_s": time.perf_counter() - start})
            progress.set_postfix(loss=f"{train_loss:.3f}", val=f"{val_loss:.3f}" if val_loss else "-")

            stopping = any_rank(stop.signal is not None, env.device)
            if (cfg.train.ckpt_every and done % cfg.train.ckpt_every == 0 and done < plan.steps) or stopping:
                save_checkpoint(done)
            if stopping:
                status = "preempted"
                log.warning("%s received: checkpoint step-%d written, exiting", stop.signal or "stop signal", done)
                break
    progress.close()
    if status == "completed" and cfg.train.ckpt_at_end and checkpointer.last_saved_step != done:
        save_checkpoint(done)
    wall = time.perf_counter() - start

    summary = {
        "status": status, "val_loss": val_loss if status == "completed" else None,
        "last_val_loss": val_loss, "initial_val_loss": initial_val_loss, "train_loss": train_loss,
        "params": counts, "tokens": done * plan.tokens_per_step, "steps": done, "planned_steps": plan.steps,
        "resumed_from": start_step if meta else None, "plan": plan.as_dict(), "wall_s": wall,
        "data": data.summary(),
        "config": config,
    }
    if env.is_main:
        write_summary(run_dir, summary)
    loggers.close()
    log.info("%s after %d of %d steps, %.1fs: %s validation loss %.4f (initial %s); run dir %s", status, done,
             plan.steps, wall, "final" if status == "completed" else "last", val_loss or math.nan,
             f"{initial_val_loss:.4f}" if initial_val_loss else "-", run_dir)
    return summary
