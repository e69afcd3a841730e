"""How much of a vision step waits on image decoding, with and without decoding workers.

For each `data.images.workers` value, in alternating rounds: a mae_tiny training loop (the
trainer's own ImageBatches, model and AdamW) on a folder of images, timing the wait in
`samples()` separately from the step. The data share is the wait over the whole. Then the
decode-and-augment rate of one process, on the offline tiles and on ImageNet-sized JPEGs
(500x375, cropped to 224), which tells how many workers a GPU step needs.

    python benchmarks/image_data.py --rounds 3 --steps 40
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moa_train.budget import plan_run
from moa_train.config import compose_run_config
from moa_train.data.images import BadFiles, ImageBatches, ImageSamples, image_root, split_images
from moa_train.data.sources import cache_root
from moa_train.mae import MaskedAutoencoder


def loop(workers: int, steps: int, threads: int) -> tuple[float, float]:
    """(seconds waiting for batches, seconds in total) over `steps` steps after 3 warm-up steps."""
    cfg = compose_run_config(["model=mae_tiny", "ffn=qd_moa", "ffn.kernel=eager"])
    torch.set_num_threads(threads)
    split = split_images(image_root(cfg.data, cache_root(cfg.data)), 0.1, 1024)
    plan = plan_run(cfg.train, cfg.budget, {"active": 1}, train_images=len(split.train))
    v = cfg.model.vision
    dataset = ImageSamples(split, v.image_size, v.patch_size, 64, 0, (0.2, 1.0), True)
    batches = ImageBatches(dataset, plan, 0, workers, BadFiles(10))
    torch.manual_seed(0)
    model = MaskedAutoencoder(cfg.model, cfg.ffn)
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    waited = 0.0
    for step in range(steps + 3):
        if step == 3:
            waited, start = 0.0, time.perf_counter()
        t = time.perf_counter()
        images, noise = batches.samples(step * plan.batch_size, plan.micro_batch_size)
        waited += time.perf_counter() - t
        model(images, noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    total = time.perf_counter() - start
    batches.close()
    return waited, total


def decode_rate(folder: Path, image_size: int, patch: int, count: int) -> float:
    """Training samples per second that one process decodes and augments."""
    split = split_images(folder, 0.01, None)
    dataset = ImageSamples(split, image_size, patch, (image_size // patch) ** 2, 0, (0.2, 1.0), True)
    start = time.perf_counter()
    for k in range(count):
        dataset[k]
    return count / (time.perf_counter() - start)


def imagenet_like(folder: Path, count: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = rng.random((15, 20, 3))
        pixels = np.kron(coarse, np.ones((25, 25, 1))) * 200 + rng.random((375, 500, 3)) * 55
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads available, "
          f"torch {torch.__version__}; training process on {args.threads} thread(s)")
    choices = [int(w) for w in args.workers.split(",")]
    shares: dict[int, list[float]] = {w: [] for w in choices}
    step_ms: dict[int, list[float]] = {w: [] for w in choices}
    for _ in range(args.rounds):
        for workers in choices:
            waited, total = loop(workers, args.steps, args.threads)
            shares[workers].append(waited / total)
            step_ms[workers].append(1000 * total / args.steps)
    print("\nmae_tiny, batch 64 of 32x32 crops, qd_moa (median over rounds):")
    print("| data.images.workers | step (ms) | waiting for data |")
    print("|---:|---:|---:|")
    for workers in choices:
        print(f"| {workers} | {statistics.median(step_ms[workers]):.1f} | "
              f"{100 * statistics.median(shares[workers]):.1f}% |")
    cfg = compose_run_config(["model=mae_tiny"])
    tiles = image_root(cfg.data, cache_root(cfg.data))
    print(f"\none process decodes and augments: {decode_rate(tiles, 32, 4, 2000):,.0f} samples/s "
          f"(offline 64x64 PNG tiles -> 32x32)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = imagenet_like(Path(tmp), 200)
        print(f"one process decodes and augments: {decode_rate(folder, 224, 16, 400):,.0f} samples/s "
              f"(500x375 JPEG -> 224x224, ImageNet-sized)")


if __name__ == "__main__":
    main()
