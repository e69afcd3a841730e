"""Corpus -> tokenizer -> cached, memory-mapped token shards -> packed, deterministic batches.

The data pipeline, by stage (docs/data.md describes it for users):

- readers.py    the Corpus record; .txt files and .jsonl/.json/.parquet records read as documents
- sources.py    the four `data.source` sources (DATA_SOURCES) that turn the data config into a Corpus
- tokenizer.py  trained or loaded tokenizers, their sizes, resolve_vocab_size
- checks.py     check_data_config, the data part of validate_config
- cache.py      the held-out split, shard writing, the checksummed cache and prepare_data
- loader.py     TokenShards, PackedBatches and validation_batches over the prepared tokens

Every public name is importable from `moa_train.data` itself, as before the split.
"""

from .cache import (
    ENCODE_BATCH_CHARS,
    FORMAT_VERSION,
    FULL_VERIFY_BYTES,
    VERIFY_MODES,
    HeldOut,
    PreparedData,
    ShardWriter,
    prepare_data,
)
from .checks import check_data_config
from .loader import PackedBatches, TokenShards, validation_batches
from .readers import (
    FORMATS,
    JSON,
    PARQUET,
    PSEUDO_DOCUMENT_CHARS,
    TEXT,
    Corpus,
    file_corpus,
    file_format,
    fingerprint_files,
    read_documents,
    read_text,
    split_into_pseudo_documents,
)
from .sources import (
    DATA_SOURCES,
    LOCAL_ACCEPTED,
    HubSource,
    LocalSource,
    PydocsSource,
    ShakespeareSource,
    cache_root,
)
from .tokenizer import (
    BYTE_LEVEL_MIN_VOCAB,
    EOT,
    EOT_CANDIDATES,
    end_of_document_id,
    load_tokenizer,
    resolve_vocab_size,
    tokenizer_size,
    tokenizer_vocab_size,
    train_tokenizer,
)

__all__ = [
    # readers
    "Corpus", "FORMATS", "JSON", "PARQUET", "PSEUDO_DOCUMENT_CHARS", "TEXT", "file_corpus", "file_format",
    "fingerprint_files", "read_documents", "read_text", "split_into_pseudo_documents",
    # sources
    "DATA_SOURCES", "LOCAL_ACCEPTED", "HubSource", "LocalSource", "PydocsSource", "ShakespeareSource", "cache_root",
    # tokenizer
    "BYTE_LEVEL_MIN_VOCAB", "EOT", "EOT_CANDIDATES", "end_of_document_id", "load_tokenizer", "resolve_vocab_size",
    "tokenizer_size", "tokenizer_vocab_size", "train_tokenizer",
    # checks
    "check_data_config",
    # cache
    "ENCODE_BATCH_CHARS", "FORMAT_VERSION", "FULL_VERIFY_BYTES", "VERIFY_MODES", "HeldOut", "PreparedData",
    "ShardWriter", "prepare_data",
    # loader
    "PackedBatches", "TokenShards", "validation_batches",
]
