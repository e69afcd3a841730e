"""End-to-end training through the command line, and the run contract (metrics.jsonl, summary.json)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import compose_config, read_jsonl, run_cli
from moa_train.ffn import FFN_REGISTRY
from moa_train.train import run

ROW_KEYS = {"step", "tokens", "lr", "train_loss", "tokens_per_s", "elapsed_s"}


@pytest.mark.slow
def test_tiny_swiglu_60_steps_val_loss_falls(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("model=tiny", "ffn=swiglu", "train.max_steps=60", "train.eval_every=20",
                     f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in train_rows] == list(range(1, 61))
    for row in rows:
        assert ROW_KEYS <= row.keys()
        assert row["tokens"] == row["step"] * 16 * 256
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 20, 40, 60]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_loss"] == evals[-1]["val_loss"]
    assert summary["status"] == "completed" and summary["steps"] == 60
    assert summary["val_loss"] < 0.9 * summary["initial_val_loss"]
    assert summary["params"]["total"] == 1_901_696
    assert summary["config"]["ffn"]["name"] == "swiglu" and summary["wall_s"] > 0
    # the schedule was followed: warmup peak, cosine down to min_lr_ratio * lr on the last step
    assert max(r["lr"] for r in train_rows) == pytest.approx(1e-3)
    assert train_rows[-1]["lr"] == pytest.approx(1e-4)
    assert (run_dir / "train.log").exists()


@pytest.mark.slow
def test_a_compiled_moa_run_compiles_one_graph_for_training_and_one_for_every_pass_without_gradients(tmp_path):
    """The step-0 loss, the evaluations and the gate recordings all run a compiled block's one no-gradient graph
    (the first loss inside a dropped gate recording): a third graph would cost about 1 s per architecture and
    process, which a sweep pays for every variant it meets."""
    import torch

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = compose_config("model=tiny", "ffn=qd_moa", "train.compile=true", "train.max_steps=2", "train.batch_size=2",
                         "train.seq_len=32", "train.eval_every=2", "train.eval_tokens=128", "train.progress=false")
    summary = run(cfg, tmp_path)
    assert summary["status"] == "completed"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["train_loss"] > 0


def test_step_zero_row_measures_the_untrained_model_without_disturbing_training(tmp_path):
    """Step 0 holds the untrained model's train loss (first step's samples) and val loss; measuring them changes
    nothing that follows, MoE load balancing included (tiny_moe balances with per-expert biases)."""
    rows = {}
    for at_start in ("true", "false"):
        run_dir = tmp_path / at_start
        result = run_cli("model=tiny_moe", "ffn=swiglu", "train.max_steps=3", "train.batch_size=4",
                         "train.eval_tokens=1024", "train.eval_every=3", f"train.eval_at_start={at_start}",
                         f"hydra.run.dir={run_dir}")
        assert result.returncode == 0, result.stderr[-3000:]
        rows[at_start] = read_jsonl(run_dir / "metrics.jsonl")
    first = rows["true"][0]
    assert first["step"] == 0 and first["tokens"] == 0
    assert first["tokens_per_s"] is None and first["grad_norm"] is None
    assert abs(first["train_loss"] - first["val_loss"]) < 0.1  # both near ln(vocabulary) before training
    assert first["lr"] == pytest.approx(rows["true"][1]["lr"])  # the first step's learning rate
    assert [r["train_loss"] for r in rows["true"][1:]] == [r["train_loss"] for r in rows["false"]]
    assert rows["true"][-1]["expert_load"] == rows["false"][-1]["expert_load"]  # counts of training steps only


def test_wandb_logger_runs_offline_and_metrics_still_written(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("model=tiny", "logger=wandb", "train.max_steps=2", "train.eval_tokens=2048",
                     "train.eval_at_start=false", "train.batch_size=4", f"hydra.run.dir={run_dir}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(read_jsonl(run_dir / "metrics.jsonl")) == 2
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1


def test_gradient_accumulation_matches_full_batch(tmp_path):
    """Same global batch, split into micro-batches or not: same losses (float32, tolerance 1e-4)."""
    losses = {}
    for micro in (8, 2):
        run_dir = tmp_path / f"micro{micro}"
        result = run_cli("model=tiny", "train.max_steps=3", "train.batch_size=8",
                         f"train.micro_batch_size={micro}", "train.eval_tokens=1024", "train.eval_every=3",
                         "train.eval_at_start=false", f"hydra.run.dir={run_dir}")
        assert result.returncode == 0, result.stderr[-3000:]
        losses[micro] = [r["train_loss"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert losses[8] == pytest.approx(losses[2], rel=1e-4)


def test_console_script_dry_run_prints_only_json():
    script = Path(sys.executable).parent / "moa-train"
    if not script.exists():
        pytest.skip("console script not installed next to this interpreter")
    result = subprocess.run([str(script), "model=tiny", "dry_run=true"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # the whole of stdout is one JSON object
    assert report["total"] == 1_901_696 and report["model"] == "tiny"


@pytest.mark.parametrize("ffn", sorted(FFN_REGISTRY))
def test_every_ffn_variant_learns_on_tiny(ffn, tmp_path):
    kernel = ["ffn.kernel=eager"] if FFN_REGISTRY[ffn].mixture else []  # compiled path: test_mixtures
    cfg = compose_config("model=tiny", f"ffn={ffn}", *kernel, "train.max_steps=12", "train.batch_size=8",
                         "train.eval_every=12", "train.eval_tokens=2048", "train.progress=false",
                         "optim.lr=3e-3")
    summary = run(cfg, tmp_path)
    assert summary["status"] == "completed"
    assert summary["val_loss"] < summary["initial_val_loss"] - 0.5, summary
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    if FFN_REGISTRY[ffn].mixture:
        # the mean coefficient per dictionary entry per layer is logged at every evaluation
        for row in (r for r in rows if "val_loss" in r):
            mix = row["mix"]
            assert sorted(mix) == [f"layers.{i}" for i in range(cfg.model.n_layers)]
            n_entries = len(_mixture_entry_names(cfg))
            assert all(len(entries) == n_entries for entries in mix.values())
    else:
        assert all("mix" not in r for r in rows)


def _mixture_entry_names(cfg):
    from moa_train.ffn import build_ffn

    return build_ffn(cfg.ffn, cfg.model.dim, 384).entry_names()
