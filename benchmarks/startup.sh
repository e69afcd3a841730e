#!/usr/bin/env bash
# What a user waits for before anything happens: `moa-train --help`, and a `model=tiny` run from
# launch to its first training step (read from train.log's step-1 line), with and without the initial
# validation. Run it once before timing so that the data cache exists. Usage: benchmarks/startup.sh [ROUNDS]
set -euo pipefail
rounds=${1:-3}
moa=${MOA_TRAIN:-moa-train}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
first_step() {  # seconds from launch to the step-1 line of train.log
  local dir=$tmp/run start
  rm -rf "$dir"
  start=$(date +%s.%N)
  "$moa" model=tiny train.max_steps=2 train.log_every=1 train.progress=false train.ckpt_at_end=false \
    train.resume=never hydra.run.dir="$dir" "$@" > "$tmp/log" 2>&1 || { cat "$tmp/log" >&2; exit 1; }
  python3 - "$dir/train.log" "$start" <<'PY'
import sys
from datetime import datetime
line = next(l for l in open(sys.argv[1]) if "step 1/" in l)
stamp = datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()
print(f"{stamp - float(sys.argv[2]):.2f}")
PY
}
first_step > /dev/null  # the data cache
for round in $(seq "$rounds"); do
  start=$(date +%s.%N); "$moa" --help > /dev/null; end=$(date +%s.%N)
  help=$(python3 -c "print(f'{$end - $start:.2f}')")
  echo "round $round: --help ${help} s | first step of model=tiny $(first_step) s, without the initial validation $(first_step train.eval_at_start=false) s"
done
