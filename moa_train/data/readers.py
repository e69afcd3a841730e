"""Corpora and their readers: the Corpus record, .txt files, .jsonl/.json/.parquet records.

A Corpus is what a source (sources.py) hands to the preparation: a fingerprint for the cache
key, a description for meta.json and its documents in a fixed order. .json and .parquet files
are read through the same `datasets` path as hub datasets; a record without text is reported
as 'file line N: problem'.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from ..errors import DataError, UserError

# A corpus of a single text file is cut into pseudo-documents of about this many characters, at
# blank lines, so that whole pieces of it can be held out for validation.
PSEUDO_DOCUMENT_CHARS = 20_000
# Text files are read in blocks of this size; a larger file is cut into pseudo-documents too (one
# document of hundreds of MB would be neither a sensible validation unit nor affordable in memory).
TEXT_BLOCK_BYTES = 64 << 20
TEXT, JSON, PARQUET = "text", "json", "parquet"
FORMATS = {".txt": TEXT, ".jsonl": JSON, ".json": JSON, ".parquet": PARQUET}


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


def xxh3_file(path: Path) -> str:
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


class FileHashMemo:
    """Content hashes of files remembered by (path, size, mtime, inode), so a run on a large corpus that
    has not changed starts without reading it again (git's index and rsync trust the same stat data).

    A file modified less than RACY_SECONDS before it was hashed is hashed again next time: a write in
    the same timestamp tick after hashing would leave its stat data unchanged. A lost or unreadable
    memo only costs a re-hash; it is written atomically, so concurrent ranks never see half of one.
    """

    RACY_SECONDS = 2.0

    def __init__(self, path: Path | None):
        self.path, self.entries, self.changed = path, {}, False
        if path is not None and path.is_file():
            try:
                entries = json.loads(path.read_text())
            except (OSError, ValueError):
                entries = None
            self.entries = entries if isinstance(entries, dict) else {}

    def hash(self, file: Path) -> str:
        st = file.stat()
        key = str(file.resolve())
        stat = [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = self.entries.get(key)
        if isinstance(entry, dict) and entry.get("stat") == stat and \
                entry.get("hashed_at_ns", 0) - st.st_mtime_ns > self.RACY_SECONDS * 1e9:
            return entry["xxh3_128"]
        hashed_at = time.time_ns()
        digest = xxh3_file(file)
        self.entries[key] = {"stat": stat, "hashed_at_ns": hashed_at, "xxh3_128": digest}
        self.changed = True
        return digest

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.entries = {k: v for k, v in self.entries.items() if os.path.exists(k)}  # forget deleted files
            tmp = self.path.with_name(f".{self.path.name}-{os.getpid()}")
            tmp.write_text(json.dumps(self.entries))
            os.replace(tmp, self.path)
        except OSError:  # a read-only cache directory: the next run hashes again
            pass


def fingerprint_files(files: list[Path], root: Path, memo: Path | None = None) -> str:
    """A hash of the files' names (relative to root) and contents: moving the corpus keeps its cache.

    memo: a FileHashMemo file; unchanged files are then not read again.
    """
    hashes = FileHashMemo(memo)
    digest = xxhash.xxh3_128()
    for path in files:
        digest.update(f"{path.relative_to(root)}\0{hashes.hash(path)}\0".encode())
    hashes.save()
    return digest.hexdigest()


def file_corpus(files: list[tuple[Path, str]], root: Path, text_key: str, memo: Path | None = None) -> Corpus:
    """Files read in the given order: a .txt file is one document, a .jsonl/.json/.parquet record is one.

    memo: where fingerprint_files remembers the files' hashes (see FileHashMemo).
    """
    names = [str(p.relative_to(root)) for p, _ in files]
    corpus = Corpus(
        fingerprint=fingerprint_files([p for p, _ in files], root, memo),
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
            name, bad = str(path.relative_to(root)), [0]
            blocks = _text_blocks(path)
            first, second = next(blocks, b""), next(blocks, None)
            if second is None:  # the usual case: the whole file is one block, one document
                text = _decode(first, bad).strip()
                if single_text:
                    yield from split_into_pseudo_documents(text)
                elif text:
                    yield text
            else:  # a file over TEXT_BLOCK_BYTES: pseudo-documents block by block, never all in memory
                for raw in itertools.chain((first, second), blocks):
                    yield from split_into_pseudo_documents(_decode(raw, bad).strip())
            if bad[0]:
                replaced[name] = bad[0]


def _text_blocks(path: Path) -> Iterator[bytes]:
    """The bytes of a text file (or .gz) in blocks of about TEXT_BLOCK_BYTES, each cut after its last paragraph
    break (else line break, else space), never inside a UTF-8 sequence, so each decodes on its own."""
    opener = gzip.open if path.suffix == ".gz" else open
    carry = b""
    with opener(path, "rb") as f:
        chunk = f.read(TEXT_BLOCK_BYTES)
        while chunk:
            following = f.read(TEXT_BLOCK_BYTES)  # read ahead: the last block is never cut
            buf = carry + chunk
            cut = _block_end(buf) if following else len(buf)
            if cut:
                yield buf[:cut]
            carry, chunk = buf[cut:], following


def _block_end(buf: bytes) -> int:
    for sep in (b"\n\n", b"\n", b" "):
        at = buf.rfind(sep)
        if at >= 0:
            return at + len(sep)
    start = len(buf)  # no whitespace at all: find where the last UTF-8 sequence starts; cut before it if incomplete
    while start > max(0, len(buf) - 4) and (buf[start - 1] & 0xC0) == 0x80:
        start -= 1
    lead = buf[start - 1] if start > 0 else 0
    length = 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if lead >= 0xF0 else 0
    return start - 1 if length and len(buf) - (start - 1) < length else len(buf)


def _decode(raw: bytes, bad: list[int]) -> str:
    """UTF-8, with bytes that are not UTF-8 as U+FFFD; their count is added to bad[0]."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        bad[0] += text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")  # U+FFFD already in the file are not counted
        return text


def read_text(path: Path, replaced: dict[str, int] | None = None, name: str | None = None) -> str:
    """A whole text file, stripped. Bytes that are not UTF-8 become U+FFFD; their count is recorded."""
    bad = [0]
    text = "".join(_decode(raw, bad) for raw in _text_blocks(path)).strip()
    if bad[0] and replaced is not None:
        replaced[name or str(path)] = bad[0]
    return text


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


def import_datasets():
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
            rows = import_datasets().load_dataset(fmt, data_files=[str(p) for p in paths], split="train",
                                                  streaming=True)
        except Exception as exc:
            raise DataError(where(0, exc)) from None
        yield from text_values(rows, text_key, where)


def text_values(rows: Iterable[dict], text_key: str, where: Callable[[int, Exception | None], str]) -> Iterator[str]:
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


def error_reason(exc: Exception) -> str:
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
