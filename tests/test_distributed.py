"""torchrun with 2 processes on CPU (gloo): DDP and FSDP2 follow the one-process curve; one run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import read_jsonl, run_cli, torchrun

pytestmark = pytest.mark.slow
RUN = ["model=tiny", "ffn=bi_moa", "ffn.kernel=eager", "train.batch_size=8", "train.seq_len=64",
       "train.eval_tokens=2048", "train.eval_every=4", "train.progress=false"]


def _losses(run_dir: Path) -> tuple[list[float], list[float]]:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    return [r["train_loss"] for r in rows if r["step"] > 0], [r["val_loss"] for r in rows if "val_loss" in r]


# The processes sum gradients in another order, so float32 results may differ in the last digits.
TOLERANCE = 1e-5


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_ddp_and_fsdp_follow_the_single_process_curve(optim, tmp_path):
    """Same global batch: the same losses in one process, DDP and FSDP2, to the tolerance above."""
    steps = [f"optim={optim}", "train.max_steps=12", "train.micro_batch_size=2"]
    single = run_cli(*RUN, *steps, f"hydra.run.dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr[-3000:]
    train_ref, val_ref = _losses(tmp_path / "single")
    assert len(train_ref) == 12 and train_ref[-1] < train_ref[0] - 0.1
    for mode in ("ddp", "fsdp"):
        run_dir = tmp_path / mode
        result = torchrun(*RUN, *steps, f"dist={mode}", f"hydra.run.dir={run_dir}")
        assert result.returncode == 0, result.stderr[-5000:]
        train, val = _losses(run_dir)
        assert train == pytest.approx(train_ref, rel=TOLERANCE), mode
        assert val == pytest.approx(val_ref, rel=TOLERANCE), mode
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["plan"]["world_size"] == 2 and summary["plan"]["grad_accum"] == 2
        assert summary["config"]["dist"]["name"] == mode


def test_only_rank_zero_writes_and_resume_across_world_sizes(tmp_path):
    run_dir = tmp_path / "run"
    result = torchrun(*RUN, "train.max_steps=4", "train.ckpt_every=2", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-5000:]
    assert "dist=ddp" in (run_dir / "train.log").read_text()  # auto: ddp under torchrun
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1, 2, 3, 4]  # one writer
    assert not list(tmp_path.glob("**/.hydra/../*rank*"))  # no per-rank files beside the run's
    # a checkpoint written by 2 processes resumes in 1 (DCP reshards) and continues the same run
    result = run_cli(*RUN, "train.max_steps=6", "train.resume=" + str(run_dir / "checkpoints" / "step-4"),
                     f"hydra.run.dir={tmp_path / 'one'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["resumed_from"] == 4


def test_dist_none_under_torchrun_is_refused(tmp_path):
    result = torchrun(*RUN, "dist=none", "train.max_steps=1", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "config key 'dist.name': 'none' cannot train 2 processes together" in result.stderr


def test_launch_scripts(tmp_path):
    root = Path(__file__).resolve().parent.parent
    for script in ("launch/torchrun.sh", "launch/slurm.sbatch"):
        assert subprocess.run(["bash", "-n", str(root / script)]).returncode == 0, script
    env = {**os.environ, "NPROC": "2", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run([str(root / "launch/torchrun.sh"), *RUN, "train.max_steps=2", f"hydra.run.dir={tmp_path}"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["plan"]["world_size"] == 2 and summary["steps"] == 2


def test_moe_with_muon_under_ddp_and_fsdp_follows_single_process(tmp_path):
    """tiny_moe with MoA experts: expert stacks sharded by FSDP2 (whole experts per rank, orthogonalised
    locally by Muon) and expert-selection biases updated from loads summed over both ranks."""
    run = ["model=tiny_moe", "ffn=qd_moa", "ffn.kernel=eager", "optim=muon", "train.batch_size=8",
           "train.seq_len=64", "train.eval_tokens=2048", "train.eval_every=6", "train.max_steps=6",
           "train.micro_batch_size=2", "model.moe.bias_update_coef=0.01", "train.progress=false"]
    single = run_cli(*run, f"hydra.run.dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr[-3000:]
    train_ref, val_ref = _losses(tmp_path / "single")
    assert val_ref[-1] < val_ref[0]
    for mode in ("ddp", "fsdp"):
        result = torchrun(*run, f"dist={mode}", f"hydra.run.dir={tmp_path / mode}")
        assert result.returncode == 0, result.stderr[-5000:]
        train, val = _losses(tmp_path / mode)
        assert train == pytest.approx(train_ref, rel=TOLERANCE), mode
        assert val == pytest.approx(val_ref, rel=TOLERANCE), mode
        loads = [r["expert_load"] for r in read_jsonl(tmp_path / mode / "metrics.jsonl") if "expert_load" in r]
        assert loads == [r["expert_load"] for r in read_jsonl(tmp_path / "single" / "metrics.jsonl")
                         if "expert_load" in r]  # the same routing, hence the same loads, as one process


def test_an_fsdp_checkpoint_exports_to_the_tensors_of_a_single_process_one(tmp_path):
    """moa-export consolidates a checkpoint sharded over 2 FSDP2 ranks into the same tensors, bit for bit, as the
    checkpoint one process writes of the same weights (an lr of 1e-30 leaves the seeded initial weights as they are,
    so both runs hold exactly the same values; their training would differ in the last float digits). The MoA gate
    weights start random (ffn.gate_init_std), not at zero, where that step would be all they hold."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    frozen = [*RUN, "model=tiny_moe", "train.max_steps=1", "optim.lr=1e-30", "ffn.gate_init_std=0.02"]
    single = run_cli(*frozen, f"hydra.run.dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = torchrun(*frozen, "dist=fsdp", f"hydra.run.dir={tmp_path / 'fsdp'}")
    assert sharded.returncode == 0, sharded.stderr[-5000:]
    assert len(list((tmp_path / "fsdp" / "checkpoints" / "step-1").glob("*.distcp"))) == 2
    tensors = {}
    for name in ("single", "fsdp"):
        done = subprocess.run([sys.executable, "-m", "moa_train.export", str(tmp_path / name), "--out",
                               str(tmp_path / f"export_{name}")], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        tensors[name] = load_file(str(tmp_path / f"export_{name}" / "model.safetensors"))
    assert tensors["single"].keys() == tensors["fsdp"].keys() and len(tensors["single"]) > 20
    for key, value in tensors["single"].items():
        assert torch.equal(value, tensors["fsdp"][key]), key
