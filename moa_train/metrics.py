"""Metric sinks. metrics.jsonl is always written; wandb is added with logger=wandb."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _clean(row: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


class JSONLLogger:
    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)  # line-buffered: a killed run keeps every row

    def log(self, row: dict) -> None:
        self.file.write(json.dumps(_clean(row)) + "\n")

    def close(self) -> None:
        self.file.close()


class WandbLogger:
    def __init__(self, logger_cfg, run_dir: Path, config: dict):
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.run = wandb.init(
            project=logger_cfg.project, entity=logger_cfg.entity, mode=logger_cfg.mode,
            dir=str(run_dir), config=config, tags=list(logger_cfg.tags), name=run_dir.name,
            settings=wandb.Settings(init_timeout=60, console="off"),
        )

    def log(self, row: dict) -> None:
        step = row["step"]
        self.run.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricLoggers:
    def __init__(self, logger_cfg, run_dir: Path, config: dict, enabled: bool = True):
        self.sinks = []
        if enabled:
            self.sinks.append(JSONLLogger(run_dir / "metrics.jsonl"))
            if logger_cfg.name == "wandb":
                self.sinks.append(WandbLogger(logger_cfg, run_dir, config))

    def log(self, row: dict) -> None:
        for sink in self.sinks:
            sink.log(row)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
