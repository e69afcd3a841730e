"""Small helpers with no dependency on the rest of the package (nor on torch, so that the CLI starts fast):
paths, the per-machine JSON caches, dotted config keys, the ranks a launcher gave this process, and the flag
of an activation-checkpointing recomputation."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def expand_path(path: str) -> str:
    """`~` expanded, made absolute."""
    return os.path.abspath(os.path.expanduser(path))


def display_path(path) -> str:
    """A path as logs show it: relative to the working directory when inside it (committed run
    records then hold no absolute path of the machine), else absolute."""
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute)
    return absolute if relative.startswith("..") else relative


def read_machine_cache(path: Path) -> dict:
    """A per-machine cache beside the data cache (the CPU's matmul peak, inductor's vector ISA checks): {} when it
    is missing or unreadable, which costs a measurement, nothing more."""
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def write_machine_cache(path: Path, value: dict) -> None:
    """Replaced whole (a process that reads it meanwhile sees the old or the new file); one that cannot be written
    costs the next process the measurement again, nothing more."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(value, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass


def in_forked_shares(shares: int, work: Callable[[int], str]) -> list[str | None]:
    """work(0) in this process and work(1), ..., work(shares - 1) each in a forked copy of it, side by side; their
    answers (short strings) in that order, None for a copy that failed. For pure-Python work that answers in a
    line or leaves files (a sweep's config checks, a report's figures): a copy shares nothing back but its answer."""
    children, answers = [], []
    try:
        for share in range(1, shares):
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the copy: its share, its answer, and out without this process's exit handlers
                code = 1
                try:
                    os.close(read)
                    os.write(write, work(share).encode())
                    code = 0
                finally:
                    os._exit(code)
            os.close(write)
            children.append((pid, read))
        answers.append(work(0))
    finally:
        for pid, read in children:
            with os.fdopen(read) as pipe:
                answer = pipe.read()
            _, status = os.waitpid(pid, 0)
            answers.append(answer if status == 0 else None)
    return answers


def flatten(tree, prefix: str = "") -> dict[str, Any]:
    """A nested config as {'dotted.key': value}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def under(key: str, prefixes: tuple[str, ...]) -> bool:
    """Whether a dotted key is one of `prefixes` or inside one of them."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


_RECOMPUTING = [False]


@contextlib.contextmanager
def recomputing():
    """Set while activation checkpointing recomputes a block's forward in the backward pass (parallel.py), so
    that forward side effects (the MoE layer's load counts) happen once per micro-batch, not twice."""
    _RECOMPUTING[0] = True
    try:
        yield
    finally:
        _RECOMPUTING[0] = False


def in_recomputation() -> bool:
    return _RECOMPUTING[0]


def _export_submitit_ranks() -> None:
    """Jobs of Hydra's submitit launcher run one task per GPU without torchrun: set what it would."""
    if "RANK" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        return
    TorchDistributedEnvironment().export()


def launched_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun (or the submitit launcher) set them, or one process."""
    _export_submitit_ranks()
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))
