"""The data contract through the real command lines: moa-prepare, and moa-train on corpora it has never seen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import run_cli

# Small run shapes: the acceptance command (model=tiny ffn=one_moa data=local train.max_steps=40) with a
# short sequence, batch and validation set so that it takes seconds on 2 CPU cores.
SMALL_RUN = ("model=tiny", "ffn=one_moa", "train.max_steps=40", "train.seq_len=64", "train.batch_size=8",
             "train.eval_tokens=2048", "train.eval_every=40", "train.progress=false", "data.tokenizer.vocab_size=512")


def run_prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moa_train.prepare", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def assert_clean_failure(result, *needles):
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr + result.stdout
    assert "Traceback" not in message, message
    for needle in needles:
        assert needle in message, message


def stdlib_sources(count: int, skip: int = 0) -> list[Path]:
    """Python's own standard library: text this project has never been tuned on."""
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.stat().st_size > 8000)
    return files[skip:skip + count]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("stdlib_text")
    for f in stdlib_sources(12):
        (out / f"{f.stem}.txt").write_text(f.read_text(encoding="utf-8", errors="replace"))
    return out


def test_cli_missing_path_exits_2_naming_it(tmp_path):
    missing = tmp_path / "no_corpus_here"
    assert_clean_failure(run_cli("data=local", f"data.path={missing}", f"hydra.run.dir={tmp_path / 'run'}"),
                         "data.path", str(missing))
    assert_clean_failure(run_prepare("data=local", f"data.path={missing}"), "data.path", str(missing))


def test_cli_empty_corpus_exits_2_naming_it(tmp_path):
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert_clean_failure(run_cli("data=local", f"data.path={empty}", f"hydra.run.dir={tmp_path / 'run'}"),
                         str(empty), "holds no .txt")
    (empty / "a.txt").write_text("")
    (empty / "b.txt").write_text("\n \n")
    assert_clean_failure(run_prepare("data=local", f"data.path={empty}", f"data.cache_dir={tmp_path / 'cache'}"),
                         str(empty), "empty")
    (empty / "a.txt").write_text("Too short to train on.")
    assert_clean_failure(run_prepare("data=local", f"data.path={empty}", f"data.cache_dir={tmp_path / 'cache'}",
                                     "data.tokenizer.vocab_size=300"),
                         str(empty), "too small", "32769 validation tokens")


def test_moa_prepare_once_then_the_cache(text_dir, tmp_path):
    args = ("data=local", f"data.path={text_dir}", f"data.cache_dir={tmp_path}", "data.tokenizer.vocab_size=512",
            "--json")
    first, second = run_prepare(*args), run_prepare(*args)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    first, second = json.loads(first.stdout), json.loads(second.stdout)
    assert first["built"] and not second["built"] and first["cache"] == second["cache"]
    assert second["seconds"] < first["seconds"] and second["documents"] == 12
    human = run_prepare(*args[:-1])
    assert "already prepared" in human.stdout and "12 (" in human.stdout, human.stdout


def _train(tmp_path: Path, corpus: Path) -> dict:
    result = run_cli(*SMALL_RUN, "data=local", f"data.path={corpus}", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((tmp_path / "run" / "summary.json").read_text())


@pytest.mark.slow
def test_a_new_directory_of_text_files_trains(text_dir, tmp_path):
    summary = _train(tmp_path, text_dir)
    assert summary["status"] == "completed" and summary["data"]["source"] == "local"
    assert summary["val_loss"] < summary["initial_val_loss"] - 0.5


@pytest.mark.slow
def test_a_jsonl_file_of_text_records_trains(tmp_path):
    corpus = tmp_path / "records.jsonl"
    with open(corpus, "w") as f:
        for source in stdlib_sources(12, skip=12):
            text = source.read_text(encoding="utf-8", errors="replace")
            for start in range(0, len(text), 4000):
                f.write(json.dumps({"text": text[start:start + 4000], "source": source.name}) + "\n")
    summary = _train(tmp_path, corpus)
    assert summary["status"] == "completed" and summary["data"]["documents"] > 50
    assert summary["val_loss"] < summary["initial_val_loss"] - 0.5
