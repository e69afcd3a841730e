"""Preparation and the cache: the held-out split, shard writing, build/open/verify, prepare_data.

Preparation runs once per (corpus content, tokenizer, validation size) into
`<cache>/<source>-<key>/`: tokenizer.json, train-00000.bin ... (at most `data.shard_tokens` tokens
each), val.bin and meta.json (provenance, counts and a checksum per file). It is built in a
temporary directory and renamed into place, so a crash never leaves a half-written cache; a cache
that fails its checks (sizes always, checksums up to FULL_VERIFY_BYTES) is rebuilt, never used.

Validation documents are held out whole: the documents in the order of a hash of their text
(independent of the seed and of the file order), taken until they hold more than
`train.eval_tokens` tokens. The choice is made in one streaming pass that keeps only the current
candidates in memory.
"""

from __future__ import annotations

import errno
import hashlib
import heapq
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from ..errors import DataError
from .loader import TokenShards
from .readers import Corpus, xxh3_file
from .sources import DATA_SOURCES, cache_root
from .tokenizer import EOT, end_of_document_id, load_tokenizer, tokenizer_plan, tokenizer_size, train_tokenizer

logger = logging.getLogger("moa_train")

FORMAT_VERSION = 3  # 3: .txt files over 64 MiB are cut into pseudo-documents
ENCODE_BATCH_CHARS = 4 << 20  # text handed to the (multi-threaded) encoder at once
FULL_VERIFY_BYTES = 4 << 30  # data.verify=auto hashes caches up to this size (xxh3: ~0.25 s/GiB from page cache)
VERIFY_MODES = ("auto", "full", "size")


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- preparation


class HeldOut:
    """Streaming choice of the validation documents.

    The validation set is the shortest prefix of the documents sorted by hash that holds more than
    `eval_tokens` tokens. Offered documents in any order, this keeps the current candidates (a
    max-heap by hash) and releases to training each document that the prefix no longer needs; the
    heap's largest hash only falls once the prefix is full, so a released document never returns.
    Identical documents share a hash and so a side.
    """

    def __init__(self, eval_tokens: int):
        self.eval_tokens, self.tokens, self.released = eval_tokens, 0, False
        self.keys: list[int] = []  # negated hashes: heapq is a min-heap
        self.docs: dict[int, list[np.ndarray]] = {}

    def offer(self, key: int, ids: np.ndarray) -> list[np.ndarray]:
        if key not in self.docs:
            heapq.heappush(self.keys, -key)
            self.docs[key] = []
        self.docs[key].append(ids)
        self.tokens += len(ids)
        out = []
        while len(self.keys) > 1:
            top = -self.keys[0]
            size = sum(len(d) for d in self.docs[top])
            if self.tokens - size <= self.eval_tokens:
                break
            heapq.heappop(self.keys)
            out += self.docs.pop(top)
            self.tokens -= size
        self.released |= bool(out)
        return out

    def finish(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(validation documents in hash order, documents for training): training keeps at least one."""
        keys = sorted(self.docs)
        to_train = [] if self.released or not keys else self.docs.pop(keys.pop())
        return [d for k in keys for d in self.docs[k]], to_train


class ShardWriter:
    """Token ids appended across files of at most `shard_tokens` tokens, each hashed as it is written."""

    def __init__(self, directory: Path, pattern: str, dtype, shard_tokens: int | None = None):
        self.directory, self.pattern, self.dtype, self.limit = directory, pattern, np.dtype(dtype), shard_tokens
        self.index: list[dict] = []
        self.file = None

    def _open(self) -> None:
        name = self.pattern.format(len(self.index))
        self.file, self.hasher, self.count = open(self.directory / name, "wb", buffering=1 << 22), xxhash.xxh3_128(), 0
        self.index.append({"file": name})

    def _close_current(self) -> None:
        self.file.close()
        self.index[-1].update(tokens=self.count, xxh3_128=self.hasher.hexdigest())
        self.file = None

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.file is None:
                self._open()
            room = len(ids) if self.limit is None else self.limit - self.count
            data = ids[:room].tobytes()
            self.file.write(data)
            self.hasher.update(data)
            self.count += min(room, len(ids))
            ids = ids[room:]
            if self.count == self.limit:
                self._close_current()

    def close(self) -> list[dict]:
        if self.file is None and not self.index:
            self._open()  # an empty split still has its (empty) file
        if self.file is not None:
            self._close_current()
        return self.index


def _batches(documents: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    batch, chars = [], 0
    for document in documents:
        batch.append(document)
        chars += len(document)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _first_chars(documents: Iterable[str], max_chars: int | None) -> Iterator[str]:
    total = 0
    for document in documents:
        if max_chars is not None and total >= max_chars:
            return
        total += len(document)
        yield document


def _spooled(documents: Iterable[str], path: Path) -> Callable[[], Iterator[str]]:
    """Write documents to a JSON-lines file once (one pass over a stream), then read them from it."""
    with open(path, "w", encoding="utf-8") as f:
        for document in documents:
            f.write(json.dumps(document) + "\n")

    def read() -> Iterator[str]:
        with open(path, encoding="utf-8") as f:
            yield from map(json.loads, f)

    return read


def _build_cache(out: Path, corpus: Corpus, data_cfg, tokenizer_key: str, tokenizer_info: dict, eval_tokens: int,
                 log) -> None:
    start = time.perf_counter()
    documents = lambda: itertools.islice(corpus.documents(), data_cfg.max_documents)  # noqa: E731
    if corpus.costly_to_reread:
        log(f"reading {data_cfg.name} documents to {out} (one pass over the stream)")
        documents = _spooled(documents(), out / "documents.jsonl")

    tokenizer = load_tokenizer(data_cfg)
    if tokenizer is None:
        log(f"training a byte-level BPE of {tokenizer_info['vocab_size']} entries on {data_cfg.name}")
        tokenizer = train_tokenizer(_first_chars(documents(), data_cfg.tokenizer.train_chars),
                                    tokenizer_info["vocab_size"])
        eot = tokenizer.token_to_id(EOT)
    else:
        eot = end_of_document_id(tokenizer, data_cfg)
    tokenizer.save(str(out / "tokenizer.json"))
    size = tokenizer_size(tokenizer)
    dtype = np.dtype(np.uint16 if size <= 1 << 16 else np.uint32)

    held_out = HeldOut(eval_tokens)
    train = ShardWriter(out, "train-{:05d}.bin", dtype, data_cfg.shard_tokens)
    n_documents, n_tokens, last_report = 0, 0, time.perf_counter()
    for batch in _batches(documents(), ENCODE_BATCH_CHARS):
        # encode_batch runs over all cores (Rust threads): the parallel part of the preparation
        for text, encoding in zip(batch, tokenizer.encode_batch(batch, add_special_tokens=False)):
            ids = np.array(encoding.ids + [eot], dtype=dtype)
            for released in held_out.offer(xxhash.xxh3_64_intdigest(text.encode()), ids):
                train.write(released)
            n_tokens += len(ids)
        n_documents += len(batch)
        if time.perf_counter() - last_report > 30:
            log(f"  {n_documents:,} documents, {n_tokens:,} tokens")
            last_report = time.perf_counter()
    if n_documents == 0:
        raise DataError(corpus.empty_message)
    val_docs, to_train = held_out.finish()
    for ids in to_train:
        train.write(ids)
    val = ShardWriter(out, "val.bin", dtype)
    for ids in val_docs:
        val.write(ids)
    shards, (val_file,) = train.close(), val.close()
    (out / "documents.jsonl").unlink(missing_ok=True)

    for name, count in corpus.replaced.items():
        logger.warning("%s: %d byte sequence(s) that are not UTF-8 were read as U+FFFD (replacement characters)",
                       Path(corpus.description.get("root", "")) / name, count)
    meta = {
        "format_version": FORMAT_VERSION, "source": data_cfg.source, **corpus.description,
        "fingerprint": corpus.fingerprint, "text_key": data_cfg.text_key, "max_documents": data_cfg.max_documents,
        "documents": n_documents, "val_documents": len(val_docs),
        "train_tokens": sum(s["tokens"] for s in shards), "val_tokens": val_file["tokens"],
        "dtype": dtype.name, "vocab_size": size, "eot_id": eot,
        "tokenizer": {**tokenizer_info, "key": tokenizer_key}, "tokenizer_sha256": _sha256_file(out / "tokenizer.json"),
        "shard_tokens": data_cfg.shard_tokens, "shards": shards, "val": val_file,
        "replaced_characters": corpus.replaced, "prepare_seconds": round(time.perf_counter() - start, 3),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))


# ----------------------------------------------------------------------------- the prepared data


@dataclass
class PreparedData:
    train: np.ndarray | TokenShards  # memmapped token ids, documents separated by the end-of-document token
    val: np.ndarray
    tokenizer_path: Path
    meta: dict
    built: bool = False  # prepared by this call (False: read from the cache)

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def cache_dir(self) -> Path:
        return self.tokenizer_path.parent

    def summary(self) -> dict:
        """Provenance for a run's summary.json."""
        keys = ("source", "documents", "val_documents", "train_tokens", "val_tokens", "vocab_size", "dtype",
                "fingerprint", "tokenizer_sha256")
        return {**{k: self.meta[k] for k in keys}, "tokenizer": self.meta["tokenizer"]["kind"],
                "shards": len(self.meta["shards"]), "cache": self.cache_dir.name}  # under the cache root


def _load_tokens(path: Path, dtype: np.dtype) -> np.ndarray:
    if path.stat().st_size == 0:  # mmap refuses empty files
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _cache_problem(cache: Path, meta: dict, tokenizer_key: str, verify: str) -> str | None:
    """Why the cache must not be used (None: it is sound)."""
    if meta.get("format_version") != FORMAT_VERSION:
        return f"it has format {meta.get('format_version')}, this version reads {FORMAT_VERSION}"
    if meta["tokenizer"]["key"] != tokenizer_key:
        return f"it was written with another tokenizer ({meta['tokenizer']['key'][:40]}, not {tokenizer_key[:40]})"
    tokenizer_path = cache / "tokenizer.json"
    if not tokenizer_path.is_file() or _sha256_file(tokenizer_path) != meta["tokenizer_sha256"]:
        return "its tokenizer.json is not the one its tokens were made with"
    entries = meta["shards"] + [meta["val"]]
    itemsize = np.dtype(meta["dtype"]).itemsize
    for entry in entries:
        path = cache / entry["file"]
        if not path.is_file():
            return f"{entry['file']} is missing"
        if path.stat().st_size != entry["tokens"] * itemsize:
            return f"{entry['file']} holds {path.stat().st_size} bytes, not {entry['tokens'] * itemsize}"
    total = sum(e["tokens"] for e in entries) * itemsize
    if verify == "full" or (verify == "auto" and total <= FULL_VERIFY_BYTES):
        for entry in entries:
            if xxh3_file(cache / entry["file"]) != entry["xxh3_128"]:
                return f"{entry['file']} fails its checksum"
    return None


def _open_cache(cache: Path, tokenizer_key: str, verify: str, built: bool = False) -> PreparedData | None:
    """The cache if it is sound; otherwise None, after a warning and its removal."""
    if not cache.is_dir():
        return None
    try:
        meta = json.loads((cache / "meta.json").read_text())
        problem = _cache_problem(cache, meta, tokenizer_key, verify)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        problem = f"its meta.json is unreadable ({type(exc).__name__}: {exc})"
    if problem:
        logger.warning("the data cache %s is not usable: %s; rebuilding it", cache, problem)
        aside = cache.with_name(f".{cache.name}-discarded-{os.getpid()}")
        os.replace(cache, aside)  # atomic: no reader sees a half-deleted cache
        shutil.rmtree(aside, ignore_errors=True)
        return None
    dtype = np.dtype(meta["dtype"])
    shards = [_load_tokens(cache / s["file"], dtype) for s in meta["shards"]]
    train = shards[0] if len(shards) == 1 else TokenShards(shards)
    return PreparedData(train, _load_tokens(cache / meta["val"]["file"], dtype), cache / "tokenizer.json", meta,
                        built)


def prepare_data(data_cfg, vocab_size: int | None, eval_tokens: int, seq_len: int, log=print) -> PreparedData:
    """The run's tokens, from the cache or prepared now (once per corpus content, tokenizer and validation size).

    vocab_size: the BPE size to train when data.tokenizer.vocab_size is not set (the trainer passes
    model.vocab_size); ignored for a loaded tokenizer.
    """
    source = DATA_SOURCES[data_cfg.source]
    corpus = source.corpus(data_cfg)
    tokenizer_key, tokenizer_info = tokenizer_plan(data_cfg, vocab_size)
    key = hashlib.sha256("|".join(map(str, (
        FORMAT_VERSION, data_cfg.source, corpus.fingerprint, tokenizer_key, eval_tokens, data_cfg.text_key,
        data_cfg.max_documents, data_cfg.shard_tokens))).encode()).hexdigest()[:16]
    root = cache_root(data_cfg)
    cache = root / f"{data_cfg.source}-{key}"
    data = _open_cache(cache, tokenizer_key, data_cfg.verify)
    if data is None:
        start = time.perf_counter()
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=root))
        try:
            _build_cache(tmp, corpus, data_cfg, tokenizer_key, tokenizer_info, eval_tokens, log)
            os.replace(tmp, cache)  # atomic: readers see a complete cache or none
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
                shutil.rmtree(tmp, ignore_errors=True)
                raise DataError(f"no space left on the device of the data cache {root} while preparing "
                                f"{data_cfg.name}: the partial cache was removed and nothing else was touched. It "
                                f"had written {written / 2**20:,.1f} MiB when the disk filled, and needs more; "
                                f"{shutil.disk_usage(root).free / 2**20:,.1f} MiB are free. Free space or point "
                                f"data.cache_dir (or MOA_TRAIN_CACHE) at a larger disk.") from None
            if not (cache / "meta.json").exists():  # another process may have won the rename
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"prepared {data_cfg.name} in {time.perf_counter() - start:.1f}s -> {cache.name} in the data cache")
        data = _open_cache(cache, tokenizer_key, data_cfg.verify, built=True)

    meta = data.meta
    if len(data.train) < seq_len + 1 or len(data.val) < eval_tokens + 1:
        where = meta.get("root") or meta.get("dataset") or data_cfg.name
        raise DataError(
            f"the corpus '{where}' ({meta['documents']} documents) is too small: it has "
            f"{meta['train_tokens'] + meta['val_tokens']} tokens ({meta['train_tokens']} for training, "
            f"{meta['val_tokens']} held out in {meta['val_documents']} whole documents); this run needs "
            f"{eval_tokens + 1} validation tokens (train.eval_tokens + 1) plus at least {seq_len + 1} training "
            f"tokens (one sequence of train.seq_len + 1), from separate documents. Add text, or lower "
            f"train.eval_tokens / train.seq_len.")
    return data
