"""Sweeps through `moa-train -m` and `moa-report` on them; the comparison logic on synthetic runs."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from moa_train.report import (
    UNTUNED,
    Run,
    compare,
    curves_figure,
    find_run_dirs,
    format_count,
    format_lr,
    group_names,
    lr_figure,
    lr_grid,
    nice_ticks,
    read_run,
    scaling_figure,
    tick_labels,
    write_report,
)


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


def test_a_failed_run_of_a_sweep_is_recorded_and_the_sweep_goes_on(tmp_path):
    sweep, out = tmp_path / "sweep", tmp_path / "report"
    result = run_cli("-m", "model=tiny", "optim.lr=-1,1e-3", "train.max_steps=2", "train.batch_size=4",
                     "train.seq_len=64", "train.eval_tokens=1024", "train.progress=false", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 2  # the sweep finished, and says that a run failed
    assert "1 run(s) of the sweep failed" in result.stderr and "Traceback" not in result.stderr
    bad_dir, good_dir = sorted(p for p in sweep.iterdir() if p.is_dir())  # ...optim.lr=-1..., ...optim.lr=0.001...
    bad, good = (json.loads((d / "summary.json").read_text()) for d in (bad_dir, good_dir))
    assert bad["status"] == "failed" and "optim.lr" in bad["error"] and bad["config"]["optim"]["lr"] == -1
    assert good["status"] == "completed"
    report = write_report([read_run(p) for p in find_run_dirs([sweep])], out, [sweep])
    assert [(p["path"], p["status"]) for p in report["problems"]] == [(str(bad_dir), "failed")]


def test_a_failure_after_completion_does_not_overwrite_the_summary(tmp_path):
    from omegaconf import OmegaConf

    from moa_train.cli import _record_failure

    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed", "val_loss": 3.0}))
    _record_failure(tmp_path, OmegaConf.create({"optim": {"lr": 1e-3}}), RuntimeError("wandb.finish failed"))
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"
    (tmp_path / "summary.json").unlink()
    _record_failure(tmp_path, OmegaConf.create({"optim": {"lr": 1e-3}}), RuntimeError("boom"))
    failed = json.loads((tmp_path / "summary.json").read_text())
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: boom" and failed["config"]["optim"]


def _run(ffn, lr, seed, loss, model="m", params=100, status="completed", corpus="shakespeare", mtime=0.0):
    config = {"ffn": {"name": ffn}, "optim": {"lr": lr, "name": "adamw"}, "train": {"seed": seed, "max_steps": None},
              "budget": {"tokens_per_param": 20}, "model": {"name": model}, "schedule": {"name": "cosine"},
              "data": {"name": corpus}}
    summary = {"status": status, "val_loss": loss, "params": {"total": params}, "tokens": 2000}
    return Run(Path(f"/runs/{ffn}-{lr}-{seed}-{mtime}"), status, config, summary, mtime=mtime)


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
    # 4e-3 diverged: never the best, but it bounds the grid from above, so 2e-3 is not at its edge
    assert qd.best_lr == 2e-3 and qd.losses == [2.90, 2.92] and not qd.lr_at_edge and qd.diverged == {4e-3: 1}
    assert swiglu.lr_at_edge  # best at the lowest rate tried
    assert qd.relative == pytest.approx((2.91 - 3.01) / 3.01)
    assert qd.separated is True  # [2.90, 2.92] lies below [3.00, 3.02]
    assert table["moa1"].baseline == "relu2" and table["moa1"].relative == pytest.approx(-0.1 / 3.2)
    assert list(table) == ["relu2", "moa1", "swiglu", "qd_moa"]  # each baseline leads its family


def test_vision_runs_compare_every_variant_with_the_vit_mlp_and_name_their_budget_in_epochs():
    runs = [_run(ffn, 1e-3, seed, loss) for ffn, loss in (("gelu", 0.40), ("qd_moa", 0.38), ("one_moa", 0.41))
            for seed in (0, 1)]
    for run in runs:
        run.config["model"]["family"] = "mae"
        run.config["budget"] = {"tokens_per_param": 20, "epochs": 10, "images": None}
    [(label, table)] = compare(runs).items()
    assert label[1] == "10 epochs"
    assert {r.baseline for r in table.values()} == {"gelu"} and table["gelu"].is_baseline
    assert not table["qd_moa"].is_baseline
    assert table["qd_moa"].relative == pytest.approx(-0.05) and table["one_moa"].relative == pytest.approx(0.025)
    assert list(table)[0] == "gelu"  # the baseline leads
    text_gelu = _run("gelu", 1e-3, 0, 3.0)  # a language model's gelu is a Type-I variant of relu2
    assert text_gelu.baseline == "relu2"


def test_overlapping_seed_ranges_are_not_called_a_win():
    runs = [_run("swiglu", 1e-3, s, loss) for s, loss in enumerate((3.00, 3.05))] + \
           [_run("one_moa", 1e-3, s, loss) for s, loss in enumerate((2.99, 3.02))]
    [table] = compare(runs).values()
    assert table["one_moa"].relative < 0 and table["one_moa"].separated is False


def test_groups_keep_sizes_and_budgets_apart():
    runs = [_run("swiglu", 1e-3, 0, 3.0, model="small"), _run("swiglu", 1e-3, 0, 2.5, model="large")]
    groups = compare(runs)
    assert sorted(g[0] for g in groups) == ["large", "small"]


def test_runs_on_other_data_are_another_group_named_by_the_difference():
    runs = [_run("swiglu", 1e-3, s, 3.0 + s / 100) for s in (0, 1)] + \
           [_run("swiglu", 1e-3, s, 2.0 + s / 100, corpus="pydocs") for s in (0, 1)]
    results = compare(runs)
    assert len(results) == 2 and all(len(t["swiglu"].losses) == 2 for t in results.values())  # not 4 "seeds"
    names = group_names(results)
    assert sorted(extra for extra, _ in names.values()) == ["data.name=pydocs", "data.name=shakespeare"]
    assert len({slug for _, slug in names.values()}) == 2  # plots do not overwrite each other


def test_a_lucky_seed_does_not_pick_an_unstable_learning_rate():
    runs = [_run("swiglu", 1e-3, s, 3.12) for s in (0, 1)] + [
        _run("swiglu", 3e-3, 0, float("nan"), status="diverged"), _run("swiglu", 3e-3, 1, 3.10)]
    [table] = compare(runs).values()
    assert table["swiglu"].best_lr == 1e-3 and table["swiglu"].diverged == {3e-3: 1}


def test_spread_is_not_judged_against_a_single_baseline_seed():
    runs = [_run("swiglu", 1e-3, 0, 3.0)] + [_run("qd_moa", 1e-3, s, 2.9 + s / 100) for s in (0, 1)]
    [table] = compare(runs).values()
    assert table["qd_moa"].relative < 0 and table["qd_moa"].separated is None
    assert table["swiglu"].separated is None  # the baseline is never compared with itself


def test_the_newer_of_two_runs_of_one_point_counts_and_the_other_is_listed(tmp_path):
    old, new = _run("swiglu", 1e-3, 0, 3.5, mtime=1.0), _run("swiglu", 1e-3, 0, 3.0, mtime=2.0)
    [table] = compare([new, old]).values()
    assert table["swiglu"].losses == [3.0]
    assert old.status == "duplicate" and str(new.path) in old.reason and new.status == "completed"
    report = write_report([old, new], tmp_path / "out", [Path("/runs")])
    assert report["problems"] == [{"path": str(old.path), "status": "duplicate", "reason": old.reason}]


def test_run_discovery_tolerates_cut_lines_and_roots_named_checkpoints(tmp_path):
    root = tmp_path / "checkpoints" / "sweep"  # a parent directory's name must not hide the runs
    run = root / "0_run"
    run.mkdir(parents=True)
    (run / "checkpoints" / "step-8").mkdir(parents=True)
    (run / "checkpoints" / "step-8" / "summary.json").write_text("{}")  # files inside a checkpoint: not a run
    config = _run("swiglu", 1e-3, 0, 3.0).config
    (run / "summary.json").write_text(json.dumps({"status": "completed", "val_loss": 3.0, "config": config}))
    (run / "metrics.jsonl").write_text('{"step": 0, "tokens": 0, "val_loss": 8.3}\n{"step": 10, "tokens": 40, "val')
    assert find_run_dirs([root]) == [run]
    read = read_run(run)
    assert read.status == "completed" and read.curve == [(0, 8.3)]


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
            if name == "paper":  # the parameter-matched controls are part of the paper's protocol
                assert {"swiglu_match_qd_moa", "relu2_match_moa1"} <= set(params.ffn.split(","))
    assert len(cfg.hydra.sweeper.params.model.split(",")) >= 3  # the CPU study spans three sizes


# ----------------------------------------------------------------------------- what the figures print


def test_counts_read_with_k_and_m_suffixes():
    assert [format_count(n) for n in (250_000, 1_200_000, 38_712, 774_144, 2e9, 0, 512)] == \
        ["250k", "1.2M", "38.7k", "774k", "2B", "0", "512"]
    assert format_count(999_999) == "1M"  # rounding up moves to the next suffix, never "1e+03k"


def test_learning_rates_read_in_short_scientific_notation():
    assert [format_lr(lr) for lr in (4e-3, 0.016, 3e-4, 1e-3, 1.25e-3)] == ["4e-3", "1.6e-2", "3e-4", "1e-3", "1.25e-3"]


def test_loss_ticks_are_round_values_inside_the_range():
    ticks = nice_ticks(3.18, 3.77)
    assert ticks == [3.2, 3.3, 3.4, 3.5, 3.6, 3.7]
    assert nice_ticks(3.5512, 3.5562) == [3.552, 3.553, 3.554, 3.555, 3.556]  # a narrow range: finer steps
    for low, high in ((0.7, 9.3), (3.23, 3.75), (2.001, 2.0049), (1e-4, 4e-4)):
        ticks = nice_ticks(low, high)
        assert 2 <= len(ticks) <= 6 and low <= ticks[0] and ticks[-1] <= high
        step = ticks[1] - ticks[0]
        mantissa = round(step / 10 ** math.floor(math.log10(step) + 1e-9), 6)  # 0.0999999 reads 1, not 9.99
        assert mantissa in (1, 2, 2.5, 5), (low, high, ticks)
    assert tick_labels([3.2, 3.4, 3.6]) == ["3.2", "3.4", "3.6"]
    assert tick_labels([3.25, 3.5, 3.75]) == ["3.25", "3.50", "3.75"]  # one number of decimals for all


def _grid_runs():
    """swiglu and qd_moa over three LRs and two seeds; qd_moa also diverged at a fourth, higher LR."""
    runs = [_run(ffn, lr, seed, loss + seed / 100 + offset)
            for ffn, offset in (("swiglu", 0.0), ("qd_moa", -0.05))
            for lr, loss in ((4e-3, 3.8), (8e-3, 3.6), (1.6e-2, 3.7)) for seed in (0, 1)]
    for run in runs:
        run.curve = [(0, 9.0), (250_000, 4.5), (500_000, 4.0), (1_200_000, run.val_loss)]
    return runs + [_run("qd_moa", 3.2e-2, 0, float("nan"), status="diverged")]


def _close(fig):
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_lr_plot_is_ticked_at_the_rates_run_and_draws_the_baseline_apart():
    [table] = compare(_grid_runs()).values()
    assert lr_grid(table) == [4e-3, 8e-3, 1.6e-2, 3.2e-2]  # the diverged rate was run too
    fig, ax = lr_figure("m", table)
    try:
        assert list(ax.get_xticks()) == [4e-3, 8e-3, 1.6e-2, 3.2e-2]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["4e-3", "8e-3", "1.6e-2", "3.2e-2"]
        assert list(ax.get_xticks(minor=True)) == []  # no unlabelled 10^-2 style minor ticks
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert len(labels) >= 2 and all(len(label.split(".")[-1]) <= 2 for label in labels)
        handles, names = ax.get_legend_handles_labels()
        lines = {name: handle.lines[0] for handle, name in zip(handles, names) if hasattr(handle, "lines")}
        baseline, variant = lines["swiglu (baseline)"], lines["qd_moa"]
        assert baseline.get_color() == "black" and baseline.get_linestyle() == "--"
        assert variant.get_color() != "black" and variant.get_linestyle() == "-"
        assert baseline.get_linewidth() > variant.get_linewidth()
        assert any("diverged" in name for name in names)
        assert UNTUNED not in ax.get_title()
    finally:
        _close(fig)


def test_curves_plot_reads_tokens_with_suffixes():
    [table] = compare(_grid_runs()).values()
    fig, ax = curves_figure("m", table)
    try:
        fig.canvas.draw()
        formatter = ax.xaxis.get_major_formatter()
        assert formatter(250_000, 0) == "250k" and formatter(1_200_000, 0) == "1.2M"
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert labels and all(label == "0" or label[-1] in "kM" for label in labels)
        assert "swiglu (baseline, lr 8e-3)" in ax.get_legend_handles_labels()[1]
        assert all(float(t.get_text()) == pytest.approx(v) for t, v in zip(ax.get_yticklabels(), ax.get_yticks()))
    finally:
        _close(fig)


def test_scaling_plot_ticks_round_losses_and_counts():
    runs = [_run(ffn, 1e-3, 0, loss, model=model, params=params) for model, params, base in
            (("small", 38_700, 3.75), ("large", 1_200_000, 3.23)) for ffn, loss in (("swiglu", base), ("qd_moa", base))]
    groups = list(compare(runs).items())
    fig, ax = scaling_figure(("20 tokens/param", "adamw", "cosine"), groups)
    try:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["small\n38.7k", "large\n1.2M"]
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert len(labels) >= 2 and all(len(label.split(".")[-1]) <= 2 for label in labels)  # not 3.749, 3.612...
        assert UNTUNED in ax.get_title()  # every point ran at one learning rate
    finally:
        _close(fig)


def test_a_one_value_lr_grid_is_flagged_as_not_tuned(tmp_path):
    runs = [_run(ffn, 1e-3, s, 3.0 + s / 100 + offset) for ffn, offset in (("swiglu", 0), ("qd_moa", -0.1))
            for s in (0, 1)]
    report = write_report(runs, tmp_path, [Path("/runs")])
    text = (tmp_path / "report.md").read_text()
    assert f"| swiglu | 0.001 ({UNTUNED}) |" in text and f"| qd_moa | 0.001 ({UNTUNED}) |" in text
    assert f"**{UNTUNED}**: every variant ran at one learning rate only (0.001)" in text
    assert [v["lr_tuned"] for v in report["groups"][0]["variants"]] == [False, False]
    [table] = compare(runs).values()
    fig, ax = lr_figure("m", table)
    try:
        assert UNTUNED in ax.get_title() and [t.get_text() for t in ax.get_xticklabels()] == ["1e-3"]
    finally:
        _close(fig)


def test_a_tuned_grid_is_not_flagged_and_a_lone_untuned_variant_is_named(tmp_path):
    runs = _grid_runs()
    write_report(runs, tmp_path, [Path("/runs")])
    text = (tmp_path / "report.md").read_text()
    assert f"({UNTUNED})" not in text and f"**{UNTUNED}**" not in text
    [table] = compare(runs + [_run("one_moa", 8e-3, 0, 3.5)]).values()
    assert table["one_moa"].lr_tuned is False and table["swiglu"].lr_tuned is True
    fig, ax = lr_figure("m", table)
    try:
        assert "one_moa (LR not tuned)" in ax.get_legend_handles_labels()[1]
        assert UNTUNED not in ax.get_title()  # the others were tuned
    finally:
        _close(fig)


@pytest.mark.parametrize("module", ["report", "prepare"])
def test_help_states_the_defaults(module, capsys):
    from importlib import import_module

    with pytest.raises(SystemExit) as exit_:
        import_module(f"moa_train.{module}").main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    if module == "report":
        assert "(default: report)" in text  # --out
    else:
        assert "JSON object (default: off" in text and "(default: none" in text  # --json, the overrides


def test_lr_tolerance_reads_half_and_twice_the_best_lr_against_the_baseline(tmp_path):
    runs = [_run("swiglu", lr, seed, loss) for lr, loss in ((1e-3, 3.10), (2e-3, 3.00), (4e-3, 3.30))
            for seed in (0, 1)]
    runs += [_run("one_moa", lr, seed, loss) for lr, loss in ((1e-3, 3.20), (2e-3, 3.02), (4e-3, 2.98))
             for seed in (0, 1)]
    runs += [_run("one_moa", 8e-3, 0, float("nan"), status="diverged")]
    [table] = compare(runs).values()
    from moa_train.report import lr_tolerance

    swiglu, moa = lr_tolerance(table["swiglu"]), lr_tolerance(table["one_moa"])
    assert swiglu == {"half": pytest.approx(0.10 / 3.00), "double": pytest.approx(0.30 / 3.00)}
    assert moa == {"half": pytest.approx(0.04 / 2.98), "double": "diverged"}
    report = write_report(runs, tmp_path, [tmp_path])
    variants = {v["variant"]: v for v in report["groups"][0]["variants"]}
    assert variants["one_moa"]["best_lr_vs_baseline"] == pytest.approx(2.0)
    text = (tmp_path / "report.md").read_text()
    assert "| one_moa | 0.004 | 2x | +1.34% | diverged | swiglu at 0.002: +3.33% / +10.00% |" in text


def test_lr_tolerance_leaves_out_rates_that_were_not_run():
    runs = [_run("swiglu", 1e-3, 0, 3.0), _run("swiglu", 3e-3, 0, 3.1)]
    [table] = compare(runs).values()
    from moa_train.report import lr_tolerance

    assert lr_tolerance(table["swiglu"]) == {"half": None, "double": None}


def test_the_report_draws_the_downstream_table(tmp_path):
    from moa_train.report import downstream_lines

    runs = [_run("swiglu", 1e-3, 0, 3.0), _run("qd_moa", 1e-3, 0, 2.9)]
    for run, scores in zip(runs, ({"arc_challenge": 0.20, "winogrande": 0.50}, {"arc_challenge": 0.22,
                                                                                  "winogrande": 0.52})):
        run.path = tmp_path / run.path.name
        run.path.mkdir()
        rows = [{"task": t, "metric": m, "value": v + (0.01 if m == "acc_norm" else 0), "num_fewshot": 0}
                for t, v in scores.items() for m in (("acc", "acc_norm") if t == "arc_challenge" else ("acc",))]
        (run.path / "eval.json").write_text(json.dumps({"results": rows}))
    [table] = compare(runs).values()
    lines, summary = downstream_lines(table)
    text = "\n".join(lines)
    assert "| variant | arc_challenge (acc_norm) | winogrande (acc) | average |" in text
    assert "| qd_moa | 23.00 | 52.00 | 37.50 |" in text and "| swiglu | 21.00 | 50.00 | 35.50 |" in text
    assert summary["qd_moa"]["average"] == pytest.approx(0.375)


def test_figures_drawn_in_forked_shares_are_those_drawn_one_by_one(tmp_path, monkeypatch):
    """The report draws its figures side by side in forked processes (matplotlib draws on one core); each file is
    byte for byte the one a single process draws, also when a forked process fails and its share is drawn again."""
    import os

    from moa_train import report

    runs = []
    for size, params in (("s", 100), ("m", 200), ("l", 400), ("xl", 800)):  # 4 x (curves, lr) + scaling: 9
        for run in _grid_runs():
            run.config["model"]["name"], run.summary["params"]["total"] = size, params
            runs.append(run)
    drawn, drawers = {}, {}
    parent = os.getpid()
    real_curves, real_save = report.curves_figure, report._save

    def save_noting_the_process(fig, path):
        with open(path.parent / "drawers", "a") as f:  # one short line: atomic
            f.write(f"{os.getpid()}\n")
        return real_save(fig, path)

    monkeypatch.setattr(report, "_save", save_noting_the_process)

    def curves_failing_in_a_fork(*args):
        if os.getpid() != parent:
            raise RuntimeError("a forked share fails")
        return real_curves(*args)

    for cores, curves in ((1, real_curves), (2, real_curves), (2, curves_failing_in_a_fork)):
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        monkeypatch.setattr(report, "curves_figure", curves)
        out = tmp_path / f"{cores}-{curves.__name__}"
        write_report(runs, out, [Path("/runs")])
        drawn[out.name] = {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}
        drawers[out.name] = set((out / "drawers").read_text().split())
    serial, *forked = drawn.values()
    assert len(serial) == 9
    assert [len(pids) for pids in drawers.values()] == [1, 2, 2]  # the failed share's process, then this one
    assert all(figures == serial for figures in forked)
