"""Llama-style decoder: pre-RMSNorm, RoPE, causal SDPA attention, no biases.

The model stays thin: the FFN of each block comes from `build_ffn`, and parallelisation,
compilation and mixed precision are applied elsewhere (parallel.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig

from .ffn import FeedForward, build_ffn, ffn_hidden_dim
from .linear import Linear
from .loss import linear_cross_entropy
from .moe import MoE


def rope_tables(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., i], x[..., i + D/2]) of x: (B, H, T, D) by position-dependent angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.type_as(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, min_head_dim: int = 0, split_queries: bool = False,
              **mask) -> torch.Tensor:
    """SDPA over heads (B, H, T, D). Heads narrower than `min_head_dim` are zero-padded to it first: the
    zeros add nothing to q.k nor to the kept columns of the output, but torch's CPU flash-attention kernel
    runs narrow heads far below its rate (docs/benchmarks.md: heads of 10 padded to 16 are 1.6x faster).
    With `split_queries`, causal self-attention over SPLIT_QUERIES_LENGTHS positions is computed in two
    calls (causal_in_halves)."""
    head_dim, length = q.shape[-1], q.shape[-2]
    scale = {}
    if head_dim < min_head_dim:
        q, k, v = (F.pad(t, (0, min_head_dim - head_dim)) for t in (q, k, v))
        scale = {"scale": head_dim ** -0.5}
    if (split_queries and mask.get("is_causal") and k.shape[-2] == length and length % 2 == 0
            and SPLIT_QUERIES_LENGTHS[0] <= length <= SPLIT_QUERIES_LENGTHS[1]):
        y = causal_in_halves(q, k, v, **scale)
    else:
        y = F.scaled_dot_product_attention(q, k, v, **mask, **scale)
    return y[..., :head_dim] if scale else y


# Sequence lengths at which torch's CPU flash kernel computes every key of a causal row block, masked
# or not (its key blocks are 512 long below 768 positions), so that halving the queries pays: forward and
# backward 1.09-1.14x at 128 positions, 1.12x at 256, 1.23x at 512; 0.94x at 1,024, 0.95x at 64
SPLIT_QUERIES_LENGTHS = (128, 512)


def causal_in_halves(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **scale) -> torch.Tensor:
    """Causal self-attention as two SDPA calls: the first half of the queries against the first half of the
    keys (causal), the second half against all keys with the causal mask's lower half. A quarter of the
    score matrix, above the diagonal, is never computed; the result is SDPA's to float rounding."""
    half = q.shape[-2] // 2
    first = F.scaled_dot_product_attention(q[..., :half, :], k[..., :half, :], v[..., :half, :], is_causal=True,
                                           **scale)
    visible = torch.ones(half, 2 * half, dtype=torch.bool, device=q.device).tril(half)
    second = F.scaled_dot_product_attention(q[..., half:, :], k, v, attn_mask=visible, **scale)
    return torch.cat((first, second), dim=-2)


# Head width below which SDPA pads heads (train.attention_min_head_dim when null), by device type
AUTO_MIN_HEAD_DIM = {"cpu": 16}


def attention_min_head_dim(configured: int | None, device_type: str) -> int:
    return AUTO_MIN_HEAD_DIM.get(device_type, 0) if configured is None else configured


def attention_split_queries(configured: bool | None, device_type: str) -> bool:
    """train.attention_split_queries: null splits on CPU only, whose flash kernel the split was measured on."""
    return device_type == "cpu" if configured is None else configured


class Attention(nn.Module):
    min_head_dim: int = 0  # set from train.attention_min_head_dim by the builder; see attention()
    split_queries: bool = False  # set from train.attention_split_queries by the builder; see attention()

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.wq = Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None, layer: int = 0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # the keys and values of every earlier position, this step's appended
            k, v = cache.update(k, v, layer)
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        y = attention(q, k, v, self.min_head_dim, self.split_queries, **causal_mask(T, k.shape[2], x.device))
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def causal_mask(queries: int, keys: int, device) -> dict:
    """SDPA's masking for `queries` new positions after `keys - queries` cached ones."""
    if queries == keys:
        return {"is_causal": True}
    if queries == 1:
        return {}  # one new position sees every cached one
    return {"attn_mask": torch.ones(queries, keys, dtype=torch.bool, device=device).tril(keys - queries)}


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, norm_eps: float, ffn: FeedForward | MoE,
                 layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id  # its slot in a key/value cache
        self.attn_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, n_heads, n_kv_heads)
        self.ffn_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.ffn = ffn

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, self.layer_id)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    # Tokens per chunk of the fused head + cross-entropy (loss.py); 0: the whole logits tensor and
    # F.cross_entropy. Set from train.loss_chunk_tokens by the builder; it does not change the numbers.
    loss_chunk_tokens: int = 0

    def __init__(self, model_cfg: DictConfig, ffn_cfg: DictConfig):
        super().__init__()
        self.cfg = model_cfg
        self._rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin), see _rope
        dim = model_cfg.dim
        n_kv_heads = model_cfg.n_kv_heads or model_cfg.n_heads
        self.tok_embeddings = nn.Embedding(model_cfg.vocab_size, dim)
        self.layers = nn.ModuleList(
            Block(dim, model_cfg.n_heads, n_kv_heads, model_cfg.norm_eps, self._ffn(model_cfg, ffn_cfg), layer_id)
            for layer_id in range(model_cfg.n_layers)
        )
        self.norm = nn.RMSNorm(dim, eps=model_cfg.norm_eps)
        self.output = Linear(dim, model_cfg.vocab_size, bias=False)
        if model_cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def _rope(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE tables of at least `length` positions, built once per device and regrown by doubling
        (generation asks for one more position each step); a position's angles do not depend on the
        table's length. Not buffers: no checkpoint holds them, and a meta-device build has none."""
        tables = self._rope_tables
        if tables is None or tables[0].device != device:
            tables = None
        if tables is None or tables[0].shape[0] < length:
            size = max(length, 2 * tables[0].shape[0]) if tables is not None else length
            # outside any inference_mode a caller may be in: training later saves them for backward
            with torch.inference_mode(False), torch.no_grad():
                tables = rope_tables(size, self.cfg.dim // self.cfg.n_heads, self.cfg.rope_theta, device)
            self._rope_tables = tables
        return tables

    @staticmethod
    def _ffn(model_cfg: DictConfig, ffn_cfg: DictConfig) -> nn.Module:
        if model_cfg.family == "moe":
            return MoE(model_cfg.dim, model_cfg.moe, ffn_cfg, model_cfg.ffn_multiple_of)
        hidden = ffn_hidden_dim(model_cfg.dim, ffn_cfg.name, model_cfg.ffn_hidden, model_cfg.ffn_multiple_of)
        return build_ffn(ffn_cfg, model_cfg.dim, hidden)

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.cfg.init_std
        # Projections that write into the residual stream are scaled down with depth (GPT-2).
        output_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for block in self.layers:
            for name, linear in block.attn.named_children():
                nn.init.normal_(linear.weight, std=output_std if name == "wo" else std)
            block.ffn.reset_parameters(std, output_std)
            block.attn_norm.reset_parameters()
            block.ffn_norm.reset_parameters()
        self.norm.reset_parameters()
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, std=std)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute every buffer that checkpoints do not hold (after loading into uninitialised memory)."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_buffers"):
                module.reset_buffers()

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """Logits (B, T, V), or the mean cross-entropy when targets are given.

        `cache`: for generation, the keys and values of the positions before `tokens`, extended in place;
        anything with `update(k, v, layer) -> (k, v)` and `get_seq_length()` (generate.KVCache, or a
        transformers DynamicCache)."""
        start = cache.get_seq_length() if cache is not None else 0
        cos, sin = self._rope(start + tokens.shape[1], tokens.device)
        cos, sin = cos[start:start + tokens.shape[1]], sin[start:start + tokens.shape[1]]
        h = self.tok_embeddings(tokens)
        for block in self.layers:
            h = block(h, cos, sin, cache)
        h = self.norm(h)
        if targets is None:
            return self.output(h)
        if self.loss_chunk_tokens:
            loss = linear_cross_entropy(h.flatten(0, 1), self.output.weight, targets.flatten(), self.loss_chunk_tokens)
        else:
            loss = F.cross_entropy(self.output(h).float().flatten(0, 1), targets.flatten())
        if self.training:  # MoE balance losses, when configured
            for block in self.layers:
                if getattr(block.ffn, "aux_loss", None) is not None:
                    loss = loss + block.ffn.aux_loss
        return loss
