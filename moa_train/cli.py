"""`moa-train` and `python -m moa_train`: the Hydra entry point."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .config import register_configs
from .distributed import launched_ranks
from .errors import UserError
from .metrics import read_summary, write_summary

FAILED_SWEEP_RUNS: list[str] = []  # run directories of a multirun whose job failed


@hydra.main(version_base="1.3", config_path="pkg://moa_train.conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    from .train import run  # imported here so that `--help` and config errors stay fast

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    rank, world_size, _ = launched_ranks()
    # A sweep run in this process (the basic launcher, one rank) records a failed run and goes on;
    # elsewhere a failure must end the process non-zero: the launcher (submitit) reports it, and
    # torchrun tears down the other ranks instead of leaving them waiting at a collective.
    goes_on = in_sweep and world_size == 1 and hydra_cfg.launcher._target_.endswith("BasicLauncher")
    fresh = _only_hydra_records(run_dir)
    try:
        summary = run(cfg, run_dir)
        if cfg.dry_run and fresh and rank == 0:
            _remove_hydra_records(run_dir)  # a dry run trains nothing and leaves no run directory
    except Exception as exc:
        if isinstance(exc, UserError) and fresh and rank == 0 and not in_sweep:
            _remove_hydra_records(run_dir)  # refused before training: leave no directory behind
        elif in_sweep:
            _record_failure(run_dir, cfg, exc)
        if isinstance(exc, UserError):
            where = f" (rank {rank})" if world_size > 1 else ""
            print(f"moa-train: error{where}: {exc}", file=sys.stderr)
            if not goes_on:
                sys.exit(2)
        elif goes_on:
            logging.getLogger("moa_train").exception("run %s failed; the sweep goes on", run_dir)
        else:
            raise
        return None
    return summary.get("val_loss")  # the objective Hydra sweepers minimise


HYDRA_RECORDS = {".hydra", "train.log"}  # what Hydra writes into a run directory before the task starts


def _only_hydra_records(run_dir: Path) -> bool:
    """Whether the run directory holds nothing but what Hydra just wrote (it creates the directory
    before calling the task): then no earlier run of this name exists."""
    return run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= HYDRA_RECORDS


def _remove_hydra_records(run_dir: Path) -> None:
    for handler in logging.getLogger().handlers[:]:  # train.log's handler holds the file open
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir:
            handler.close()
            logging.getLogger().removeHandler(handler)
    shutil.rmtree(run_dir, ignore_errors=True)


def _record_failure(run_dir: Path, cfg: DictConfig, exc: Exception) -> None:
    """summary.json with status failed (moa-report lists it), unless the run had already completed."""
    FAILED_SWEEP_RUNS.append(str(run_dir))
    if launched_ranks()[0] != 0 or (read_summary(run_dir) or {}).get("status") == "completed":
        return
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an invalid config is what failed: keep it unresolved
        config = OmegaConf.to_container(cfg, resolve=False)
    write_summary(run_dir, {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "val_loss": None,
                            "config": config})


def main() -> None:
    register_configs()
    rank, world_size, _ = launched_ranks()
    # Under torchrun every rank resolves the same run directory, but only rank 0 writes Hydra's
    # .hydra/ record and train.log; the others log warnings to stderr.
    if rank != 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=worker"]
    if world_size == 1:
        hydra_main()
        if FAILED_SWEEP_RUNS:
            print(f"moa-train: {len(FAILED_SWEEP_RUNS)} run(s) of the sweep failed: {', '.join(FAILED_SWEEP_RUNS)}",
                  file=sys.stderr)
            sys.exit(2)
        return
    # gloo's threads can outlive destroy_process_group and abort the interpreter's teardown now and
    # then (torch 2.13: "terminate called without an active exception"), turning a finished run
    # into a failed one: distributed ranks flush and leave without that teardown.
    code = 0
    try:
        hydra_main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
