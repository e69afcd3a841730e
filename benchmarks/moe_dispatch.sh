#!/usr/bin/env bash
# MoE dispatch, the figures of docs/benchmarks.md: one tiny_moe block (32 experts, top-4, one shared
# expert), forward + backward, grouped paths against a naive per-expert loop.
# Usage: benchmarks/moe_dispatch.sh [OUT_PREFIX]   (on a GPU the same command times bf16 and torch._grouped_mm)
set -euo pipefail
out=${1:-benchmarks/moe_dispatch}
for ffn in swiglu qd_moa; do
  moa-bench --moe --steps 20 --warmup 3 --rounds 3 --json "${out}_${ffn}.json" "ffn=$ffn" | grep -v '^{'
done
