"""The one build sequence of a model: seeded, initialised, then parallelised for its processes.

Training and `moa-bench` both call `build_model`, so what is timed is what is trained.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from .budget import count_parameters
from .distributed import DistEnv
from .ffn import FFN_REGISTRY
from .loss import chunk_tokens
from .mae import MaskedAutoencoder, SelfAttention, part_counts
from .model import Attention, Transformer, attention_min_head_dim, attention_split_queries
from .parallel import configure_backends, parallelize, remember_vector_isa_checks


def build_model(cfg: DictConfig, env: DistEnv) -> nn.Module:
    """The run's model on env.device, weights from train.seed (equal on every rank), compiled and
    wrapped for DDP / FSDP2 as cfg asks (parallel.py)."""
    configure_backends(env.device, cfg.train.threads, cfg.train.cpu_reuse_freed_memory, cfg.train.cpu_linear)
    if env.device.type == "cpu":  # compiled blocks and the MoA kernels: inductor's ISA checks remembered per machine
        from .data import cache_root

        remember_vector_isa_checks(cache_root(cfg.data))
    torch.manual_seed(cfg.train.seed)
    with env.device:
        model = model_class(cfg.model)(cfg.model, cfg.ffn)
    model.init_weights()
    if isinstance(model, Transformer):
        model.loss_chunk_tokens = chunk_tokens(cfg.train.loss_chunk_tokens, cfg.model.vocab_size,
                                               cfg.train.seq_len, env.device.type)
    min_head_dim = attention_min_head_dim(cfg.train.attention_min_head_dim, env.device.type)
    split_queries = attention_split_queries(cfg.train.attention_split_queries, env.device.type)
    for module in model.modules():
        if isinstance(module, (Attention, SelfAttention)):
            module.min_head_dim = min_head_dim
        if isinstance(module, Attention):  # causal: the ViT's attention sees every patch
            module.split_queries = split_queries
    return parallelize(model, env, cfg.train.compile, cfg.train.dtype, cfg.train.activation_checkpointing,
                       cfg.train.activation_checkpointing_every)


def resolve_shape(cfg: DictConfig) -> None:
    """The sizes a config leaves to be derived, set in place: a language model's model.vocab_size (null: the
    tokenizer's size), a vision model's train.seq_len (its patches per image: a token is a patch)."""
    if cfg.model.family == "mae":
        vision = cfg.model.vision
        cfg.train.seq_len = (vision.image_size // vision.patch_size) ** 2
    else:
        from .data import resolve_vocab_size

        cfg.model.vocab_size = resolve_vocab_size(cfg.data, cfg.model.vocab_size)


def model_class(model_cfg: DictConfig) -> type[nn.Module]:
    """The decoder for language (dense, moe), the masked autoencoder for vision (mae)."""
    return MaskedAutoencoder if model_cfg.family == "mae" else Transformer


def parameter_counts(cfg: DictConfig) -> tuple[dict[str, int], dict[str, int]]:
    """The model's parameter counts, and those the token budget multiplies: its baseline's unless
    budget.params_of=own, so a variant and its baseline train on the same tokens. Built on the meta
    device: no memory, no initialisation."""
    build = model_class(cfg.model)
    with torch.device("meta"):
        model = build(cfg.model, cfg.ffn)
        counts = count_parameters(model)
        if isinstance(model, MaskedAutoencoder):
            counts.update(part_counts(model))
        baseline = FFN_REGISTRY[cfg.ffn.name].baseline
        if cfg.budget.params_of == "own" or (baseline == cfg.ffn.name and not cfg.ffn.get("match_params_of")):
            return counts, counts
        return counts, count_parameters(build(cfg.model, OmegaConf.create({"name": baseline})))
