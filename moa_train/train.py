"""The training path, top to bottom: check, plan, start processes, prepare data, build, resume, train.

The global batch is fixed by `train.batch_size`: sample k of the run is the same sequence whatever
the number of processes (rank r of W takes its contiguous share of each step's samples), so one
process and N processes follow the same curve, and a resumed run continues on the next unseen
batch from the step number alone. The run contract (files, statuses) is docs/design.md section 4.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from .budget import RunPlan, flops_per_token, mfu, peak_flops, plan_run
from .builder import build_model, parameter_counts, resolve_shape
from .checkpoint import (
    Checkpointer,
    CheckpointError,
    check_compatible,
    config_differences,
    read_meta,
    resume_path,
    set_aside,
)
from .config import NOT_THE_RUN, to_container, validate_config
from .data import PackedBatches, PreparedData, cache_root, prepare_data, validation_batches
from .data.images import (
    BadFiles,
    ImageBatches,
    ImageSamples,
    ImageSplit,
    ImageValidation,
    check_readable,
    image_root,
    split_images,
)
from .distributed import (
    DistEnv,
    any_rank,
    barrier,
    gather_from_all_ranks,
    init_distributed,
    launched_ranks,
    mean_across_ranks,
    shutdown,
)
from .errors import DataError, RunFailed, UserError
from .evaluation import evaluate
from .ffn import GateDetail, Gates, gate_entry_names, mean_gates, recording_gates
from .gate_report import GATES_FILE, gate_summary
from .hardware import cpu_peak_flops, peak_memory_mib, reset_peak_memory
from .metrics import MetricLoggers, read_summary, write_summary
from .moe import expert_load_statistics, update_load_balance
from .optim import build_optimizer, set_lr
from .parallel import autocast_context, gradient_norm, gradient_sync, unwrap
from .reconstruction import RECONSTRUCTION_FIGURE, reconstruction_figure
from .schedule import lr_multiplier
from .trained import load_initial_weights, weights_source
from .utils import display_path

log = logging.getLogger("moa_train")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SIGUSR1: what Slurm sends before preemption


def count_and_plan(cfg: DictConfig, world_size: int = 1) -> tuple[dict[str, int], RunPlan]:
    """Parameter counts and the run plan (steps, batches) of a config, without building the model."""
    counts, budget_counts = parameter_counts(cfg)
    train_images = len(image_split(cfg).train) if cfg.budget.get("epochs") is not None else None
    return counts, plan_run(cfg.train, cfg.budget, budget_counts, world_size=world_size, train_images=train_images)


def image_split(cfg: DictConfig) -> ImageSplit:
    """data=images: the folder's training and validation files (the offline set is cut into the cache first)."""
    images = cfg.data.images
    return split_images(image_root(cfg.data, cache_root(cfg.data)), images.val_fraction, images.max_val_images,
                        offline=cfg.data.path is None)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    validate_config(cfg)
    resolve_shape(cfg)  # the tokenizer's vocabulary size, or an image's patch count
    if cfg.dry_run:
        counts, plan = count_and_plan(cfg, world_size=launched_ranks()[1])
        report = {"model": cfg.model.name, "ffn": cfg.ffn.name, **counts, **plan.as_dict()}
        if cfg.model.family == "moe":
            report["moe"] = to_container(cfg.model.moe)
        print(json.dumps(report))
        return report
    env = init_distributed(cfg.dist.name, cfg.train.device, cfg.dist.timeout_s)
    try:
        return train(cfg, run_dir, env)
    finally:
        shutdown()


@dataclass
class RunState:
    """What changes as a run goes: steps done, its clock, the last losses and how it ended."""

    step: int = 0
    train_loss: float | None = None
    val_loss: float | None = None
    initial_val_loss: float | None = None
    status: str = "completed"  # completed | diverged | preempted
    resumed_from: int | None = None
    skipped_steps: int = 0  # updates skipped for non-finite gradients (train.skip_nonfinite_steps)
    failure: str | None = None  # why a diverged run stopped
    clock_start: float = field(default_factory=time.perf_counter)  # minus the time of earlier sessions

    @classmethod
    def from_checkpoint(cls, meta: dict) -> RunState:
        return cls(step=meta["step"], train_loss=meta.get("train_loss"), val_loss=meta.get("val_loss"),
                   initial_val_loss=meta.get("initial_val_loss"), resumed_from=meta["step"],
                   skipped_steps=meta.get("skipped_steps", 0),
                   clock_start=time.perf_counter() - meta.get("elapsed_s", 0.0))

    def elapsed(self) -> float:
        return time.perf_counter() - self.clock_start

    def checkpoint_meta(self) -> dict:
        return {"elapsed_s": self.elapsed(), "initial_val_loss": self.initial_val_loss, "val_loss": self.val_loss,
                "train_loss": self.train_loss, "skipped_steps": self.skipped_steps}


def train(cfg: DictConfig, run_dir: Path, env: DistEnv) -> dict:
    if len(directories := set(gather_from_all_ranks(str(run_dir.resolve())))) > 1:
        raise UserError(f"the processes resolved different run directories {sorted(directories)}; "
                        "set hydra.run.dir explicitly for distributed runs.")
    counts, plan = count_and_plan(cfg, env.world_size)
    config = to_container(cfg)
    if cfg.train.resume == "auto" and (done := finished_summary(run_dir, config, plan.steps)):
        # On the console only: the finished run's train.log (committed for a study) stays as it was.
        print(f"moa-train: the run in {run_dir} is already complete ({done['steps']} steps, summary.json): nothing "
              "to train. Use train.resume=never to train it again, or another hydra.run.dir.", file=sys.stderr)
        return done

    checkpoint = checkpoint_to_resume(run_dir, cfg.train.resume, env)  # before data and model: a refusal costs nothing
    meta = read_meta(checkpoint) if checkpoint else None
    if meta:
        check_compatible(checkpoint, meta, config)
    elif cfg.train.resume == "never" and env.is_main and (moved := set_aside(run_dir)):
        log.warning("train.resume=never: the earlier checkpoints of %s were moved to %s", run_dir, moved)
    initial = initial_weights(cfg, config) if cfg.train.init_from and not meta else None
    data = load_data(cfg, env)

    model = build_model(cfg, env)
    optimizer = build_optimizer(model, cfg.optim)
    checkpointer = Checkpointer(run_dir, env, cfg.train.keep_checkpoints)
    state = RunState()
    if meta:
        checkpointer.load(checkpoint, model, optimizer.optimizers)
        state = RunState.from_checkpoint(meta)
        log.info("resumed from %s (step %d)", checkpoint, state.step)
    elif initial:
        load_initial_weights(initial, model)
        log.info("weights from %s (train.init_from); the optimizer starts fresh", initial)

    run_dir.mkdir(parents=True, exist_ok=True)
    if env.is_main and isinstance(data, PreparedData):  # the run records the tokenizer its tokens were made with
        shutil.copy(data.tokenizer_path, run_dir / "tokenizer.json")
    loggers = MetricLoggers(cfg.logger, run_dir, config, enabled=env.is_main, resume_step=state.resumed_from)
    log.info("model %s / ffn %s: %s parameters; %d steps of %d tokens (%d processes x %d micro-batches of %d); "
             "dist=%s on %s", cfg.model.name, cfg.ffn.name, f"{counts['total']:,}", plan.steps, plan.tokens_per_step,
             plan.world_size, plan.grad_accum, plan.micro_batch_size, env.mode, env.device)
    trainer = Trainer(cfg, env, plan, counts, model, optimizer, data, loggers, checkpointer, state, config)
    if state.step >= plan.steps:
        log.info("the run in %s is already complete (%d of %d steps): nothing to train. Use train.resume=never to "
                 "train it again from scratch, or another hydra.run.dir.", run_dir, state.step, plan.steps)
    elif cfg.train.eval_at_start and not meta:
        trainer.log_start()
    trainer.fit()
    if state.status == "completed":
        trainer.write_analysis()
    summary = trainer.summary()
    if env.is_main:
        write_summary(run_dir, summary)
    loggers.close()
    log.info("%s after %d of %d steps, %.1fs: %s validation loss %.4f (initial %s); run dir %s", state.status,
             state.step, plan.steps, summary["wall_s"], "final" if state.status == "completed" else "last",
             state.val_loss or math.nan, f"{state.initial_val_loss:.4f}" if state.initial_val_loss else "-",
             display_path(run_dir))
    if state.status == "diverged":
        newest = checkpointer.last_saved_step
        kept = f"the newest checkpoint is step-{newest}, from before it" if newest else "no checkpoint was written"
        raise RunFailed(f"training diverged at step {state.step}: {state.failure}. summary.json records status: "
                        f"diverged; {kept}. "
                        f"Try a lower optim.lr, gradient clipping (optim.grad_clip > 0), a longer warmup, or "
                        f"train.skip_nonfinite_steps=N to skip up to N such updates.")
    return summary


def checkpoint_to_resume(run_dir: Path, resume: str, env: DistEnv) -> Path | None:
    """resume_path on rank 0 alone (verifying reads every file of a checkpoint once, not once per rank), its
    answer or its refusal shared with every rank."""
    answer = ""
    if env.is_main:
        try:
            path = resume_path(run_dir, resume)
            answer = f"path:{path}" if path else "none:"
        except CheckpointError as exc:
            answer = f"error:{exc}"
    kind, _, value = gather_from_all_ranks(answer)[0].partition(":")
    if kind == "error":
        raise CheckpointError(value if env.is_main else f"(as rank 0 found) {value}")
    return Path(value) if kind == "path" else None


def step_logger(console: bool) -> logging.Logger:
    """The periodic step lines of train.log, for those who read logs rather than bars; on the console as well
    when no progress bar shows the same figures."""
    logger = logging.getLogger("moa_train.steps")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.handlers = [h for h in logging.getLogger().handlers if console or isinstance(h, logging.FileHandler)]
    return logger


def duration(seconds: float) -> str:
    """A short human duration: 45s, 12m05s, 3h07m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def step_line(row: dict, val_loss: float | None, total_steps: int, eta_s: float) -> str:
    """One plain line of a step: step, losses, lr, throughput, MFU, memory and the time left."""
    parts = [f"step {row['step']}/{total_steps}", f"loss {row['train_loss']:.4f}"]
    if val_loss is not None:
        parts.append(f"val {val_loss:.4f}")
    parts += [f"lr {row['lr']:.2e}", f"{row['tokens_per_s']:,.0f} tok/s"]
    if row.get("mfu") is not None:
        parts.append(f"mfu {100 * row['mfu']:.1f}%")
    parts += [f"mem {row['peak_memory_mib']:,.0f} MiB", f"eta {duration(eta_s)}"]
    return " | ".join(parts)


def progress_figures(row: dict, val_loss: float | None) -> dict[str, str]:
    """What the progress bar shows after the step counter."""
    figures = {"loss": f"{row['train_loss']:.3f}", "val": f"{val_loss:.3f}" if val_loss else "-",
               "lr": f"{row['lr']:.1e}", "tok/s": f"{row['tokens_per_s']:,.0f}"}
    if row.get("mfu") is not None:
        figures["mfu"] = f"{100 * row['mfu']:.1f}%"
    return figures


def finished_summary(run_dir: Path, config: dict, steps: int) -> dict | None:
    """The summary of a completed run of this configuration in run_dir, if there is one."""
    summary = read_summary(run_dir) or {}
    if summary.get("status") != "completed" or summary.get("steps") != steps or "config" not in summary:
        return None
    return None if config_differences(summary["config"], config, only=None, ignore=NOT_THE_RUN) else summary


def initial_weights(cfg: DictConfig, config: dict) -> Path:
    """The checkpoint or export that train.init_from names, refused unless its model and ffn are this run's."""
    source, trained_with = weights_source(cfg.train.init_from)
    if differences := config_differences(trained_with, config, only=("model", "ffn")):
        raise UserError(f"train.init_from: '{source}' holds a model of another shape, so its weights cannot start "
                        f"this run. Differing keys: {'; '.join(differences)}. Data, schedule and optimizer may "
                        f"differ; model and ffn must not.")
    return source


def load_data(cfg: DictConfig, env: DistEnv) -> PreparedData | ImageSplit:
    """Prepared once per corpus and tokenizer by rank 0, then memory-mapped by every rank; for images, the
    folder listed (the offline set cut) by rank 0 first, then by every rank."""
    if cfg.data.source == "images":
        split = image_split(cfg) if env.is_main else None
        barrier()
        split = split or image_split(cfg)
        check_readable(split, cfg.model.vision.patch_size)
        log.info("images: %d training and %d validation files in %s", len(split.train), len(split.val), split.where)
        return split

    def prepare():
        return prepare_data(cfg.data, cfg.model.vocab_size, cfg.train.eval_tokens, cfg.train.seq_len, log=log.info)

    data = prepare() if env.is_main else None
    barrier()
    data = data or prepare()
    if data.vocab_size > cfg.model.vocab_size:
        raise DataError(f"the tokenizer at {data.tokenizer_path} has {data.vocab_size} entries but "
                        f"model.vocab_size is {cfg.model.vocab_size}; set model.vocab_size >= {data.vocab_size}.")
    return data


def image_batches(cfg: DictConfig, split: ImageSplit, plan: RunPlan, env: DistEnv) -> tuple[ImageBatches,
                                                                                             ImageValidation]:
    """This rank's training batches and validation share of an image folder."""
    v, images = cfg.model.vision, cfg.data.images
    bad = BadFiles(images.max_bad_files)

    def samples(validation: bool) -> ImageSamples:
        return ImageSamples(split, v.image_size, v.patch_size, cfg.train.seq_len, cfg.train.seed, images.crop_scale,
                            images.flip, validation)

    return (ImageBatches(samples(False), plan, env.rank, images.workers, bad),
            ImageValidation(samples(True), plan.micro_batch_size, env.rank, env.world_size, images.workers, bad))


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


class Trainer:
    """A built run: model, optimizer, batches, sinks and its RunState; `fit` is the loop."""

    def __init__(self, cfg: DictConfig, env: DistEnv, plan: RunPlan, counts: dict[str, int], model, optimizer,
                 data: PreparedData, loggers: MetricLoggers, checkpointer: Checkpointer, state: RunState,
                 config: dict):
        self.cfg, self.env, self.plan, self.counts, self.config = cfg, env, plan, counts, config
        self.model, self.optimizer, self.data, self.loggers, self.checkpointer = (model, optimizer, data, loggers,
                                                                                  checkpointer)
        self.state = state
        self.gate_detail: dict | None = None  # the final evaluation's detailed gate recordings (gates.json)
        self.autocast = autocast_context(env.device, cfg.train.dtype, env.mode)
        if isinstance(data, ImageSplit):
            self.train_batches, self.val_batches = image_batches(cfg, data, plan, env)
            self.flops_per_token = unwrap(model).flops_per_image() / cfg.train.seq_len  # a token: a patch
        else:
            self.train_batches = PackedBatches(data.train, cfg.train.seq_len, cfg.train.seed)
            self.val_batches = validation_batches(data.val, cfg.train.seq_len, cfg.train.eval_tokens,
                                                  plan.micro_batch_size, env.rank, env.world_size)
            self.flops_per_token = flops_per_token(counts["active"], cfg.model.vocab_size, cfg.model.dim,
                                                   cfg.model.n_layers, cfg.train.seq_len, cfg.model.tie_embeddings)
        self.peak_flops = peak_flops(torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else None,
                                     cfg.train.peak_tflops)
        if self.peak_flops is None and env.device.type == "cpu":  # measured once per machine (hardware.py)
            self.peak_flops = cpu_peak_flops(cache_root(cfg.data))
        self.step_log = step_logger(console=not (cfg.train.progress and env.is_main))

    def fit(self) -> None:
        cfg, plan, state = self.cfg.train, self.plan, self.state
        progress = tqdm(range(state.step, plan.steps), initial=state.step, total=plan.steps, desc="train",
                        dynamic_ncols=True, disable=not (cfg.progress and self.env.is_main))
        session_start, session_first_step = time.perf_counter(), state.step  # for the ETA
        with StopRequest() as stop:
            for step in progress:
                row = self.train_step(step)
                if state.status == "diverged":
                    self.loggers.log({**row, "elapsed_s": state.elapsed()})
                    log.error("training diverged at step %d: %s", state.step, state.failure)
                    break
                if state.step % cfg.eval_every == 0 or state.step == plan.steps:
                    row.update(self.evaluate(final=state.step == plan.steps))
                if "val_loss" in row or state.step % cfg.log_every == 0:
                    self.loggers.log({**row, "elapsed_s": state.elapsed()})
                    per_step = (time.perf_counter() - session_start) / (state.step - session_first_step)
                    self.step_log.info(step_line(row, state.val_loss, plan.steps, per_step * (plan.steps - state.step)))
                progress.set_postfix(progress_figures(row, state.val_loss), refresh=False)

                stopping = any_rank(stop.signal is not None, self.env.device)
                if (cfg.ckpt_every and state.step % cfg.ckpt_every == 0 and state.step < plan.steps) or stopping:
                    self.save_checkpoint()
                if stopping:
                    state.status = "preempted"
                    log.warning("%s received: checkpoint step-%d written, exiting", stop.signal or "stop signal",
                                state.step)
                    break
        progress.close()
        if hasattr(self.train_batches, "close"):  # image decoding workers
            self.train_batches.close()
        if state.status == "completed" and cfg.ckpt_at_end and self.checkpointer.last_saved_step != state.step:
            self.save_checkpoint()

    def train_step(self, step: int) -> dict:
        """One optimizer step over the step's micro-batches; returns its metrics row."""
        lr_scale = lr_multiplier(self.cfg.schedule, step, self.plan.steps)
        set_lr(self.optimizer, lr_scale)
        reset_peak_memory(self.env.device)
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=self.env.device)
        for micro, x, y in self.step_samples(step):
            with gradient_sync(self.model, enabled=micro == self.plan.grad_accum - 1):
                with self.autocast:
                    loss = self.model(x, y)
                (loss / self.plan.grad_accum).backward()
            loss_sum += loss.detach()
        grad_norm = gradient_norm(self.model, self.cfg.optim.grad_clip)  # clipped to it when grad_clip > 0
        self.state.train_loss = mean_across_ranks(loss_sum / self.plan.grad_accum).item()  # waits for the step
        self.state.step = done = step + 1
        row = {"step": done, "tokens": done * self.plan.tokens_per_step, "lr": self.cfg.optim.lr * lr_scale,
               "train_loss": self.state.train_loss, "grad_norm": grad_norm}
        if math.isfinite(self.state.train_loss) and math.isfinite(grad_norm):
            self.optimizer.step()
            update_load_balance(self.model)  # MoE: expert selection biases follow the step's loads
        elif self.state.skipped_steps < self.cfg.train.skip_nonfinite_steps:
            self.state.skipped_steps += 1
            row["skipped"] = True
            log.warning("step %d: non-finite loss or gradients (loss %s, gradient norm %s): update skipped (%d of "
                        "train.skip_nonfinite_steps=%d)", done, self.state.train_loss, grad_norm,
                        self.state.skipped_steps, self.cfg.train.skip_nonfinite_steps)
        else:  # no update with these gradients: the weights stay those of the last finite step
            self.state.status = "diverged"
            self.state.failure = (f"train loss {self.state.train_loss}, gradient norm {grad_norm}"
                                  + (f", after {self.state.skipped_steps} skipped updates" if self.state.skipped_steps
                                     else ""))
        self.optimizer.zero_grad(set_to_none=True)
        row["tokens_per_s"] = tokens_per_s = self.plan.tokens_per_step / (time.perf_counter() - started)
        if (utilisation := mfu(tokens_per_s, self.flops_per_token, self.peak_flops, self.env.world_size)) is not None:
            row["mfu"] = utilisation
        row["peak_memory_mib"] = peak_memory_mib(self.env.device)
        return row

    def step_samples(self, step: int):
        """This rank's micro-batches of a step: contiguous shares of the step's samples, the same for any world size."""
        plan = self.plan
        for micro in range(plan.grad_accum):
            first = step * plan.batch_size + (self.env.rank * plan.grad_accum + micro) * plan.micro_batch_size
            x, y = self.train_batches.samples(first, plan.micro_batch_size)
            yield micro, x.to(self.env.device, non_blocking=True), y.to(self.env.device, non_blocking=True)

    def evaluate(self, final: bool = False) -> dict:
        """The evaluation columns of a metrics row: val_loss, and the gate and expert-load statistics. The final
        one also records the gates' distributions for gates.json, so that no second pass is needed."""
        self.state.val_loss, gates = self.validation(detail=final)
        row = {"val_loss": self.state.val_loss}
        if gates:
            row["mix"] = gates
        if load := expert_load_statistics(unwrap(self.model)):
            row["expert_load"] = load  # max/mean and min/mean per layer since the last evaluation
        return row

    def log_start(self) -> None:
        """The row before training, as nanoGPT's iter 0: the untrained model's losses on the validation set and on
        the first step's samples; no step has run, so there is no throughput or gradient norm."""
        reset_peak_memory(self.env.device)
        self.state.initial_val_loss, gates = self.validation()
        self.state.val_loss = self.state.initial_val_loss
        self.model.eval()  # measured, not trained on: MoE load statistics and balance losses stay untouched
        # Gates recorded (and dropped) as in an evaluation: a compiled block then runs the evaluation's graph instead
        # of compiling a third one, with no gate stash, for this one pass (about 1 s an architecture on CPU).
        with torch.no_grad(), self.autocast, recording_gates(unwrap(self.model)):
            first_loss = torch.stack([self.model(x, y) for _, x, y in self.step_samples(0)]).mean()
        self.model.train()
        self.loggers.log({"step": 0, "tokens": 0, "lr": self.cfg.optim.lr * lr_multiplier(self.cfg.schedule, 0,
                                                                                            self.plan.steps),
                          "train_loss": mean_across_ranks(first_loss).item(), "grad_norm": None, "tokens_per_s": None,
                          "val_loss": self.state.val_loss, "elapsed_s": self.state.elapsed(),
                          **({"mfu": None} if self.peak_flops else {}),
                          "peak_memory_mib": peak_memory_mib(self.env.device), **({"mix": gates} if gates else {})})

    def validation(self, detail: bool = False) -> tuple[float, dict]:
        """The validation loss and the mean gate per layer and dictionary entry; with `detail`, for a model with
        MoA gates, the recordings are kept for gates.json (self.gate_detail)."""
        wanted = detail and not isinstance(self.data, ImageSplit) and self.has_moa_gates()  # vision: no gates.json
        gate_detail = GateDetail(vocab_size=self.cfg.model.vocab_size) if wanted else None
        loss, recorders = evaluate(self.model, self.val_batches, self.env, self.autocast, gate_detail)
        if gate_detail is not None:
            self.gate_detail = recorders
        return loss, mean_gates(recorders, gate_entry_names(unwrap(self.model)))

    def has_moa_gates(self) -> bool:
        """Token-dependent gates, whose distributions gates.json reports (baselines and LA have none)."""
        return any(isinstance(m, Gates) and m.mixture == "moa" for m in unwrap(self.model).modules())

    def write_analysis(self) -> None:
        """After a completed run: gates.json for a language model with MoA gates, the reconstruction figure
        for a vision model."""
        if isinstance(self.data, ImageSplit):  # every rank runs the model (FSDP2 gathers weights), rank 0 draws
            path = self.checkpointer.root.parent / RECONSTRUCTION_FIGURE
            reconstruction_figure(unwrap(self.model), self.val_batches.dataset, path if self.env.is_main else None,
                                  self.env.device, self.autocast)
            if self.env.is_main:
                log.info("reconstructions of validation images: %s", display_path(path))
            return
        self.write_gate_analysis(self.data.tokenizer_path)

    def write_gate_analysis(self, tokenizer_path: Path) -> None:
        """gates.json (gate_report.py): the gates' distributions over the validation set and the tokens that
        drive them, for a model with MoA gates, as the final evaluation recorded them (one more pass over the
        validation set only when this session ran no final evaluation: a run resumed already complete)."""
        model = unwrap(self.model)
        if not self.has_moa_gates():
            return  # baselines and LA: no token-dependent gates
        from tokenizers import Tokenizer

        recorders = self.gate_detail
        if recorders is None:
            _, recorders = evaluate(self.model, self.val_batches, self.env, self.autocast,
                                    GateDetail(vocab_size=self.cfg.model.vocab_size))
        if self.env.is_main:
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
            summary = gate_summary(recorders, gate_entry_names(model), lambda i: tokenizer.decode([i]),
                                   self.state.step)
            (self.checkpointer.root.parent / GATES_FILE).write_text(json.dumps(summary, indent=1))

    def save_checkpoint(self) -> None:
        saved, step = time.perf_counter(), self.state.step
        self.checkpointer.save(step, self.model, self.optimizer.optimizers, {
            "config": self.config, "tokens": step * self.plan.tokens_per_step, "samples": step * self.plan.batch_size,
            **self.state.checkpoint_meta()})
        log.info("checkpoint step-%d written in %.1fs", step, time.perf_counter() - saved)

    def summary(self) -> dict:
        state, plan = self.state, self.plan
        return {
            "status": state.status, "val_loss": state.val_loss if state.status == "completed" else None,
            "last_val_loss": state.val_loss, "initial_val_loss": state.initial_val_loss,
            "train_loss": state.train_loss, "params": self.counts, "tokens": state.step * plan.tokens_per_step,
            "steps": state.step, "planned_steps": plan.steps, "resumed_from": state.resumed_from,
            "skipped_steps": state.skipped_steps, **({"failure": state.failure} if state.failure else {}),
            "plan": plan.as_dict(), "wall_s": state.elapsed(), "data": self.data.summary(), "config": self.config,
        }
