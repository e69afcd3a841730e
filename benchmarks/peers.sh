#!/usr/bin/env bash
# moa-train against a bare transformers Llama loop and the transformers Qwen2-MoE and Mixtral blocks at equal dims, in
# alternating rounds in one process tree, then pairs of arms in lockstep (their processes take turns step by
# step, each pair LOCKSTEP_RUNS=3 times; the figure to read on a shared machine): benchmarks/peers.py.
# Usage: benchmarks/peers.sh [ROUNDS] [OUT.json]
# Needs transformers (the eval extra: pip install 'moa-train[eval]'; make install has it).
set -euo pipefail
rounds=${1:-5}
out=${2:-benchmarks/peers_cpu.json}
python -c "import transformers" 2>/dev/null || { echo "peers.sh: needs transformers (pip install 'moa-train[eval]')" >&2; exit 2; }
python "$(dirname "$0")/peers.py" --rounds "$rounds" --lockstep-runs "${LOCKSTEP_RUNS:-3}" --json "$out"
