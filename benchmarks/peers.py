"""moa-train against its peers at equal dims, in one process tree, in alternating rounds.

Arms (each in a fresh process, so that no arm warms another's caches):
  cli-<ffn>   the full `moa-train` step, as metrics.jsonl reports tokens_per_s (clipping, logging and all);
              cli-<ffn>+KEY=VALUE[+...]: the same with these overrides (e.g. +train.compile=true: the
              compilation falls in the warm-up steps)
  bare-<ffn>  the project's own model (builder.build_model) in a bare loop with torch's AdamW (overrides
              as for cli)
  hf-swiglu   a bare `transformers` LlamaForCausalLM loop (SDPA attention, torch's AdamW, no clipping)
and the MoE block alone (forward + backward, 32 experts, top-4, one shared expert):
  moe-ours    moa_train.moe.MoE (grouped dispatch)
  moe-hf      transformers' Qwen2MoeSparseMoeBlock, which also has a shared expert (its default experts
              implementation; `moe-hf-grouped` is its grouped_mm one where the installed version has it)
  moe-ours-mixtral, moe-hf-mixtral
              the same without a shared expert and with the top-k weights renormalised: moa_train's block
              configured as Mixtral's, and transformers' MixtralSparseMoeBlock

The allocator: moa-train makes glibc keep freed memory for the next step (hardware.reuse_freed_memory,
train.cpu_reuse_freed_memory), so the cli, bare and moe-ours arms run with it, and the transformers arms
with the allocator as a transformers process has it. `+reuse` on an hf or moe-hf arm gives that arm the same
setting, `+malloc-default` on moe-ours takes it away: the comparison with the allocator held equal.

Rounds: every figure is the median over the timed steps of one run; an arm's figure is its best run over the
rounds. Each ratio is given twice: of the best runs, and the median over the rounds of each round's ratio.
On a shared machine whose speed swings by 20% over tens of seconds, the two arms of a round (minutes apart)
do not meet the same load, and 5-8 rounds still leave the median uncertain by several percent.

Lockstep (--pairs ARM:BASE): both arms' processes live at once and take turns, one step each, so that each
pair of neighbouring steps meets the same moment of the machine; the speed-up is the median over the pairs
of BASE's step time over ARM's, with its quartiles. A cli arm there is the moa-train CLI in its worker
process, its Trainer driven step by step; a step's time is what its metrics row reports.

    python benchmarks/peers.py --rounds 3 --json benchmarks/peers_cpu.json
    python benchmarks/peers.py --rounds 0 --lockstep-runs 3 --pairs cli-swiglu:hf-swiglu,moe-ours-mixtral:moe-hf-mixtral
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DIMS = dict(dim=384, n_layers=2, n_heads=6, ffn_hidden=1024, vocab_size=8192, batch=8, seq_len=256)
MOE_DIMS = dict(dim=384, n_experts=32, top_k=4, expert_hidden=256, tokens=2048)
MODEL_OVERRIDES = ["model=tiny", f"model.dim={DIMS['dim']}", f"model.n_layers={DIMS['n_layers']}",
                   f"model.n_heads={DIMS['n_heads']}", f"model.ffn_hidden={DIMS['ffn_hidden']}",
                   f"model.vocab_size={DIMS['vocab_size']}", f"train.batch_size={DIMS['batch']}",
                   f"train.seq_len={DIMS['seq_len']}"]


def _timed(step, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return times


def _random_batch(vocab: int, batch: int, seq_len: int):
    import torch

    tokens = torch.randint(0, vocab, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def cli_overrides(detail: str, total_steps: int, run_dir: str) -> list[str]:
    """The moa-train command line of a cli arm: cli-swiglu+train.compile=true is the run with these overrides,
    every step logged, no evaluation or checkpoint between the steps."""
    ffn, *extra = detail.split("+")
    return [*MODEL_OVERRIDES, f"ffn={ffn}", *extra, f"train.max_steps={total_steps}", "train.eval_every=100000",
            "train.eval_at_start=false", "train.ckpt_at_end=false", "train.log_every=1", "train.progress=false",
            "train.resume=never", f"hydra.run.dir={run_dir}"]


def arm_cli(detail: str, steps: int, warmup: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([sys.executable, "-m", "moa_train", *cli_overrides(detail, steps + warmup, f"{tmp}/run")],
                             capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"peers: moa-train failed:\n{run.stderr[-3000:]}")
        rows = [json.loads(line) for line in Path(tmp, "run", "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows if r["step"] > warmup)


def bare_step(detail: str):
    import torch

    from moa_train.builder import build_model
    from moa_train.config import compose_run_config
    from moa_train.distributed import init_distributed

    ffn, *extra = detail.split("+")
    cfg = compose_run_config([*MODEL_OVERRIDES, f"ffn={ffn}", *extra])
    model = build_model(cfg, init_distributed("none", "cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    x, y = _random_batch(DIMS["vocab_size"], DIMS["batch"], DIMS["seq_len"])

    def step():
        model(x, y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, DIMS["batch"] * DIMS["seq_len"]


def hf_step():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=DIMS["vocab_size"], hidden_size=DIMS["dim"], intermediate_size=DIMS["ffn_hidden"],
                         num_hidden_layers=DIMS["n_layers"], num_attention_heads=DIMS["n_heads"],
                         num_key_value_heads=DIMS["n_heads"], max_position_embeddings=DIMS["seq_len"],
                         tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    x, _ = _random_batch(DIMS["vocab_size"], DIMS["batch"], DIMS["seq_len"])

    def step():
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, DIMS["batch"] * DIMS["seq_len"]


MOE_BLOCKS = ("ours", "hf", "hf-grouped", "ours-mixtral", "hf-mixtral")


def moe_block_kind(name: str) -> tuple[str, str]:
    """(side, block) of a moe arm's name: ours-mixtral -> (ours, mixtral); hf-grouped is transformers' other
    experts implementation of the same Qwen2-MoE block."""
    side, _, block = name.partition("-")
    return side, "qwen2_moe" if block in ("", "grouped") else block


def moe_block(which: str):
    """One MoE block at MOE_DIMS. `ours` and `hf` have one shared expert and the top-k softmax weights as they
    are (Qwen2-MoE, whose shared expert also has a sigmoid gate of its own); the `-mixtral` pair has no shared
    expert and renormalises the top-k weights to sum to 1 (Mixtral): the same function (test)."""
    import torch

    torch.manual_seed(0)
    d = MOE_DIMS["dim"]
    side, block_kind = moe_block_kind(which)
    mixtral = block_kind == "mixtral"
    if side == "ours":
        from omegaconf import OmegaConf

        from moa_train.config import FFNConfig, MoEConfig
        from moa_train.moe.layer import MoE

        moe_cfg = OmegaConf.structured(MoEConfig(n_experts=MOE_DIMS["n_experts"], top_k=MOE_DIMS["top_k"],
                                                 n_shared_experts=0 if mixtral else 1,
                                                 expert_hidden=MOE_DIMS["expert_hidden"], score="softmax",
                                                 renormalize=mixtral))
        block = MoE(d, moe_cfg, OmegaConf.structured(FFNConfig(name="swiglu")), 16)
        block.reset_parameters(0.02, 0.02)
    else:
        if mixtral:
            from transformers import MixtralConfig
            from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

            config = MixtralConfig(hidden_size=d, num_local_experts=MOE_DIMS["n_experts"],
                                   num_experts_per_tok=MOE_DIMS["top_k"], intermediate_size=MOE_DIMS["expert_hidden"])
            block_class = MixtralSparseMoeBlock
        else:
            from transformers import Qwen2MoeConfig
            from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

            config = Qwen2MoeConfig(hidden_size=d, num_experts=MOE_DIMS["n_experts"],
                                    num_experts_per_tok=MOE_DIMS["top_k"],
                                    moe_intermediate_size=MOE_DIMS["expert_hidden"],
                                    shared_expert_intermediate_size=MOE_DIMS["expert_hidden"])
            block_class = Qwen2MoeSparseMoeBlock
        if which == "hf-grouped":
            config._experts_implementation = "grouped_mm"
        block = block_class(config)
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.02)
    return block


def moe_step(which: str):
    """One MoE block's forward and backward over MOE_DIMS tokens."""
    import torch

    block = moe_block(which)  # x follows from the same random stream as the block's weights, as measured
    tokens = MOE_DIMS["tokens"]
    x = torch.randn(1, tokens, MOE_DIMS["dim"], requires_grad=True)

    def step():
        block(x).float().pow(2).mean().backward()

    return step, tokens


def step_of(arm: str):
    """(step function, tokens a step) of a bare, hf or moe arm, in this process."""
    kind, _, detail = arm.partition("-")
    if kind == "bare":
        return bare_step(detail)
    name, *flags = detail.split("+")
    unknown = set(flags) - {"reuse", "malloc-default"}
    if unknown:
        raise SystemExit(f"peers: unknown arm flag(s) {sorted(unknown)} in {arm!r}; accepted: +reuse, +malloc-default")
    if name.startswith("ours"):  # as moa-train's build_model does on CPU: the allocator, the linear layers' backend
        import torch

        from moa_train.parallel import configure_backends

        configure_backends(torch.device("cpu"), reuse_freed_memory="malloc-default" not in flags)
    elif "reuse" in flags:
        from moa_train.hardware import reuse_freed_memory

        reuse_freed_memory()
    if kind == "hf":
        return hf_step()
    if kind == "moe" and name in MOE_BLOCKS:
        return moe_step(name)
    raise SystemExit(f"peers: unknown arm {arm!r}; accepted: cli-<ffn>, bare-<ffn>, hf-swiglu, "
                     + ", ".join(f"moe-{block}" for block in MOE_BLOCKS))


def worker(arm: str, steps: int, warmup: int) -> float:
    """An arm's tokens per second: the median over `steps` timed steps after `warmup` untimed ones."""
    if arm.startswith("cli-"):
        return arm_cli(arm.removeprefix("cli-"), steps, warmup)
    step, tokens = step_of(arm)
    return tokens / statistics.median(_timed(step, steps, warmup))


# Lockstep: two arms' processes take turns step by step, so that both meet the same moments of a shared
# machine; the ratio of each pair of neighbouring steps is free of the machine's slow swings.
ANSWER = "PEERS "


def _answer(text: str) -> None:
    print(ANSWER + text, flush=True)


def _wait_for_turn() -> bool:
    return sys.stdin.readline().strip() == "step"


def serve(arm: str, steps: int, warmup: int) -> None:
    """A lockstep worker: build the arm, run its warm-up, answer `ready`, then one step per `step` line on stdin,
    answering each with the step's seconds. A cli arm is the moa-train CLI itself, whose Trainer takes its turns:
    each step's seconds are those its metrics row would report (tokens_per_step / tokens_per_s)."""
    if not arm.startswith("cli-"):
        step, _ = step_of(arm)
        for _ in range(warmup):
            step()
        _answer("ready")
        while _wait_for_turn():
            started = time.perf_counter()
            step()
            _answer(str(time.perf_counter() - started))
        return
    from moa_train import train as training

    def fit(trainer) -> None:
        for index in range(trainer.plan.steps):
            if index == warmup:
                _answer("ready")
            if index >= warmup and not _wait_for_turn():
                break
            row = trainer.train_step(index)
            if index >= warmup:
                _answer(str(trainer.plan.tokens_per_step / row["tokens_per_s"]))

    training.Trainer.fit = fit
    with tempfile.TemporaryDirectory() as tmp:
        sys.argv = ["moa-train", *cli_overrides(arm.removeprefix("cli-"), steps + warmup, f"{tmp}/run")]
        from moa_train.cli import main as cli_main

        cli_main()


def _start(arm: str, steps: int, warmup: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, __file__, "--serve", arm, "--steps", str(steps), "--warmup",
                                str(warmup)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if _read_answer(process, arm) != "ready":
        raise SystemExit(f"peers: arm {arm} did not get ready")
    return process


def _read_answer(process: subprocess.Popen, arm: str) -> str:
    for line in process.stdout:
        if line.startswith(ANSWER):
            return line[len(ANSWER):].strip()
    raise SystemExit(f"peers: arm {arm} ended early (exit status {process.wait()})")


def lockstep(arm: str, base: str, steps: int, warmup: int) -> list[float]:
    """Per pair of neighbouring steps, base's step time over arm's: arm's speed-up over base. The processes start
    one after the other (their warm-ups would slow each other); the order within a pair alternates."""
    processes = {name: _start(name, steps, warmup) for name in (arm, base)}
    times: dict[str, list[float]] = {arm: [], base: []}
    try:
        for index in range(steps):
            for name in ((arm, base) if index % 2 == 0 else (base, arm)):
                processes[name].stdin.write("step\n")
                processes[name].stdin.flush()
                times[name].append(float(_read_answer(processes[name], name)))
    finally:
        for process in processes.values():
            process.stdin.close()
            process.wait()
    return [b / a for a, b in zip(times[arm], times[base])]


ARMS = ["hf-swiglu", "hf-swiglu+reuse", "cli-swiglu", "bare-swiglu", "cli-qd_moa", "bare-qd_moa", "moe-hf",
        "moe-hf+reuse", "moe-ours", "moe-hf-mixtral", "moe-ours-mixtral"]


PAIRS = ["cli-swiglu:hf-swiglu", "cli-qd_moa:hf-swiglu", "cli-swiglu:hf-swiglu+reuse", "moe-ours:moe-hf",
         "moe-ours:moe-hf+reuse", "moe-ours-mixtral:moe-hf-mixtral", "moe-ours-mixtral:moe-hf-mixtral+reuse",
         "cli-swiglu:cli-swiglu+train.cpu_linear=blas"]  # the last: what oneDNN's products give (linear.py)


def rounds(arms: list[str], n_rounds: int, steps: int, warmup: int) -> dict:
    """Each arm in a fresh process, one after another, round after round; ratios of best runs and per round."""
    width = max(map(len, arms))
    runs: dict[str, list[float]] = {a: [] for a in arms}
    for round_ in range(n_rounds):
        for arm in arms:
            done = subprocess.run([sys.executable, __file__, "--worker", arm, "--steps", str(steps),
                                   "--warmup", str(warmup)], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"peers: arm {arm} failed:\n{done.stderr[-3000:]}")
            runs[arm].append(json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_s"])
            print(f"round {round_ + 1}: {arm:<{width}} {runs[arm][-1]:>10,.0f} tokens/s", flush=True)
    best = {a: max(v) for a, v in runs.items()}
    hf_lm = [a for a in arms if a.startswith("hf-")]
    moe = {a: moe_block_kind(a.removeprefix("moe-").split("+")[0]) for a in arms if a.startswith("moe-")}
    pairs = [(arm, hf) for hf in hf_lm for arm in arms if arm.startswith(("cli-", "bare-"))]
    pairs += [(arm, hf) for hf, (hf_side, block) in moe.items() if hf_side == "hf"
              for arm, (side, arm_block) in moe.items() if side == "ours" and arm_block == block]
    ratios = {f"{a} / {b}": best[a] / best[b] for a, b in pairs}
    round_ratios = {f"{a} / {b}": [x / y for x, y in zip(runs[a], runs[b])] for a, b in pairs}
    print("\nbest of the rounds (tokens/s) and ratios:")
    for arm in arms:
        print(f"  {arm:<{width}} {best[arm]:>10,.0f}   (runs: {', '.join(f'{v:,.0f}' for v in runs[arm])})")
    ratio_width = max(map(len, ratios), default=5)
    print(f"  {'ratio':<{ratio_width}} {'of best':>8} {'median of rounds':>17}  (each round's)")
    for name, ratio in ratios.items():
        per_round = round_ratios[name]
        print(f"  {name:<{ratio_width}} {ratio:>8.3f} {statistics.median(per_round):>17.3f}  "
              f"({', '.join(f'{r:.3f}' for r in per_round)})")
    return {"steps": steps, "warmup": warmup, "rounds": n_rounds, "runs": runs, "best": best, "ratios": ratios,
            "round_ratios": round_ratios,
            "median_round_ratios": {k: statistics.median(v) for k, v in round_ratios.items()}}


def lockstep_pairs(pairs: list[str], steps: int, warmup: int, runs: int = 1) -> dict:
    """Each pair in lockstep `runs` times, fresh processes each time: the median of each run and of all pairs of
    steps together (on this shared machine a pair's median moved by 15% between runs minutes apart)."""
    print(f"\nlockstep ({steps} steps of each arm, taking turns, {runs} run(s) a pair; speed-up = the other's step "
          "time over the arm's):")
    results = {}
    for pair in pairs:
        arm, base = pair.split(":")
        per_run = [lockstep(arm, base, steps, warmup) for _ in range(runs)]
        ratios = [r for run in per_run for r in run]
        q1, median, q3 = statistics.quantiles(ratios, n=4)
        run_medians = [statistics.median(run) for run in per_run]
        results[f"{arm} / {base}"] = {"median": median, "q1": q1, "q3": q3, "run_medians": run_medians,
                                      "ratios": ratios}
        by_run = f"   runs: {', '.join(f'{m:.3f}' for m in run_medians)}" if runs > 1 else ""
        print(f"  {arm + ' / ' + base:<40} median {median:.3f}   quartiles {q1:.3f}-{q3:.3f}   "
              f"({sum(r > 1 for r in ratios)} of {len(ratios)} pairs faster){by_run}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all arms in fresh processes (0: none)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--pairs", default=",".join(PAIRS), help="ARM:BASE pairs run in lockstep ('': none)")
    parser.add_argument("--lockstep-steps", type=int, default=30)
    parser.add_argument("--lockstep-runs", type=int, default=1, help="lockstep runs of each pair, fresh processes each")
    parser.add_argument("--json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps({"tokens_per_s": worker(args.worker, args.steps, args.warmup)}))
        return
    if args.serve:
        serve(args.serve, args.steps, args.warmup)
        return
    import torch

    from moa_train.hardware import cpu_name

    try:
        from importlib.metadata import version

        transformers_version = version("transformers")
    except ImportError:
        transformers_version = None
    report = {"date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
              "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                          "torch": torch.__version__, "transformers": transformers_version,
                          "threads": torch.get_num_threads()}, "dims": DIMS, "moe_dims": MOE_DIMS}
    if args.rounds:
        report.update(rounds(args.arms.split(","), args.rounds, args.steps, args.warmup))
    if args.pairs:
        report["lockstep"] = lockstep_pairs(args.pairs.split(","), args.lockstep_steps, args.warmup, args.lockstep_runs)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
