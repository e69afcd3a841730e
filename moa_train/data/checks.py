"""The data checks of validate_config: keys, the source and the tokenizer size, before any compute."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from ..errors import ConfigError, DataError
from ..utils import expand_path
from .cache import VERIFY_MODES
from .sources import DATA_SOURCES
from .tokenizer import BYTE_LEVEL_MIN_VOCAB, resolve_vocab_size


def check_data_config(data_cfg, model_vocab_size: int | None) -> None:
    """The data checks of validate_config: keys, the source (no corpus read, no network) and the tokenizer size."""
    source, name = data_cfg.source, data_cfg.name
    if source == "images":
        return _check_images(data_cfg)
    if source not in DATA_SOURCES:
        raise ConfigError("data.source", f"unknown value '{source}'.", ", ".join(sorted(DATA_SOURCES)))
    if source != "hf" and name != source:  # only a hub dataset is named freely
        hub = "" if name in DATA_SOURCES else f"; for a hub dataset: data=hf data.name={name}"
        raise ConfigError("data.name", f"is '{name}' but data.source is '{source}', which reads its own corpus. "
                          f"Choose the source with its config group, data={source}, which sets both keys{hub}.",
                          source)
    for key in ("max_documents", "shard_tokens", "tokenizer.vocab_size", "tokenizer.train_chars"):
        value = OmegaConf.select(data_cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"data.{key}", f"got {value}, must be > 0.")
    if data_cfg.verify not in VERIFY_MODES:
        raise ConfigError("data.verify", f"unknown value '{data_cfg.verify}'.", ", ".join(VERIFY_MODES))
    tok = data_cfg.tokenizer
    if tok.path and tok.pretrained:
        raise ConfigError("data.tokenizer.path", "set data.tokenizer.path or data.tokenizer.pretrained, not both.")
    if (tok.path or tok.pretrained) and tok.vocab_size:
        raise ConfigError("data.tokenizer.vocab_size", "sets the size of a trained BPE; a loaded tokenizer "
                          "(data.tokenizer.path / pretrained) has its own.", "null")
    if not (tok.path or tok.pretrained):
        size, key = (tok.vocab_size, "data.tokenizer.vocab_size") if tok.vocab_size else (model_vocab_size,
                                                                                           "model.vocab_size")
        if size is not None and size < BYTE_LEVEL_MIN_VOCAB:
            raise ConfigError(key, f"{size} is too small for a byte-level BPE, which holds at least "
                              f"{BYTE_LEVEL_MIN_VOCAB} entries (256 bytes and the end-of-document token).")
        if tok.vocab_size and model_vocab_size and tok.vocab_size > model_vocab_size:
            raise ConfigError("data.tokenizer.vocab_size", f"{tok.vocab_size} exceeds model.vocab_size="
                              f"{model_vocab_size}; token ids would fall outside the embedding.")
    DATA_SOURCES[source].check(data_cfg)
    if tok.path:  # a local file is cheap to load: its size is checked now (a hub tokenizer when preparing)
        resolve_vocab_size(data_cfg, model_vocab_size)


def _check_images(data_cfg) -> None:
    """data=images: its own keys; the folder itself is read when the run prepares its data."""
    from ..errors import check_fraction

    if data_cfg.name != "images":
        raise ConfigError("data.name", f"is '{data_cfg.name}' but data.source is 'images'.", "images (data=images)")
    img = data_cfg.images
    check_fraction("data.images.val_fraction", img.val_fraction)
    if not 0 < img.val_fraction < 1:
        raise ConfigError("data.images.val_fraction", f"got {img.val_fraction}; some files must be trained on and "
                          "some held out.", "a fraction strictly between 0 and 1, e.g. 0.1")
    for key in ("max_val_images",):
        if img[key] is not None and img[key] <= 0:
            raise ConfigError(f"data.images.{key}", f"got {img[key]}, must be > 0 (or null).")
    for key in ("workers", "max_bad_files"):
        if img[key] < 0:
            raise ConfigError(f"data.images.{key}", f"got {img[key]}, must be >= 0.")
    scale = list(img.crop_scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError("data.images.crop_scale", f"got {scale}; the random crop's area range as a fraction of "
                          "the image's.", "[low, high] with 0 < low <= high <= 1, e.g. [0.2, 1.0]")
    if data_cfg.path is not None and not Path(expand_path(data_cfg.path)).is_dir():
        raise DataError(f"data.path: '{data_cfg.path}' is not a folder. data=images reads a folder of image files "
                        "(ImageFolder layout or flat), or the offline set with data.path=null.")
