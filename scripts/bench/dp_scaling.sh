#!/usr/bin/env bash
# Data-parallel scaling of recipe-pretrain (the small Shakespeare LLaMA) on this machine: tokens/s
# for 1, 2 and 4 ranks, plain DP and ZeRO-1/2, same global batch (8 × 128 tokens) everywhere.
# Each rank gets cores / ranks compute threads (at least 1). Prints one markdown table row per run.
#
#   cargo build --release -p recipe-pretrain --features mpi
#   scripts/bench/dp_scaling.sh [steps]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${BIN:-$here/../../target/release/recipe-pretrain}"
steps="${1:-12}"
cores=$(nproc)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none
echo "# machine: $cores cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "| ranks | layout | threads/rank | tokens/s | tokens/s/rank | step s (mean) | peak RSS/rank MiB |"
echo "|---|---|---|---|---|---|---|"
for np in 1 2 4; do
  threads=$(( cores / np )); [ "$threads" -ge 1 ] || threads=1
  for zero in 0 1 2; do
    [ "$np" = 1 ] && [ "$zero" != 0 ] && continue
    out="runs/scaling/np$np-zero$zero"
    rm -rf "$out"
    args=(--quiet --set "train.max_steps=$steps" --set train.eval_every=0 --set train.save_every=0
          --set "train.micro_batch_size=$(( 8 / np ))" --set "parallel.zero=$zero" --set "output.dir=$out")
    if [ "$np" = 1 ]; then
      RAYON_NUM_THREADS=$threads "$bin" "${args[@]}" >/dev/null 2>&1
    else
      mpirun --oversubscribe -np "$np" -x RAYON_NUM_THREADS=$threads "$bin" "${args[@]}" >/dev/null 2>&1
    fi
    python3 - "$out" "$np" "$zero" "$threads" <<'PY'
import json, sys
out, np_, zero, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = json.load(open(f"{out}/summary.json"))
steps = [json.loads(l) for l in open(f"{out}/metrics.jsonl") if '"loss"' in l and '"step_seconds"' in l]
# The first step carries one-time warm-up (allocation, autotune): report the rest.
rest = steps[1:] or steps
tps = sum(x["tokens"] for x in rest) / sum(x["step_seconds"] for x in rest)
mean = sum(x["step_seconds"] for x in rest) / len(rest)
rss = max(x.get("peak_mem_bytes") or 0 for x in steps) / 2**20
layout = "single" if np_ == 1 else ("dp" if zero == 0 else f"dp + ZeRO-{zero}")
print(f"| {np_} | {layout} | {threads} | {tps:.0f} | {tps/np_:.0f} | {mean:.2f} | {rss:.0f} (rank 0) |")
PY
  done
done
