"""Corpus -> tokenizer -> cached, memory-mapped token shards -> packed, deterministic batches.

The data pipeline, by stage (docs/data.md describes it for users):

- readers.py    the Corpus record; .txt files and .jsonl/.json/.parquet records read as documents
- sources.py    the four `data.source` sources (DATA_SOURCES) that turn the data config into a Corpus
- tokenizer.py  trained or loaded tokenizers, their sizes, resolve_vocab_size
- checks.py     check_data_config, the data part of validate_config
- cache.py      the held-out split, shard writing, the checksummed cache and prepare_data
- loader.py     TokenShards, PackedBatches and validation_batches over the prepared tokens

Below: what the rest of the package uses; anything else is imported from its stage's module.
"""

from .cache import PreparedData, prepare_data
from .checks import check_data_config
from .loader import PackedBatches, validation_batches
from .sources import cache_root
from .tokenizer import resolve_vocab_size

__all__ = ["PackedBatches", "PreparedData", "cache_root", "check_data_config", "prepare_data", "resolve_vocab_size",
           "validation_batches"]
