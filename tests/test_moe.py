"""Llama-MoE: dispatch against naive references, balancing, presets, bad input, training."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config, read_jsonl, run_cli
from moa_train.budget import count_parameters
from moa_train.config import validate_config
from moa_train.errors import ConfigError
from moa_train.model import Transformer
from moa_train.moe import MoE, expert_load_statistics, grouped_mm, update_load_balance
from moa_train.moe.reference import per_expert_loop
from moa_train.train import run


def moe_cfg(**overrides):
    base = {"n_experts": 6, "top_k": 2, "n_shared_experts": 1, "expert_hidden": 8, "score": "sigmoid",
            "renormalize": True, "route_scale": 1.0, "bias_update_coef": 1e-3, "aux_loss_coef": 0.0,
            "grouped_mm": "loop"}
    return OmegaConf.create({**base, **overrides})


def ffn_cfg(name):
    return OmegaConf.create({"name": name, "dict": None, "up_dict": None, "gate": "tanh", "gate_bias": True,
                             "gate_groups": 1, "init": "uniform", "kernel": "eager", "gate_init_std": 0.0,
                             "match_params_of": None})


def make_moe(ffn="qd_moa", dim=12, **overrides) -> MoE:
    torch.manual_seed(0)
    moe = MoE(dim, moe_cfg(**overrides), ffn_cfg(ffn), multiple_of=4).double()
    moe.reset_parameters(0.3, 0.3)
    for p in moe.parameters():  # gates and coefficients away from their symmetric start
        p.data.add_(0.05 * torch.randn_like(p))
    return moe


def per_token_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: out_n = sum_j w_nj expert_{e_nj}(x_n) + shared(x_n)."""
    weights, experts, _ = moe.router(x)
    rows = []
    for n in range(x.shape[0]):
        y = sum(weights[n, j] * moe.experts.forward_expert(x[n:n + 1], int(experts[n, j]))[0]
                for j in range(experts.shape[1]))
        if moe.shared is not None:
            y = y + moe.shared(x[n:n + 1])[0]
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("ffn", ["swiglu", "relu2", "la1", "bi_moa", "qd_moa"])
@pytest.mark.parametrize("top_k, shared", [(1, 0), (4, 0), (4, 1)])
def test_dispatch_equals_per_token_reference_forward_and_backward(ffn, top_k, shared):
    moe = make_moe(ffn, top_k=top_k, n_shared_experts=shared)
    x = torch.randn(20, 12, dtype=torch.float64, requires_grad=True)
    out = moe(x)
    ref = per_token_reference(moe, x)
    assert torch.allclose(out, ref, atol=1e-12)
    grad = torch.randn_like(out)
    params = [p for p in moe.parameters() if p.requires_grad]
    got = torch.autograd.grad(out, [x, *params], grad, allow_unused=True)
    want = torch.autograd.grad(ref, [x, *params], grad, allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not g.any()
        else:
            assert torch.allclose(g, w, atol=1e-10)
    names = [n for n, p in moe.named_parameters() if p.requires_grad]
    router_grad = got[1 + names.index("router.weight")]
    assert router_grad is not None and router_grad.abs().sum() > 0  # the routing weights are trained


def test_grouped_paths_agree_and_handle_empty_experts():
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 0, 2])
    x = torch.randn(10, 8, requires_grad=True)  # torch._grouped_mm wants 16-byte rows
    w = torch.randn(5, 4, 8, requires_grad=True)
    results = {}
    for backend in ("loop", "torch"):
        y = grouped_mm(x, w, counts, backend)
        y.sum().backward()  # a zero-stride gradient, which torch._grouped_mm refuses unless made contiguous
        results[backend] = (y.detach(), x.grad.clone(), w.grad.clone())
        x.grad = w.grad = None
    expected = torch.cat([x[s:s + c] @ w[e].T for e, (s, c) in enumerate(zip([0, 3, 3, 8, 8], counts.tolist()))])
    for y, _, _ in results.values():
        assert torch.allclose(y, expected, atol=1e-5)
    for a, b in zip(results["loop"], results["torch"]):
        assert torch.allclose(a, b, atol=1e-5)
    assert results["loop"][2][1].abs().sum() == 0  # an expert without tokens gets no gradient


def test_gathered_rows_equal_the_repeated_layout_bitwise_forward_and_backward():
    """gather_tokens builds x[order // k] in one copy; it must equal the repeated layout indexed by `order`,
    and its gradient the repeated layout's (summed over each token's k rows), bit for bit in float32."""
    from moa_train.moe import gather_tokens, sort_by_expert

    torch.manual_seed(0)
    x = torch.randn(64, 24, requires_grad=True)
    experts = torch.stack([torch.randperm(8)[:4] for _ in range(64)])
    dispatch = sort_by_expert(experts, 8)
    grad = torch.randn(64 * 4, 24)
    got = gather_tokens(x, dispatch)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    want = x.repeat_interleave(4, dim=0)[dispatch.order]
    (want_grad,) = torch.autograd.grad(want, x, grad)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
    assert got_grad.abs().sum() > 0
    transposed = torch.randn(24, 64 * 4).t()  # an incoming gradient that is not contiguous
    assert torch.equal(torch.autograd.grad(gather_tokens(x, dispatch), x, transposed)[0],
                       torch.autograd.grad(x.repeat_interleave(4, dim=0)[dispatch.order], x, transposed)[0])


def test_naive_per_expert_loop_matches_grouped_path():
    moe = make_moe("qd_moa", top_k=4)
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    assert torch.allclose(moe(x), per_expert_loop(moe, x), atol=1e-12)


def test_bias_balancing_evens_out_a_skewed_router():
    torch.manual_seed(0)
    moe = MoE(16, moe_cfg(n_experts=8, top_k=2, bias_update_coef=0.002), ffn_cfg("swiglu"), multiple_of=4)
    moe.reset_parameters(0.02, 0.02)
    with torch.no_grad():  # a router that sends every token to experts 0 and 1
        moe.router.weight[:2] += 0.2
    held_out = torch.randn(2048, 16) + 1.0

    def max_over_mean() -> float:
        moe.step_load.zero_()
        with torch.no_grad():
            moe(held_out)
        load = moe.step_load.clone()
        moe.step_load.zero_()
        return (load.max() / load.mean()).item()

    before = max_over_mean()
    assert before == 4.0  # all assignments on 2 of 8 experts
    for _ in range(300):  # a training batch per update, as after each optimizer step
        with torch.no_grad():
            moe(torch.randn(256, 16) + 1.0)
        moe.update_bias()
    after = max_over_mean()
    assert after < 1.5, after
    assert abs(moe.router.expert_bias.mean().item()) < 1e-6  # mean-centred
    stats = expert_load_statistics(torch.nn.ModuleDict({"ffn": moe}))
    assert stats["ffn"]["max"] >= 1.0 >= stats["ffn"]["min"]
    assert moe.logged_load.sum() == 0  # read and reset


def test_aux_loss_is_one_for_a_uniform_router_and_trains_it():
    moe = MoE(8, moe_cfg(n_experts=4, top_k=2, aux_loss_coef=1.0), ffn_cfg("swiglu"), multiple_of=4)
    moe.reset_parameters(0.02, 0.02)
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(torch.randn(64, 8))
    # f_e = 1/E and P_e = 1/E for every expert: E * sum f P = 1
    assert moe.aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        moe.router.weight.normal_()
    moe(torch.randn(64, 8))
    moe.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name, total, active", [("moe_0.25b", 0.25e9, 0.11e9), ("moe_0.5b", 0.5e9, 0.2e9),
                                                 ("moe_1b", 1e9, 0.35e9), ("moe_2b", 2e9, 0.62e9)])
def test_presets_total_and_active_counts(name, total, active):
    cfg = compose_config(f"model={name}", "ffn=qd_moa")
    validate_config(cfg)
    assert (cfg.model.moe.n_experts, cfg.model.moe.top_k, cfg.model.moe.n_shared_experts) == (32, 4, 1)
    with torch.device("meta"):
        counts = count_parameters(Transformer(cfg.model, cfg.ffn))
    assert abs(counts["total"] / total - 1) < 0.10, counts
    assert abs(counts["active"] / active - 1) < 0.20, counts
    # MoA gates are per expert (33 per layer), so they weigh more than in a dense model, still O(d)
    assert counts["ffn_extra"] < 0.025 * counts["total"]


def test_cli_dry_run_moe_2b_reports_total_and_active():
    result = run_cli("model=moe_2b", "ffn=qd_moa", "dry_run=true")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert abs(report["total"] / 2e9 - 1) < 0.1 and abs(report["active"] / 0.62e9 - 1) < 0.2
    assert report["active"] < report["total"]


@pytest.mark.parametrize("overrides, key", [
    (["model.moe.top_k=40"], "model.moe.top_k"),
    (["model.moe.n_experts=0"], "model.moe.n_experts"),
    (["model.moe.bias_update_coef=-0.1"], "model.moe.bias_update_coef"),
    (["model.moe.aux_loss_coef=-1"], "model.moe.aux_loss_coef"),
    (["model.moe.score=relu"], "model.moe.score"),
])
def test_bad_moe_config_is_refused(overrides, key):
    cfg = compose_config("model=tiny_moe", *overrides)
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert info.value.key == key


def test_cli_top_k_above_experts_exits_cleanly():
    result = run_cli("model=tiny_moe", "model.moe.top_k=33", "dry_run=true")
    assert result.returncode == 2
    assert "model.moe.top_k" in result.stderr and "Traceback" not in result.stderr


def test_tiny_moe_qd_moa_learns_and_logs_expert_load(tmp_path):
    cfg = compose_config("model=tiny_moe", "ffn=qd_moa", "ffn.kernel=eager", "train.max_steps=16",
                         "train.batch_size=8", "train.seq_len=128", "train.eval_every=8", "train.eval_tokens=2048",
                         "train.progress=false", "optim.lr=3e-3")
    summary = run(cfg, tmp_path)
    assert summary["status"] == "completed"
    assert summary["val_loss"] < summary["initial_val_loss"] - 0.5, summary
    evals = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "val_loss" in r and r["step"] > 0]
    for row in evals:
        assert sorted(row["expert_load"]) == [f"layers.{i}" for i in range(4)]
        for load in row["expert_load"].values():
            assert load["max"] >= 1.0 >= load["min"] >= 0.0
        assert {"layers.0.experts", "layers.0.shared"} <= set(row["mix"])
    # the balancing bias is part of the model's state, so checkpoints carry it
    assert "layers.0.ffn.router.expert_bias" in Transformer(cfg.model, cfg.ffn).state_dict()


def test_update_load_balance_moves_biases_of_every_layer():
    cfg = compose_config("model=tiny_moe", "ffn=swiglu")
    model = Transformer(cfg.model, cfg.ffn)
    model.init_weights()
    model(torch.randint(0, 4096, (2, 32)))
    update_load_balance(model)
    for block in model.layers:
        assert block.ffn.router.expert_bias.abs().sum() > 0
        assert block.ffn.step_load.sum() == 0 and block.ffn.logged_load.sum() == 2 * 32 * 4


def test_the_peers_benchmarks_mixtral_arms_are_the_same_block():
    """benchmarks/peers.py times moa-train's block set up as Mixtral's against transformers' Mixtral block: given
    the same weights, both compute the same output and input gradient (so the ratio compares like with like)."""
    pytest.importorskip("transformers")
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("peers", Path(__file__).parents[1] / "benchmarks" / "peers.py")
    peers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peers)
    ours, theirs = peers.moe_block("ours-mixtral"), peers.moe_block("hf-mixtral")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    hidden = peers.MOE_DIMS["expert_hidden"]
    with torch.no_grad():
        ours.router.weight.copy_(theirs.gate.weight)
        ours.experts.w1.weight.copy_(theirs.experts.gate_up_proj[:, :hidden])  # gate
        ours.experts.w2.weight.copy_(theirs.experts.gate_up_proj[:, hidden:])  # up
        ours.experts.output_projection.weight.copy_(theirs.experts.down_proj)
    x = torch.randn(1, 512, peers.MOE_DIMS["dim"], generator=torch.Generator().manual_seed(0))
    grads = []
    for block in (ours, theirs):
        xi = x.clone().requires_grad_()
        out = block(xi)
        out.pow(2).sum().backward()
        grads.append((out.detach(), xi.grad))
    (out_ours, grad_ours), (out_theirs, grad_theirs) = grads
    assert out_theirs.abs().max() > 0.01
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-4, atol=1e-6)
