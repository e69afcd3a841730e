"""The step's speed levers change no number: the fused head + cross-entropy (loss.py) against
F.cross_entropy, the fused AdamW against the per-tensor loop, and 50 training steps with every lever
against none of them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import read_jsonl, run_cli
from moa_train.loss import TRANSPOSED_WEIGHT_GRADIENT_MAX_WIDTH, chunk_tokens, linear_cross_entropy


def _reference(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.t()).float(), targets)


@pytest.mark.parametrize("n_tokens, chunk, width", [(96, 32, 48), (100, 32, 48), (64, 64, 48), (64, 500, 48),
                                                     (100, 32, TRANSPOSED_WEIGHT_GRADIENT_MAX_WIDTH + 16)])
def test_chunked_head_and_loss_equal_cross_entropy_with_gradients(n_tokens, chunk, width):
    """Loss, d/d(hidden) and d/d(weight) as F.cross_entropy's, with a ragged last chunk and a chunk larger
    than the batch, the weight gradient formed transposed (narrow) or not (wide); the incoming gradient
    (here 0.25, as under gradient accumulation) scales both."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(n_tokens, width, generator=generator)
    weight = torch.randn(300, width, generator=generator) * 0.5
    targets = torch.randint(0, 300, (n_tokens,), generator=generator)
    grads = []
    for loss_fn in (_reference, lambda h, w, t: linear_cross_entropy(h, w, t, chunk)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = loss_fn(h, w, targets)
        (0.25 * loss).backward()
        grads.append((loss.detach(), h.grad, w.grad))
    (ref_loss, ref_h, ref_w), (loss, grad_h, grad_w) = grads
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    torch.testing.assert_close(grad_h, ref_h, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_w, ref_w, rtol=1e-5, atol=1e-7)
    assert grad_w.is_contiguous()  # the parameter's layout, whichever way the product was formed
    assert grad_h.abs().sum() > 0 and grad_w.abs().sum() > 0


def test_chunked_loss_without_gradients_and_with_the_weight_frozen():
    generator = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(40, 16, generator=generator), torch.randn(50, 16, generator=generator)
    targets = torch.randint(0, 50, (40,), generator=generator)
    expected = _reference(hidden, weight, targets).item()
    with torch.no_grad():  # evaluation: the loss alone
        assert linear_cross_entropy(hidden, weight, targets, 16).item() == pytest.approx(expected, rel=1e-6)
    h = hidden.clone().requires_grad_()
    linear_cross_entropy(h, weight, targets, 16).backward()  # only the hidden states want a gradient
    ref = hidden.clone().requires_grad_()
    _reference(ref, weight, targets).backward()
    torch.testing.assert_close(h.grad, ref.grad, rtol=1e-5, atol=1e-7)
    assert weight.grad is None


@pytest.mark.parametrize("vocab, seq_len, device, expected", [
    (8192, 256, "cpu", 512),      # 4M logits per chunk on CPU
    (512, 128, "cpu", 8192),      # a small vocabulary: large chunks, few of them
    (32000, 2048, "cpu", 128),    # 2**22 / 32000 = 131 -> 128, which divides 2048
    (32000, 2048, "cuda", 8192),  # 2**28 / 32000 = 8388 -> 8192, four sequences
    (50257, 1000, "cpu", 50),     # 83 -> 64 -> the largest divisor of 1000 not above it
])
def test_the_automatic_chunk_tiles_every_micro_batch(vocab, seq_len, device, expected):
    chunk = chunk_tokens(None, vocab, seq_len, device)
    assert chunk == expected
    assert seq_len % chunk == 0 or chunk % seq_len == 0
    assert chunk_tokens(300, vocab, seq_len, device) == 300 and chunk_tokens(0, vocab, seq_len, device) == 0


@pytest.mark.parametrize("implementation", ["fused", "foreach"])
def test_adamw_implementations_step_as_the_per_tensor_loop(implementation):
    from moa_train.optim import _adamw

    generator = torch.Generator().manual_seed(2)
    start = [torch.randn(33, 17, generator=generator), torch.randn(17, generator=generator)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(5)]
    results = {}
    for impl in ("for-loop", implementation):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        cfg = type("Cfg", (), dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, implementation=impl))
        optimizer = _adamw([{"params": params, "weight_decay": 0.1}], cfg)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        results[impl] = params
    for a, b in zip(results["for-loop"], results[implementation]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert not torch.equal(a, torch.zeros_like(a))
    assert not torch.equal(results["for-loop"][0], start[0])  # the steps moved the weights


@pytest.mark.slow
@pytest.mark.parametrize("ffn, lr", [("swiglu", "1e-3"), ("qd_moa", "3e-4")])
def test_fifty_steps_with_every_lever_equal_fifty_without(ffn, lr, tmp_path):
    """The acceptance test of issue 16: the training losses of 50 steps, levers on (the defaults) and off,
    agree to 1e-5 relative (in fact to 2e-7 at every step here).

    qd_moa runs at lr 3e-4: at 1e-3 its tiny-model trajectory amplifies any float rounding change, even
    torch's own fused AdamW against its for-loop one, from 1e-7 at step 30 to 1e-4 at step 50 (7e-4 at
    batch 16; 1e-2 at lr 3e-3), while SwiGLU's stays at 1e-7 throughout (docs/benchmarks.md)."""
    losses = {}
    # model=tiny's heads of 32 are not padded by default (16 on CPU): padding to 64 is forced to cover that lever;
    # oneDNN products are forced too, which are the default only on a CPU that is not Intel's (linear.py)
    for name, levers in (("on", ["train.attention_min_head_dim=64", "train.cpu_linear=onednn"]),
                         ("off", ["train.loss_chunk_tokens=0", "optim.implementation=for-loop",
                                  "train.attention_min_head_dim=0", "train.attention_split_queries=false",
                                  "train.cpu_linear=blas"])):
        run_dir = tmp_path / name
        result = run_cli("model=tiny", f"ffn={ffn}", "train.max_steps=50", "train.batch_size=4", "train.seq_len=128",
                         f"optim.lr={lr}", "train.eval_every=50",
                         "train.eval_tokens=2048", "train.eval_at_start=false",
                         "train.ckpt_at_end=false", *levers, f"hydra.run.dir={run_dir}")
        assert result.returncode == 0, result.stderr[-3000:]
        losses[name] = [(r["train_loss"], r.get("val_loss")) for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert len(losses["on"]) == 50
    train_on, train_off = ([t for t, _ in losses[k]] for k in ("on", "off"))
    assert train_on == pytest.approx(train_off, rel=1e-5, abs=0)
    assert train_on[-1] < 0.9 * train_on[0]  # it trained: a comparison of 50 equal constants would prove nothing
    assert losses["on"][-1][1] == pytest.approx(losses["off"][-1][1], rel=1e-5, abs=0)
