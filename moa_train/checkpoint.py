"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, resharding on load, written atomically.

Layout, under the run directory:

    checkpoints/step-<N>/        a complete checkpoint: DCP shards + .metadata, meta.json, rng-rank<R>.pt
    checkpoints/.tmp-step-<N>/   one being written (ignored; removed by the next save of that step)

A checkpoint is written under the temporary name by every rank, then rank 0 writes meta.json and
renames the directory, so `step-<N>` exists only once it is whole. meta.json holds the step (the
data position and the schedule are functions of it), the resolved config and the figures the
summary needs; the RNG states of each rank are saved beside it.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from .config import NOT_THE_RUN, flat_with_defaults
from .distributed import DistEnv, barrier
from .errors import UserError
from .utils import under


def _quiet_single_process(fn, *args, **kwargs):
    # One process without a process group is a supported DCP mode; its warning says nothing useful here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        return fn(*args, **kwargs)

CHECKPOINT_DIR = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d+)$")
META = "meta.json"
# Config sections whose change makes a checkpoint unusable for this run: the model's shape, and
# what fixes the data position (sample k of the run must be the same sample after a resume).
MUST_MATCH = ("model", "ffn", "train.seq_len", "train.batch_size", "train.seed", "data")


class CheckpointError(UserError):
    pass


def is_complete(path: Path) -> bool:
    return STEP_DIR.match(path.name) is not None and (path / META).is_file() and (path / ".metadata").is_file()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resume_path(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to start from: `auto` (newest complete one, if any), `never`, or a path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(os.path.abspath(os.path.expanduser(resume)))
    if not path.is_dir():
        raise CheckpointError(f"train.resume: '{path}' does not exist. Accepted: auto, never, or the path of a "
                              f"checkpoint directory (…/{CHECKPOINT_DIR}/step-<N>).")
    if not is_complete(path):
        raise CheckpointError(f"train.resume: '{path}' is not a complete checkpoint (a step-<N> directory with "
                              f"{META} and .metadata); it may be half-written.")
    return path


def set_aside(run_dir: Path) -> Path | None:
    """Move the checkpoints of an earlier run out of the way (train.resume=never): kept, never resumed."""
    root = run_dir / CHECKPOINT_DIR
    if not root.is_dir() or not any(root.iterdir()):
        return None
    target = run_dir / f"{CHECKPOINT_DIR}.set-aside-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    os.replace(root, target)
    return target


def read_meta(path: Path) -> dict:
    try:
        return json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint '{path}': cannot read {META} ({exc}).") from None


def config_differences(saved: dict, current: dict, only: tuple[str, ...] | None = MUST_MATCH,
                       ignore: tuple[str, ...] = ()) -> list[str]:
    """'key: saved -> current' for every differing key under `only` (None: all keys) and not under `ignore`.
    Keys the schema gained since `saved` was written count at their defaults."""
    old, new = flat_with_defaults(saved), flat_with_defaults(current)
    keys = {k for k in old.keys() | new.keys() if (only is None or under(k, only)) and not under(k, ignore)}
    return [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in sorted(keys)
            if old.get(k) != new.get(k)]


def check_compatible(path: Path, meta: dict, config: dict) -> None:
    differences = config_differences(meta["config"], config, ignore=NOT_THE_RUN)
    if differences:
        raise CheckpointError(
            f"checkpoint '{path}' was written by a run with a different configuration; resuming would not "
            f"continue that run. Differing keys: {'; '.join(differences)}. Use the original values, "
            f"train.resume=never to start over in this directory, or another hydra.run.dir.")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    def __init__(self, run_dir: Path, env: DistEnv, keep: int | None):
        self.root = run_dir / CHECKPOINT_DIR
        self.env, self.keep = env, keep
        self.last_saved_step: int | None = None

    def save(self, step: int, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], meta: dict) -> Path:
        final, tmp = self.root / f"step-{step}", self.root / f".tmp-step-{step}"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a save that was killed
            tmp.mkdir(parents=True)
        barrier()
        model_state, optim_state = get_state_dict(model, optimizers)
        _quiet_single_process(dcp.save, {"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
        torch.save(_rng_state(), tmp / f"rng-rank{self.env.rank}.pt")
        barrier()
        if self.env.is_main:
            (tmp / META).write_text(json.dumps({**meta, "step": step, "world_size": self.env.world_size}, indent=2))
            if final.exists():  # the same step saved again (e.g. at a signal right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        barrier()
        self.last_saved_step = step
        return final

    def _prune(self) -> None:
        if self.keep is None:
            return
        for old in complete_checkpoints(self.root.parent)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict:
        meta = read_meta(path)
        model_state, optim_state = get_state_dict(model, optimizers)
        state = {"model": model_state, "optim": optim_state}
        try:
            _quiet_single_process(dcp.load, state, checkpoint_id=str(path))
        except Exception as exc:  # DCP raises several types for missing or mismatched entries
            raise CheckpointError(f"checkpoint '{path}' cannot be loaded into this model and optimizer "
                                  f"({type(exc).__name__}: {str(exc)[:400]}).") from None
        set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng = path / f"rng-rank{self.env.rank}.pt"
        if rng.exists():  # absent when resuming on more ranks than saved: those start from the seed
            _set_rng_state(torch.load(rng, weights_only=False))
        self.last_saved_step = meta["step"]
        return meta


def find_checkpoint(path: Path) -> Path:
    """The checkpoint a path names: itself (a complete step-<N> directory) or a run directory's newest."""
    path = Path(os.path.abspath(os.path.expanduser(str(path))))
    if is_complete(path):
        return path
    if STEP_DIR.match(path.name) and path.is_dir():
        raise CheckpointError(f"'{path}' is not a complete checkpoint (no {META} or .metadata); it may be "
                              "half-written.")
    found = complete_checkpoints(path)
    if not found:
        raise CheckpointError(f"'{path}' holds no complete checkpoint ({CHECKPOINT_DIR}/step-<N>): train the run with "
                              "train.ckpt_at_end=true (the default), or name a checkpoint directory.")
    return found[-1]


def load_model_state(path: Path, model: torch.nn.Module) -> None:
    """The model weights of a checkpoint alone (no optimizer, no RNG), resharded to this process's model:
    a checkpoint written by any number of processes loads into one."""
    state = {"model": get_model_state_dict(model)}
    try:
        _quiet_single_process(dcp.load, state, checkpoint_id=str(path))
    except Exception as exc:  # DCP raises several types for missing or mismatched entries
        raise CheckpointError(f"checkpoint '{path}' cannot be loaded into this model "
                              f"({type(exc).__name__}: {str(exc)[:400]}).") from None
    set_model_state_dict(model, state["model"])
