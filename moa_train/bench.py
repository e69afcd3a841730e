"""`moa-bench`: time per training step and peak memory of FFN variants against their baselines.

    moa-bench --variants moa1,qd_moa model=tiny model.dim=384 model.n_layers=2 model.n_heads=6
    moa-bench --compare train.activation_checkpointing=none,selective,full model=tiny model.n_layers=8

Positional arguments are Hydra overrides of the training config (model size, batch, ffn keys).
Each variant runs in its own process so that memory figures and compile caches do not mix; rounds
alternate variants and baselines, and the best median per variant is kept. A full step is forward,
backward and AdamW on random tokens. Memory: on CUDA the allocator's peak during the timed steps.
On CPU a separate worker runs with glibc's mmap threshold pinned at 64 KiB, so that every tensor
is mapped on allocation and unmapped on free and the resident set follows live memory; its peak is
parameters and optimizer state plus the growth of the resident set during two steps after warm-up
(the high-water mark is reset then, so compilation does not count). Both report the bytes autograd
saves for backward (exact, from saved-tensor hooks, each storage once).
Type-I variants are compared with relu2, Type-II with swiglu; with `--compare KEY=A,B,...` the arms are
the values of one config key instead, each compared with the first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset VmHWM, the peak resident set size, to the current RSS


def _compose(overrides: list[str]):
    """The training config of `overrides`, checked as moa-train checks it."""
    from moa_train.builder import resolve_shape
    from moa_train.config import compose_run_config, validate_config

    cfg = compose_run_config(overrides)
    validate_config(cfg)
    resolve_shape(cfg)
    return cfg


def measure(overrides: list[str], steps: int, warmup: int, memory: bool = False) -> dict:
    """Run in a worker process: build the model of `overrides`, time `steps` full training steps."""
    import torch

    from moa_train.budget import count_parameters, plan_run
    from moa_train.builder import build_model
    from moa_train.distributed import init_distributed
    from moa_train.optim import build_optimizer
    from moa_train.parallel import autocast_context, unwrap

    cfg = _compose(overrides)
    env = init_distributed("none", cfg.train.device)
    device = env.device
    model = build_model(cfg, env)
    counts = count_parameters(unwrap(model))
    optimizer = build_optimizer(model, cfg.optim)
    autocast = autocast_context(device, cfg.train.dtype)
    plan = plan_run(cfg.train, cfg.budget, counts, train_images=1)  # only the batch shape is used
    if cfg.model.family == "mae":  # random images and mask noise: a step costs the same whatever the pixels
        v = cfg.model.vision
        x = torch.randn(plan.micro_batch_size, v.channels, v.image_size, v.image_size, device=device)
        y = torch.rand(plan.micro_batch_size, cfg.train.seq_len, device=device)
    else:
        tokens = torch.randint(0, cfg.model.vocab_size, (plan.micro_batch_size, cfg.train.seq_len + 1),
                               device=device)
        x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        with autocast:
            loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    saved: dict[int, int] = {}  # by storage: a tensor saved by several ops counts once

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    for _ in range(warmup):
        step()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast:
            model(x, y).backward()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()
        rss_before = _status_mb("VmRSS")
    times = []
    for _ in range(2 if memory else steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result = {
        "ffn": cfg.ffn.name, "step_s": statistics.median(times), "saved_mb": sum(saved.values()) / 2**20,
        "tokens_per_s": plan.micro_batch_size * cfg.train.seq_len / statistics.median(times),
        "params": counts["total"], "ffn_extra": counts["ffn_extra"],
    }
    if device.type == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        state = [t for p in model.parameters() for t in [p, *optimizer.state.get(p, {}).values()]
                 if isinstance(t, torch.Tensor)]
        static_mb = sum(t.numel() * t.element_size() for t in state) / 2**20
        result["peak_mb"] = static_mb + _status_mb("VmHWM") - rss_before
    return result


MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _worker(overrides: list[str], steps: int, warmup: int, memory: bool = False) -> dict:
    cmd = [sys.executable, "-m", "moa_train.bench", "--worker", "--steps", str(steps), "--warmup", str(warmup),
           *(["--memory"] if memory else []), *overrides]
    env = {**os.environ, **(MEMORY_ENV if memory else {})}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"moa-bench: worker failed for {overrides}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor() or
            platform.machine(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def measure_moe(overrides: list[str], steps: int, warmup: int, rounds: int) -> list[dict]:
    """One MoE block of the model preset: forward + backward tokens/s of each dispatch path."""
    import torch
    from omegaconf import OmegaConf

    from moa_train.distributed import init_distributed
    from moa_train.moe import MoE, torch_grouped_mm_works
    from moa_train.moe.reference import per_expert_loop
    from moa_train.parallel import autocast_context, use_bf16

    cfg = _compose(["model=tiny_moe", *overrides])
    if cfg.model.family != "moe":
        raise SystemExit(f"moa-bench --moe: model {cfg.model.name} is not an MoE preset")
    device = init_distributed("none", cfg.train.device).device
    torch.manual_seed(cfg.train.seed)
    tokens = (cfg.train.micro_batch_size or cfg.train.batch_size) * cfg.train.seq_len
    x = torch.randn(tokens, cfg.model.dim, device=device)
    paths = {"grouped (loop over experts)": "loop", "naive (mask per expert)": "naive"}
    autocast = autocast_context(device, cfg.train.dtype)
    if torch_grouped_mm_works(device.type, torch.bfloat16 if use_bf16(device, cfg.train.dtype) else torch.float32):
        paths["grouped (torch._grouped_mm)"] = "torch"
    results = {}
    for _ in range(rounds):
        for label, path in paths.items():
            moe_cfg = OmegaConf.merge(cfg.model.moe, {"grouped_mm": "loop" if path == "naive" else path})
            with device:
                moe = MoE(cfg.model.dim, moe_cfg, cfg.ffn, cfg.model.ffn_multiple_of)
            moe.reset_parameters(cfg.model.init_std, cfg.model.init_std)
            forward = (lambda m, t: per_expert_loop(m, t)) if path == "naive" else (lambda m, t: m(t))
            times = []
            for i in range(warmup + steps):
                start = time.perf_counter()
                with autocast:
                    forward(moe, x).float().pow(2).mean().backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append(time.perf_counter() - start)
            median = statistics.median(times)
            if label not in results or median < results[label]["step_s"]:
                results[label] = {"path": label, "step_s": median, "tokens_per_s": tokens / median}
    naive = results["naive (mask per expert)"]["step_s"]
    rows = [{**r, "speedup_vs_naive": naive / r["step_s"]} for r in results.values()]
    print(f"MoE block of {cfg.model.name} ({cfg.model.moe.n_experts} experts, top-{cfg.model.moe.top_k}, "
          f"ffn={cfg.ffn.name}), {tokens} tokens, forward + backward on {device.type}")
    print(f"{'path':<30} {'ms':>9} {'tokens/s':>10} {'x naive':>8}")
    for r in rows:
        print(f"{r['path']:<30} {1e3 * r['step_s']:>9.1f} {r['tokens_per_s']:>10.0f} {r['speedup_vs_naive']:>8.2f}")
    return rows


def _arms(parser: argparse.ArgumentParser, args) -> tuple[dict[str, str], dict[str, str]]:
    """What is timed: FFN variants against their baselines, or the values of one key against its first."""
    from moa_train.ffn import FFN_REGISTRY

    if args.compare:
        key, _, values = args.compare.partition("=")
        values = [v for v in values.split(",") if v]
        if not key or len(values) < 2:
            parser.error(f"--compare: got '{args.compare}'; expected KEY=A,B,... with at least two values")
        arms = {f"{key}={v}": f"{key}={v}" for v in values}
        return arms, {name: f"{key}={values[0]}" for name in arms}
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in FFN_REGISTRY]
    if unknown:
        raise SystemExit(f"moa-bench: unknown ffn variant(s) {unknown}; accepted: {', '.join(sorted(FFN_REGISTRY))}")
    names = list(dict.fromkeys([b for v in variants for b in (FFN_REGISTRY[v].baseline, v)]))
    return {n: f"ffn={n}" for n in names}, {n: FFN_REGISTRY[n].baseline for n in names}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="moa-bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--variants", default="moa1,qd_moa", help="comma-separated ffn names")
    parser.add_argument("--compare", metavar="KEY=A,B,...",
                        help="instead of FFN variants, the values of one config key, each against the first")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best median is kept")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--moe", action="store_true",
                        help="time one MoE block (default model=tiny_moe): grouped dispatch against a naive loop")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=tiny model.dim=384")
    args = parser.parse_args(argv)
    for flag, value, least in (("--steps", args.steps, 1), ("--rounds", args.rounds, 1), ("--warmup", args.warmup, 0)):
        if value < least:
            parser.error(f"{flag}: got {value}, must be >= {least}")
    if args.worker:
        print(json.dumps(measure(args.overrides, args.steps, args.warmup, args.memory)))
        return
    if args.moe:
        report = {"machine": machine(), "overrides": args.overrides, "steps": args.steps,
                  "results": measure_moe(args.overrides, args.steps, args.warmup, args.rounds)}
        print(json.dumps(report))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
        return

    arms, baselines = _arms(parser, args)  # arm name -> its override; arm name -> the arm it is compared with
    order = list(dict.fromkeys([b for a in arms for b in (baselines[a], a)]))
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name in order:
            result = _worker([arms[name], *args.overrides], args.steps, args.warmup)
            if name not in best or result["step_s"] < best[name]["step_s"]:
                best[name] = result
    for name in order:
        if "gpu" not in machine():  # CPU: memory from its own worker (see the module docstring)
            best[name]["peak_mb"] = _worker([arms[name], *args.overrides], 2, args.warmup, memory=True)["peak_mb"]
    rows = []
    for name in order:
        r = best[name]
        base = best[baselines[name]]
        rows.append({**r, "arm": name, "baseline": baselines[name] if args.compare else base["ffn"],
                     "time_ratio": r["step_s"] / base["step_s"], "saved_ratio": r["saved_mb"] / base["saved_mb"],
                     "peak_ratio": r["peak_mb"] / base["peak_mb"]})
    width = max(10, *(len(r["arm"]) for r in rows))
    print(f"{'arm' if args.compare else 'ffn':<{width}} {'step ms':>9} {'tok/s':>9} {'x base':>7} {'saved MB':>9} "
          f"{'x base':>7} {'peak MB':>9} {'x base':>7}  baseline")
    for r in rows:
        print(f"{r['arm']:<{width}} {1e3 * r['step_s']:>9.1f} {r['tokens_per_s']:>9.0f} {r['time_ratio']:>7.3f} "
              f"{r['saved_mb']:>9.1f} {r['saved_ratio']:>7.3f} {r['peak_mb']:>9.1f} {r['peak_ratio']:>7.3f}  "
              f"{r['baseline']}")
    report = {"machine": machine(), "overrides": args.overrides, "steps": args.steps, "rounds": args.rounds,
              "results": rows}
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
