"""`moa-train` and `python -m moa_train`: the Hydra entry point."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from . import config as _config  # noqa: F401  (registers the schemas in the ConfigStore)
from .errors import UserError


@hydra.main(version_base="1.3", config_path="pkg://moa_train.conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from .train import run  # imported here so that `--help` and config errors stay fast

    try:
        summary = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except UserError as exc:
        print(f"moa-train: error: {exc}", file=sys.stderr)
        sys.exit(2)
    return summary.get("val_loss")  # the objective Hydra sweepers minimise


if __name__ == "__main__":
    main()
