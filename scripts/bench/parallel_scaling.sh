#!/usr/bin/env bash
# Parallel scaling of recipe-pretrain (the small Shakespeare LLaMA: 4 layers, d 192, vocab 49,152,
# tied embeddings) on this machine: tokens/s for 1, 2 and 4 ranks per layout, the same global batch
# (8 × 128 tokens) everywhere. Each rank gets cores / ranks compute threads (at least 1). Prints one
# markdown table row per run, with rank 0's mean exposed communication per step (the rank log's
# `comm_exposed`: time blocked in collectives, and in the waits for the reductions that the
# backward walk started — `parallel.overlap=false` waits for each at once).
#
#   cargo build --release -p recipe-pretrain --features mpi
#   scripts/bench/parallel_scaling.sh [steps] [layout...]
#
# A layout is `ranks:name:settings` with settings `k=v,k=v` (default: all of the list below).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${BIN:-${CARGO_TARGET_DIR:-$here/../../target}/release/recipe-pretrain}"
steps="${1:-12}"
shift || true
layouts=("$@")
if [ ${#layouts[@]} -eq 0 ]; then
  layouts=(
    "1:single:train.micro_batch_size=8"
    "2:dp:train.micro_batch_size=4"
    "2:dp + ZeRO-1:train.micro_batch_size=4,parallel.zero=1"
    "2:dp + ZeRO-2:train.micro_batch_size=4,parallel.zero=2"
    "2:tp:train.micro_batch_size=8,parallel.tp=2"
    "2:pp (4 micro-batches):train.micro_batch_size=2,train.grad_accum_steps=4,parallel.pp=2"
    "4:dp:train.micro_batch_size=2"
    "4:dp × tp:train.micro_batch_size=4,parallel.tp=2"
    "4:tp × pp (4 micro-batches):train.micro_batch_size=2,train.grad_accum_steps=4,parallel.tp=2,parallel.pp=2"
    "4:pp (8 micro-batches):train.micro_batch_size=1,train.grad_accum_steps=8,parallel.pp=4"
  )
fi
cores=$(nproc)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none
echo "# machine: $cores cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "| ranks | layout | threads/rank | tokens/s | tokens/s/rank | step s (mean) | exposed comm s/step (rank 0) | peak RSS rank 0 MiB |"
echo "|---|---|---|---|---|---|---|---|"
for spec in "${layouts[@]}"; do
  IFS=: read -r np name settings <<< "$spec"
  threads=$(( cores / np )); [ "$threads" -ge 1 ] || threads=1
  out="runs/scaling/$(echo "$np-$name" | tr -c 'a-zA-Z0-9-' '_')"
  rm -rf "$out"
  args=(--quiet --set "train.max_steps=$steps" --set train.eval_every=0 --set train.save_every=0
        --set "output.dir=$out")
  IFS=, read -ra kvs <<< "$settings"
  for kv in "${kvs[@]}"; do args+=(--set "$kv"); done
  if [ "$np" = 1 ]; then
    RAYON_NUM_THREADS=$threads "$bin" "${args[@]}" >/dev/null 2>&1
  else
    mpirun --oversubscribe -np "$np" -x RAYON_NUM_THREADS=$threads "$bin" "${args[@]}" >/dev/null 2>&1
  fi
  python3 - "$out" "$np" "$name" "$threads" <<'PY'
import json, sys
out, np_, name, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
steps = [json.loads(l) for l in open(f"{out}/metrics.jsonl") if '"step_seconds"' in l]
# The first step carries one-time warm-up (allocation): report the rest.
rest = steps[1:] or steps
tps = sum(x["tokens"] for x in rest) / sum(x["step_seconds"] for x in rest)
mean = sum(x["step_seconds"] for x in rest) / len(rest)
rss = max(x.get("peak_mem_bytes") or 0 for x in steps) / 2**20
comm = "–"
if np_ > 1:
    lines = [l.split() for l in open(f"{out}/logs/rank-0.log") if l.startswith("step ")]
    waits = [float(w[w.index("comm_exposed") + 1]) for w in lines][1:]
    comm = f"{sum(waits) / len(waits):.2f}"
print(f"| {np_} | {name} | {threads} | {tps:.0f} | {tps/np_:.0f} | {mean:.2f} | {comm} | {rss:.0f} |")
PY
done
