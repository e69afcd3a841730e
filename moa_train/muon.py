"""Muon (MomentUm Orthogonalized by Newton-Schulz) that gives the single-process result under DDP and FSDP2.

The math is that of the reference package `muon-optimizer` (`muon.zeropower_via_newtonschulz5`,
`muon.muon_update`), with the Newton-Schulz dtype as an argument: bfloat16 (the reference's choice) on
GPU, float32 on CPU, where bfloat16 matmuls are ~100x slower. Its distributed classes are not used:
they all_gather whole parameters, which fails for DTensors and for matrices whose shapes differ
across ranks.

How `Muon.step` distributes the work, per parameter kind (a matrix is never orthogonalised shard by shard):

* plain tensor, no process group (or world size 1): `muon_update` locally.
* plain tensor with an initialised process group of size > 1 (DDP): the parameter is assumed full and
  replicated with averaged grads. Every rank updates the momentum (so the state stays replicated and
  any rank can checkpoint it); whole matrices are assigned to owner ranks, balanced by Newton-Schulz
  cost, identically on every rank; the owner orthogonalises and updates the parameter, then an async
  `broadcast` from the owner (any shape) brings every replica to the same value.
* DTensor `Shard(0)` on a 1-D mesh (FSDP2), 2-D: each rank updates its momentum rows and forms its rows
  of the Nesterov update, pads them to ceil(dim0 / world) rows (gloo needs equal sizes; a rank may
  hold no rows), casts them to the Newton-Schulz dtype (exact: the iteration casts first anyway) and
  `gather`s them to the owner; the owner trims, orthogonalises the full matrix and `scatter`s padded
  row chunks back; each rank applies its own rows. Gathers, then scatters, are issued async in one
  fixed order on every rank.
* DTensor `Shard(0)`, ndim >= 3 (a stack of expert matrices [E, d, m]): each rank holds whole
  matrices, so they are orthogonalised locally, with no communication.

Grads must be None on all ranks or on none (skipped params are skipped everywhere). Momentum buffers
are `zeros_like(param)`, hence DTensors under FSDP2, which torch.distributed.checkpoint saves and loads.

FSDP2 on CPU/gloo: works in torch 2.13 with plain float32 params, including the ReduceOp.AVG
reduce-scatter FSDP2 picks for float32 grads and uneven (even empty) shards; no workaround is needed.
One gloo quirk, not Muon's: once torch.optim (through torch._dynamo) or fully_shard has run, the group outlives
destroy_process_group, and interpreter teardown then SIGABRTs now and then ("terminate called without an active
exception"); tests/dist_muon_worker.py ends with os._exit(0) after destroy_process_group.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch < 2.5
    from torch.distributed._tensor import DTensor, Shard

UPDATE_SCALES = ("spectral", "match_adamw")
_NS_COEFFS = (3.4445, -4.7750, 2.0315)  # the reference's quintic coefficients


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximate U V^T of G = U S V^T over the last two dims (leading dims are a batch), in `dtype`.

    Op for op the reference iteration, so with dtype=bfloat16 the result equals `muon.zeropower_via_newtonschulz5`.
    As there, the singular values come out roughly in [0.5, 1.5], not exactly 1.
    """
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix or a stack of matrices, got shape {tuple(G.shape)}")
    a, b, c = _NS_COEFFS
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


def update_scale_factor(rows: int, cols: int, scale: str = "spectral", rms: float = 0.2) -> float:
    if scale == "spectral":  # the reference: sqrt(max(1, fan_out / fan_in))
        return max(1.0, rows / cols) ** 0.5
    if scale == "match_adamw":  # Moonlight: orthogonal matrices have RMS ~ 1/sqrt(max(rows, cols))
        return rms * max(rows, cols) ** 0.5
    raise ValueError(f"update scale must be one of {UPDATE_SCALES}, got {scale!r}")


def _nesterov(grad: torch.Tensor, momentum: torch.Tensor, beta: float, nesterov: bool) -> torch.Tensor:
    momentum.lerp_(grad, 1 - beta)
    return grad.lerp(momentum, beta) if nesterov else momentum  # out of place: the reference mutates grad


def _orthogonalize(update, ns_steps, dtype, scale, rms):
    X = zeropower_via_newtonschulz5(update, ns_steps, dtype)
    # scaled in the Newton-Schulz dtype, as the reference does (bitwise equality in bfloat16)
    return X.mul_(update_scale_factor(update.size(-2), update.size(-1), scale, rms))


def muon_update(grad: torch.Tensor, momentum: torch.Tensor, beta: float = 0.95, ns_steps: int = 5,
                nesterov: bool = True, dtype: torch.dtype = torch.bfloat16, scale: str = "spectral",
                rms: float = 0.2) -> torch.Tensor:
    """The reference `muon_update` (momentum updated in place) without mutating `grad`; result in `dtype`.

    Leading dims are a batch of matrices (the reference flattens 4-D conv filters instead; not needed here).
    """
    return _orthogonalize(_nesterov(grad, momentum, beta, nesterov), ns_steps, dtype, scale, rms)


def assign_owners(costs: list[float], world: int) -> list[int]:
    """Greedy longest-processing-time assignment: deterministic, so every rank computes the same map."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners


def _ns_cost(shape: torch.Size) -> float:
    # the Newton-Schulz matmuls cost ~ numel * min(rows, cols) flops
    return math.prod(shape) * min(shape[-2], shape[-1])


class Muon(torch.optim.Optimizer):
    """Muon for hidden matrices (ndim >= 2; leading dims of 3-D+ params are a stack of matrices).

    Decoupled weight decay, then the orthogonalised Nesterov momentum: `p *= 1 - lr*wd; p -= lr * update`.
    update_scale "match_adamw" gives the update an RMS of `update_rms` (Moonlight), so AdamW's lr and
    weight decay carry over; "spectral" is the reference's sqrt(max(1, rows/cols)).
    ns_dtype None: bfloat16 for CUDA params, float32 otherwise. See the module docstring for DDP/FSDP2.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, update_scale: str = "match_adamw",
                 update_rms: float = 0.2, ns_dtype: torch.dtype | None = None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, update_scale=update_scale, update_rms=update_rms, ns_dtype=ns_dtype)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            if group["update_scale"] not in UPDATE_SCALES:
                raise ValueError(f"update_scale must be one of {UPDATE_SCALES}, got {group['update_scale']!r}")
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"Muon only takes matrices (ndim >= 2), got a parameter of shape "
                                     f"{tuple(p.shape)}; give vectors and scalars to AdamW")
        except ValueError:
            self.param_groups.pop()
            raise

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        replicated: dict[tuple, tuple] = {}  # key: group ranks -> (process group, [job])
        sharded: dict[tuple, tuple] = {}
        spread = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                job = _Job(p, state["momentum_buffer"], group)
                if isinstance(p, DTensor):
                    mesh = p.device_mesh
                    if mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                        raise NotImplementedError(f"Muon supports DTensors sharded Shard(0) on a 1-D mesh, "
                                                  f"got placements {p.placements} on a {mesh.ndim}-D mesh")
                    pg = mesh.get_group()
                    if p.ndim >= 3 or mesh.size() == 1:  # whole matrices on each rank
                        job.run_local()
                    else:
                        _bucket(sharded, pg, job)
                elif spread:
                    _bucket(replicated, None, job)
                else:
                    job.run_local()
        for pg, jobs in replicated.values():
            _step_replicated(pg, jobs)
        for pg, jobs in sharded.values():
            _step_sharded(pg, jobs)
        return loss


class _Job:
    """One parameter's step: hyperparameters and the local tensors (a DTensor's shard)."""

    def __init__(self, p, momentum, group):
        self.p, self.group, self.shape = p, group, p.shape  # a DTensor's shape is the global one
        local = (lambda t: t.to_local()) if isinstance(p, DTensor) else (lambda t: t)
        self.param, self.grad, self.momentum = local(p), local(p.grad), local(momentum)
        self.dtype = group["ns_dtype"] or (torch.bfloat16 if p.device.type == "cuda" else torch.float32)

    def nesterov(self):
        g = self.group
        return _nesterov(self.grad, self.momentum, g["momentum"], g["nesterov"])

    def orthogonalize(self, update):
        g = self.group
        return _orthogonalize(update, g["ns_steps"], self.dtype, g["update_scale"], g["update_rms"])

    def apply(self, update):
        self.param.mul_(1 - self.group["lr"] * self.group["weight_decay"])
        self.param.add_(update, alpha=-self.group["lr"])

    def run_local(self):
        self.apply(self.orthogonalize(self.nesterov()))


def _bucket(buckets, pg, job):
    key = tuple(dist.get_process_group_ranks(pg if pg is not None else dist.group.WORLD))
    buckets.setdefault(key, (pg, []))[1].append(job)


def _global(pg, rank):
    return rank if pg is None else dist.get_global_rank(pg, rank)


def _step_replicated(pg, jobs):
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    owners = assign_owners([_ns_cost(j.shape) for j in jobs], world)
    works = []
    for i in sorted(range(len(jobs)), key=lambda i: (-_ns_cost(jobs[i].shape), i)):  # same order on all ranks
        job = jobs[i]
        if owners[i] == rank:
            job.run_local()
        else:
            job.momentum.lerp_(job.grad, 1 - job.group["momentum"])  # keep the momentum replicated
        # broadcasting the parameter itself: no receive buffers, and replicas stay bitwise equal
        works.append(dist.broadcast(job.param, src=_global(pg, owners[i]), group=pg, async_op=True))
    for w in works:
        w.wait()


def _step_sharded(pg, jobs):
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    owners = assign_owners([_ns_cost(j.shape) for j in jobs], world)
    order = sorted(range(len(jobs)), key=lambda i: (-_ns_cost(jobs[i].shape), i))
    rows = {i: -(-jobs[i].shape[0] // world) for i in order}  # torch.chunk's rows per rank
    gathers = {}
    for i in order:
        job, c = jobs[i], rows[i]
        n = job.param.shape[0]
        if n != max(0, min(c, job.shape[0] - rank * c)):
            raise RuntimeError(f"unexpected shard of {n} rows for a {tuple(job.shape)} parameter on rank {rank}")
        update = job.nesterov()
        send = update.new_zeros((c, *update.shape[1:]), dtype=job.dtype)
        send[:n] = update
        recv = [torch.empty_like(send) for _ in range(world)] if owners[i] == rank else None
        gathers[i] = (send, recv, dist.gather(send, recv, dst=_global(pg, owners[i]), group=pg, async_op=True))
    chunks = {}
    for i in order:
        send, recv, work = gathers[i]
        work.wait()
        if owners[i] == rank:
            full = torch.cat(recv)[: jobs[i].shape[0]]
            out = jobs[i].orthogonalize(full)
            padded = out.new_zeros((rows[i] * world, *out.shape[1:]))
            padded[: out.shape[0]] = out
            chunks[i] = list(padded.split(rows[i]))
    gathers.clear()
    scatters = []
    for i in order:
        recv = torch.empty((rows[i], *jobs[i].shape[1:]), dtype=jobs[i].dtype, device=jobs[i].param.device)
        work = dist.scatter(recv, chunks.get(i), src=_global(pg, owners[i]), group=pg, async_op=True)
        scatters.append((i, recv, work))
    for i, recv, work in scatters:
        work.wait()
        job = jobs[i]
        job.apply(recv[: job.param.shape[0]])
