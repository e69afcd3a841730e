"""Run records: metric sinks (metrics.jsonl always, wandb with logger=wandb) and summary.json."""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path

from .errors import UserError


def read_summary(run_dir: Path) -> dict | None:
    """A run's summary.json, or None when there is none (or it is unreadable)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def write_summary(run_dir: Path, summary: dict) -> None:
    """summary.json, written whole or not at all: a reader never sees a cut file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".summary.json-{os.getpid()}"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, run_dir / "summary.json")


def _clean(row: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


class JSONLLogger:
    def __init__(self, path: Path, resume_step: int | None = None):
        """A fresh run starts an empty file; a resumed one keeps the rows up to its checkpoint's step."""
        kept = []
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a", buffering=1)  # line-buffered: a killed run keeps every row

    def log(self, row: dict) -> None:
        self.file.write(json.dumps(_clean(row)) + "\n")

    def close(self) -> None:
        self.file.close()


WANDB_INIT_TIMEOUT_S = 60


class WandbLogger:
    def __init__(self, logger_cfg, run_dir: Path, config: dict, resume_step: int | None = None):
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        # The run id lives in the run directory, so a resumed run continues the same wandb run.
        id_file = run_dir / "wandb_id.txt"
        if resume_step is None or not id_file.exists():
            id_file.write_text(secrets.token_hex(4))  # wandb run ids: short, lowercase alphanumeric
        try:
            self.run = wandb.init(
                project=logger_cfg.project, entity=logger_cfg.entity, mode=logger_cfg.mode,
                dir=str(run_dir), config=config, tags=list(logger_cfg.tags), name=run_dir.name,
                id=id_file.read_text().strip(), resume="allow",
                settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S, console="off"),
            )
        except wandb.errors.UsageError as exc:  # no API key, or one wandb refuses
            raise UserError(f"config key 'logger.mode': '{logger_cfg.mode}' needs wandb credentials and wandb "
                            f"refused ({str(exc).splitlines()[0]}). Log in once with `wandb login` (or set "
                            f"WANDB_API_KEY), or use logger.mode=offline and upload later with `wandb sync "
                            f"{run_dir}/wandb`.") from None
        except wandb.errors.Error as exc:  # the server cannot be reached
            raise UserError(f"config key 'logger.mode': '{logger_cfg.mode}' could not reach the wandb server within "
                            f"{WANDB_INIT_TIMEOUT_S} s ({str(exc).splitlines()[0][:200]}). Check the network, or use "
                            f"logger.mode=offline and upload later with `wandb sync {run_dir}/wandb`.") from None

    def log(self, row: dict) -> None:
        step = row["step"]
        self.run.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricLoggers:
    def __init__(self, logger_cfg, run_dir: Path, config: dict, enabled: bool = True,
                 resume_step: int | None = None):
        self.sinks = []
        if enabled:  # rank 0 only
            if logger_cfg.name == "wandb":  # first: a refusal leaves metrics.jsonl as it was
                self.sinks.append(WandbLogger(logger_cfg, run_dir, config, resume_step))
            self.sinks.append(JSONLLogger(run_dir / "metrics.jsonl", resume_step))

    def log(self, row: dict) -> None:
        for sink in self.sinks:
            sink.log(row)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
