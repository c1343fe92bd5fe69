#!/usr/bin/env bash
# Peak memory of every rank when a pretrained checkpoint is loaded and trained, by parallel layout:
# what a rank must hold (docs/parallelism.md, "Memory per rank"). The checkpoint is written first
# by a one-step scratch run of recipe-pretrain in the shape of `collie bench`'s `350m` preset
# (d 1024, 24 layers, 16 / 4 heads, MLP 2816, SmolLM2's 49,152-token vocabulary, tied: 321M
# parameters, 1.28 GB in f32; LAYERS=12 halves the depth); each layout then loads it and trains
# 2 steps on 1 × 64 tokens, once in full with plain SGD (OPTIM=adamw: AdamW, two moments per
# weight; without: the peak is the weights, their gradients and the update's copy) and once
# with LoRA (r 8 on every linear layer of a frozen base: the peak is the weights and the loading
# transient). Evaluation and samples run on 2 examples. Prints one markdown table row per layout
# with each rank's peak RSS while loading and training (summary.json's
# train_peak_rss_bytes_per_rank) and, after `→`, over the whole run with its final evaluation
# and checkpoint, which each rank writes its own part of (peak_rss_bytes_per_rank).
#
#   cargo build --release -p recipe-pretrain --features mpi
#   scripts/bench/memory_per_rank.sh [layout...]
#
# A layout is `ranks:name:settings` with settings `k=v,k=v` (default: the list below).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${BIN:-${CARGO_TARGET_DIR:-$here/../../target}/release/recipe-pretrain}"
layouts=("$@")
if [ ${#layouts[@]} -eq 0 ]; then
  layouts=(
    "1:one process:"
    "2:dp:"
    "2:dp ZeRO-3:parallel.zero=3"
    "2:tp:parallel.tp=2"
    "2:pp:parallel.pp=2"
    "4:dp ZeRO-3:parallel.zero=3"
    "4:tp:parallel.tp=4"
    "4:dp2 x tp2 ZeRO-3:parallel.tp=2,parallel.zero=3"
    "4:tp2 x pp2:parallel.tp=2,parallel.pp=2"
  )
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none
shape=(--set model.config.hidden_size=1024 --set model.config.intermediate_size=2816
  --set "model.config.num_hidden_layers=${LAYERS:-24}" --set model.config.num_attention_heads=16
  --set model.config.num_key_value_heads=4)
small=(--quiet --set data.seq_len=64 --set train.micro_batch_size=1 --set train.eval_every=0
  --set eval.max_examples=2 --set recipe.sample_tokens=4 --set "optim.name=${OPTIM:-sgd}" --set optim.lr=1e-3
  --set sched.warmup_steps=0)
lora=(--set peft.kind=lora --set peft.r=8 --set peft.alpha=16 --set peft.target_modules=all-linear)
base=runs/memory/base-${LAYERS:-24}
if [ ! -f "$base/checkpoints/step-1/model.safetensors" ]; then
  rm -rf "$base"
  "$bin" "${small[@]}" "${shape[@]}" --set train.max_steps=1 --set train.save_every=1 \
    --set "output.dir=$base" >/dev/null 2>&1
fi
ckpt="$base/checkpoints/step-1"
echo "# machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); checkpoint $(du -m "$ckpt/model.safetensors" | cut -f1) MiB"
echo "| ranks | layout | full (${OPTIM:-sgd}): peak RSS per rank, MiB (training → run) | LoRA: the same |"
echo "|---|---|---|---|"
# Peak RSS of every rank of one run, in MiB, `a / b / …`.
run() {
  local np="$1" out="$2"
  shift 2
  rm -rf "$out"
  # The recipe's before/after samples go to the log with everything else.
  if [ "$np" = 1 ]; then
    "$bin" "$@" --set "output.dir=$out" >"$out.log" 2>&1 || { cat "$out.log" >&2; exit 1; }
  else
    mpirun --oversubscribe -np "$np" "$bin" "$@" --set "output.dir=$out" >"$out.log" 2>&1 ||
      { cat "$out.log" >&2; exit 1; }
  fi
  python3 - "$out" <<'PY'
import json, sys
s = json.load(open(f"{sys.argv[1]}/summary.json"))
mib = lambda key: " / ".join(f"{p / 2**20:.0f}" for p in s[key])
print(f"{mib('train_peak_rss_bytes_per_rank')} → {mib('peak_rss_bytes_per_rank')}")
PY
  # The run's checkpoint has been written (it is in the peak); the disk gets it back.
  rm -rf "$out/checkpoints"
}
for spec in "${layouts[@]}"; do
  IFS=: read -r np name settings <<< "$spec"
  out="runs/memory/$(echo "$np-$name-${OPTIM:-sgd}" | tr -c 'a-zA-Z0-9-' '_')"
  args=("${small[@]}" --set model.init=pretrained --set "model.path=$ckpt" --set train.max_steps=2
        --set train.save_every=0)
  IFS=, read -ra kvs <<< "$settings"
  for kv in "${kvs[@]}"; do [ -n "$kv" ] && args+=(--set "$kv"); done
  full=$(run "$np" "$out" "${args[@]}")
  adapted=$(run "$np" "$out-lora" "${args[@]}" "${lora[@]}")
  echo "| $np | $name | $full | $adapted |"
done
