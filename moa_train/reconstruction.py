"""The picture of a vision run: validation images, what the encoder saw, and what the decoder made of it."""

from __future__ import annotations

from pathlib import Path

import torch

from .data.images import MEAN, STD, ImageSamples
from .mae import MaskedAutoencoder, patchify, unpatchify

RECONSTRUCTION_FIGURE = "reconstruction.png"


@torch.no_grad()
def reconstructions(model: MaskedAutoencoder, images: torch.Tensor, noise: torch.Tensor,
                    autocast) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masked, reconstructed, per-image loss) for a batch: the masked images with the hidden patches grey, and the
    visible patches with the predictions in the masked ones. Predictions of per-patch normalised pixels are put
    back at each original patch's mean and spread, as MAE's visualisation does."""
    was_training = model.training
    model.eval()
    with autocast:
        loss, prediction, mask = model(images, noise, reduction="none", return_prediction=True)
    model.train(was_training)
    patches = patchify(images.float(), model.patch)
    if model.cfg.vision.norm_pix_loss:
        mean, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
        prediction = prediction * (var + 1e-6) ** 0.5 + mean
    hidden = mask[..., None].bool()
    grey = torch.full_like(patches, 0.0)  # 0 in normalised units: ImageNet's mean colour
    masked = torch.where(hidden, grey, patches)
    filled = torch.where(hidden, prediction, patches)
    return (unpatchify(masked, model.patch, model.channels), unpatchify(filled, model.patch, model.channels),
            loss.float())


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) normalised -> (B, H, W, C) in [0, 1] for imshow."""
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    return (images.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1)


def reconstruction_figure(model: MaskedAutoencoder, validation: ImageSamples, path: Path | None, device, autocast,
                          count: int = 6) -> Path | None:
    """A figure of `count` validation images (rows): original, masked, reconstructed, with each one's loss. With
    path None the model runs (as every process of a sharded model must) but nothing is drawn."""
    items = [validation[i] for i in range(min(count, len(validation)))]
    items = [item for item in items if item[0] is not None]
    images = torch.stack([x for x, _, _ in items]).to(device)
    noise = torch.stack([z for _, z, _ in items]).to(device)
    masked, filled, loss = reconstructions(model, images, noise, autocast)
    if path is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [("original", to_pixels(images)), ("masked", to_pixels(masked)), ("reconstructed", to_pixels(filled))]
    fig, axes = plt.subplots(len(items), 3, figsize=(6, 2 * len(items)), squeeze=False)
    for row in range(len(items)):
        for col, (title, pixels) in enumerate(columns):
            ax = axes[row][col]
            ax.imshow(pixels[row].numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title)
        axes[row][2].set_xlabel(f"loss {loss[row].item():.3f}", fontsize=8)
    fig.suptitle(f"{model.cfg.name}: {int(100 * model.cfg.vision.mask_ratio)}% of patches masked", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
