"""Time per generated token with and without the key/value cache (moa_train/generate.py; docs/benchmarks.md).

    .venv/bin/python benchmarks/kv_cache.py                          # model=tiny ffn=qd_moa, 256 new tokens
    .venv/bin/python benchmarks/kv_cache.py --new-tokens 128 model=tiny_moe ffn=bi_moa

Positional arguments are Hydra overrides of the run config. The model is built as training builds it
(untrained weights: the cost of a token does not depend on them), in float32 on the CPU. Greedy decoding
from a 16-token prompt, with and without the cache, alternating in rounds in one process (this machine's
speed drifts between processes); each figure is the best round's milliseconds per new token, and the
ratio is taken within rounds. The two decodings must produce the same tokens (checked).
"""

from __future__ import annotations

import argparse
import json
import platform
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", default=[])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch

    from moa_train.builder import build_model
    from moa_train.config import compose_run_config, validate_config
    from moa_train.distributed import init_distributed
    from moa_train.generate import Sampling, generate

    cfg = compose_run_config(["model=tiny", "ffn=qd_moa", "train.device=cpu", *args.overrides])
    validate_config(cfg)
    model = build_model(cfg, init_distributed("none", cfg.train.device))
    prompt = torch.randint(0, cfg.model.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0))
    greedy = Sampling(max_new_tokens=args.new_tokens, temperature=0.0)

    per_token = {True: [], False: []}
    outputs = {}
    generate(model, prompt.tolist(), Sampling(max_new_tokens=8, temperature=0.0))  # warm-up: first calls are slow
    for _ in range(args.rounds):
        for use_cache in (True, False):
            start = time.perf_counter()
            outputs[use_cache] = generate(model, prompt.tolist(), greedy, use_cache=use_cache)
            per_token[use_cache].append(1e3 * (time.perf_counter() - start) / args.new_tokens)
    if outputs[True] != outputs[False]:
        raise SystemExit("the cached and the uncached decoding differ: the cache is wrong")
    ratios = [without / with_ for with_, without in zip(per_token[True], per_token[False])]
    print(json.dumps({
        "model": cfg.model.name, "ffn": cfg.ffn.name, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rounds": args.rounds,
        "cached_ms_per_token": round(min(per_token[True]), 3),
        "uncached_ms_per_token": round(min(per_token[False]), 3),
        "speedup_per_round": [round(r, 2) for r in ratios],
    }))


if __name__ == "__main__":
    main()
