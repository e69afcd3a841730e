from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from moa_train.config import register_configs

register_configs()
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several test processes share the cores (make test): one torch thread each, and for the CLIs they
    # start, instead of each process's default of all cores, which oversubscribes them many times over.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@pytest.fixture(scope="session", autouse=True)
def shared_data_cache(tmp_path_factory):
    """One data cache for the whole session, so the shakespeare tokenizer is trained once."""
    cache = tmp_path_factory.mktemp("moa_cache")
    old = os.environ.get("MOA_TRAIN_CACHE")
    os.environ["MOA_TRAIN_CACHE"] = str(cache)
    os.environ.setdefault("WANDB_MODE", "offline")
    yield cache
    if old is None:
        os.environ.pop("MOA_TRAIN_CACHE", None)
    else:
        os.environ["MOA_TRAIN_CACHE"] = old


def compose_config(*overrides: str):
    with initialize_config_module(config_module="moa_train.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moa_train", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def torchrun(*args: str, nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """moa-train under torchrun, `nproc` processes of one thread each on CPU (gloo)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "moa_train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def start_cli(*args: str, module: str = "moa_train") -> subprocess.Popen:
    """A CLI started in the background (for the tests that kill, stop or race it), output piped."""
    return subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(predicate, process: subprocess.Popen, timeout: float = 300) -> None:
    """Until predicate() holds; fails, with the process's stderr, if the process ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"run ended early ({process.returncode}): {process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


def train_losses(run_dir: Path) -> dict[int, float]:
    """{step: train loss} of a run's metrics.jsonl, the step-0 row left out."""
    return {r["step"]: r["train_loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["step"] > 0}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
