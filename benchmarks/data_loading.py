"""Data loading time as a share of the training step (docs/data.md; target: under 2% for model=tiny).

    .venv/bin/python benchmarks/data_loading.py                       # model=tiny on shakespeare
    .venv/bin/python benchmarks/data_loading.py --steps 50 model=tiny ffn=qd_moa data=pydocs

Positional arguments are Hydra overrides of the training config. The run uses the trainer's own
pieces: prepare_data (from the cache, prepared first if needed), PackedBatches, the Transformer,
parallelize, build_optimizer and autocast. Each step reads the global batch the way rank 0 of a
single-process run does (PackedBatches.samples, then .to(device)), then runs forward, backward and
the optimizer step; .item() on the loss waits for the device. The data time is the first part; the
share is its sum over the sum of whole steps, after warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", default=[])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    import torch

    from moa_train.budget import count_parameters, plan_run
    from moa_train.builder import build_model
    from moa_train.config import compose_run_config, validate_config
    from moa_train.data import PackedBatches, prepare_data, resolve_vocab_size
    from moa_train.distributed import init_distributed
    from moa_train.optim import build_optimizer
    from moa_train.parallel import autocast_context, unwrap

    cfg = compose_run_config(["model=tiny", *args.overrides])
    validate_config(cfg)
    start = time.perf_counter()
    data = prepare_data(cfg.data, resolve_vocab_size(cfg.data, cfg.model.vocab_size), cfg.train.eval_tokens,
                        cfg.train.seq_len, log=lambda message: None)
    prepare_s = time.perf_counter() - start

    env = init_distributed("none", cfg.train.device)
    model = build_model(cfg, env)
    plan = plan_run(cfg.train, cfg.budget, count_parameters(unwrap(model)))
    optimizer = build_optimizer(model, cfg.optim)
    autocast = autocast_context(env.device, cfg.train.dtype)
    batches = PackedBatches(data.train, cfg.train.seq_len, cfg.train.seed)

    data_times, step_times = [], []
    for step in range(args.warmup + args.steps):
        step_start = data_end = time.perf_counter()
        for micro in range(plan.grad_accum):  # the trainer's addressing for rank 0 of one process
            x, y = batches.samples(step * plan.batch_size + micro * plan.micro_batch_size, plan.micro_batch_size)
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            if micro == 0:  # the first micro-batch's read: what the step waits for before compute starts
                data_end = time.perf_counter()
            with autocast:
                loss = model(x, y)
            (loss / plan.grad_accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        if step >= args.warmup:
            step_times.append(time.perf_counter() - step_start)
            data_times.append(data_end - step_start)
    share = sum(data_times) / sum(step_times)
    result = {
        "model": cfg.model.name, "ffn": cfg.ffn.name, "data": cfg.data.name, "device": str(env.device),
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "seq_len": cfg.train.seq_len, "batch_size": plan.batch_size, "steps": args.steps,
        "data_ms_median": round(1e3 * statistics.median(data_times), 3),
        "step_ms_median": round(1e3 * statistics.median(step_times), 2),
        "data_share_pct": round(100 * share, 3), "prepare_s_cached": round(prepare_s, 3),
        "train_tokens": data.meta["train_tokens"], "shards": len(data.meta["shards"]),
    }
    print(f"{result['model']}/{result['ffn']} on {result['data']} ({result['device']}, {result['threads']} threads): "
          f"data {result['data_ms_median']} ms of a {result['step_ms_median']} ms step (median), "
          f"{result['data_share_pct']}% of step time over {args.steps} steps")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
