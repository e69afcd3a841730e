#!/usr/bin/env bash
# One node, all its GPUs (or NPROC processes): launch/torchrun.sh model=dense_0.5b ffn=bi_moa optim=muon
# Every argument is a Hydra override. Rerunning the same command resumes the run from its last checkpoint.
set -euo pipefail
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l)
  [ "$NPROC" -gt 0 ] || NPROC=1
fi
# OMP threads per process: the cores shared out (torchrun would otherwise set 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
exec torchrun --standalone --nproc_per_node="$NPROC" -m moa_train "$@"
