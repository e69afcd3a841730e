"""moa-bench runs its workers and reports every variant against its baseline."""

from __future__ import annotations

import json

import pytest

from moa_train.bench import main


def test_bench_reports_variants_against_baselines(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["--variants", "la1,one_moa", "--steps", "1", "--warmup", "1", "--rounds", "1", "--json", str(out),
          "model=tiny", "train.batch_size=2", "train.seq_len=32", "ffn.kernel=eager"])
    report = json.loads(out.read_text())
    rows = {r["ffn"]: r for r in report["results"]}
    assert list(rows) == ["relu2", "la1", "swiglu", "one_moa"]
    assert rows["la1"]["baseline"] == "relu2" and rows["one_moa"]["baseline"] == "swiglu"
    assert rows["relu2"]["time_ratio"] == 1.0 and rows["swiglu"]["peak_ratio"] == 1.0
    assert rows["la1"]["ffn_extra"] == 4 * 4  # K coefficients per layer, 4 layers
    assert rows["one_moa"]["ffn_extra"] == 4 * 128 * 4  # K x d gate weights per layer
    for r in rows.values():
        assert r["step_s"] > 0 and r["saved_mb"] > 0 and r["peak_mb"] > 0
        assert r["time_ratio"] == pytest.approx(r["step_s"] / rows[r["baseline"]]["step_s"])
    assert "x base" in capsys.readouterr().out
    assert report["machine"]["threads"] >= 1


def test_bench_times_a_vision_model_on_random_images(tmp_path):
    out = tmp_path / "bench.json"
    main(["--variants", "qd_moa", "--steps", "1", "--warmup", "1", "--rounds", "1", "--json", str(out),
          "model=mae_tiny", "train.batch_size=4", "ffn.kernel=eager"])
    rows = {r["ffn"]: r for r in json.loads(out.read_text())["results"]}
    assert list(rows) == ["swiglu", "qd_moa"]
    # 12 (sigma, tau) pairs, a gate weight per input channel: 4 encoder blocks of width 96, 2 decoder ones of 64
    assert rows["qd_moa"]["params"] == 567_472 and rows["qd_moa"]["ffn_extra"] == 12 * (4 * 96 + 2 * 64)
    assert rows["qd_moa"]["tokens_per_s"] == pytest.approx(4 * 64 / rows["qd_moa"]["step_s"])  # a token: a patch


def test_bench_compares_the_values_of_one_key(tmp_path):
    """--compare: each value of a key against the first; activation checkpointing saves for backward only what
    the checkpointed blocks need (their input), so the full arm saves far less."""
    out = tmp_path / "bench.json"
    main(["--compare", "train.activation_checkpointing=none,full", "--steps", "1", "--warmup", "1", "--rounds", "1",
          "--json", str(out), "model=tiny", "train.batch_size=2", "train.seq_len=64"])
    rows = {r["arm"]: r for r in json.loads(out.read_text())["results"]}
    none, full = rows["train.activation_checkpointing=none"], rows["train.activation_checkpointing=full"]
    assert list(rows) == ["train.activation_checkpointing=none", "train.activation_checkpointing=full"]
    assert full["baseline"] == "train.activation_checkpointing=none" and none["time_ratio"] == 1.0
    assert full["saved_mb"] < 0.5 * none["saved_mb"]
    assert full["params"] == none["params"]


@pytest.mark.parametrize("compare", ["train.activation_checkpointing=none", "=a,b", "train.threads"])
def test_bench_refuses_a_comparison_of_fewer_than_two_values(compare, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--compare", compare, "model=tiny"])
    assert info.value.code == 2 and "--compare" in capsys.readouterr().err


def test_bench_refuses_unknown_variants():
    with pytest.raises(SystemExit, match="nope"):
        main(["--variants", "moa1,nope"])


def test_bench_moe_times_grouped_and_naive_dispatch(tmp_path, capsys):
    out = tmp_path / "moe.json"
    main(["--moe", "--steps", "1", "--warmup", "0", "--rounds", "1", "--json", str(out), "ffn=qd_moa",
          "ffn.kernel=eager", "train.batch_size=2", "train.seq_len=32"])
    rows = {r["path"]: r for r in json.loads(out.read_text())["results"]}
    assert {"grouped (loop over experts)", "naive (mask per expert)"} <= set(rows)
    assert rows["naive (mask per expert)"]["speedup_vs_naive"] == 1.0
    for r in rows.values():
        assert r["tokens_per_s"] == pytest.approx(2 * 32 / r["step_s"])
    assert "x naive" in capsys.readouterr().out
