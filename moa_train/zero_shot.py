"""`moa-eval RUN_DIR_OR_EXPORT`: zero-shot (or few-shot) evaluation through lm-evaluation-harness.

The default tasks are the paper's four: ARC-Challenge, HellaSwag, OpenBookQA and WinoGrande, scored
as lm-eval scores them (accuracy, and accuracy normalised by the answer's length). Any lm-eval task
or group works by name, and a task of your own as a YAML file (lm-eval's task format, over local
JSON/JSONL data). The model is scored by moa_train's own forward pass (`MoaLM`, an lm-eval
`TemplateLM`), with the run's tokenizer; the scores equal lm-eval's `hf` model type on the export.
Results are added to `eval.json` in the run (or export) directory and printed as a table.

lm-eval reads task datasets through `datasets`, from the hub the first time: on a machine without
network, a task whose dataset is not in the datasets cache cannot run (the error says which dataset).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from pathlib import Path

import torch

from .errors import UserError

PAPER_TASKS = ("arc_challenge", "hellaswag", "openbookqa", "winogrande")
EVAL_FILE = "eval.json"


def lm_class():
    """MoaLM, defined once lm_eval is importable (it is an optional dependency)."""
    try:
        from lm_eval.api.model import TemplateLM
        from lm_eval.models import utils as lm_utils
    except ImportError:
        raise UserError("moa-eval needs lm-evaluation-harness: pip install 'moa-train[eval]' (make install "
                        "installs it).") from None

    class MoaLM(TemplateLM):
        """A trained moa_train model as an lm-eval causal LM: log-likelihoods from one forward pass per batch
        (sequences padded on the right, which a causal model never sees), greedy generation with a cache."""

        def __init__(self, trained, batch_size: int = 16):
            super().__init__()
            self.trained, self.model = trained, trained.model
            self.text_tokenizer = trained.tokenizer()
            self._eot = trained.eot_id
            self.max_length = trained.seq_len
            self.batch_size = batch_size
            self._device = next(self.model.parameters()).device

        @property
        def eot_token_id(self) -> int:
            return self._eot

        def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
            return self.text_tokenizer.encode(string, add_special_tokens=False).ids

        @torch.no_grad()
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            results = []
            for first in range(0, len(requests), self.batch_size):
                batch = requests[first:first + self.batch_size]
                inputs = [(context + continuation)[-(self.max_length + 1):][:-1] for _, context, continuation in batch]
                width = max(len(i) for i in inputs)
                padded = torch.full((len(batch), width), self._eot, dtype=torch.long)
                for row, ids in enumerate(inputs):
                    padded[row, :len(ids)] = torch.tensor(ids)
                logprobs = self.model(padded.to(self.device)).float().log_softmax(-1).cpu()
                for row, ((key, _, continuation), ids) in enumerate(zip(batch, inputs)):
                    target = torch.tensor(continuation)
                    picked = logprobs[row, len(ids) - len(continuation):len(ids)]
                    greedy = bool((picked.argmax(-1) == target).all())
                    answer = (float(picked.gather(-1, target[:, None]).sum()), greedy)
                    results.append(answer)
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, answer)
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            totals = []
            for (text,) in (r.args for r in requests):
                windows = [(None, *lm_utils.make_disjoint_window(w)) for w in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                totals.append(sum(lp for lp, _ in self._loglikelihood_tokens(windows)))
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            from .generate import Sampling, generate

            outputs = []
            for context, gen_kwargs in (r.args for r in requests):
                until = gen_kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                ids = self.tok_encode(context)[-(self.max_length - 1):] or [self._eot]
                budget = min(int(gen_kwargs.get("max_gen_toks", 256)), self.max_length - len(ids))
                new = generate(self.model, ids, Sampling(max(budget, 1), temperature=0.0, stop_token=self._eot))
                text = self.text_tokenizer.decode([t for t in new if t != self._eot])
                for stop in until:
                    text = text.split(stop)[0]
                outputs.append(text)
            return outputs

    return MoaLM


def check_tasks(tasks: list[str], task_manager) -> None:
    """Unknown task names are refused before any model is loaded, with the close matches."""
    known = set(task_manager.all_tasks)
    for task in tasks:
        if task in known or (task.endswith((".yaml", ".yml")) and Path(task).is_file()):
            continue
        if task.endswith((".yaml", ".yml")):
            raise UserError(f"the task file '{task}' does not exist.")
        close = difflib.get_close_matches(task, sorted(known), n=5, cutoff=0.6)
        raise UserError(f"'{task}' is not an lm-eval task" + (f"; close matches: {', '.join(close)}" if close else "")
                        + ". Any task of `lm_eval --tasks list`, or the path of a task YAML file.")


def dataset_error(exc: BaseException, tasks: list[str]) -> UserError:
    text = str(exc)
    named = re.search(r"reach '([^']+)'", text) or re.search(r"[Dd]ataset '([^']+)'", text)
    dataset = f"the dataset '{named.group(1)}'" if named else "a task's dataset"
    return UserError(f"the tasks {', '.join(tasks)} need {dataset}, which is not in the datasets cache and could not "
                     f"be downloaded ({type(exc).__name__}: {text[:200]}). Run moa-eval once on a machine with "
                     "network access (datasets caches it under ~/.cache/huggingface/datasets; copy that folder "
                     "over), or evaluate a local task file.")


def evaluate_tasks(source: Path, tasks: list[str], batch_size: int = 16, limit: float | None = None,
                   num_fewshot: int | None = None, include_path: Path | None = None,
                   device: str = "cpu") -> dict:
    """Run lm-eval on the model at `source`; returns the eval.json record (without writing it)."""
    lm = lm_class()
    import lm_eval
    from lm_eval.tasks import TaskManager

    from .trained import load_trained

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    check_tasks(tasks, manager)
    trained = load_trained(source, device=device)
    try:
        results = lm_eval.simple_evaluate(model=lm(trained, batch_size), tasks=list(tasks), num_fewshot=num_fewshot,
                                          limit=limit, task_manager=manager, log_samples=False)
    except (ConnectionError, FileNotFoundError) as exc:  # datasets: DatasetNotFoundError is a FileNotFoundError
        raise dataset_error(exc, tasks) from None
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, _ = key.partition(",")
            if metric.endswith("_stderr") or not isinstance(value, (int, float)) or metric in ("sample_len",):
                continue
            stderr = metrics.get(key.replace(metric, f"{metric}_stderr", 1))
            rows.append({"task": task, "metric": metric, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                         "num_fewshot": results.get("n-shot", {}).get(task, num_fewshot or 0)})
    return {"model": str(trained.checkpoint), "step": trained.step, "lm_eval_version": results.get("lm_eval_version")
            or getattr(lm_eval, "__version__", None), "limit": limit, "batch_size": batch_size, "results": rows,
            "run_dir": trained.run_dir}


def write_eval(record: dict) -> Path:
    """eval.json in the run directory: earlier results of other tasks (or few-shot counts) are kept."""
    run_dir = Path(record.pop("run_dir"))
    path = run_dir / EVAL_FILE
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        earlier = {}
    fresh = {(r["task"], r["num_fewshot"]) for r in record["results"]}
    kept = [r for r in earlier.get("results", []) if (r["task"], r.get("num_fewshot", 0)) not in fresh]
    record = {**record, "results": kept + record["results"]}
    tmp = run_dir / f".{EVAL_FILE}-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)
    return path


def format_table(record: dict) -> str:
    lines = [f"{'task':<24} {'metric':<10} {'shots':>5} {'value':>8} {'stderr':>8}"]
    for r in record["results"]:
        stderr = f"{r['stderr']:.4f}" if r["stderr"] is not None else "-"
        lines.append(f"{r['task']:<24} {r['metric']:<10} {r['num_fewshot']:>5} {r['value']:>8.4f} {stderr:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="moa-eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model", type=Path, help="a run directory, one of its checkpoints, or a moa-export directory")
    parser.add_argument("--tasks", default=",".join(PAPER_TASKS),
                        help="comma-separated lm-eval task or group names, or task YAML files")
    parser.add_argument("--include-path", type=Path, help="a directory of task YAML files to add to lm-eval's")
    parser.add_argument("--num-fewshot", type=int, default=None, help="examples in each prompt (None: the task's own)")
    parser.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1); None: all")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks:
            raise UserError("--tasks names no task.")
        record = evaluate_tasks(args.model, tasks, args.batch_size, args.limit, args.num_fewshot, args.include_path,
                                args.device)
        path = write_eval(record)
    except UserError as exc:
        print(f"moa-eval: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(format_table(record))
    print(f"moa-eval: step {record['step']}, lm-eval {record['lm_eval_version']} -> {path}")


if __name__ == "__main__":
    main()
