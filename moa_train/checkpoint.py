"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, resharding on load, written atomically.

Layout, under the run directory:

    checkpoints/step-<N>/            a complete checkpoint: DCP shards + .metadata, meta.json, rng-rank<R>.pt
    checkpoints/.tmp-step-<N>/       one being written (ignored; removed by the next save of that step)
    checkpoints/.replaced-step-<N>/  the older copy of a step saved twice, for the moment of the swap

A checkpoint is written under the temporary name by every rank, then rank 0 flushes every file to
disk, writes meta.json with a manifest of the files (name, size, CRC-32), flushes it and renames the
directory, so `step-<N>` exists only once it is whole and on disk. meta.json holds the step (the data
position and the schedule are functions of it), the resolved config and the figures the summary
needs; the RNG states of each rank are saved beside it as tensors (loaded with weights_only=True).
`verify` checks a checkpoint against its manifest: a resume picks the newest that verifies.

DCP's own `.metadata` file is a pickle, read by `torch.distributed.checkpoint`: load checkpoints only
from sources you trust, and share weights as `moa-export` safetensors.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import random
import re
import shutil
import warnings
import zlib
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

log = logging.getLogger("moa_train")
CHECKPOINT_DIR = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d+)$")
REPLACED_PREFIX = ".replaced-"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
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
    """The checkpoint to start from: `auto` (the newest complete one that verifies, if any), `never`, or a path
    (refused unless it verifies)."""
    if resume == "never":
        return None
    if resume == "auto":
        restore_replaced(run_dir / CHECKPOINT_DIR)
        found = complete_checkpoints(run_dir)
        for path in reversed(found):
            if (problem := verify(path)) is None:
                return path
            log.warning("checkpoint %s is damaged (%s): trying the one before it", path, problem)
        if found:
            raise CheckpointError(f"train.resume=auto: every checkpoint of {run_dir} is damaged "
                                  f"({', '.join(p.name for p in found)}); the newest: {verify(found[-1])}. "
                                  f"Use train.resume=never to start over (they are kept, set aside), or name one "
                                  f"with train.resume=PATH.")
        return None
    path = Path(os.path.abspath(os.path.expanduser(resume)))
    if not path.is_dir():
        raise CheckpointError(f"train.resume: '{path}' does not exist. Accepted: auto, never, or the path of a "
                              f"checkpoint directory (…/{CHECKPOINT_DIR}/step-<N>).")
    if not is_complete(path):
        raise CheckpointError(f"train.resume: '{path}' is not a complete checkpoint (a step-<N> directory with "
                              f"{META} and .metadata); it may be half-written.")
    if problem := verify(path):
        raise CheckpointError(f"train.resume: checkpoint '{path}' is damaged: {problem}.")
    return path


def file_crc32(path: Path, chunk: int = 1 << 22) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def manifest(path: Path) -> dict[str, dict[str, int]]:
    """Every file of a checkpoint directory but meta.json: its size and CRC-32."""
    return {f.name: {"size": f.stat().st_size, "crc32": file_crc32(f)}
            for f in sorted(path.iterdir()) if f.is_file() and f.name != META}


def verify(path: Path) -> str | None:
    """None if the checkpoint's files match the manifest in its meta.json, else what is wrong, naming the file.
    A checkpoint written before manifests existed is checked for its meta.json only."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as exc:
        return f"{path / META} cannot be read ({exc})"
    for name, expected in (meta.get("files") or {}).items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if (size := file.stat().st_size) != expected["size"]:
            return f"{file} has {size:,} bytes, {expected['size']:,} were written"
        if file_crc32(file) != expected["crc32"]:
            return f"{file} does not match its checksum"
    return None


def restore_replaced(root: Path) -> None:
    """Finish a swap that a kill interrupted (Checkpointer.save): the older copy of step-N is kept until the
    newer one is in place, so a leftover older copy is renamed back if step-N is absent and removed if not."""
    if not root.is_dir():
        return
    for old in root.glob(f"{REPLACED_PREFIX}step-*"):
        final = root / old.name[len(REPLACED_PREFIX):]
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entries to disk (a directory: so that a rename in it survives a power loss)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    """Every generator's state as tensors and numbers, so that it loads with torch.load(weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    def __init__(self, run_dir: Path, env: DistEnv, keep: int | None):
        self.root = run_dir / CHECKPOINT_DIR
        self.env, self.keep = env, keep
        self.last_saved_step: int | None = None

    def save(self, step: int, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], meta: dict) -> Path:
        final, tmp = self.root / f"step-{step}", self.root / f".tmp-step-{step}"
        try:
            if self.env.is_main:
                shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a save that was killed
                tmp.mkdir(parents=True)
            barrier()
            model_state, optim_state = get_state_dict(model, optimizers)
            _quiet_single_process(dcp.save, {"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
            torch.save(_rng_state(), tmp / f"rng-rank{self.env.rank}.pt")
            barrier()
            if self.env.is_main:
                self._seal(tmp, {**meta, "step": step, "world_size": self.env.world_size})
                self._put_in_place(tmp, final)
                self._prune()
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(self._no_space_message(step, model)) from None
        barrier()
        self.last_saved_step = step
        return final

    @staticmethod
    def _seal(tmp: Path, meta: dict) -> None:
        """Flush the shards, then write and flush meta.json with their manifest: a checkpoint is whole on disk
        before it is named complete."""
        for f in tmp.iterdir():
            fsync_path(f)
        (tmp / META).write_text(json.dumps({**meta, "files": manifest(tmp)}, indent=2))
        fsync_path(tmp / META)
        fsync_path(tmp)

    def _put_in_place(self, tmp: Path, final: Path) -> None:
        """Rename tmp to final. A step saved again (e.g. at a signal right after a periodic save) keeps its older
        copy under another name until the newer one is in place: at no moment is neither on disk."""
        replaced = self.root / f"{REPLACED_PREFIX}{final.name}"
        if final.exists():
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(tmp, final)
        fsync_path(self.root)
        shutil.rmtree(replaced, ignore_errors=True)

    def _no_space_message(self, step: int, model: torch.nn.Module) -> str:
        newest = complete_checkpoints(self.root.parent)
        if newest:
            needed = sum(f.stat().st_size for f in newest[-1].iterdir() if f.is_file())
        else:  # about the weights and AdamW's two moments
            needed = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
        free = shutil.disk_usage(self.root).free if self.root.exists() else 0
        return (f"no space left on the device of {self.root} while writing checkpoint step-{step}: the partial files "
                f"were removed and the older checkpoints are intact ({', '.join(p.name for p in newest) or 'none'}). "
                f"A checkpoint needs about {needed / 2**20:,.1f} MiB; {free / 2**20:,.1f} MiB are free. Free space, "
                f"lower train.keep_checkpoints, or move the run (hydra.run.dir); rerunning resumes.")

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
            _set_rng_state(torch.load(rng, weights_only=True))
        self.last_saved_step = meta["step"]
        return meta


def find_checkpoint(path: Path) -> Path:
    """The checkpoint a path names: itself (a complete step-<N> directory) or a run directory's newest that
    verifies; a damaged one is refused, naming the damaged file."""
    path = Path(os.path.abspath(os.path.expanduser(str(path))))
    if is_complete(path):
        if problem := verify(path):
            raise CheckpointError(f"checkpoint '{path}' is damaged: {problem}.")
        return path
    if STEP_DIR.match(path.name) and path.is_dir():
        raise CheckpointError(f"'{path}' is not a complete checkpoint (no {META} or .metadata); it may be "
                              "half-written.")
    found = complete_checkpoints(path)
    if not found:
        raise CheckpointError(f"'{path}' holds no complete checkpoint ({CHECKPOINT_DIR}/step-<N>): train the run with "
                              "train.ckpt_at_end=true (the default), or name a checkpoint directory.")
    for checkpoint in reversed(found):
        if (problem := verify(checkpoint)) is None:
            return checkpoint
        log.warning("checkpoint %s is damaged (%s): trying the one before it", checkpoint, problem)
    raise CheckpointError(f"every checkpoint of '{path}' is damaged; the newest: {verify(found[-1])}.")


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
