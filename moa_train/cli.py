"""`moa-train` and `python -m moa_train`: the Hydra entry point."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from . import config as _config  # noqa: F401  (registers the schemas in the ConfigStore)
from .distributed import launched_ranks
from .errors import UserError


@hydra.main(version_base="1.3", config_path="pkg://moa_train.conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    from .train import run  # imported here so that `--help` and config errors stay fast

    try:
        summary = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except UserError as exc:
        rank, world_size, _ = launched_ranks()
        where = f" (rank {rank})" if world_size > 1 else ""
        print(f"moa-train: error{where}: {exc}", file=sys.stderr)
        sys.exit(2)
    return summary.get("val_loss")  # the objective Hydra sweepers minimise


def main() -> None:
    rank, world_size, _ = launched_ranks()
    # Under torchrun every rank resolves the same run directory, but only rank 0 writes Hydra's
    # .hydra/ record and train.log; the others log warnings to stderr.
    if rank != 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=worker"]
    if world_size == 1:
        hydra_main()
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
