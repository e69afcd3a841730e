"""Trains a toy model for a few steps with Muon + AdamW and saves every parameter (full tensors).

    torchrun --standalone --nproc_per_node=2 tests/dist_muon_worker.py {ddp,fsdp} OUT_DIR
    python tests/dist_muon_worker.py single OUT_DIR   (or `train("single")` in-process)

The toy model carries the reference Muon's distributed failure modes: matrices with odd dim 0 (uneven
FSDP shards), a [1, 15] head (one rank holds no rows), a [3, 8, 6] expert stack (odd expert count), an
odd number (5) of Muon params, and 1-D biases, which go to AdamW. Each rank takes its half of the global
batch, so DDP/FSDP gradient averaging is exercised. In fsdp mode the optimizer state also takes a
torch.distributed.checkpoint save/load round trip, checked by replaying a 4th step.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from moa_train.muon import Muon  # noqa: E402

STEPS, BATCH = 3, 8


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 7)
        self.gate = nn.Linear(6, 3, bias=False)
        self.experts = nn.Parameter(torch.randn(3, 8, 6) / 6**0.5)
        self.head = nn.Linear(15, 1, bias=False)

    def forward(self, x):
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        e = torch.tanh(torch.einsum("bi,eoi->beo", x, self.experts))
        mix = (torch.softmax(self.gate(x), -1)[..., None] * e).sum(1)
        return self.head(torch.cat([h, mix], -1)).sum(-1)  # not squeeze: FSDP2 warns about view outputs


def build(mode: str):
    torch.manual_seed(0)
    model = Toy()
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for sub in (model.a, model.b, model.head):
            fully_shard(sub)
        fully_shard(model)  # the root holds gate and experts
    names = dict(model.named_parameters())
    matrices = [p for p in names.values() if p.ndim >= 2]
    muon = Muon(matrices, lr=0.05, weight_decay=0.1, update_scale="match_adamw", ns_dtype=torch.float32)
    adamw = torch.optim.AdamW([p for p in names.values() if p.ndim < 2], lr=0.01)
    if mode == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    return model, muon, adamw


def batch(step: int, rank: int, world: int):
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, generator=g)
    n = BATCH // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def train_step(model, opts, step, rank, world):
    x, y = batch(step, rank, world)
    (model(x) - y).pow(2).mean().backward()
    for opt in opts:
        opt.step()
        opt.zero_grad(set_to_none=True)


def full_params(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.removeprefix("module.")] = t.detach().clone()
    return out


def checkpoint_round_trip(model, muon, adamw, ckpt_dir, rank, world):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.tensor import DTensor

    assert all(isinstance(s["momentum_buffer"], DTensor) for s in muon.state.values())
    msd, osd = get_state_dict(model, (muon, adamw))
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt_dir)
    train_step(model, (muon, adamw), STEPS, rank, world)
    expected = full_params(model)

    model2, muon2, adamw2 = build("fsdp")
    msd2, osd2 = get_state_dict(model2, (muon2, adamw2))  # initialises the optimizer state (a zero-grad step)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, checkpoint_id=ckpt_dir)
    set_state_dict(model2, (muon2, adamw2), model_state_dict=state["model"], optim_state_dict=state["optim"])
    train_step(model2, (muon2, adamw2), STEPS, rank, world)
    for name, t in full_params(model2).items():
        assert torch.equal(t, expected[name]), f"{name} differs after the checkpoint round trip"


def train(mode: str, out_dir: str | None = None) -> dict[str, torch.Tensor]:
    rank, world = (dist.get_rank(), dist.get_world_size()) if mode != "single" else (0, 1)
    model, muon, adamw = build(mode)
    for step in range(STEPS):
        train_step(model, (muon, adamw), step, rank, world)
    params = full_params(model)
    if out_dir is not None:
        torch.save(params, os.path.join(out_dir, f"{mode}_rank{rank}.pt"))
    if mode == "fsdp":
        checkpoint_round_trip(model, muon, adamw, os.path.join(out_dir, "ckpt"), rank, world)
    return params


if __name__ == "__main__":
    mode, out_dir = sys.argv[1], sys.argv[2]
    if mode == "single":
        train(mode, out_dir)
        sys.exit()
    dist.init_process_group("gloo")
    train(mode, out_dir)
    dist.barrier()
    dist.destroy_process_group()
    # torch 2.13: after torch.optim (via torch._dynamo) or fully_shard, destroy_process_group leaves the gloo
    # group's threads alive, and interpreter teardown then aborts now and then ("terminate called without
    # an active exception", SIGABRT on rank 0). Everything is saved and the group is down: skip the teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
