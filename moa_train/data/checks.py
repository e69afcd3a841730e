"""The data checks of validate_config: keys, the source and the tokenizer size, before any compute."""

from __future__ import annotations

from omegaconf import OmegaConf

from ..errors import ConfigError
from .cache import VERIFY_MODES
from .sources import DATA_SOURCES
from .tokenizer import BYTE_LEVEL_MIN_VOCAB, resolve_vocab_size


def check_data_config(data_cfg, model_vocab_size: int | None) -> None:
    """The data checks of validate_config: keys, the source (no corpus read, no network) and the tokenizer size."""
    source, name = data_cfg.source, data_cfg.name
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
