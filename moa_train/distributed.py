"""Processes: who am I, how many are we, and the few collectives the training loop needs.

`torchrun` sets RANK, WORLD_SIZE and LOCAL_RANK; without them the run is one process. gloo is
used on CPU and NCCL on GPU. Everything here is a no-op in a single process without a process
group, so the training path reads the same in both cases.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError
from .utils import launched_ranks

DIST_MODES = ("auto", "none", "ddp", "fsdp")


@dataclass(frozen=True)
class DistEnv:
    mode: str  # none | ddp | fsdp (auto resolved)
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def resolve_mode(requested: str, world_size: int) -> str:
    if requested == "auto":
        return "ddp" if world_size > 1 else "none"
    if requested == "none" and world_size > 1:
        raise ConfigError("dist.name", f"'none' cannot train {world_size} processes together (each would train "
                          "its own model).", "auto, ddp, fsdp")
    return requested


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(requested_mode: str, device_name: str, timeout_s: float = 600.0) -> DistEnv:
    """Start the process group when the run is distributed (or asks for ddp/fsdp in one process)."""
    rank, world_size, local_rank = launched_ranks()
    mode = resolve_mode(requested_mode, world_size)
    device = _resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if mode != "none" and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # ddp/fsdp asked for in a plain single process
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return DistEnv(mode, rank, world_size, local_rank, device)


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":  # one GPU per process under torchrun
        return torch.device("cuda", local_rank)
    return torch.device(name)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any: all ranks must agree to stop together."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_from_all_ranks(value: str) -> list[str]:
    """Every rank's value of a string (for checks such as: do all ranks write to one run directory?)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    gathered: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
