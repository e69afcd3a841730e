"""Checkpoints: exact resume after SIGKILL, SIGTERM preemption, refusal of foreign or half-written ones."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import run_cli, start_cli, train_losses, wait_for
from moa_train.checkpoint import CheckpointError, complete_checkpoints, config_differences, resume_path, set_aside

# eager mixing kernels: the same numbers without compiling in every process of these tests
RUN = ["model=tiny", "ffn=qd_moa", "ffn.kernel=eager", "train.batch_size=4", "train.seq_len=64",
       "train.eval_tokens=1024", "train.eval_every=4", "train.progress=false"]


def _popen(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return start_cli(*RUN, *overrides, f"hydra.run.dir={run_dir}")


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_bitwise(tmp_path):
    steps = ["train.max_steps=24", "train.ckpt_every=8"]
    reference = tmp_path / "uninterrupted"
    assert run_cli(*RUN, *steps, f"hydra.run.dir={reference}").returncode == 0

    run_dir = tmp_path / "killed"
    process = _popen(run_dir, *steps, "train.ckpt_at_end=false")
    wait_for(lambda: (run_dir / "checkpoints" / "step-8" / "meta.json").exists(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run_dir / "summary.json").exists()
    result = run_cli(*RUN, *steps, f"hydra.run.dir={run_dir}")  # the same command
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr and "step 8" in result.stderr

    resumed, uninterrupted = train_losses(run_dir), train_losses(reference)
    assert sorted(resumed) == list(range(1, 25))  # rows after the checkpoint were replaced, none doubled
    assert resumed == uninterrupted  # bitwise: the same floats, step by step
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == 8 and summary["steps"] == 24
    assert summary["val_loss"] == json.loads((reference / "summary.json").read_text())["val_loss"]


def test_sigterm_checkpoints_and_exits_zero_within_seconds(tmp_path):
    run_dir = tmp_path / "run"
    process = _popen(run_dir, "train.max_steps=100000")
    wait_for(lambda: len(train_losses(run_dir)) >= 2 if (run_dir / "metrics.jsonl").exists() else False, process)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0, process.stderr.read()[-3000:]
    assert time.monotonic() - sent < 10
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "preempted"
    assert [p.name for p in complete_checkpoints(run_dir)] == [f"step-{summary['steps']}"]

    # the same command continues from there
    again = _popen(run_dir, "train.max_steps=100000")
    wait_for(lambda: max(train_losses(run_dir)) > summary["steps"], again)
    again.send_signal(signal.SIGTERM)
    assert again.wait(timeout=30) == 0
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] == summary["steps"]


def test_checkpoint_of_another_model_is_refused_naming_the_keys(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli(*RUN, "train.max_steps=2", f"hydra.run.dir={run_dir}").returncode == 0
    result = run_cli(*RUN, "train.max_steps=4", "model.n_layers=2", "ffn.gate=tanh", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "model.n_layers: 4 -> 2" in result.stderr and "ffn.gate: 'sigmoid' -> 'tanh'" in result.stderr
    # nothing was lost: the checkpoint and the finished run are still there
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-2"]


def test_completed_run_is_not_trained_again(tmp_path):
    run_dir = tmp_path / "run"
    first = run_cli(*RUN, "train.max_steps=3", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0
    second = run_cli(*RUN, "train.max_steps=3", f"hydra.run.dir={run_dir}")
    assert second.returncode == 0 and "already complete" in second.stderr
    assert sorted(train_losses(run_dir)) == [1, 2, 3]  # the metrics of the finished run are kept as they were
    # train.resume=never starts over and keeps the old checkpoints aside
    third = run_cli(*RUN, "train.max_steps=2", "train.resume=never", f"hydra.run.dir={run_dir}")
    assert third.returncode == 0
    assert sorted(train_losses(run_dir)) == [1, 2]
    assert len(list(run_dir.glob("checkpoints.set-aside-*/step-3"))) == 1


def _fake_checkpoint(root: Path, name: str, complete: bool) -> Path:
    path = root / "checkpoints" / name
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"x")
    if complete:
        (path / "meta.json").write_text(json.dumps({"step": int(name.split("-")[-1])}))
    return path


def test_half_written_checkpoints_are_ignored(tmp_path):
    _fake_checkpoint(tmp_path, "step-8", complete=True)
    _fake_checkpoint(tmp_path, "step-4", complete=True)
    _fake_checkpoint(tmp_path, "step-20", complete=False)  # killed before meta.json
    _fake_checkpoint(tmp_path, ".tmp-step-12", complete=True)  # killed before the rename
    assert resume_path(tmp_path, "auto").name == "step-8"
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-4", "step-8"]
    assert resume_path(tmp_path, "never") is None
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resume_path(tmp_path, str(tmp_path / "checkpoints" / "step-20"))
    with pytest.raises(CheckpointError, match="does not exist"):
        resume_path(tmp_path, str(tmp_path / "nowhere"))
    assert resume_path(tmp_path / "empty", "auto") is None


def test_set_aside_keeps_old_checkpoints(tmp_path):
    assert set_aside(tmp_path) is None
    _fake_checkpoint(tmp_path, "step-8", complete=True)
    moved = set_aside(tmp_path)
    assert (moved / "step-8" / "meta.json").exists() and not (tmp_path / "checkpoints").exists()


def test_config_differences_cover_model_and_data_position_only():
    saved = {"model": {"dim": 128, "n_layers": 4}, "ffn": {"name": "qd_moa"}, "optim": {"lr": 1e-3},
             "train": {"seq_len": 256, "batch_size": 16, "seed": 0, "max_steps": 10}, "data": {"name": "shakespeare"}}
    same_model = {**saved, "optim": {"lr": 3e-3}, "train": {**saved["train"], "max_steps": 20}}
    assert config_differences(saved, same_model) == []  # a new lr or a longer run may resume
    changed = {**saved, "model": {"dim": 256, "n_layers": 4}, "train": {**saved["train"], "seed": 1}}
    assert config_differences(saved, changed) == ["model.dim: 128 -> 256", "train.seed: 0 -> 1"]


def test_keep_checkpoints_bounds_disk_use(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(*RUN, "train.max_steps=5", "train.ckpt_every=1", "train.keep_checkpoints=2",
                     f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-4", "step-5"]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
