#!/usr/bin/env bash
# FFN-family overhead, the figures of docs/benchmarks.md. Usage: benchmarks/ffn_overhead.sh [cpu|gpu] [OUT.json]
#   cpu: a 2-layer model of width 384 (the acceptance shape of the FFN-family issue), float32.
#   gpu: dense_0.5b, bf16 autocast with torch.compile, one micro-batch of 8 x 2048 tokens.
set -euo pipefail
target=${1:-cpu}
out=${2:-benchmarks/ffn_overhead_${target}.json}
variants=moa1,la1,one_moa,bi_moa,qd_moa
if [ "$target" = gpu ]; then
  moa-bench --variants "$variants" --steps 20 --warmup 5 --rounds 2 --json "$out" \
    model=dense_0.5b train.micro_batch_size=8 train.batch_size=8 train.seq_len=2048 train.compile=true
else
  moa-bench --variants "$variants" --steps 10 --warmup 3 --rounds 3 --json "$out" \
    model=tiny model.dim=384 model.n_layers=2 model.n_heads=6 train.batch_size=16 train.seq_len=256
fi
