"""moa_train.muon against the reference package `muon-optimizer`, and under DDP/FSDP2 (torchrun, gloo)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import muon as ref
import pytest
import torch
import torch.nn as nn

from moa_train.muon import Muon, assign_owners, muon_update, update_scale_factor, zeropower_via_newtonschulz5

WORKER = Path(__file__).resolve().parent / "dist_muon_worker.py"
SHAPES = [(32, 64), (64, 32), (48, 48), (3, 16, 24)]


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_bf16_is_bitwise_the_reference(shape):
    G = _randn(*shape)
    ours = zeropower_via_newtonschulz5(G, 5, torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, ref.zeropower_via_newtonschulz5(G, 5))
    if G.ndim == 3:  # a stack is orthogonalised matrix by matrix
        assert torch.equal(ours, torch.stack([ref.zeropower_via_newtonschulz5(g, 5) for g in G]))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_update_bf16_is_bitwise_the_reference(shape, nesterov):
    grad, mom = _randn(*shape, seed=1), _randn(*shape, seed=2)
    ref_mom, our_mom, our_grad = mom.clone(), mom.clone(), grad.clone()
    expected = ref.muon_update(grad.clone(), ref_mom, beta=0.9, ns_steps=5, nesterov=nesterov)
    got = muon_update(our_grad, our_mom, beta=0.9, ns_steps=5, nesterov=nesterov, dtype=torch.bfloat16)
    assert torch.equal(got, expected) and torch.equal(our_mom, ref_mom)
    assert torch.equal(our_grad, grad)  # unlike the reference, grad is left alone


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_float32(shape):
    G = _randn(*shape)
    f32 = zeropower_via_newtonschulz5(G, 5, torch.float32)
    bf16 = ref.zeropower_via_newtonschulz5(G, 5).float()
    exact = zeropower_via_newtonschulz5(G.double(), 5, torch.float64)  # same iteration, exact-ish arithmetic

    def rel(x, y):
        return ((x.double() - y.double()).norm() / y.double().norm()).item()

    assert rel(f32, bf16) < 0.05  # bf16 rounding through 5 iterations: ~3% here
    assert rel(f32, exact) < 1e-5 < 1e-3 < rel(bf16, exact)
    for out in (f32, bf16):  # the reference's band, not an exact polar factor
        sv = torch.linalg.svdvals(out.double())
        assert 0.5 < sv.min() and sv.max() < 1.5


@pytest.mark.parametrize("shape", [(32, 64), (64, 32)])
def test_match_adamw_scale(shape):
    grad = _randn(*shape, seed=3)
    spectral = muon_update(grad, torch.zeros(shape), dtype=torch.float32, scale="spectral")
    matched = muon_update(grad, torch.zeros(shape), dtype=torch.float32, scale="match_adamw", rms=0.2)
    factor = 0.2 * max(shape) ** 0.5 / max(1, shape[0] / shape[1]) ** 0.5
    assert factor == pytest.approx(update_scale_factor(*shape, "match_adamw") / update_scale_factor(*shape))
    torch.testing.assert_close(matched, spectral * factor, rtol=1e-6, atol=0)
    assert 0.1 < matched.pow(2).mean().sqrt() < 0.25  # RMS ~ 0.2 x the mean singular value (~0.9)


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(8, 16, bias=False), nn.Linear(16, 5, bias=False)
        self.experts = nn.Parameter(torch.randn(3, 4, 5) / 5**0.5)

    def forward(self, x):
        return torch.einsum("bj,eoj->beo", self.l2(torch.relu(self.l1(x))), self.experts).pow(2).mean()


def _grads(model, step):
    model.zero_grad(set_to_none=True)
    model(_randn(4, 8, seed=10 + step)).backward()


def test_muon_step_equals_reference_loop():
    model, expected = Small(), Small()
    groups = [{"params": [model.l1.weight, model.experts]}, {"params": [model.l2.weight], "lr": 0.03}]
    opt = Muon(groups, lr=0.02, weight_decay=0.1, momentum=0.9, update_scale="spectral", ns_dtype=torch.bfloat16)
    lrs = {"l1.weight": 0.02, "experts": 0.02, "l2.weight": 0.03}
    moms = {n: torch.zeros_like(p) for n, p in expected.named_parameters()}
    for step in range(3):
        _grads(model, step)
        opt.step()
        _grads(expected, step)
        with torch.no_grad():
            for n, p in expected.named_parameters():
                update = ref.muon_update(p.grad.clone(), moms[n], beta=0.9)
                p.mul_(1 - lrs[n] * 0.1)
                p.add_(update, alpha=-lrs[n])
    for (n, p), q in zip(model.named_parameters(), expected.parameters()):
        assert torch.equal(p, q), n
        assert torch.equal(opt.state[p]["momentum_buffer"], moms[n]), n
    assert not torch.equal(model.l1.weight, Small().l1.weight)


def test_muon_match_adamw_step_scales_the_update():
    deltas = {}
    for scale in ("spectral", "match_adamw"):
        model = Small()
        _grads(model, 0)
        Muon(model.parameters(), lr=0.01, update_scale=scale, update_rms=0.3, ns_dtype=torch.float32).step()
        deltas[scale] = [p0 - p for p0, p in zip(Small().parameters(), model.parameters())]
    for p, spectral, matched in zip(Small().parameters(), *deltas.values()):
        rows, cols = p.shape[-2:]
        factor = 0.3 * max(rows, cols) ** 0.5 / max(1, rows / cols) ** 0.5
        torch.testing.assert_close(matched, spectral * factor, rtol=1e-4, atol=1e-7)


def test_muon_refuses_vectors_and_unknown_scales():
    with pytest.raises(ValueError, match="ndim >= 2"):
        Muon([nn.Parameter(torch.zeros(4, 4)), nn.Parameter(torch.zeros(4))])
    with pytest.raises(ValueError, match="update_scale"):
        Muon([nn.Parameter(torch.zeros(4, 4))], update_scale="rms")


def test_assign_owners_is_balanced_and_deterministic():
    costs = [5.0, 1.0, 9.0, 3.0, 3.0]
    owners = assign_owners(costs, 2)
    assert owners == assign_owners(list(costs), 2) == [1, 0, 0, 1, 1]  # 9 | 5+3 | then 3 and 1 to the lighter
    assert sorted(set(assign_owners([1.0] * 5, 4))) == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def single_process_params():
    spec = importlib.util.spec_from_file_location("dist_muon_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    params = worker.train("single")
    torch.manual_seed(0)  # as worker.build does
    return params, {n: p.detach() for n, p in worker.Toy().named_parameters()}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_distributed_equals_single_process(mode, single_process_params, tmp_path):
    """2 ranks on gloo, each on half the global batch: every param after 3 steps within 1e-5 (absolute)."""
    expected, init = single_process_params
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), mode, str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{mode}_rank{rank}.pt")
        assert got.keys() == expected.keys()
        for name, t in got.items():
            torch.testing.assert_close(t, expected[name], rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
            assert (expected[name] - init[name]).abs().max() > 1e-2, f"{name} hardly moved: the check is vacuous"
