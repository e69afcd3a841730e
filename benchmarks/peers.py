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

The allocator: moa-train makes glibc keep freed memory for the next step (hardware.reuse_freed_memory,
train.cpu_reuse_freed_memory), so the cli, bare and moe-ours arms run with it, and the transformers arms
with the allocator as a transformers process has it. `+reuse` on an hf or moe-hf arm gives that arm the same
setting, `+malloc-default` on moe-ours takes it away: the comparison with the allocator held equal.

Every figure is the median over the timed steps of one run; an arm's figure is its best run over the rounds.
Ratios are what to read: a single run on a shared machine moves by 10-15%. Each ratio is given twice: of
the best runs, and the median over the rounds of each round's ratio (the two arms of a round ran minutes
apart, under the same load: the robust one).

    python benchmarks/peers.py --rounds 3 --json benchmarks/peers_cpu.json
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


def arm_cli(detail: str, steps: int, warmup: int) -> float:
    ffn, *extra = detail.split("+")  # cli-swiglu+train.compile=true: the run with these overrides
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([sys.executable, "-m", "moa_train", *MODEL_OVERRIDES, f"ffn={ffn}", *extra,
                              f"train.max_steps={steps + warmup}", "train.eval_every=100000",
                              "train.eval_at_start=false", "train.ckpt_at_end=false", "train.log_every=1",
                              "train.progress=false", "train.resume=never", f"hydra.run.dir={tmp}/run"],
                             capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"peers: moa-train failed:\n{run.stderr[-3000:]}")
        rows = [json.loads(line) for line in Path(tmp, "run", "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows if r["step"] > warmup)


def arm_bare(detail: str, steps: int, warmup: int) -> float:
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

    return DIMS["batch"] * DIMS["seq_len"] / statistics.median(_timed(step, steps, warmup))


def arm_hf(steps: int, warmup: int) -> float:
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

    return DIMS["batch"] * DIMS["seq_len"] / statistics.median(_timed(step, steps, warmup))


def arm_moe(which: str, steps: int, warmup: int) -> float:
    """Tokens per second through one MoE block, forward and backward."""
    import torch

    torch.manual_seed(0)
    d, tokens = MOE_DIMS["dim"], MOE_DIMS["tokens"]
    if which == "ours":
        from omegaconf import OmegaConf

        from moa_train.config import FFNConfig, MoEConfig
        from moa_train.moe.layer import MoE

        # As Qwen2-MoE routes: softmax over all experts, the top-k weights not renormalised
        moe_cfg = OmegaConf.structured(MoEConfig(n_experts=MOE_DIMS["n_experts"], top_k=MOE_DIMS["top_k"],
                                                 n_shared_experts=1, expert_hidden=MOE_DIMS["expert_hidden"],
                                                 score="softmax", renormalize=False))
        block = MoE(d, moe_cfg, OmegaConf.structured(FFNConfig(name="swiglu")), 16)
        block.reset_parameters(0.02, 0.02)
    else:
        from transformers import Qwen2MoeConfig
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

        config = Qwen2MoeConfig(hidden_size=d, num_experts=MOE_DIMS["n_experts"],
                                num_experts_per_tok=MOE_DIMS["top_k"], moe_intermediate_size=MOE_DIMS["expert_hidden"],
                                shared_expert_intermediate_size=MOE_DIMS["expert_hidden"])
        if which == "hf-grouped":
            config._experts_implementation = "grouped_mm"
        block = Qwen2MoeSparseMoeBlock(config)
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(1, tokens, d, requires_grad=True)

    def step():
        block(x).float().pow(2).mean().backward()

    return tokens / statistics.median(_timed(step, steps, warmup))


def worker(arm: str, steps: int, warmup: int) -> float:
    kind, _, detail = arm.partition("-")
    if kind == "cli":
        return arm_cli(detail, steps, warmup)
    if kind == "bare":
        return arm_bare(detail, steps, warmup)
    name, *flags = detail.split("+")
    unknown = set(flags) - {"reuse", "malloc-default"}
    if unknown:
        raise SystemExit(f"peers: unknown arm flag(s) {sorted(unknown)} in {arm!r}; accepted: +reuse, +malloc-default")
    if (name == "ours" and "malloc-default" not in flags) or "reuse" in flags:
        from moa_train.hardware import reuse_freed_memory

        reuse_freed_memory()  # as moa-train's build_model does on CPU
    if kind == "hf":
        return arm_hf(steps, warmup)
    return arm_moe({"ours": "ours", "hf": "hf", "hf-grouped": "hf-grouped"}[name], steps, warmup)


ARMS = ["hf-swiglu", "hf-swiglu+reuse", "cli-swiglu", "bare-swiglu", "cli-qd_moa", "bare-qd_moa", "moe-hf",
        "moe-hf+reuse", "moe-ours"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps({"tokens_per_s": worker(args.worker, args.steps, args.warmup)}))
        return
    arms = args.arms.split(",")
    width = max(map(len, arms))
    runs: dict[str, list[float]] = {a: [] for a in arms}
    for round_ in range(args.rounds):
        for arm in arms:
            done = subprocess.run([sys.executable, __file__, "--worker", arm, "--steps", str(args.steps),
                                   "--warmup", str(args.warmup)], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"peers: arm {arm} failed:\n{done.stderr[-3000:]}")
            runs[arm].append(json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_s"])
            print(f"round {round_ + 1}: {arm:<{width}} {runs[arm][-1]:>10,.0f} tokens/s", flush=True)
    best = {a: max(v) for a, v in runs.items()}
    hf_lm = [a for a in arms if a.startswith("hf-")]
    hf_moe = [a for a in arms if a.startswith("moe-hf")]
    pairs = [(arm, hf) for hf in hf_lm for arm in arms if arm.startswith(("cli-", "bare-"))]
    pairs += [(arm, hf) for hf in hf_moe for arm in arms if arm.startswith("moe-ours")]
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
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": platform.python_version()}, "dims": DIMS, "moe_dims": MOE_DIMS,
              "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "runs": runs, "best": best,
              "ratios": ratios, "round_ratios": round_ratios,
              "median_round_ratios": {k: statistics.median(v) for k, v in round_ratios.items()}}
    import torch

    report["machine"]["torch"] = torch.__version__
    report["machine"]["threads"] = torch.get_num_threads()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
