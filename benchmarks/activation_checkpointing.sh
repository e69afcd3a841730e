#!/usr/bin/env bash
# Activation checkpointing: peak memory and step time of none / selective (every 2nd block) / full, the
# figures of docs/benchmarks.md. Usage: benchmarks/activation_checkpointing.sh [cpu|gpu] [OUT.json]
#   cpu: an 8-layer model of width 384, 8 x 512 tokens, float32.
#   gpu: dense_0.5b, bf16, compiled, one micro-batch of 8 x 2048 tokens.
set -euo pipefail
target=${1:-cpu}
out=${2:-benchmarks/activation_checkpointing_${target}.json}
arms=train.activation_checkpointing=none,selective,full
if [ "$target" = gpu ]; then
  moa-bench --compare "$arms" --steps 10 --warmup 5 --rounds 2 --json "$out" \
    model=dense_0.5b ffn=qd_moa train.micro_batch_size=8 train.batch_size=8 train.seq_len=2048 train.compile=true
else
  moa-bench --compare "$arms" --steps 4 --warmup 2 --rounds 3 --json "$out" \
    model=tiny model.dim=384 model.n_layers=8 model.n_heads=6 ffn=qd_moa train.batch_size=8 train.seq_len=512
fi
