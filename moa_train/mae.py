"""Masked autoencoder (MAE, He et al. 2021) of a ViT, with any `ffn=` variant in its blocks.

The second model family (`model.family: mae`), for the paper's vision check. As in MAE's reference:
patches of `patch_size` pixels embedded linearly, fixed 2-D sin-cos position embeddings, a class
token, a random `mask_ratio` of each image's patches dropped before the encoder, a narrower decoder
that sees the encoded visible patches and a shared mask token at every masked position, and the
loss: mean squared error on the masked patches only, against pixels normalised per patch
(`norm_pix_loss`). Blocks are pre-LayerNorm ViT blocks whose MLP is `build_ffn`'s FeedForward, so
GELU (the ViT baseline, Type-I), SwiGLU and every LA / MoA variant drop in; Type-II variants get
the 8/3 width that keeps the Type-I MLP's parameters, as in the language models.

Which patches are masked is decided by `noise` (B, N), given with the images: the patches with the
lowest noise are kept. The data pipeline draws it from the sample's index and passes each patch's
rank in it (integers, which mixed precision never rounds), so a sample is masked
the same way whatever the number of processes, and a resumed run masks as the uninterrupted one.

Encoder and decoder blocks are one `layers` list (encoder first), so compile, activation
checkpointing and FSDP2 (parallel.py) treat them as they treat a decoder's blocks.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from omegaconf import DictConfig

from .ffn import FeedForward, build_ffn, ffn_hidden_dim
from .linear import Linear
from .model import attention


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(len(positions), dim): sines then cosines at MAE's frequencies 1 / 10000^(2i/dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """(1 + grid^2, dim) position embeddings: a zero row for the class token, then the patches row by row,
    half the channels encoding the column and half the row (MAE's get_2d_sincos_pos_embed)."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    table = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=table.dtype), table]).float()


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, patch * patch * C), patches row by row, each (row, column, channel)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """The inverse of patchify for square images."""
    b, n, _ = patches.shape
    grid = int(round(n ** 0.5))
    x = patches.reshape(b, grid, grid, patch, patch, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, channels, grid * patch, grid * patch)


def normalised_patches(patches: torch.Tensor) -> torch.Tensor:
    """Each patch's pixels at zero mean and unit variance (MAE's norm_pix_loss target)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + 1e-6) ** 0.5


class SelfAttention(nn.Module):
    """ViT attention: every token sees every token; biased projections as in MAE (qkv_bias=True)."""

    min_head_dim: int = 0  # set from train.attention_min_head_dim by the builder; see model.attention()

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = attention(q, k, v, self.min_head_dim)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, norm_eps: float, ffn: FeedForward):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SelfAttention(dim, n_heads)
        self.ffn_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.ffn = ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class MaskedAutoencoder(nn.Module):
    def __init__(self, model_cfg: DictConfig, ffn_cfg: DictConfig):
        super().__init__()
        self.cfg = model_cfg
        v = model_cfg.vision
        self.patch, self.channels = v.patch_size, v.channels
        self.grid = v.image_size // v.patch_size
        self.n_patches = self.grid ** 2
        self.n_visible = visible_patches(self.n_patches, v.mask_ratio)
        self.encoder_layers = model_cfg.n_layers
        dim, ddim = model_cfg.dim, v.decoder_dim

        self.patch_embed = Linear(v.patch_size ** 2 * v.channels, dim)  # MAE's stride-p convolution, as a matmul
        self.cls_token = nn.Parameter(torch.zeros(dim))
        self.encoder_norm = nn.LayerNorm(dim, eps=model_cfg.norm_eps)
        self.decoder_embed = Linear(dim, ddim)
        self.mask_token = nn.Parameter(torch.zeros(ddim))
        self.layers = nn.ModuleList(
            [ViTBlock(dim, model_cfg.n_heads, model_cfg.norm_eps, self._ffn(model_cfg, ffn_cfg, dim))
             for _ in range(model_cfg.n_layers)]
            + [ViTBlock(ddim, v.decoder_heads, model_cfg.norm_eps, self._ffn(model_cfg, ffn_cfg, ddim))
               for _ in range(v.decoder_layers)])
        self.decoder_norm = nn.LayerNorm(ddim, eps=model_cfg.norm_eps)
        self.output = Linear(ddim, v.patch_size ** 2 * v.channels)  # the pixel head (optim role `head`)
        # Fixed, not learned: recomputed by reset_buffers rather than held by checkpoints.
        self.register_buffer("pos_embed", sincos_2d(dim, self.grid), persistent=False)
        self.register_buffer("decoder_pos_embed", sincos_2d(ddim, self.grid), persistent=False)

    @staticmethod
    def _ffn(model_cfg: DictConfig, ffn_cfg: DictConfig, dim: int) -> FeedForward:
        hidden = ffn_hidden_dim(dim, ffn_cfg.name, None, model_cfg.ffn_multiple_of)
        return build_ffn(ffn_cfg, dim, hidden)

    @property
    def encoder(self) -> nn.ModuleList:
        return self.layers[:self.encoder_layers]

    @property
    def decoder(self) -> nn.ModuleList:
        return self.layers[self.encoder_layers:]

    @torch.no_grad()
    def init_weights(self) -> None:
        """MAE's: Xavier-uniform linear maps (the patch embedding too), zero biases, LayerNorms at 1 and 0,
        class and mask tokens from N(0, 0.02^2); the FFN's own reset for its projections and gates, at the
        std a Xavier init gives its first projection."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        for block in self.layers:
            w1 = block.ffn.w1.weight
            std = (2.0 / (w1.shape[0] + w1.shape[1])) ** 0.5
            block.ffn.reset_parameters(std, std)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        device = self.pos_embed.device
        self.pos_embed = sincos_2d(self.cfg.dim, self.grid).to(device)
        self.decoder_pos_embed = sincos_2d(self.cfg.vision.decoder_dim, self.grid).to(device)
        for module in self.modules():
            if module is not self and hasattr(module, "reset_buffers"):
                module.reset_buffers()

    def encode(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoded class + visible tokens (B, 1 + n_visible, dim), restore order (B, N))."""
        patches = patchify(images, self.patch).to(self.patch_embed.weight.dtype)  # bf16 under FSDP2's policy
        x = self.patch_embed(patches) + self.pos_embed[1:]
        order = noise.argsort(dim=1)  # ascending: the lowest-noise patches are kept
        keep = order[:, :self.n_visible]
        x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[0]).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.encoder:
            x = block(x)
        return self.encoder_norm(x), order.argsort(dim=1)

    def decode(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Predicted pixels of every patch (B, N, patch^2 * C)."""
        x = self.decoder_embed(latent)
        b, _, d = x.shape
        masked = self.mask_token.to(x.dtype).expand(b, self.n_patches - self.n_visible, d)
        patches = torch.cat([x[:, 1:], masked], dim=1).gather(1, restore[..., None].expand(-1, -1, d))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder:
            x = block(x)
        return self.output(self.decoder_norm(x))[:, 1:]

    def forward(self, images: torch.Tensor, noise: torch.Tensor, reduction: str = "mean",
                return_prediction: bool = False):
        """The reconstruction loss on the masked patches: its mean over the batch's masked patches, or with
        reduction="none" one loss per image (B,). With return_prediction, (loss, predicted patches (B, N, P),
        mask (B, N) with 1 at masked patches) for pictures of the reconstruction."""
        latent, restore = self.encode(images, noise)
        prediction = self.decode(latent, restore).float()
        target = patchify(images.float(), self.patch)
        if self.cfg.vision.norm_pix_loss:
            target = normalised_patches(target)
        mask = (restore >= self.n_visible).float()
        per_patch = (prediction - target).pow(2).mean(dim=-1)
        if reduction == "none":
            loss = (per_patch * mask).sum(1) / mask.sum(1)
        else:
            loss = (per_patch * mask).sum() / mask.sum()
        return (loss, prediction, mask) if return_prediction else loss

    def flops_per_image(self) -> float:
        """Training FLOPs of one image (forward and backward, 6 per matmul parameter and token, plus attention's
        12 * layers * width * tokens per token), the encoder on its visible tokens, the decoder on all."""
        enc_tokens, dec_tokens = 1 + self.n_visible, 1 + self.n_patches
        enc = sum(p.numel() for block in self.encoder for p in block.parameters() if p.ndim >= 2)
        dec = sum(p.numel() for block in self.decoder for p in block.parameters() if p.ndim >= 2)
        ddim = self.cfg.vision.decoder_dim
        return (6.0 * (self.patch_embed.weight.numel() * self.n_patches
                       + enc * enc_tokens + self.decoder_embed.weight.numel() * enc_tokens
                       + dec * dec_tokens + self.output.weight.numel() * dec_tokens)
                + 12.0 * (self.encoder_layers * self.cfg.dim * enc_tokens ** 2
                          + len(self.decoder) * ddim * dec_tokens ** 2))


def visible_patches(n_patches: int, mask_ratio: float) -> int:
    """Patches the encoder sees: MAE's int(N * (1 - mask_ratio))."""
    return int(n_patches * (1 - mask_ratio))


def part_counts(model: MaskedAutoencoder) -> dict[str, int]:
    """encoder (patch embedding, class token, encoder blocks and norm) and decoder (the rest) parameters."""
    encoder = [model.patch_embed, model.encoder_norm, *model.encoder]
    n_encoder = sum(p.numel() for m in encoder for p in m.parameters()) + model.cls_token.numel()
    return {"encoder": n_encoder, "decoder": sum(p.numel() for p in model.parameters()) - n_encoder}
