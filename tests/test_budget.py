"""Parameter counts, presets' sizes and the token budget."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config, run_cli
from moa_train.budget import count_parameters, plan_run
from moa_train.errors import ConfigError
from moa_train.ffn import ffn_hidden_dim
from moa_train.model import Transformer
from moa_train.train import count_and_plan


def closed_form_dense(cfg) -> dict[str, int]:
    m = cfg.model
    d, v, layers = m.dim, m.vocab_size, m.n_layers
    kv = (m.n_kv_heads or m.n_heads) * (d // m.n_heads)
    hidden = ffn_hidden_dim(d, cfg.ffn.name, m.ffn_hidden, m.ffn_multiple_of)
    n_mats = 3 if cfg.ffn.name == "swiglu" else 2
    per_layer = 2 * d * d + 2 * d * kv + n_mats * d * hidden + 2 * d
    head = 0 if m.tie_embeddings else v * d
    total = v * d + head + layers * per_layer + d
    return {"total": total, "non_embedding": layers * per_layer + d}


@pytest.mark.parametrize("overrides", [
    ("model=tiny", "ffn=swiglu"), ("model=tiny", "ffn=relu2"), ("model=tiny", "model.tie_embeddings=true"),
    ("model=tiny", "model.n_kv_heads=2"), ("model=dense_0.12b", "ffn=gelu"), ("model=dense_0.5b",),
])
def test_counts_match_closed_form(overrides):
    cfg = compose_config(*overrides)
    counts, _ = count_and_plan(cfg)
    expected = closed_form_dense(cfg)
    assert counts["total"] == expected["total"]
    assert counts["non_embedding"] == expected["non_embedding"]
    assert counts["active"] == counts["total"]  # dense
    assert counts["ffn_extra"] == 0  # baselines have no gates


def test_type1_and_type2_default_widths_hold_the_same_ffn_parameters():
    assert ffn_hidden_dim(768, "relu2", None, 64) == 3072
    assert ffn_hidden_dim(768, "swiglu", None, 64) == 2048
    assert ffn_hidden_dim(768, "swiglu", 1000, 64) == 1000  # explicit width wins


@pytest.mark.parametrize("model, size", [("dense_0.12b", 0.12e9), ("dense_0.25b", 0.25e9), ("dense_0.5b", 0.5e9)])
def test_dry_run_presets_within_ten_percent(model, size):
    result = run_cli(f"model={model}", "ffn=swiglu", "dry_run=true")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert abs(report["total"] - size) / size < 0.10, report["total"]
    for key in ("total", "active", "non_embedding", "ffn_extra", "budget_tokens", "steps", "batch_size"):
        assert key in report
    assert report["budget_tokens"] == 20 * report["active"]
    assert report["steps"] == math.ceil(report["budget_tokens"] / report["tokens_per_step"])


def test_budget_scales_with_tokens_per_param_and_count():
    counts = {"total": 1000, "active": 800, "non_embedding": 500, "ffn_extra": 0}
    train = OmegaConf.create({"batch_size": 4, "seq_len": 10, "micro_batch_size": None, "max_steps": None})
    plan = plan_run(train, OmegaConf.create({"tokens_per_param": 20, "count": "active"}), counts)
    assert plan.budget_tokens == 16000 and plan.steps == 400
    plan = plan_run(train, OmegaConf.create({"tokens_per_param": 100, "count": "non_embedding"}), counts)
    assert plan.budget_tokens == 50000 and plan.steps == 1250
    train.max_steps = 7
    assert plan_run(train, OmegaConf.create({"tokens_per_param": 20, "count": "total"}), counts).steps == 7


def test_gradient_accumulation_is_derived_from_global_batch():
    counts = {"total": 1, "active": 1, "non_embedding": 1, "ffn_extra": 0}
    budget = OmegaConf.create({"tokens_per_param": 20, "count": "active"})
    train = OmegaConf.create({"batch_size": 32, "seq_len": 8, "micro_batch_size": 4, "max_steps": 1})
    plan = plan_run(train, budget, counts, world_size=2)
    assert (plan.micro_batch_size, plan.grad_accum, plan.tokens_per_step) == (4, 4, 256)
    train.micro_batch_size = 5
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        plan_run(train, budget, counts, world_size=2)
    train.micro_batch_size = None
    with pytest.raises(ConfigError, match="train.batch_size"):
        plan_run(train, budget, counts, world_size=3)


def test_tied_weights_counted_once():
    cfg = compose_config("model=tiny", "model.tie_embeddings=true")
    model = Transformer(cfg.model, cfg.ffn)
    assert model.output.weight is model.tok_embeddings.weight
    unique = sum(p.numel() for p in model.parameters())  # parameters() already de-duplicates
    assert count_parameters(model)["total"] == unique
    with torch.device("meta"):
        untied = Transformer(compose_config("model=tiny").model, cfg.ffn)
    assert count_parameters(untied)["total"] - unique == cfg.model.vocab_size * cfg.model.dim


def test_flops_per_token_and_mfu():
    from moa_train.budget import flops_per_token, mfu, peak_flops

    # untied: the embedding table is a lookup, not a matmul; the head is
    per_token = flops_per_token(active_params=1000, vocab_size=10, dim=4, n_layers=2, seq_len=8)
    assert per_token == 6 * (1000 - 40) + 12 * 2 * 4 * 8
    tied = flops_per_token(active_params=1000, vocab_size=10, dim=4, n_layers=2, seq_len=8, tied_embeddings=True)
    assert tied == 6 * 1000 + 12 * 2 * 4 * 8
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops(None) is None
    assert peak_flops(None, override_tflops=100) == 100e12
    assert mfu(1e6, 6e8, 989e12, world_size=2) == pytest.approx(1e6 * 6e8 / (2 * 989e12))
    assert mfu(1e6, 6e8, None) is None  # no MFU on CPU unless train.peak_tflops is set


def test_variants_of_a_size_get_the_baseline_budget_unless_told_otherwise():
    from moa_train.train import count_and_plan

    def plan(*overrides):
        counts, run_plan = count_and_plan(compose_config("model=dense_0.12b", *overrides))
        return counts, run_plan

    base_counts, base = plan("ffn=swiglu")
    moa_counts, moa = plan("ffn=qd_moa")
    assert moa_counts["total"] > base_counts["total"]
    assert moa.budget_tokens == base.budget_tokens == 20 * base_counts["total"] and moa.steps == base.steps
    _, own = plan("ffn=qd_moa", "budget.params_of=own")
    assert own.budget_tokens == 20 * moa_counts["total"] > base.budget_tokens
    relu_counts, relu = plan("ffn=relu2")
    _, moa1 = plan("ffn=moa1")
    assert moa1.budget_tokens == relu.budget_tokens == 20 * relu_counts["total"]  # Type-I: against relu2
