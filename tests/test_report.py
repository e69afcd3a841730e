"""Sweeps through `moa-train -m` and `moa-report` on them; the comparison logic on synthetic runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from moa_train.report import Run, compare


def _summaries(sweep: Path) -> dict[str, list[float]]:
    losses: dict[str, list[float]] = {}
    for path in sweep.glob("*/summary.json"):
        summary = json.loads(path.read_text())
        if summary["status"] == "completed":
            losses.setdefault(summary["config"]["ffn"]["name"], []).append(summary["val_loss"])
    return losses


@pytest.mark.slow
def test_sweep_then_report(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("-m", "model=tiny", "ffn=swiglu,one_moa", "optim.lr=1e-3,3e-3", "ffn.kernel=eager",
                     "train.max_steps=6", "train.batch_size=4", "train.seq_len=64", "train.eval_tokens=1024",
                     "train.eval_every=3", "train.progress=false", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(runs) == 4
    # one run that did not finish (killed before its summary) and one that failed
    unfinished = tmp_path / "sweep" / "9_unfinished"
    shutil.copytree(runs[0], unfinished)
    (unfinished / "summary.json").unlink()
    failed = tmp_path / "sweep" / "10_failed"
    failed.mkdir()
    (failed / "summary.json").write_text(json.dumps({"status": "failed", "error": "DataError: boom"}))

    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "moa_train.report", str(sweep), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    [group] = report["groups"]
    assert (group["model"], group["budget"]) == ("tiny", "6 steps")
    best = {v["variant"]: v for v in group["variants"]}
    for ffn, losses in _summaries(sweep).items():
        assert best[ffn]["terminal_loss"] == min(losses)  # one seed: the best LR's loss is the minimum
        assert sorted(float(lr) for lr in best[ffn]["by_lr"]) == [1e-3, 3e-3]
    assert best["swiglu"]["relative"] == 0.0
    assert best["one_moa"]["relative"] == pytest.approx(
        (best["one_moa"]["terminal_loss"] - best["swiglu"]["terminal_loss"]) / best["swiglu"]["terminal_loss"])
    problems = {Path(p["path"]).name: p["status"] for p in report["problems"]}
    assert problems == {"9_unfinished": "unfinished", "10_failed": "failed"}
    text = (out / "report.md").read_text()
    assert "| one_moa |" in text and "9_unfinished" in text and "DataError: boom" in text
    assert len(list(out.glob("*.png"))) >= 2
    for name in group["plots"]:
        assert (out / name).stat().st_size > 10_000  # a real figure, not an empty canvas


def _run(ffn, lr, seed, loss, model="m", params=100, status="completed"):
    config = {"ffn": {"name": ffn}, "optim": {"lr": lr, "name": "adamw"}, "train": {"seed": seed, "max_steps": None},
              "budget": {"tokens_per_param": 20}, "model": {"name": model}, "schedule": {"name": "cosine"}}
    summary = {"status": status, "val_loss": loss, "params": {"total": params}, "tokens": 2000}
    return Run(Path(f"/runs/{ffn}-{lr}-{seed}"), status, config, summary)


def test_best_lr_is_chosen_on_the_seed_mean_and_spread_is_judged():
    runs = [
        _run("swiglu", 1e-3, 0, 3.00), _run("swiglu", 1e-3, 1, 3.02),
        _run("swiglu", 2e-3, 0, 2.95), _run("swiglu", 2e-3, 1, 3.10),  # one lucky seed, worse mean
        _run("qd_moa", 1e-3, 0, 2.99), _run("qd_moa", 1e-3, 1, 3.01),
        _run("qd_moa", 2e-3, 0, 2.90), _run("qd_moa", 2e-3, 1, 2.92),
        _run("qd_moa", 4e-3, 0, float("nan"), status="diverged"),
        _run("relu2", 1e-3, 0, 3.20), _run("moa1", 1e-3, 0, 3.10),
    ]
    [table] = compare(runs).values()
    swiglu, qd = table["swiglu"], table["qd_moa"]
    assert swiglu.best_lr == 1e-3 and swiglu.mean == pytest.approx(3.01)
    assert qd.best_lr == 2e-3 and qd.losses == [2.90, 2.92] and qd.lr_at_edge  # 4e-3 diverged: not in the grid
    assert qd.relative == pytest.approx((2.91 - 3.01) / 3.01)
    assert qd.separated is True  # [2.90, 2.92] lies below [3.00, 3.02]
    assert table["moa1"].baseline == "relu2" and table["moa1"].relative == pytest.approx(-0.1 / 3.2)
    assert list(table) == ["relu2", "moa1", "swiglu", "qd_moa"]  # each baseline leads its family


def test_overlapping_seed_ranges_are_not_called_a_win():
    runs = [_run("swiglu", 1e-3, s, loss) for s, loss in enumerate((3.00, 3.05))] + \
           [_run("one_moa", 1e-3, s, loss) for s, loss in enumerate((2.99, 3.02))]
    [table] = compare(runs).values()
    assert table["one_moa"].relative < 0 and table["one_moa"].separated is False


def test_groups_keep_sizes_and_budgets_apart():
    runs = [_run("swiglu", 1e-3, 0, 3.0, model="small"), _run("swiglu", 1e-3, 0, 2.5, model="large")]
    groups = compare(runs)
    assert sorted(g[0] for g in groups) == ["large", "small"]


def test_report_cli_errors(tmp_path):
    for args in ([str(tmp_path / "missing")], [str(tmp_path)]):
        done = subprocess.run([sys.executable, "-m", "moa_train.report", *args], capture_output=True, text=True)
        assert done.returncode == 2 and "Traceback" not in done.stderr


def test_sweep_presets_compose():
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="moa_train.conf", version_base="1.3"):
        for name in ("paper", "cpu_study"):
            cfg = compose(config_name="config", overrides=[f"sweep={name}"], return_hydra_config=True)
            params = cfg.hydra.sweeper.params
            assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
            assert "swiglu" in params.ffn and "qd_moa" in params.ffn and len(params["optim.lr"].split(",")) >= 3
            assert len(params["train.seed"].split(",")) >= 2
    assert len(cfg.hydra.sweeper.params.model.split(",")) >= 3  # the CPU study spans three sizes
