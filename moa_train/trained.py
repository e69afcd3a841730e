"""A trained model outside the training loop, from a run directory, one of its checkpoints, or a
moa-export directory: built from the configuration it was trained with, in float32 on the CPU
unless asked otherwise.

A checkpoint's weights are loaded with DCP (written by any number of processes, resharded on load);
an export's from its safetensors files (export.py), whose `moa_train.json` records the run's config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .checkpoint import CheckpointError, find_checkpoint, load_model_state, read_meta
from .config import RunConfig
from .errors import UserError
from .hf_names import from_llama, is_plain_llama
from .model import Transformer

EXPORT_RECORD = "moa_train.json"  # in an export directory: the run's config and step


@dataclass
class TrainedModel:
    model: Transformer  # in eval mode
    config: DictConfig  # the run's, with today's defaults for keys added since
    step: int
    checkpoint: Path  # the checkpoint directory, or the export directory
    run_dir: Path  # where its tokenizer.json is, and where eval.json goes

    @property
    def tokenizer_path(self) -> Path:
        return self.run_dir / "tokenizer.json"

    def tokenizer(self):
        from tokenizers import Tokenizer

        if not self.tokenizer_path.is_file():
            raise CheckpointError(f"'{self.run_dir}' holds no tokenizer.json (training copies the run's tokenizer "
                                  f"there, moa-export writes it into the export).")
        return Tokenizer.from_file(str(self.tokenizer_path))

    @property
    def eot_id(self) -> int:
        from .data.tokenizer import end_of_document_id

        return end_of_document_id(self.tokenizer(), self.config.data)

    @property
    def seq_len(self) -> int:
        """The positions the model was trained at."""
        return self.config.train.seq_len


def run_config(saved: dict) -> DictConfig:
    """A recorded config on today's schema: keys added since it was written take their defaults."""
    return OmegaConf.merge(OmegaConf.structured(RunConfig), saved)


def is_export(path: Path) -> bool:
    return (Path(path) / EXPORT_RECORD).is_file()


def load_trained(path: Path, device: str | torch.device = "cpu") -> TrainedModel:
    path = Path(path)
    if is_export(path):
        return load_export(path, device)
    checkpoint = find_checkpoint(path)
    meta = read_meta(checkpoint)
    cfg = run_config(meta["config"])
    if cfg.model.family == "mae":
        raise UserError(f"{checkpoint} holds a vision model (model={cfg.model.name}, model.family=mae). Export, "
                        "generation, gate reports and lm-eval are for the language models; a vision run's picture "
                        "is reconstruction.png in its run directory, and its checkpoints resume or start another "
                        "run (train.init_from).")
    with torch.device(device):
        model = Transformer(cfg.model, cfg.ffn)
    load_model_state(checkpoint, model)
    return TrainedModel(model.eval(), cfg, meta["step"], checkpoint, checkpoint.parent.parent)


def export_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export's safetensors files (one file, or the shards its index names)."""
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    state = {}
    for name in files:
        if not (directory / name).is_file():
            raise CheckpointError(f"the export '{directory}' lacks its weights file '{name}'.")
        state.update(load_file(str(directory / name)))
    return state


def load_export(directory: Path, device: str | torch.device = "cpu") -> TrainedModel:
    record = json.loads((directory / EXPORT_RECORD).read_text())
    cfg = run_config(record["config"])
    state = export_state_dict(directory)
    state = from_llama(state) if is_plain_llama(cfg) else {k.removeprefix("model."): v for k, v in state.items()}
    with torch.device(device):
        model = Transformer(cfg.model, cfg.ffn)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"the export '{directory}' does not fit the model its {EXPORT_RECORD} describes "
                              f"(missing: {missing[:5]}, unexpected: {unexpected[:5]}).")
    return TrainedModel(model.eval(), cfg, record["step"], directory, directory)


def weights_source(path: str) -> tuple[Path, dict]:
    """(the checkpoint or export directory `path` names, the config it was trained with)."""
    path = Path(path).expanduser()
    if is_export(path):
        return path, json.loads((path / EXPORT_RECORD).read_text())["config"]
    checkpoint = find_checkpoint(path)
    return checkpoint, read_meta(checkpoint)["config"]


def load_initial_weights(source: Path, model: torch.nn.Module) -> None:
    """Another run's weights into this run's (possibly wrapped or sharded) model: train.init_from."""
    if not is_export(source):
        load_model_state(source, model)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = export_state_dict(source)
    cfg = run_config(json.loads((source / EXPORT_RECORD).read_text())["config"])
    state = from_llama(state) if is_plain_llama(cfg) else {k.removeprefix("model."): v for k, v in state.items()}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
