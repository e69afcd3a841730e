"""Fault injection: damaged checkpoints, divergence, two writers, unwritable or full disks, wandb without
credentials, a dead rank, and the table of bad input across the CLIs. `pytest -m faults` runs them alone."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import compose_config, read_jsonl, run_cli, start_cli, train_losses, wait_for
from moa_train import checkpoint as ckpt
from moa_train.checkpoint import CheckpointError, complete_checkpoints, resume_path, verify
from moa_train.errors import RunFailed
from moa_train.run_lock import RunLock, RunLocked
from moa_train.train import run

pytestmark = pytest.mark.faults
REPO = Path(__file__).resolve().parent.parent
RUN = ["model=tiny", "ffn=swiglu", "train.batch_size=4", "train.seq_len=64", "train.eval_tokens=1024",
       "train.eval_every=4", "train.progress=false"]


def _cli_env(**extra: str) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


def _popen(run_dir: Path, *overrides: str, module: str = "moa_train") -> subprocess.Popen:
    return start_cli(*RUN, *overrides, f"hydra.run.dir={run_dir}", module=module)


def _truncate_shards(checkpoint: Path) -> Path:
    shard = sorted(checkpoint.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # what a full disk or a killed copy leaves
    return shard


# ---- checkpoints you can trust ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before_and_ends_as_an_uninterrupted_run(tmp_path):
    run_dir = tmp_path / "run"
    steps = ["train.max_steps=8", "train.ckpt_every=2", "train.keep_checkpoints=null"]
    assert run_cli(*RUN, *steps, f"hydra.run.dir={run_dir}").returncode == 0
    uninterrupted = train_losses(run_dir)
    final = json.loads((run_dir / "summary.json").read_text())["val_loss"]
    # as if killed after step 6 was saved, with step 6's shards cut short
    (run_dir / "summary.json").unlink()
    ckpt.shutil.rmtree(run_dir / "checkpoints" / "step-8")
    shard = _truncate_shards(run_dir / "checkpoints" / "step-6")

    result = run_cli(*RUN, *steps, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step-6 is damaged" in result.stderr and shard.name in result.stderr  # the warning names it
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == 4
    assert summary["val_loss"] == final  # bitwise the uninterrupted run's
    assert train_losses(run_dir) == uninterrupted


def _saved_checkpoint(tmp_path: Path, steps: int = 2) -> Path:
    run_dir = tmp_path / "saved"
    cfg = compose_config(*RUN, f"train.max_steps={steps}", "train.ckpt_every=1", "train.keep_checkpoints=null",
                         "train.eval_at_start=false")
    run(cfg, run_dir)
    return run_dir


def test_every_damage_to_a_checkpoint_is_found_and_named(tmp_path):
    run_dir = _saved_checkpoint(tmp_path)
    newest = complete_checkpoints(run_dir)[-1]
    assert verify(newest) is None
    meta = json.loads((newest / "meta.json").read_text())
    assert ".metadata" in meta["files"] and "rng-rank0.pt" in meta["files"]
    assert all(set(entry) == {"size", "crc32"} for entry in meta["files"].values())

    shard = sorted(newest.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    shard.write_bytes(bytes(data))
    assert shard.name in verify(newest) and "checksum" in verify(newest)
    with pytest.raises(CheckpointError, match=f"damaged.*{shard.name}"):  # train.resume=PATH: refused
        resume_path(run_dir, str(newest))
    assert resume_path(run_dir, "auto").name == "step-1"  # auto: the one before
    older = complete_checkpoints(run_dir)[0]
    (older / "rng-rank0.pt").unlink()
    assert "rng-rank0.pt is missing" in verify(older)


def test_auto_resume_refuses_rather_than_start_over_when_every_checkpoint_is_damaged(tmp_path):
    run_dir = _saved_checkpoint(tmp_path)
    for checkpoint in complete_checkpoints(run_dir):
        _truncate_shards(checkpoint)
    with pytest.raises(CheckpointError, match="every checkpoint .* is damaged.*train.resume=never"):
        resume_path(run_dir, "auto")
    assert len(complete_checkpoints(run_dir)) == 2  # nothing removed


def test_a_damaged_checkpoint_named_on_the_command_line_is_refused_and_nothing_is_touched(tmp_path):
    run_dir = _saved_checkpoint(tmp_path)
    shard = _truncate_shards(complete_checkpoints(run_dir)[-1])
    before = (run_dir / "metrics.jsonl").read_text()
    result = run_cli(*RUN, "train.max_steps=2", "train.ckpt_every=1", "train.keep_checkpoints=null",
                     "train.eval_at_start=false", f"train.resume={complete_checkpoints(run_dir)[-1]}",
                     f"hydra.run.dir={run_dir}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train.resume" in result.stderr and shard.name in result.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_a_swap_interrupted_by_a_kill_is_finished_by_the_next_resume(tmp_path):
    """Between the two renames of a step saved again, only the older copy exists, as .replaced-step-N."""
    run_dir = _saved_checkpoint(tmp_path)
    root, step = run_dir / "checkpoints", complete_checkpoints(run_dir)[-1]
    os.replace(step, root / f".replaced-{step.name}")  # killed after the first rename
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-1"]
    assert resume_path(run_dir, "auto").name == step.name  # put back, verified, chosen
    ckpt.shutil.copytree(step, root / f".replaced-{step.name}")  # killed after the second rename
    assert resume_path(run_dir, "auto").name == step.name
    assert not (root / f".replaced-{step.name}").exists()


def test_the_same_step_saved_twice_has_a_complete_copy_on_disk_after_every_rename(tmp_path, monkeypatch):
    from moa_train.builder import build_model
    from moa_train.distributed import init_distributed
    from moa_train.optim import build_optimizer

    run_dir = _saved_checkpoint(tmp_path, steps=1)
    root = run_dir / "checkpoints"
    cfg = compose_config(*RUN)
    cfg.model.vocab_size = 4096
    env = init_distributed("none", "cpu")
    model = build_model(cfg, env)
    optimizer = build_optimizer(model, cfg.optim)
    complete_after_rename = []
    real_replace = os.replace

    def watching_replace(src, dst):
        real_replace(src, dst)
        complete_after_rename.append(any((p / "meta.json").is_file() for p in (root / "step-1",
                                                                               root / ".replaced-step-1")))

    monkeypatch.setattr(ckpt.os, "replace", watching_replace)
    ckpt.Checkpointer(run_dir, env, keep=None).save(1, model, optimizer.optimizers, {"config": {}})
    monkeypatch.undo()
    assert len(complete_after_rename) == 2 and all(complete_after_rename)
    assert not (root / ".replaced-step-1").exists() and verify(root / "step-1") is None


def test_rng_state_is_stored_without_pickled_objects_and_restores_every_generator(tmp_path):
    import random

    import numpy as np
    import torch

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    state = ckpt._rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt._set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_nothing_in_the_package_unpickles_with_weights_only_false():
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in (REPO / "moa_train").rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if "weights_only=False" in line]
    assert offenders == []


def test_a_full_disk_during_a_checkpoint_removes_the_partial_files_and_keeps_the_older(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_save = ckpt.dcp.save
    calls = []

    def filling_save(state, checkpoint_id):
        calls.append(checkpoint_id)
        if len(calls) == 2:  # the second checkpoint: some bytes land, then the disk is full
            (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(ckpt.dcp, "save", filling_save)
    overrides = [*RUN, "train.max_steps=4", "train.ckpt_every=2", "train.eval_at_start=false"]
    with pytest.raises(CheckpointError, match=r"no space left .*step-4.*removed.*intact \(step-2\).*MiB"):
        run(compose_config(*overrides), run_dir)
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-2"]
    assert verify(run_dir / "checkpoints" / "step-2") is None
    monkeypatch.undo()
    summary = run(compose_config(*overrides), run_dir)  # space freed: the rerun resumes
    assert summary["resumed_from"] == 2 and summary["status"] == "completed"


def test_a_full_disk_while_the_data_cache_is_built_leaves_no_partial_cache(tmp_path, monkeypatch):
    from moa_train.data import cache
    from moa_train.errors import DataError

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 400)

    def full_write(self, ids):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache.ShardWriter, "write", full_write)
    cfg = compose_config("data=local", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
                         "model.vocab_size=300", "data.tokenizer.vocab_size=300", "train.eval_tokens=256",
                         "train.seq_len=32")
    with pytest.raises(DataError, match=r"no space left .*data cache.*partial cache was removed.*MiB are free"):
        cache.prepare_data(cfg.data, 300, 256, 32, log=lambda *_: None)
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()] == []  # no cache, whole or partial


# ---- divergence ---------------------------------------------------------------------------------------------------

def test_a_diverging_run_exits_non_zero_with_status_diverged_and_its_last_finite_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("model=tiny", "optim.lr=1e6", "optim.grad_clip=0", "train.max_steps=30", "train.ckpt_every=1",
                     "train.progress=false", f"hydra.run.dir={run_dir}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["val_loss"] is None
    step = summary["steps"]
    assert f"diverged at step {step}" in result.stderr
    assert [p.name for p in complete_checkpoints(run_dir)][-1] == f"step-{step - 1}"  # from before it


def _nan_at(calls: set[int]):
    from moa_train import train as train_module

    real = train_module.gradient_norm
    count = [0]

    def gradient_norm(model, max_norm):
        count[0] += 1
        norm = real(model, max_norm)
        return float("nan") if count[0] in calls else norm

    return gradient_norm


def test_skip_nonfinite_steps_skips_up_to_n_updates_then_diverges(tmp_path, monkeypatch):
    from moa_train import train as train_module

    overrides = [*RUN, "train.max_steps=6", "train.eval_at_start=false", "train.ckpt_every=null"]
    monkeypatch.setattr(train_module, "gradient_norm", _nan_at({3}))
    summary = run(compose_config(*overrides, "train.skip_nonfinite_steps=1"), tmp_path / "skips")
    assert summary["status"] == "completed" and summary["skipped_steps"] == 1 and summary["steps"] == 6
    rows = read_jsonl(tmp_path / "skips" / "metrics.jsonl")
    assert [r["step"] for r in rows if r.get("skipped")] == [3]

    monkeypatch.setattr(train_module, "gradient_norm", _nan_at({2, 4}))
    with pytest.raises(RunFailed, match="diverged at step 4.*after 1 skipped"):
        run(compose_config(*overrides, "train.skip_nonfinite_steps=1"), tmp_path / "two")
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["steps"] == 4 and summary["skipped_steps"] == 1


def test_a_sweep_records_a_diverged_run_and_goes_on(tmp_path):
    result = run_cli("-m", "model=tiny", "optim.grad_clip=0", "optim.lr=1e6,1e-3", "train.max_steps=4",
                     "train.progress=false", "train.eval_every=4", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 2 and "1 run(s) of the sweep failed" in result.stderr
    statuses = sorted(json.loads(p.read_text())["status"] for p in tmp_path.glob("*/summary.json"))
    assert statuses == ["completed", "diverged"]


# ---- one writer per run directory ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_process_on_a_run_directory_stops_at_once_naming_the_first(tmp_path):
    run_dir = tmp_path / "run"
    first = _popen(run_dir, "train.max_steps=60", "train.threads=1")
    wait_for(lambda: (run_dir / "metrics.jsonl").exists(), first)
    started = time.monotonic()
    second = subprocess.run([sys.executable, "-m", "moa_train", *RUN, "train.max_steps=60", f"hydra.run.dir={run_dir}"],
                            capture_output=True, text=True, env=_cli_env(), timeout=120)
    waited = time.monotonic() - started
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"pid {first.pid}" in second.stderr and "in use by another moa-train process" in second.stderr
    assert first.poll() is None  # refused while the first was training, not after it
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps == list(range(61))  # exactly one row per step
    assert waited < 30  # seconds of startup (imports) on a loaded test machine; about 5 s idle


def test_the_lock_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from moa_train.run_lock import RunLock; "
                               "lock = RunLock(Path(sys.argv[1])); lock.acquire(); "
                               "print('held', flush=True); time.sleep(600)", str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
        RunLock(tmp_path).acquire()
    holder.kill()
    holder.wait()
    with RunLock(tmp_path):  # no stale lock after a kill -9
        with pytest.raises(RunLocked):  # and two holders in one process exclude each other as well
            RunLock(tmp_path).acquire()


# ---- the environment ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["/proc/moa-x", "FILE/run"])
def test_a_run_directory_that_cannot_be_created_is_one_line_naming_it(tmp_path, where):
    (tmp_path / "FILE").write_text("not a directory")
    run_dir = where.replace("FILE", str(tmp_path / "FILE"))
    result = run_cli("train.max_steps=1", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "hydra.run.dir" in result.stderr and run_dir in result.stderr
    assert not Path(run_dir).exists()


def test_wandb_online_without_credentials_says_how_to_log_in(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    result = subprocess.run([sys.executable, "-m", "moa_train", *RUN, "train.max_steps=1", "logger=wandb",
                             "logger.mode=online", f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True,
                            text=True, env={**env, "HOME": str(tmp_path), "WANDB_DIR": str(tmp_path)}, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "logger.mode" in result.stderr and "wandb login" in result.stderr and "logger.mode=offline" in result.stderr
    assert not (tmp_path / "run").exists()  # refused before training: nothing left


def test_wandb_online_without_network_says_so(tmp_path, monkeypatch):
    import wandb

    from moa_train.errors import UserError
    from moa_train.metrics import MetricLoggers

    def unreachable(**kwargs):
        raise wandb.errors.CommError("Timed out while retrying: dial tcp: no such host")

    monkeypatch.setattr(wandb, "init", unreachable)
    cfg = compose_config("logger=wandb", "logger.mode=online")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(UserError, match="could not reach the wandb server.*logger.mode=offline"):
        MetricLoggers(cfg.logger, tmp_path, {}, resume_step=0)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'  # the refusal lost nothing


# ---- a dead rank --------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_frozen_rank_ends_the_job_within_a_minute_and_the_rerun_resumes(tmp_path, fault):
    """SIGKILL: torchrun sees the rank die and ends the other. SIGSTOP (a rank alive but stuck): the other waits
    at a collective for dist.timeout_s, fails, and torchrun ends the job."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "moa_train",
               *RUN, "train.max_steps=60", "train.ckpt_every=5", "train.keep_checkpoints=null", "dist.timeout_s=10",
               f"hydra.run.dir={run_dir}"]
    env = _cli_env(OMP_NUM_THREADS="1")
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    wait_for(lambda: len(complete_checkpoints(run_dir)) >= 2, job)
    ranks = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2
    hit = time.monotonic()
    os.kill(int(ranks[-1]), getattr(signal, fault))
    try:
        job.wait(timeout=120)
    finally:
        for pid in ranks:  # a frozen rank that outlived the job
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    ended = time.monotonic() - hit
    print(f"{fault}: the job ended {ended:.1f} s after it")
    assert job.returncode != 0 and ended < 60
    newest = int(complete_checkpoints(run_dir)[-1].name.split("-")[1])

    rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from"] == newest and summary["steps"] == 60


# ---- bad input, across the CLIs -----------------------------------------------------------------------------------
# (command, arguments, what the message must name). {tmp}: the test's directory, holding EMPTY (an empty directory),
# FILE (a file), DAMAGED (a checkpoint whose manifest its shard does not match) and the run directory RUN_DIR.
TRAIN_BAD_INPUT = [
    (["optim.lr=-1"], "optim.lr"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.lr=abc"], "optim.lr"),
    (["optim.beta2=1.0"], "optim.beta2"),
    (["optim.weight_decay=-1"], "optim.weight_decay"),
    (["optim=sgd"], "optim"),
    (["budget.tokens_per_param=0"], "budget.tokens_per_param"),
    (["budget.count=everything"], "budget.count"),
    (["schedule.name=linear"], "schedule.name"),
    (["schedule.warmup_frac=1.5"], "schedule.warmup_frac"),
    (["model=no_such_model"], "no_such_model"),
    (["model.n_heads=3"], "model.n_heads"),
    (["model.dim=1.5"], "model.dim"),
    (["ffn=nope"], "nope"),
    (["ffn=bi_moa", "ffn.gate=cubic"], "ffn.gate"),
    (["ffn=moa1", "ffn.init=sideways"], "ffn.init"),
    (["train.no_such_key=1"], "no_such_key"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.seq_len=-5"], "train.seq_len"),
    (["train.device=tpu"], "train.device"),
    (["train.dtype=float16"], "train.dtype"),
    (["train.eval_tokens=10"], "train.eval_tokens"),
    (["train.keep_checkpoints=0"], "train.keep_checkpoints"),
    (["train.skip_nonfinite_steps=-1"], "train.skip_nonfinite_steps"),
    (["train.peak_tflops=-1"], "train.peak_tflops"),
    (["train.loss_chunk_tokens=300"], "train.loss_chunk_tokens"),
    (["train.loss_chunk_tokens=-1"], "train.loss_chunk_tokens"),
    (["train.attention_min_head_dim=-1"], "train.attention_min_head_dim"),
    (["optim.implementation=apex"], "optim.implementation"),
    (["train.resume={tmp}/no-such-checkpoint"], "train.resume"),
    (["train.resume={tmp}/DAMAGED/step-1"], "__0_0.distcp"),
    (["train.init_from={tmp}/no-such-run"], "no-such-run"),
    (["dist.name=mpi"], "dist.name"),
    (["dist.timeout_s=0"], "dist.timeout_s"),
    (["data=local"], "data.path"),
    (["data=local", "data.path={tmp}/no-such-corpus"], "no-such-corpus"),
    (["data=local", "data.path={tmp}/EMPTY"], "EMPTY"),
    (["data.tokenizer.vocab_size=100000"], "data.tokenizer.vocab_size"),
    (["logger=wandb", "logger.mode=sometimes"], "logger.mode"),
    (["logger=nope"], "nope"),
]
OTHER_BAD_INPUT = [
    ("moa_train.prepare", ["data=local", "data.path={tmp}/no-such-corpus"], "no-such-corpus"),
    ("moa_train.prepare", ["data=local", "data.path={tmp}/EMPTY"], "EMPTY"),
    ("moa_train.prepare", ["data=nope"], "nope"),
    ("moa_train.prepare", ["train.eval_tokens=10"], "train.eval_tokens"),
    ("moa_train.report", ["{tmp}/no-such-sweep", "--out", "{tmp}/RUN_DIR"], "no-such-sweep"),
    ("moa_train.report", ["{tmp}/EMPTY", "--out", "{tmp}/RUN_DIR"], "EMPTY"),
    ("moa_train.report", ["{tmp}/FILE", "--out", "{tmp}/RUN_DIR"], "FILE"),
    ("moa_train.bench", ["--variants", "nope", "--json", "{tmp}/RUN_DIR/bench.json"], "nope"),
    ("moa_train.bench", ["--steps", "0", "--json", "{tmp}/RUN_DIR/bench.json"], "--steps"),
    ("moa_train.bench", ["--rounds", "0", "--json", "{tmp}/RUN_DIR/bench.json"], "--rounds"),
    ("moa_train.bench", ["model=no_such_model", "--json", "{tmp}/RUN_DIR/bench.json"], "no_such_model"),
    ("moa_train.gate_report", ["{tmp}/no-such-run"], "no-such-run"),
]
BAD_INPUT = ([("moa_train", [*args, "hydra.run.dir={tmp}/RUN_DIR"], named) for args, named in TRAIN_BAD_INPUT]
             + OTHER_BAD_INPUT)


def _bad_input_fixtures(tmp: Path) -> None:
    (tmp / "EMPTY").mkdir()
    (tmp / "FILE").write_text("not a directory")
    damaged = tmp / "DAMAGED" / "step-1"
    damaged.mkdir(parents=True)
    (damaged / ".metadata").write_bytes(b"metadata")
    (damaged / "__0_0.distcp").write_bytes(b"cut")
    (damaged / "meta.json").write_text(json.dumps({"step": 1, "files": {
        ".metadata": {"size": 8, "crc32": ckpt.zlib.crc32(b"metadata")},
        "__0_0.distcp": {"size": 1000, "crc32": 0}}}))


@pytest.mark.parametrize("module, args, named", BAD_INPUT,
                         ids=[f"{m.split('.')[-1]}:{' '.join(a)}"[:80] for m, a, _ in BAD_INPUT])
def test_bad_input_is_refused_naming_it_without_a_traceback_and_writes_nothing(tmp_path, module, args, named):
    _bad_input_fixtures(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, env=_cli_env(),
                            timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert named in result.stderr, result.stderr[-2000:]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_the_bad_input_table_covers_forty_cases_and_every_cli():
    assert len(BAD_INPUT) >= 40
    assert {m for m, _, _ in BAD_INPUT} >= {"moa_train", "moa_train.prepare", "moa_train.report", "moa_train.bench"}
