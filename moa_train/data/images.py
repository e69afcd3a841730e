"""Images for the MAE family (`data=images`): a folder of files -> deterministic, augmented batches.

- The folder is an ImageFolder tree (class sub-folders) or flat; every file with an image suffix
  below it counts, in sorted order of its path relative to the folder. Pillow decodes them.
- The validation split is held out by file: a file is a validation file when the hash of its
  relative path falls below `data.images.val_fraction`, so the split does not move when files are
  added, and no crop of a validation image is ever trained on.
- Sample k of the run is fixed by k alone: epoch k // n reads the training files in a permutation
  seeded by (train.seed, epoch), and the sample's crop, flip and MAE mask noise come from a generator
  seeded by (train.seed, k). Any number of processes or workers, and a resumed run, see the same
  samples as one uninterrupted process.
- Training: random resized crop (scale data.images.crop_scale, aspect 3/4..4/3, bicubic) and a
  horizontal flip, as MAE's pretraining; validation: the shorter side resized to image_size / 0.875,
  then the centre crop, with a fixed mask per validation image (seed 0, whatever train.seed).
- A file that cannot be decoded, or whose shorter side is under the patch size, is skipped with a
  warning naming it (the sample takes the next file of the permutation); past
  data.images.max_bad_files such files the run stops, naming them.
- The offline set (data.path=null): tiles of the photographs that scikit-image ships (CC0 or public
  domain, listed in OFFLINE_SOURCES), cut once into the cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..utils import display_path, expand_path

log = logging.getLogger("moa_train")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
# ImageNet's channel statistics, as MAE normalises its inputs
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# scikit-image 0.26's bundled photographs with no copyright restrictions (CC0 or public domain, per
# skimage.data's docstrings); drawings, stereo pairs and synthetic patterns are left out.
OFFLINE_SOURCES = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
                   "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
                   "microaneurysms.png", "moon.png", "page.png", "retina.jpg", "rocket.jpg", "text.png")
OFFLINE_TILE = 64  # pixels a side of the offline set's tiles
OFFLINE_HINT = "pip install --no-deps scikit-image==0.26.0 (`make install` does this)"


def offline_image_set(cache_dir: Path) -> Path:
    """The offline set's folder: OFFLINE_TILE-pixel tiles of OFFLINE_SOURCES, one sub-folder per photograph,
    written once (atomically: a half-written set is never used)."""
    spec = importlib.util.find_spec("skimage")  # located, not imported: the package's own dependencies are not needed
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"data=images with data.path=null uses the offline image set, which needs the package "
                        f"scikit-image. Install it with: {OFFLINE_HINT}; or set data.path to a folder of images.")
    source_dir = Path(list(spec.submodule_search_locations)[0]) / "data"
    missing = [name for name in OFFLINE_SOURCES if not (source_dir / name).is_file()]
    if missing:
        raise DataError(f"the offline image set needs {', '.join(missing)} in {source_dir}, which this scikit-image "
                        f"lacks. Install the version it was made from: {OFFLINE_HINT}.")
    target = cache_dir / "images" / f"skimage-tiles{OFFLINE_TILE}"
    if (target / "COMPLETE").is_file():
        return target
    import shutil
    import tempfile

    from PIL import Image

    target.parent.mkdir(parents=True, exist_ok=True)
    # each process cuts into a folder of its own, renamed into place: concurrent first runs never see half a set
    partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".partial-"))
    for name in OFFLINE_SOURCES:
        with Image.open(source_dir / name) as img:
            img = img.convert("RGB")
        folder = partial / Path(name).stem
        folder.mkdir(parents=True, exist_ok=True)
        for top in range(0, img.height - OFFLINE_TILE + 1, OFFLINE_TILE):
            for left in range(0, img.width - OFFLINE_TILE + 1, OFFLINE_TILE):
                tile = img.crop((left, top, left + OFFLINE_TILE, top + OFFLINE_TILE))
                tile.save(folder / f"{top // OFFLINE_TILE:02d}_{left // OFFLINE_TILE:02d}.png")
    (partial / "COMPLETE").write_text("tiles of scikit-image 0.26's photographs (skimage/data), CC0 or public domain\n")
    try:
        partial.rename(target)
    except OSError:  # another process finished first: its set is the same
        shutil.rmtree(partial, ignore_errors=True)
    return target


def image_root(data_cfg, cache_dir: Path) -> Path:
    """The folder a run reads: data.path, or the offline set."""
    if data_cfg.path is None:
        return offline_image_set(cache_dir)
    root = Path(expand_path(data_cfg.path))
    if not root.is_dir():
        raise DataError(f"data.path: '{data_cfg.path}' is not a folder. data=images reads a folder of image files "
                        f"(ImageFolder layout or flat: {', '.join(IMAGE_SUFFIXES)}).")
    return root


def list_images(root: Path) -> list[str]:
    """Paths (relative, '/'-separated, sorted) of the files below root with an image suffix."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith("."))


def is_validation_file(relative_path: str, val_fraction: float) -> bool:
    digest = hashlib.sha1(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < val_fraction


@dataclass
class ImageSplit:
    root: Path
    train: list[str]
    val: list[str]
    offline: bool = False  # the offline set, in the data cache

    @property
    def where(self) -> str:
        """The folder as logs and records name it: no machine path for the offline set."""
        if self.offline:
            return f"the offline image set ({self.root.name} in the data cache)"
        return display_path(self.root)

    def summary(self) -> dict:
        return {"source": "images", "path": None if self.offline else display_path(self.root),
                **({"offline_set": self.root.name} if self.offline else {}),
                "train_images": len(self.train), "val_images": len(self.val)}


def split_images(root: Path, val_fraction: float, max_val: int | None, offline: bool = False) -> ImageSplit:
    files = list_images(root)
    if not files:
        raise DataError(f"data.path: no image files in '{root}' (looked for {', '.join(IMAGE_SUFFIXES)} in it and "
                        f"its sub-folders).")
    val = [f for f in files if is_validation_file(f, val_fraction)]
    train = [f for f in files if not is_validation_file(f, val_fraction)]
    if max_val is not None and len(val) > max_val:  # the rest of the held-out files stay unused, never trained on
        val = sorted(val, key=lambda f: hashlib.sha1(f.encode()).digest())[:max_val]
        val.sort()
    if not val or not train:
        raise DataError(f"data.images.val_fraction={val_fraction} splits the {len(files)} images of '{root}' into "
                        f"{len(train)} training and {len(val)} validation files; both need at least one. Add images "
                        f"or change data.images.val_fraction.")
    return ImageSplit(root, train, val, offline)


def check_readable(split: ImageSplit, patch_size: int, tries: int = 32) -> None:
    """Before compute starts: at least one of the first `tries` training files decodes, or the run stops naming
    what was found wrong with them (a folder of unreadable files is refused, not skipped through)."""
    probe = ImageSamples(split, patch_size, patch_size, 1, 0, (1.0, 1.0), False)
    problems = []
    for relative in split.train[:tries]:
        try:
            probe._decode(relative)
            return
        except BadImage as exc:
            problems.append(str(exc))
    raise DataError(f"data.path: none of the first {len(problems)} image files of '{split.root}' can be used: "
                    + "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else ""))


def random_resized_crop(width: int, height: int, rng: np.random.Generator, scale: tuple[float, float],
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, width, height) of a crop with area in scale x the image's and aspect ratio in ratio, drawn
    as torchvision's RandomResizedCrop draws it (10 tries, then the centre crop of the nearest ratio)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class BadImage(Exception):
    """A file that cannot serve as a sample (undecodable, or smaller than a patch)."""


class ImageSamples(torch.utils.data.Dataset):
    """Sample k -> (image (C, S, S) float32, mask noise (N,), the files skipped for it). Picklable, for workers."""

    def __init__(self, split: ImageSplit, image_size: int, patch_size: int, n_patches: int, seed: int,
                 crop_scale: tuple[float, float], flip: bool, validation: bool = False):
        self.root, self.files = split.root, split.val if validation else split.train
        self.image_size, self.patch_size, self.n_patches = image_size, patch_size, n_patches
        self.seed, self.crop_scale, self.flip, self.validation = seed, tuple(crop_scale), flip, validation
        self._epoch: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.files)))
        return self._epoch[1]

    def _decode(self, relative: str):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.root / relative) as img:
                img = img.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            raise BadImage(f"{self.root / relative}: cannot be decoded ({type(exc).__name__}: {exc})") from None
        if min(img.size) < self.patch_size:
            raise BadImage(f"{self.root / relative}: {img.width}x{img.height} pixels, smaller than one "
                           f"{self.patch_size}-pixel patch (model.vision.patch_size)")
        return img

    def _transform(self, img, rng: np.random.Generator) -> torch.Tensor:
        from PIL import Image

        size = self.image_size
        if self.validation:
            short = round(size / 0.875)
            w, h = (short, max(short, round(img.height * short / img.width))) if img.width <= img.height else \
                (max(short, round(img.width * short / img.height)), short)
            img = img.resize((w, h), Image.BICUBIC)
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
        else:
            left, top, w, h = random_resized_crop(img.width, img.height, rng, self.crop_scale)
            img = img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
            if self.flip and rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]

    def __getitem__(self, k: int):
        # validation sample i: file i, mask from seed 0; training sample k: the permutation of its epoch
        rng = np.random.default_rng([0, k, 2] if self.validation else [self.seed, k, 1])
        n = len(self.files)
        epoch, position = (0, k) if self.validation else divmod(k, n)
        order = np.arange(n) if self.validation else self._order(epoch)
        skipped, img = [], None
        for attempt in range(min(n, 64)):  # past 64 unusable files in a row the caller stops the run anyway
            relative = self.files[order[(position + attempt) % n]]
            try:
                img = self._decode(relative)
                break
            except BadImage as exc:
                skipped.append(str(exc))
        if img is None:
            return None, None, skipped
        noise = rng.random(self.n_patches, dtype=np.float32)
        image = self._transform(img, rng)
        # each patch's rank in the noise (the model keeps the lowest): integers, which no mixed-precision
        # policy casts (FSDP2 casts floating inputs to bf16, whose ties would change the mask)
        return image, torch.from_numpy(np.argsort(np.argsort(noise, kind="stable"), kind="stable")), skipped


def _collate(items):
    images = [x for x, _, _ in items if x is not None]
    noise = [z for x, z, _ in items if x is not None]
    skipped = [s for _, _, bad in items for s in bad]
    if len(images) < len(items):
        return None, None, skipped
    return torch.stack(images), torch.stack(noise), skipped


class BadFiles:
    """Skipped files, each warned about once; past the limit the run stops naming them."""

    def __init__(self, limit: int):
        self.limit, self.seen = limit, {}

    def add(self, messages: list[str]) -> None:
        for message in messages:
            if message not in self.seen:
                self.seen[message] = True
                log.warning("skipped an image file: %s", message)
        if len(self.seen) > self.limit:
            raise DataError(f"{len(self.seen)} image files could not be used, more than data.images.max_bad_files="
                            f"{self.limit}: " + "; ".join(list(self.seen)[:5])
                            + ("; ..." if len(self.seen) > 5 else "") + ". Remove or fix them, or raise the limit.")


class ImageBatches:
    """This rank's training batches, decoded ahead by `workers` processes in the order the trainer asks for
    them (the plan's micro-batches from `start_step` on): `samples(first, n)` as PackedBatches has it."""

    def __init__(self, dataset: ImageSamples, plan, rank: int, workers: int, bad: BadFiles):
        self.dataset, self.plan, self.rank, self.workers, self.bad = dataset, plan, rank, workers, bad
        self._iterator, self._expected = None, None

    def _firsts(self, first: int):
        plan, step = self.plan, first // self.plan.batch_size
        micro = (first - step * plan.batch_size) // plan.micro_batch_size - self.rank * plan.grad_accum
        while True:
            yield step * plan.batch_size + (self.rank * plan.grad_accum + micro) * plan.micro_batch_size
            micro += 1
            if micro == plan.grad_accum:
                step, micro = step + 1, 0

    def _start(self, first: int) -> None:
        firsts = self._firsts(first)
        size = self.plan.micro_batch_size
        batches = (list(range(f, f + size)) for f in firsts)
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers,
                                             collate_fn=_collate, prefetch_factor=2 if self.workers else None)
        self._iterator, self._expected = iter(loader), self._firsts(first)

    def samples(self, first: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if n != self.plan.micro_batch_size:
            raise ValueError(f"ImageBatches serves micro-batches of {self.plan.micro_batch_size}, not {n}")
        if self._iterator is None or self._next_first != first:
            self.close()
            self._start(first)
            self._next_first = next(self._expected)
        images, noise, skipped = next(self._iterator)
        self._next_first = next(self._expected)
        self.bad.add(skipped)
        if images is None:
            raise DataError(f"no usable image in {self.dataset.root}: " + "; ".join(skipped[:3]))
        return images, noise

    _next_first: int | None = None

    def close(self) -> None:
        self._iterator = None  # the DataLoader's workers end with their iterator


class ImageValidation:
    """Every validation image once, this rank's share (an equal number of batches per rank, the last padded
    with weight-0 copies, as text validation): iterating yields (images, noise, weight)."""

    def __init__(self, dataset: ImageSamples, micro_batch: int, rank: int, world_size: int, workers: int,
                 bad: BadFiles):
        n = len(dataset)
        per_rank = math.ceil(n / world_size)
        indices = list(range(rank * per_rank, (rank + 1) * per_rank))
        self.chunks = [indices[start:start + micro_batch] for start in range(0, len(indices), micro_batch)]
        self.dataset, self.workers, self.bad, self.n = dataset, workers, bad, n

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self):
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=[[min(i, self.n - 1) for i in chunk]
                                                                          for chunk in self.chunks],
                                             num_workers=self.workers, collate_fn=_collate)
        for chunk, (images, noise, skipped) in zip(self.chunks, loader):
            self.bad.add(skipped)
            if images is None:
                raise DataError(f"no usable validation image in {self.dataset.root}: " + "; ".join(skipped[:3]))
            yield images, noise, torch.tensor([1.0 if i < self.n else 0.0 for i in chunk])
