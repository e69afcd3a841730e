"""`moa-export RUN_DIR_OR_CHECKPOINT --out DIR`: a trained model as a Hugging Face model directory.

The checkpoint (written by any number of processes, DDP or FSDP2) is loaded whole into one process
and written as:

    config.json, generation_config.json      the model's shape; end-of-text as bos/eos
    model.safetensors                        the weights (over --max-shard-size: model-0000k-of-0000n
                                             .safetensors and model.safetensors.index.json)
    tokenizer.json, tokenizer_config.json    the run's tokenizer as a transformers fast tokenizer
    moa_train.json                           the run's config and step: what moa-generate, moa-eval and
                                             train.init_from read back

A dense model with the `swiglu` FFN is exactly Llama: it is written as `LlamaForCausalLM` (the same
RoPE convention, so no weight is permuted) and loads with plain `AutoModelForCausalLM`. Every other
model is written with `model_type: moa` and two one-line files, configuration_moa.py and
modeling_moa.py, that import `MoaConfig` / `MoaForCausalLM` from the installed moa_train
(hf_model.py): load it with `trust_remote_code=True` where moa_train is installed. The export is
written to a temporary directory beside DIR and renamed into place, so a failure leaves nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from .errors import UserError
from .hf_names import is_plain_llama, to_llama
from .trained import EXPORT_RECORD, TrainedModel, load_trained

CUSTOM_FILES = {
    "configuration_moa.py": "from moa_train.hf_model import MoaConfig  # noqa: F401\n",
    "modeling_moa.py": "from moa_train.hf_model import MoaForCausalLM  # noqa: F401\n",
}
HEADER = "# Written by moa-export: the class is moa_train's own (pip install 'moa-train[eval]').\n"


def hf_state_dict(trained: TrainedModel) -> dict[str, torch.Tensor]:
    """The weights under the names the export uses; tied tensors are written twice (safetensors keeps no aliases)."""
    state = {k: v.detach().clone().contiguous() for k, v in trained.model.state_dict().items()}
    if is_plain_llama(trained.config):
        return to_llama(state)
    return {f"model.{k}": v for k, v in state.items()}


def hf_config(trained: TrainedModel):
    from omegaconf import OmegaConf

    cfg, model_cfg = trained.config, trained.config.model
    common = dict(vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.dim, num_hidden_layers=model_cfg.n_layers,
                  num_attention_heads=model_cfg.n_heads, max_position_embeddings=cfg.train.seq_len,
                  tie_word_embeddings=model_cfg.tie_embeddings, bos_token_id=trained.eot_id,
                  eos_token_id=trained.eot_id)
    if is_plain_llama(cfg):
        from transformers import LlamaConfig

        hidden = trained.model.layers[0].ffn.w1.weight.shape[0]
        config = LlamaConfig(**common, intermediate_size=hidden, num_key_value_heads=model_cfg.n_kv_heads or
                             model_cfg.n_heads, head_dim=model_cfg.dim // model_cfg.n_heads,
                             rms_norm_eps=model_cfg.norm_eps, rope_theta=model_cfg.rope_theta, hidden_act="silu",
                             attention_bias=False, mlp_bias=False)
        config.architectures = ["LlamaForCausalLM"]
        return config
    from .hf_model import MoaConfig

    config = MoaConfig(moa_model=OmegaConf.to_container(model_cfg, resolve=True),
                       moa_ffn=OmegaConf.to_container(cfg.ffn, resolve=True), **common)
    config.architectures = ["MoaForCausalLM"]
    config.auto_map = {"AutoConfig": "configuration_moa.MoaConfig",
                       "AutoModelForCausalLM": "modeling_moa.MoaForCausalLM"}
    return config


def write_weights(state: dict[str, torch.Tensor], directory: Path, max_shard_size: str) -> list[str]:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: state[name] for name in names}, str(directory / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sorted(split.filename_to_tensors)


def write_tokenizer(trained: TrainedModel, directory: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    tokenizer = trained.tokenizer()
    eot = tokenizer.id_to_token(trained.eot_id)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eot, bos_token=eot, pad_token=eot,
                                   model_max_length=trained.seq_len)
    fast.save_pretrained(str(directory))
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers 5 writes a name 4.x cannot load
    config_path.write_text(json.dumps(config, indent=2))


def check_target(out: Path, record: dict, force: bool) -> None:
    """Refuse to replace a directory that holds something else than an earlier export of this same model."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out '{out}' is a file, not a directory.")
    if not any(out.iterdir()) or force:
        return
    try:
        earlier = json.loads((out / EXPORT_RECORD).read_text())
    except (OSError, ValueError):
        raise UserError(f"--out '{out}' already holds files that are not a moa-export of this model; choose "
                        f"another directory, or pass --force to replace them.") from None
    if earlier.get("config") != record["config"] or earlier.get("step") != record["step"]:
        raise UserError(f"--out '{out}' already holds the export of another model (step {earlier.get('step')} of "
                        f"'{earlier.get('run')}'); choose another directory, or pass --force to replace it.")


def export(source: Path, out: Path, force: bool = False, max_shard_size: str = "5GB") -> dict:
    """Write the export of the checkpoint `source` names to `out`; returns what was written."""
    from omegaconf import OmegaConf

    trained = load_trained(source)
    trained.tokenizer()  # a run without its tokenizer stops here, before anything is written
    out = Path(os.path.abspath(out))
    record = {"format": 1, "run": str(trained.run_dir), "checkpoint": trained.checkpoint.name, "step": trained.step,
              "config": OmegaConf.to_container(trained.config, resolve=True)}
    check_target(out, record, force)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        config = hf_config(trained)
        config.save_pretrained(str(tmp))
        from transformers import GenerationConfig

        GenerationConfig(bos_token_id=trained.eot_id, eos_token_id=trained.eot_id,
                         pad_token_id=trained.eot_id).save_pretrained(str(tmp))
        files = write_weights(hf_state_dict(trained), tmp, max_shard_size)
        write_tokenizer(trained, tmp)
        if not is_plain_llama(trained.config):
            for name, text in CUSTOM_FILES.items():
                (tmp / name).write_text(HEADER + text)
        (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2))
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "model_type": config.model_type, "step": trained.step, "weights": files}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="moa-export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("source", type=Path, help="a run directory (its newest checkpoint) or a checkpoints/step-N "
                        "directory; required")
    parser.add_argument("--out", type=Path, required=True, help="the export directory (required)")
    parser.add_argument("--force", action="store_true", help="replace a directory that holds something else")
    parser.add_argument("--max-shard-size", default="5GB", help="larger weights are split into shards")
    args = parser.parse_args(argv)
    try:
        done = export(args.source, args.out, args.force, args.max_shard_size)
    except UserError as exc:
        print(f"moa-export: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"moa-export: step {done['step']} as {done['model_type']} -> {done['out']} "
          f"({', '.join(done['weights'])})")


if __name__ == "__main__":
    main()
