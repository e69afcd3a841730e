"""Parameter names of exported models: a dense swiglu model is Llama, under transformers' names.

The same RoPE convention (the head dimension split in halves) holds on both sides, so no weight is
permuted, only renamed.
"""

from __future__ import annotations

import re

import torch

# moa_train's parameter names and Llama's (transformers' LlamaForCausalLM), for a dense swiglu model; {i}: a layer
LLAMA_NAMES = [
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("layers.{i}.attn.wq.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attn.wk.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attn.wv.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attn.wo.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.ffn.w1.weight", "model.layers.{i}.mlp.gate_proj.weight"),  # silu(W1 x) ...
    ("layers.{i}.ffn.w2.weight", "model.layers.{i}.mlp.up_proj.weight"),  # ... * W2 x
    ("layers.{i}.ffn.w3.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
]


def is_plain_llama(cfg) -> bool:
    """A dense model with the swiglu FFN is exactly Llama (a matched, wider swiglu too)."""
    return cfg.model.family == "dense" and cfg.ffn.name == "swiglu"


def rename(key: str, pairs: list[tuple[str, str]]) -> str:
    """A parameter name through the first (from, to) template pair whose `from` matches it."""
    for source, target in pairs:
        if match := re.fullmatch(re.escape(source).replace(r"\{i\}", r"(\d+)"), key):
            return target.replace("{i}", match.group(1)) if match.groups() else target
    raise KeyError(f"no Llama name for the parameter '{key}'")


def to_llama(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {rename(k, LLAMA_NAMES): v for k, v in state.items()}


def from_llama(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Llama's names back to moa_train's."""
    return {rename(k, [(hf, ours) for ours, hf in LLAMA_NAMES]): v for k, v in state.items()}
