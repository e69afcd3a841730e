"""Data sources (local formats, hub path on a local dataset, pydocs), tokenizers and bad input."""

from __future__ import annotations

import gzip
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf
from tokenizers import Tokenizer

from conftest import compose_config
from moa_train.config import DataConfig, validate_config
from moa_train.data import prepare_data, resolve_vocab_size
from moa_train.data.sources import DATA_SOURCES
from moa_train.data.tokenizer import train_tokenizer
from moa_train.errors import ConfigError, DataError

# Short distinct documents: enough text for a 300-entry BPE and a small validation set.
DOCS = [f"Document {i}: the {['red', 'green', 'blue'][i % 3]} fox number {i * 7} jumps over {i} lazy dogs. " * 12
        for i in range(40)]


def cfg_of(tmp_path, **keys):
    keys.setdefault("source", keys.get("name", "shakespeare"))
    return OmegaConf.merge(OmegaConf.structured(DataConfig(cache_dir=str(tmp_path / "cache"))), keys)


def documents(cfg) -> list[str]:
    return list(DATA_SOURCES[cfg.source].corpus(cfg).documents())


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def decoded(data) -> list[str]:
    tokenizer = Tokenizer.from_file(str(data.tokenizer_path))
    eot = data.meta["eot_id"]
    out = []
    for tokens in (np.asarray(data.train), np.asarray(data.val)):
        cuts = np.flatnonzero(tokens == eot)
        out += [tokenizer.decode(tokens[a + 1 if a >= 0 else 0:b].tolist()) for a, b in zip([-1, *cuts[:-1]], cuts)]
    return out


def test_every_format_in_one_directory_in_path_order(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    write_jsonl(corpus / "a.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCS[:10])])
    (corpus / "b.json").write_text(json.dumps([{"text": d} for d in DOCS[10:20]]))
    pq.write_table(pa.table({"text": DOCS[20:30]}), corpus / "c.parquet")
    (corpus / "d.txt").write_text(DOCS[30])
    with gzip.open(corpus / "sub" / "e.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in DOCS[31:])
    (corpus / ".hidden").mkdir()
    (corpus / ".hidden" / "x.txt").write_text("never read")
    (corpus / "README.md").write_text("not a corpus format")
    cfg = cfg_of(tmp_path, name="local", path=str(corpus))
    assert documents(cfg) == [d.strip() if i == 30 else d for i, d in enumerate(DOCS)]
    data = prepare_data(cfg, 300, eval_tokens=256, seq_len=32)
    assert data.meta["documents"] == 40 and data.meta["file_count"] == 5
    assert sorted(decoded(data)) == sorted(d.strip() if i == 30 else d for i, d in enumerate(DOCS))


def test_glob_single_file_and_text_key(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"body": d} for d in DOCS[:5]])
    write_jsonl(tmp_path / "y.jsonl", [{"body": d} for d in DOCS[5:9]])
    (tmp_path / "z.txt").write_text("skipped by the pattern")
    assert documents(cfg_of(tmp_path, name="local", path=str(tmp_path / "*.jsonl"), text_key="body")) == DOCS[:9]
    assert documents(cfg_of(tmp_path, name="local", path=str(tmp_path / "y.jsonl"), text_key="body")) == DOCS[5:9]
    with pytest.raises(DataError, match="matches no file"):
        documents(cfg_of(tmp_path, name="local", path=str(tmp_path / "*.parquet")))


@pytest.mark.parametrize("lines, expected", [
    (['{"text": "a"}', '{"text": "b"}', '{"title": "no text here"}'],
     r"b\.jsonl' line 3 has no field 'text' \(fields: title\)"),
    (['{"text": "a"}', '', '{"text": 5}'], r"b\.jsonl' line 3: field 'text' is a number"),
    (['{"text": "a"}', '{"text": "unterminated'], r"b\.jsonl' line 2 is not valid JSON"),
    (['{"text": "a"}', '["a list"]'], r"b\.jsonl' line 2 is a list, not a JSON object"),
])
def test_a_bad_jsonl_record_names_the_file_and_line(tmp_path, lines, expected):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", [{"text": d} for d in DOCS[:3]])
    (corpus / "b.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=expected):
        prepare_data(cfg_of(tmp_path, name="local", path=str(corpus)), 300, 256, 32)


def test_a_parquet_file_without_the_text_column_names_its_columns(tmp_path):
    pq.write_table(pa.table({"content": DOCS[:4], "id": list(range(4))}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet' has no column 'text' \(columns: content, id\)"):
        documents(cfg_of(tmp_path, name="local", path=str(tmp_path / "p.parquet")))


def test_non_utf8_text_is_replaced_and_reported_with_file_and_count(tmp_path, caplog):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, d in enumerate(DOCS[:10]):
        (corpus / f"{i}.txt").write_text(d)
    (corpus / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me, na\u00efve \ufffd ".encode("latin-1", "replace") * 20
                                        + "ok \ufffd".encode())
    with caplog.at_level(logging.WARNING, logger="moa_train"):
        data = prepare_data(cfg_of(tmp_path, name="local", path=str(corpus)), 300, 256, 32)
    assert data.meta["replaced_characters"] == {"latin1.txt": 60}  # the U+FFFD that was in the file is not counted
    assert "latin1.txt: 60 byte sequence(s) that are not UTF-8" in caplog.text
    assert any("caf\ufffd" in d for d in decoded(data))


def test_non_utf8_jsonl_is_refused_naming_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl' line 2 is not UTF-8 text"):
        documents(cfg_of(tmp_path, name="local", path=str(tmp_path / "bad.jsonl")))


def test_missing_path_is_a_config_error_naming_it(tmp_path):
    cfg = compose_config("data=local", f"data.path={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match="nowhere' does not exist") as info:
        validate_config(cfg)
    assert info.value.key == "data.path"


def test_hub_path_on_a_local_dataset_directory_streams_and_stops_at_max_documents(tmp_path):
    """data=hf runs datasets.load_dataset(name, subset, split=..., streaming=True) exactly as for the hub."""
    dataset = tmp_path / "my_dataset" / "data"
    dataset.mkdir(parents=True)
    pq.write_table(pa.table({"text": DOCS[:20], "url": ["u"] * 20}), dataset / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"text": DOCS[20:], "url": ["u"] * 20}), dataset / "train-00001-of-00002.parquet")
    cfg = cfg_of(tmp_path, source="hf", name=str(tmp_path / "my_dataset"), split="train", streaming=True,
                 max_documents=30)
    validate_config(compose_config("data=hf", f"data.name={tmp_path / 'my_dataset'}"))
    data = prepare_data(cfg, 300, eval_tokens=256, seq_len=32)
    assert data.meta["documents"] == 30 and data.meta["dataset"] == str(tmp_path / "my_dataset")
    assert sorted(decoded(data)) == sorted(DOCS[:30])
    assert not (data.cache_dir / "documents.jsonl").exists()  # the spool of the stream is gone
    again = prepare_data(cfg, 300, eval_tokens=256, seq_len=32)
    assert not again.built and again.cache_dir == data.cache_dir
    with pytest.raises(DataError, match="has no field 'body' .*fields: text, url"):
        prepare_data(OmegaConf.merge(cfg, {"text_key": "body"}), 300, 256, 32)


@pytest.fixture
def offline(monkeypatch):
    """What this machine is: no hub. The libraries' own offline switches make them fail at once."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hub_dataset_and_pretrained_tokenizer_fail_clearly_offline(tmp_path, offline):
    cfg = cfg_of(tmp_path, source="hf", name="HuggingFaceFW/fineweb-edu", subset="sample-10BT", max_documents=10)
    with pytest.raises(DataError, match=r"could not open 'HuggingFaceFW/fineweb-edu' \(sample-10BT\).*data=local"):
        prepare_data(cfg, 512, 1024, 64)
    cfg = cfg_of(tmp_path, name="shakespeare", tokenizer={"pretrained": "gpt2"})
    with pytest.raises(DataError, match="pretrained tokenizer 'gpt2'.*data.tokenizer.path=FILE"):
        resolve_vocab_size(cfg, None)


def test_a_tokenizer_file_sets_the_vocabulary_and_is_checked_against_the_model(tmp_path):
    tokenizer = train_tokenizer(DOCS, 400)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    size = tokenizer.get_vocab_size()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, d in enumerate(DOCS):
        (corpus / f"{i}.txt").write_text(d)
    cfg = cfg_of(tmp_path, name="local", path=str(corpus), tokenizer={"path": str(tmp_path / "tokenizer.json")})
    assert resolve_vocab_size(cfg, None) == size  # model.vocab_size null: follow the tokenizer
    assert resolve_vocab_size(cfg, 4096) == 4096
    with pytest.raises(DataError, match=f"has {size} entries but model.vocab_size is 300"):
        resolve_vocab_size(cfg, 300)
    run = compose_config("data=local", f"data.path={corpus}", f"data.tokenizer.path={tmp_path / 'tokenizer.json'}",
                         "model.vocab_size=300")
    with pytest.raises(DataError, match=f"{size} entries but model.vocab_size is 300"):
        validate_config(run)  # before any compute
    data = prepare_data(cfg, None, 256, 32)
    assert data.vocab_size == size and data.meta["tokenizer"]["kind"] == "file"
    assert Tokenizer.from_file(str(data.tokenizer_path)).get_vocab() == tokenizer.get_vocab()
    assert sorted(decoded(data)) == sorted(d.strip() for d in DOCS)  # .txt documents are stripped


def test_a_loaded_tokenizer_needs_an_end_of_document_token(tmp_path):
    from tokenizers import models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "t.json"))
    (tmp_path / "a.txt").write_text("a a a")
    cfg = cfg_of(tmp_path, name="local", path=str(tmp_path / "a.txt"), tokenizer={"path": str(tmp_path / "t.json")})
    with pytest.raises(ConfigError, match="data.tokenizer.eot"):
        prepare_data(cfg, None, 16, 4)


def test_resolve_vocab_size_for_a_trained_bpe():
    cfg = OmegaConf.structured(DataConfig())
    assert resolve_vocab_size(cfg, 4096) == 4096
    assert resolve_vocab_size(OmegaConf.merge(cfg, {"tokenizer": {"vocab_size": 1000}}), None) == 1000
    with pytest.raises(ConfigError, match="data.tokenizer.vocab_size"):
        resolve_vocab_size(cfg, None)


@pytest.mark.parametrize("overrides, key, needle", [
    (["data.name=HuggingFaceFW/fineweb-edu"], "data.name", "data=hf data.name=HuggingFaceFW/fineweb-edu"),
    (["data.source=local", "data.path=x.txt"], "data.name", "data=local, which sets both keys."),
    (["data.verify=sometimes"], "data.verify", "auto, full, size"),
    (["data.max_documents=0"], "data.max_documents", "> 0"),
    (["data.shard_tokens=-1"], "data.shard_tokens", "> 0"),
    (["data.tokenizer.vocab_size=100"], "data.tokenizer.vocab_size", "at least 257"),
    (["data.tokenizer.path=/a/tokenizer.json", "data.tokenizer.pretrained=gpt2"], "data.tokenizer.path", "not both"),
    (["data.tokenizer.path=/no/tokenizer.json"], "data.tokenizer.path", "does not exist"),
    (["data.tokenizer.pretrained=gpt2", "data.tokenizer.vocab_size=512"], "data.tokenizer.vocab_size", "its own"),
    (["data=hf", "data.name=hf"], "data.name", "needs a dataset"),
])
def test_data_keys_are_checked_before_any_compute(overrides, key, needle):
    with pytest.raises(ConfigError) as info:
        validate_config(compose_config(*overrides))
    assert info.value.key == key and needle in str(info.value)


def test_pydocs_is_found_where_extracted_or_says_how_to_get_it(tmp_path, monkeypatch):
    cfg = cfg_of(tmp_path, name="pydocs")
    validate_config(compose_config("data=pydocs"))  # composing never needs the files
    if DATA_SOURCES["pydocs"].sources_dir(cfg) is None:
        with pytest.raises(DataError) as info:
            documents(cfg)
        message = str(info.value)
        assert str(tmp_path / "cache" / "pydocs") in message
        assert "apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb" in message
    # the layout dpkg-deb -x leaves, under the default location and under data.path
    elsewhere = tmp_path / "elsewhere"
    for root, keys in ((tmp_path / "cache" / "pydocs", {}), (elsewhere, {"path": str(elsewhere)})):
        sources = root / "usr/share/doc/python3.11/html/_sources"
        (sources / "library").mkdir(parents=True)
        (sources / "library" / "json.rst.txt").write_text(DOCS[0])
        (sources / "tutorial.rst.txt").write_text(DOCS[1])
        (sources / "library" / "json.html").write_text("<p>not a source</p>")
        assert documents(cfg_of(tmp_path, name="pydocs", **keys)) == [DOCS[0].strip(), DOCS[1].strip()]


def test_a_mixture_reads_every_part_and_validates_on_all_of_them(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    for i in range(30):
        (first / f"{i}.txt").write_text(f"apple orchard {i} " * 40)
        (second / f"{i}.txt").write_text(f"river stone {i} " * 40)
    cfg = compose_config("model=tiny", "data=mixture", f"data.parts=[{first},{second}]",
                         f"data.cache_dir={tmp_path / 'cache'}").data
    documents = list(DATA_SOURCES["mixture"].corpus(cfg).documents())
    assert len(documents) == 60 and "apple" in documents[0] and "river" in documents[-1]
    data = prepare_data(cfg, 300, eval_tokens=2000, seq_len=32, log=lambda *_: None)
    text = Tokenizer.from_file(str(data.tokenizer_path)).decode(data.val.tolist())
    assert "apple" in text and "river" in text  # the held-out documents come from both parts
    alone = compose_config("model=tiny", "data=local", f"data.path={first}",
                           f"data.cache_dir={tmp_path / 'cache'}").data
    assert DATA_SOURCES["mixture"].corpus(cfg).fingerprint != DATA_SOURCES["local"].corpus(alone).fingerprint


@pytest.mark.parametrize("parts, needle", [("[]", "data.parts"), ("[/no/such/dir]", "/no/such/dir")])
def test_a_mixture_with_no_parts_or_a_missing_part_is_refused(parts, needle):
    cfg = compose_config("model=tiny", "data=mixture", f"data.parts={parts}")
    with pytest.raises((ConfigError, DataError)) as info:
        validate_config(cfg)
    assert needle in str(info.value)
