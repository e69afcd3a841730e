"""After training: moa-export into Hugging Face format, moa-generate, moa-eval through lm-eval, train.init_from."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import read_jsonl, run_cli

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")

TINY_RUN = ("train.max_steps=3", "train.batch_size=2", "train.seq_len=64", "train.eval_tokens=512",
            "train.eval_every=3", "train.progress=false", "ffn.kernel=eager")
MODELS = {"swiglu": ("model=tiny", "ffn=swiglu"), "qd_moa": ("model=tiny", "ffn=qd_moa"),
          "moa1": ("model=tiny", "ffn=moa1"), "moe_bi_moa": ("model=tiny_moe", "ffn=bi_moa")}


def tool(module: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", f"moa_train.{module}", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    made = {}
    for name, overrides in MODELS.items():
        result = run_cli(*overrides, *TINY_RUN, f"hydra.run.dir={root / name}")
        assert result.returncode == 0, result.stderr[-3000:]
        made[name] = root / name
    return made


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    for name, run in runs.items():
        done = tool("export", str(run), "--out", str(root / name))
        assert done.returncode == 0, done.stderr[-3000:]
    return {name: root / name for name in runs}


def _tokens(vocab: int = 4096) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(MODELS))
def test_the_export_loads_in_transformers_with_the_projects_logits(runs, exports, name):
    from transformers import AutoModelForCausalLM

    from moa_train.trained import load_trained

    llama = name == "swiglu"
    hf = AutoModelForCausalLM.from_pretrained(str(exports[name]), trust_remote_code=not llama).eval()
    config = json.loads((exports[name] / "config.json").read_text())
    assert (type(hf).__name__, config["model_type"]) == (("LlamaForCausalLM", "llama") if llama
                                                        else ("MoaForCausalLM", "moa"))
    assert ("auto_map" in config) is not llama and (exports[name] / "modeling_moa.py").exists() is not llama
    ours = load_trained(runs[name]).model
    tokens = _tokens()
    with torch.no_grad():
        difference = (hf(tokens).logits - ours(tokens)).abs().max().item()
    assert difference <= 1e-5
    for file in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        assert (exports[name] / file).is_file()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(exports[name]))
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.encode("ROMEO:") == \
        load_trained(runs[name]).tokenizer().encode("ROMEO:").ids


def test_a_sharded_export_writes_an_index_and_loads_back(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from moa_train.trained import load_trained

    out = tmp_path / "sharded"
    done = tool("export", str(runs["qd_moa"]), "--out", str(out), "--max-shard-size", "2MB")
    assert done.returncode == 0, done.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    tokens = _tokens()
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    with torch.no_grad():
        reference = load_trained(runs["qd_moa"]).model(tokens)
        assert torch.allclose(hf(tokens).logits, reference, atol=1e-5)
        assert torch.equal(load_trained(out).model(tokens), reference)  # moa_train reads its own export back


def test_export_refuses_what_it_must_not_overwrite_and_leaves_nothing_half_written(runs, exports, tmp_path):
    other = tool("export", str(runs["qd_moa"]), "--out", str(exports["swiglu"]))
    assert other.returncode == 2 and "another model" in other.stderr and "--force" in other.stderr
    assert json.loads((exports["swiglu"] / "config.json").read_text())["model_type"] == "llama"  # untouched
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = tool("export", str(runs["swiglu"]), "--out", str(foreign))
    assert refused.returncode == 2 and (foreign / "notes.txt").exists()
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    none = tool("export", str(empty_run), "--out", str(tmp_path / "x"))
    assert none.returncode == 2 and "no complete checkpoint" in none.stderr and "Traceback" not in none.stderr
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))
    untokenized = tmp_path / "untokenized"
    shutil.copytree(runs["swiglu"], untokenized)
    (untokenized / "tokenizer.json").unlink()
    lacking = tool("export", str(untokenized), "--out", str(tmp_path / "y"))
    assert lacking.returncode == 2 and "tokenizer.json" in lacking.stderr and "Traceback" not in lacking.stderr
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y.tmp-*"))
    again = tool("export", str(runs["swiglu"]), "--out", str(exports["swiglu"]))  # the same model: replaced
    assert again.returncode == 0, again.stderr


# ----------------------------------------------------------------------------- generation


def test_greedy_generation_equals_transformers_and_the_cache_changes_nothing(runs, exports):
    from transformers import AutoModelForCausalLM

    from moa_train.generate import Sampling, generate
    from moa_train.trained import load_trained

    for name in ("swiglu", "qd_moa"):
        trained = load_trained(runs[name])
        prompt = trained.tokenizer().encode("ROMEO:").ids
        greedy = Sampling(max_new_tokens=20, temperature=0.0)
        cached = generate(trained.model, prompt, greedy)
        assert cached == generate(trained.model, prompt, greedy, use_cache=False)
        hf = AutoModelForCausalLM.from_pretrained(str(exports[name]), trust_remote_code=name != "swiglu").eval()
        expected = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20, min_new_tokens=20,
                               eos_token_id=None, pad_token_id=0)
        assert cached == expected[0, len(prompt):].tolist(), name


def test_sampling_is_seeded_and_filters_apply():
    from moa_train.generate import Sampling, next_token

    logits = torch.tensor([[3.0, 2.0, 1.0, 0.5, -1.0]])

    def draws(sampling: Sampling, seeds) -> list[int]:
        return [int(next_token(logits, sampling, torch.Generator().manual_seed(seed))) for seed in seeds]

    assert draws(Sampling(temperature=1.0), range(30)) == draws(Sampling(temperature=1.0), range(30))
    assert len(set(draws(Sampling(temperature=1.0), range(2000)))) == 5  # every token, the rarest at p = .011
    assert set(draws(Sampling(temperature=5.0, top_k=1), range(20))) == {0}
    assert set(draws(Sampling(temperature=1.0, top_p=0.8), range(200))) == {0, 1}  # p = .61, .22: the two hold .8
    assert draws(Sampling(temperature=0.0), [0]) == [0]


def test_moa_generate_cli(runs):
    first = tool("generate", str(runs["qd_moa"]), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "0")
    second = tool("generate", str(runs["qd_moa"]), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "0")
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.startswith("ROMEO:") and len(first.stdout) > 10
    other_seed = tool("generate", str(runs["qd_moa"]), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "1")
    assert other_seed.stdout != first.stdout
    too_long = tool("generate", str(runs["qd_moa"]), "--prompt", "ROMEO:", "--max-new-tokens", "100")
    assert too_long.returncode == 2 and "trained at 64" in too_long.stderr and "--extrapolate" in too_long.stderr
    for bad, needle in ((["--top-p", "0"], "--top-p"), ([], "no prompt")):
        done = tool("generate", str(runs["qd_moa"]), *([] if not bad else ["--prompt", "x"]), *bad)
        assert done.returncode == 2 and needle in done.stderr and "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- zero-shot evaluation

TASK_YAML = """task: tiny_choice
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
metadata: {{version: 1.0}}
"""


def _local_task(directory: Path) -> Path:
    rows = [{"question": f"ROMEO: what say you, {name}?", "choices": ["I will.", "Nay, my lord.", "O, woe!"],
             "label": i % 3} for i, name in enumerate(["Juliet", "Tybalt", "nurse", "friar", "Mercutio", "Paris"])]
    data = directory / "tiny_choice.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = directory / "tiny_choice.yaml"
    task.write_text(TASK_YAML.format(data=data))
    return task


def test_moa_eval_on_a_local_task_equals_lm_evals_hf_model(runs, exports, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    task = _local_task(tmp_path)
    done = tool("zero_shot", str(runs["qd_moa"]), "--tasks", str(task), "--batch-size", "4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((runs["qd_moa"] / "eval.json").read_text())
    ours = {r["metric"]: r["value"] for r in record["results"] if r["task"] == "tiny_choice"}
    assert set(ours) == {"acc", "acc_norm"} and record["step"] == 3 and record["lm_eval_version"]
    assert "tiny_choice" in done.stdout and "acc_norm" in done.stdout
    from lm_eval.tasks import TaskManager

    reference = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={exports['qd_moa']},trust_remote_code=True,"
                                        "dtype=float32", device="cpu", batch_size=4, tasks=[str(task)],
                                        task_manager=TaskManager(), log_samples=False)
    theirs = reference["results"]["tiny_choice"]
    assert ours["acc"] == pytest.approx(theirs["acc,none"], abs=1e-6)
    assert ours["acc_norm"] == pytest.approx(theirs["acc_norm,none"], abs=1e-6)


def test_moa_eval_names_unknown_tasks_and_missing_datasets(runs, tmp_path):
    pytest.importorskip("lm_eval")
    unknown = tool("zero_shot", str(runs["swiglu"]), "--tasks", "arc_challange")
    assert unknown.returncode == 2 and "arc_challenge" in unknown.stderr and "Traceback" not in unknown.stderr
    task = tmp_path / "offline.yaml"
    task.write_text(TASK_YAML.format(data="x").replace("dataset_path: json", "dataset_path: nobody/no_such_dataset")
                    .replace("task: tiny_choice", "task: offline_choice"))
    missing = tool("zero_shot", str(runs["swiglu"]), "--tasks", str(task))
    assert missing.returncode == 2 and "no_such_dataset" in missing.stderr and "Traceback" not in missing.stderr


# ----------------------------------------------------------------------------- train.init_from


def test_init_from_starts_a_new_run_from_another_runs_weights(runs, exports, tmp_path):
    final = json.loads((runs["swiglu"] / "summary.json").read_text())["val_loss"]
    for name, source in (("from_checkpoint", runs["swiglu"]), ("from_export", exports["swiglu"])):
        branch = run_cli("model=tiny", "ffn=swiglu", *TINY_RUN, "schedule=wsd", f"train.init_from={source}",
                         f"hydra.run.dir={tmp_path / name}")
        assert branch.returncode == 0, branch.stderr[-3000:]
        start = read_jsonl(tmp_path / name / "metrics.jsonl")[0]
        assert start["step"] == 0 and start["val_loss"] == pytest.approx(final, abs=1e-5), name
    refused = run_cli("model=tiny", "ffn=moa1", *TINY_RUN, f"train.init_from={runs['swiglu']}",
                      f"hydra.run.dir={tmp_path / 'refused'}")
    assert refused.returncode == 2 and "ffn.name" in refused.stderr and "Traceback" not in refused.stderr
