"""CUDA paths: bf16 autocast, compiled mixing kernels and compiled blocks. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config
from moa_train.ffn import FFN_REGISTRY, build_ffn
from moa_train.ffn.kernels import pair_mix, pair_mix_reference, product_mix, product_mix_reference
from moa_train.train import run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
MIXTURES = sorted(n for n, s in FFN_REGISTRY.items() if s.mixture)
DICT_A = ("silu", "gelu", "relu2", "tanh", "leaky_relu")
DICT_B = ("identity", "tanh", "silu")


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("kernel", ["eager", "compiled"])
def test_mixing_kernels_on_cuda_match_float64_reference(kernel):
    """Fresh random inputs on the GPU, bf16 and float32, against the float64 formula on the same values."""
    torch.manual_seed(1)
    n, groups, h = 4096, 1, 512
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        a = torch.randn(n, groups, h, device="cuda", dtype=dtype, requires_grad=True)
        b = torch.randn(n, groups, h, device="cuda", dtype=dtype, requires_grad=True)
        c = torch.rand(n, groups, len(DICT_A), device="cuda", dtype=dtype, requires_grad=True)
        e = torch.rand(n, groups, len(DICT_B), device="cuda", dtype=dtype, requires_grad=True)
        C = torch.rand(n, groups, len(DICT_A) * len(DICT_B), device="cuda", dtype=dtype, requires_grad=True)
        cases = [
            ((a, c, b, e), lambda a, c, b, e: product_mix(a, c, DICT_A, b, e, DICT_B, kernel=kernel),
             lambda a, c, b, e: product_mix_reference(a, c, DICT_A, b, e, DICT_B)),
            ((a, b, C), lambda a, b, C: pair_mix(a, b, C, DICT_A, DICT_B, kernel=kernel),
             lambda a, b, C: pair_mix_reference(a, b, C, DICT_A, DICT_B)),
        ]
        for inputs, fused, reference in cases:
            grad = torch.randn(n, groups, h, device="cuda", dtype=dtype)
            out = fused(*inputs)
            assert out.dtype == dtype and torch.isfinite(out).all()
            got = torch.autograd.grad(out, inputs, grad)
            ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
            ref = reference(*ref_inputs)
            want = torch.autograd.grad(ref, ref_inputs, grad.double())
            assert _rel_err(out, ref) < tol
            for g, w in zip(got, want):
                assert g.shape == w.shape and _rel_err(g, w) < tol


@pytest.mark.parametrize("name", MIXTURES)
def test_bf16_autocast_ffn_matches_float32(name):
    torch.manual_seed(0)
    cfg = OmegaConf.create({"name": name, "dict": None, "up_dict": None, "gate": "sigmoid", "gate_bias": False,
                            "gate_groups": 1, "init": "uniform", "kernel": "auto"})
    ffn = build_ffn(cfg, dim=256, hidden=1024).cuda()
    ffn.reset_parameters(0.02, 0.02)
    x = torch.randn(8, 128, 256, device="cuda")
    want = ffn(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = ffn(x)
    assert got.dtype == torch.bfloat16
    assert _rel_err(got, want) < 2e-2


@pytest.mark.parametrize("ffn", ["swiglu", "moa1", "qd_moa"])
def test_compiled_bf16_training_on_cuda_lowers_validation_loss(ffn, tmp_path):
    cfg = compose_config("model=tiny", f"ffn={ffn}", "train.max_steps=60", "train.eval_every=60",
                         "train.eval_tokens=8192", "train.progress=false", "optim.lr=3e-3", "train.device=cuda")
    summary = run(cfg, tmp_path)
    assert summary["status"] == "completed"
    assert summary["val_loss"] < summary["initial_val_loss"] - 1.0, summary


def test_chunked_head_and_loss_under_bf16_autocast_match_the_plain_head():
    """loss.py on the GPU: under bf16 autocast the chunked loss and its gradients are those of nn.Linear +
    F.cross_entropy under the same autocast (both run the head's matmul in bf16), and float32 weights get
    float32 gradients."""
    import torch.nn.functional as F

    from moa_train.loss import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(4096, 256, device="cuda")
    weight = torch.randn(8192, 256, device="cuda") * 0.05
    targets = torch.randint(0, 8192, (4096,), device="cuda")
    results = []
    for chunked in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (linear_cross_entropy(h, w, targets, 1024) if chunked
                    else F.cross_entropy(F.linear(h, w).float(), targets))
        loss.backward()
        results.append((loss.float(), h.grad, w.grad))
    (ref_loss, ref_h, ref_w), (loss, grad_h, grad_w) = results
    assert grad_w.dtype == torch.float32 and grad_h.dtype == torch.float32
    assert abs(loss.item() - ref_loss.item()) < 1e-3 * ref_loss.item()
    assert _rel_err(grad_h, ref_h) < 2e-2 and _rel_err(grad_w, ref_w) < 2e-2
