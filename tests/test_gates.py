"""What the gates learn: the recorder's sums, histograms and per-token ranking, gates.json at the end of an
MoA run, `moa-gates` on it and on a checkpoint, and the report's gate figure."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import run_cli
from moa_train.ffn import GateDetail, build_ffn, gate_entry_names, recording_gates
from moa_train.gate_report import format_tables, gate_summary, histogram_quantile

CFG = {"name": "bi_moa", "dict": None, "up_dict": None, "gate": "sigmoid", "gate_bias": True, "gate_groups": 1,
       "init": "normalized", "kernel": "eager", "gate_init_std": 0.0, "match_params_of": None}


def _gated_ffn():
    torch.manual_seed(0)
    ffn = build_ffn(OmegaConf.create(CFG), dim=6, hidden=12)
    with torch.no_grad():
        ffn.gates.weight.normal_(std=1.0)
    return ffn


def test_the_recorder_sums_equal_the_gates_it_saw():
    ffn = _gated_ffn()
    x, tokens = torch.randn(2, 50, 6), torch.randint(0, 7, (2, 50))
    detail = GateDetail(vocab_size=7, bins=20)
    with recording_gates(ffn, detail) as recorders:
        detail.tokens = tokens.flatten()
        ffn(x)
    [recorder] = recorders.values()
    gates = ffn.gates(x.view(-1, 6)).mean(1).double()  # (100, n): what the forward computed
    assert recorder.count == 100
    assert torch.allclose(recorder.sum, gates.sum(0))
    assert torch.allclose(recorder.sum_sq, (gates ** 2).sum(0))
    assert recorder.histogram.sum(1).tolist() == [100.0] * gates.shape[1]  # every token in one bin per gate
    for token in range(7):
        mask = tokens.flatten() == token
        assert recorder.token_count[token] == mask.sum()
        assert torch.allclose(recorder.token_sum[token], gates[mask].sum(0))
    assert ffn.gates.stash is None  # detached after the block


@pytest.mark.slow
def test_a_compiled_model_records_its_gates_without_a_graph_break():
    """Evaluation records the gates from inside compiled blocks: each forward pass stashes the coefficients
    as one more output of the block's graph (no break, no second graph per block), and the recordings,
    histograms and per-token sums included, are those of the same model run eagerly."""
    from conftest import compose_config
    from moa_train.builder import build_model
    from moa_train.distributed import init_distributed

    env = init_distributed("none", "cpu")
    tokens = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(3))
    recordings = {}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for compiled in (False, True):
        model = build_model(compose_config("model=tiny", "ffn=qd_moa", f"train.compile={compiled}",
                                           "ffn.gate_init_std=0.5"), env).eval()
        detail = GateDetail(vocab_size=4096, bins=10)
        with torch.no_grad(), recording_gates(model, detail) as recorders:
            for batch in tokens.split(1):
                detail.tokens = batch.flatten()
                model(batch)
                for recorder in recorders.values():
                    recorder.collect()
        recordings[compiled] = recorders
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    assert len(recordings[True]) == len(model.layers)  # one recorder per layer
    for name, eager in recordings[False].items():
        compiled = recordings[True][name]
        assert compiled.count == eager.count == tokens.numel()
        for key in ("sum", "sum_sq", "histogram", "token_sum", "token_count"):
            torch.testing.assert_close(getattr(compiled, key), getattr(eager, key), rtol=1e-5, atol=1e-6)
        assert eager.sum.std() > 0  # gates that differ by entry: a comparison of more than constants


def test_padding_rows_stay_out_of_the_recording():
    ffn = _gated_ffn()
    x = torch.randn(1, 10, 6)
    detail = GateDetail(vocab_size=3)
    with recording_gates(ffn, detail) as recorders:
        detail.tokens = torch.tensor([0, 1, 2, 0, 1, -1, -1, -1, -1, -1])
        ffn(x)
    [recorder] = recorders.values()
    assert recorder.count == 5 and recorder.token_count.sum() == 5


def test_histogram_quantiles_interpolate_inside_bins():
    edges = torch.linspace(0, 1, 11, dtype=torch.float64)
    uniform = torch.ones(1, 10, dtype=torch.float64)
    assert histogram_quantile(uniform, edges, 0.5).item() == pytest.approx(0.5)
    assert histogram_quantile(uniform, edges, 0.05).item() == pytest.approx(0.05)
    spike = torch.zeros(1, 10, dtype=torch.float64)
    spike[0, 7] = 4
    assert 0.7 <= histogram_quantile(spike, edges, 0.5).item() <= 0.8


def test_the_summary_ranks_tokens_by_their_mean_gate():
    ffn = _gated_ffn()
    # token 3 always comes with one input, token 4 with its negation: their gates sit at the two extremes
    direction = ffn.gates.weight[0].detach()
    inputs = torch.stack([direction * 3 if t == 3 else -direction * 3 if t == 4 else torch.randn(6) * 0.1
                          for t in range(5) for _ in range(6)]).unsqueeze(0)
    tokens = torch.tensor([t for t in range(5) for _ in range(6)])
    detail = GateDetail(vocab_size=5)
    with recording_gates(ffn, detail) as recorders:
        detail.tokens = tokens
        ffn(inputs)
    names = gate_entry_names(ffn)
    summary = gate_summary(recorders, names, decode=lambda i: f"tok{i}", step=7, top=2)
    [record] = summary["layers"].values()
    first = record["entries"][0]
    assert record["tokens"][first]["most"][0][0] == "tok3" and record["tokens"][first]["least"][0][0] == "tok4"
    assert record["tokens"][first]["most"][0][2] == 6  # occurrences
    assert summary["step"] == 7 and summary["tokens"] == 30
    assert all(sum(c) == 30 for c in record["histogram"]["counts"])
    text = format_tables(summary)
    assert first in text and '"tok3"' in text and "p95" in text


@pytest.mark.slow
def test_an_moa_run_writes_gates_json_and_moa_gates_prints_it(tmp_path):
    run = tmp_path / "run"
    result = run_cli("model=tiny", "ffn=one_moa", "ffn.kernel=eager", "train.max_steps=4", "train.batch_size=4",
                     "train.seq_len=64", "train.eval_tokens=2048", "train.eval_every=4", "train.progress=false",
                     f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    gates = json.loads((run / "gates.json").read_text())
    assert set(gates["layers"]) == {f"layers.{i}" for i in range(4)} and gates["step"] == 4
    assert gates["tokens"] == 2048
    record = gates["layers"]["layers.0"]
    assert len(record["entries"]) == 4 and all(sum(c) == 2048 for c in record["histogram"]["counts"])
    assert record["tokens"][record["entries"][0]]["most"]
    # the last logged mean gates equal the analysis' means (the same weights, the same validation tokens)
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["mix"]["layers.0"][record["entries"][0]] == pytest.approx(record["mean"][0], abs=1e-4)

    printed = subprocess.run([sys.executable, "-m", "moa_train.gate_report", str(run)], capture_output=True,
                             text=True)
    assert printed.returncode == 0, printed.stderr
    assert "layers.1" in printed.stdout and "most gated by" in printed.stdout
    # recomputed from the final checkpoint: the same analysis
    again = subprocess.run([sys.executable, "-m", "moa_train.gate_report", str(run), "--recompute", "--json"],
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    recomputed = json.loads(again.stdout)
    assert recomputed["layers"]["layers.0"]["mean"] == pytest.approx(record["mean"], abs=1e-5)
    assert recomputed["layers"]["layers.0"]["histogram"]["counts"] == record["histogram"]["counts"]

    from moa_train.report import find_run_dirs, read_run, write_report

    report = write_report([read_run(p) for p in find_run_dirs([run])], tmp_path / "report", [run])
    gate_plots = [p for p in report["groups"][0]["plots"] if p.startswith("gates_")]
    assert gate_plots and (tmp_path / "report" / gate_plots[0]).stat().st_size > 10_000


def test_gates_json_comes_from_the_final_evaluation_without_another_pass(tmp_path, monkeypatch):
    """The final evaluation records the gates' distributions: a run evaluates at the start, every eval_every
    steps and at the end, and no more; gates.json holds what a separate detailed pass over the final weights
    finds, and the final row's mean gates are the same as without the detail."""
    import moa_train.train as train_module
    from conftest import compose_config
    from moa_train.evaluation import evaluate

    passes = []

    def counting(*args, **kwargs):
        passes.append(kwargs.get("detail", args[4] if len(args) > 4 else None))
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", counting)
    run_dir = tmp_path / "run"
    cfg = compose_config("model=tiny", "ffn=one_moa", "ffn.kernel=eager", "train.max_steps=4", "train.batch_size=4",
                         "train.seq_len=64", "train.eval_tokens=2048", "train.eval_every=2", "train.progress=false",
                         "train.ckpt_at_end=true")
    train_module.run(cfg, run_dir)
    assert len(passes) == 3  # steps 0, 2 and 4: the final one is also the gates' analysis
    assert [detail is not None for detail in passes] == [False, False, True]
    gates = json.loads((run_dir / "gates.json").read_text())
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    for layer, record in gates["layers"].items():
        assert [last["mix"][layer][name] for name in record["entries"]] == pytest.approx(record["mean"], abs=1e-5)

    again = subprocess.run([sys.executable, "-m", "moa_train.gate_report", str(run_dir), "--recompute", "--json"],
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    recomputed = json.loads(again.stdout)
    for layer, record in gates["layers"].items():
        assert recomputed["layers"][layer]["histogram"]["counts"] == record["histogram"]["counts"]
        assert recomputed["layers"][layer]["mean"] == pytest.approx(record["mean"], abs=1e-6)


def test_moa_gates_errors_name_the_path(tmp_path):
    for target in (tmp_path / "missing", tmp_path):
        done = subprocess.run([sys.executable, "-m", "moa_train.gate_report", str(target)], capture_output=True,
                              text=True)
        assert done.returncode == 2 and "Traceback" not in done.stderr and str(target) in done.stderr
