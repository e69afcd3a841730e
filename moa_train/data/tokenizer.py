"""Tokenizers: a byte-level BPE trained on the corpus, or one loaded from a file or the hub; their sizes.

resolve_vocab_size gives model.vocab_size for a run without reading the corpus; tokenizer_plan
gives the part of the cache key (and of meta.json) that names the tokenizer.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from pathlib import Path

from ..errors import ConfigError, DataError
from ..utils import expand_path
from .readers import error_reason

EOT = "<|endoftext|>"
# End-of-document tokens of common pretrained tokenizers (GPT-2, Llama 3, Llama 2/Mistral/T5, Gemma).
EOT_CANDIDATES = (EOT, "<|end_of_text|>", "</s>", "<eos>")
BYTE_LEVEL_MIN_VOCAB = 257  # the 256 byte symbols of a byte-level BPE plus the end-of-document token


def train_tokenizer(documents: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents, trainer)
    return tokenizer


@functools.lru_cache(maxsize=4)
def _tokenizer_from_file(path: str, stamp: tuple[int, int]):
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as exc:
        raise ConfigError("data.tokenizer.path", f"'{path}' is not a tokenizers tokenizer.json ({exc}).") from None
    return _plain(tokenizer)


@functools.lru_cache(maxsize=4)
def _tokenizer_from_hub(name: str):
    from tokenizers import Tokenizer

    try:
        return _plain(Tokenizer.from_pretrained(name))
    except Exception as exc:
        raise DataError(
            f"could not load the pretrained tokenizer '{name}' (data.tokenizer.pretrained) from the Hugging Face "
            f"hub: {error_reason(exc)}. Without hub access, fetch its tokenizer.json where the hub is "
            f"reachable and set data.tokenizer.path=FILE instead.") from None


def _plain(tokenizer):
    """Documents are encoded whole, without the padding or truncation a tokenizer.json may carry."""
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def load_tokenizer(data_cfg):
    """The tokenizer named by data.tokenizer.path or .pretrained (None: a BPE is trained on the corpus)."""
    tok = data_cfg.tokenizer
    if tok.path:
        path = Path(expand_path(tok.path))
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ConfigError("data.tokenizer.path", f"'{path}' does not exist.", "a tokenizer.json file")
        stat = path.stat()
        return _tokenizer_from_file(str(path), (stat.st_mtime_ns, stat.st_size))
    if tok.pretrained:
        return _tokenizer_from_hub(tok.pretrained)
    return None


def tokenizer_size(tokenizer) -> int:
    """Entries = highest id + 1 (what the embedding must hold)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def end_of_document_id(tokenizer, data_cfg) -> int:
    wanted = [data_cfg.tokenizer.eot] if data_cfg.tokenizer.eot else list(EOT_CANDIDATES)
    for token in wanted:
        if (token_id := tokenizer.token_to_id(token)) is not None:
            return token_id
    raise ConfigError("data.tokenizer.eot", f"the tokenizer has no end-of-document token {' or '.join(wanted)}.",
                      "one of its special tokens")


def tokenizer_vocab_size(data_cfg, model_vocab_size: int | None = None) -> int:
    """Entries of the run's tokenizer, without reading the corpus: the BPE size to train, or the loaded size."""
    loaded = load_tokenizer(data_cfg)
    if loaded is not None:
        return tokenizer_size(loaded)
    size = data_cfg.tokenizer.vocab_size or model_vocab_size
    if size is None:
        raise ConfigError("data.tokenizer.vocab_size", "a trained BPE needs a size, and model.vocab_size is not set "
                          "either.", "data.tokenizer.vocab_size=N or model.vocab_size=N")
    return size


def resolve_vocab_size(data_cfg, model_vocab_size: int | None) -> int:
    """model.vocab_size for the run: its value if set (checked to hold the tokenizer), else the tokenizer's size."""
    size = tokenizer_vocab_size(data_cfg, model_vocab_size)
    if model_vocab_size is None:
        return size
    if size > model_vocab_size:
        tok = data_cfg.tokenizer
        which = f"'{tok.path}'" if tok.path else f"'{tok.pretrained}'" if tok.pretrained else "the trained BPE"
        raise DataError(f"the tokenizer {which} has {size} entries but model.vocab_size is {model_vocab_size}: token "
                        f"ids would fall outside the embedding. Set model.vocab_size={size} (or larger), or "
                        f"model.vocab_size=null to follow the tokenizer.")
    return model_vocab_size


def tokenizer_plan(data_cfg, vocab_size: int | None) -> tuple[str, dict]:
    """(cache key part, description) of the tokenizer a preparation uses."""
    tok = data_cfg.tokenizer
    loaded = load_tokenizer(data_cfg)
    if loaded is not None:
        kind, name = ("file", str(expand_path(tok.path))) if tok.path else ("pretrained", tok.pretrained)
        content = hashlib.sha256(loaded.to_str().encode()).hexdigest()
        return f"{kind}:{content}", {"kind": kind, "name": name, "content_sha256": content}
    size = tokenizer_vocab_size(data_cfg, vocab_size)
    return f"bpe:{size}:{tok.train_chars}", {"kind": "bpe", "vocab_size": size, "train_chars": tok.train_chars}
