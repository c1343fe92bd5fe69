#!/usr/bin/env bash
# The GPU run of collie-rs (issue 8): CUDA parity, then bf16 training throughput/MFU and memory
# beside PyTorch on the same GPU, in one command.
#
#   scripts/gpu-check.sh build        # here (no GPU needed): CUDA binaries, gzipped, into gpu-bin/
#   scripts/gpu-check.sh run OUT_DIR  # on the GPU machine: results into OUT_DIR
#
# `run` expects gpu-bin/{collie,collie-gpu-check}.gz and tests/fixtures/ in the working tree (the
# two binaries are ~66 MB each stripped, ~16 MB gzipped: a device run carries 64 MiB), a
# Python with torch + transformers (PYTHON, default python3) and an NVIDIA driver; it needs no
# cargo and no network. It finds libcuda (driver) and NVRTC (a CUDA install or the
# nvidia-cuda-nvrtc Python package), runs collie-gpu-check (the backend-generic parity suite on
# CUDA, bf16 against a same-run torch autocast trajectory), then the benchmarks, sampling
# nvidia-smi for each process's peak GPU memory, and writes OUT_DIR/gpu-check.json and
# gpu-check.log. Without a GPU it stops at once: "gpu-check: no GPU", exit status 2.
#
# Knobs: BATCH (sequences per step, default 4), SEQ (2048), STEPS (30), PEAK_TFLOPS (989: H100
# SXM / H200 bf16 dense), STEP_TIMEOUT (seconds per command, 240).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
bin="$root/gpu-bin"

build() {
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
  cargo build --release -p collie-cli --features cuda &&
    cargo build --release -p collie-tests --features cuda --bin collie-gpu-check || return 1
  mkdir -p "$bin"
  for b in collie collie-gpu-check; do
    strip -o "$bin/$b" "$CARGO_TARGET_DIR/release/$b" && gzip -9 -f "$bin/$b" || return 1
  done
  local bytes fixtures
  bytes=$(du -cb "$bin"/* | tail -1 | cut -f1)
  fixtures=$(du -sb tests/fixtures | cut -f1)
  echo "gpu-check: gpu-bin $((bytes / 1048576)) MiB + tests/fixtures $((fixtures / 1048576)) MiB"
  if [ $((bytes + fixtures)) -gt $((64 * 1048576)) ]; then
    echo "gpu-check: over the 64 MiB a device run carries" >&2
    return 1
  fi
}

# Directories holding libcuda.so.1 and NVRTC, for LD_LIBRARY_PATH (cudarc loads both by name).
find_libs() {
  local dirs=() d f py
  d=$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 /{print $NF; exit}')
  [ -n "$d" ] && dirs+=("$(dirname "$d")")
  for f in /usr/local/cuda*/lib64/libnvrtc.so* /usr/lib/x86_64-linux-gnu/libnvrtc.so*; do
    [ -e "$f" ] && { dirs+=("$(dirname "$f")"); break; }
  done
  py=$("$python" -c 'import nvidia.cuda_nvrtc, os; print(os.path.join(list(nvidia.cuda_nvrtc.__path__)[0], "lib"))' 2>/dev/null)
  if [ -n "$py" ] && [ -d "$py" ]; then
    dirs+=("$py")
    # The wheel ships only versioned names (libnvrtc.so.13, …): give cudarc the plain one too.
    local links="$out/.nvrtc"
    mkdir -p "$links"
    for f in "$py"/libnvrtc*.so.*; do
      [ -e "$f" ] || continue
      local base=${f##*/}
      ln -sf "$f" "$links/$base"
      ln -sf "$f" "$links/${base%%.so.*}.so"
    done
    dirs+=("$links")
  fi
  (IFS=:; echo "${dirs[*]}")
}

# measure NAME CMD...: runs CMD with its stdout in NAME.json, stderr in NAME.err, and the peak of
# nvidia-smi's used memory (MiB, sampled every 100 ms) in NAME.mem.
measure() {
  local name=$1 rc
  shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$out/$name.smi" 2>/dev/null &
  local smi=$!
  timeout "${STEP_TIMEOUT:-240}" "$@" >"$out/$name.json" 2>"$out/$name.err"
  rc=$?
  kill "$smi" 2>/dev/null
  wait "$smi" 2>/dev/null
  sort -n "$out/$name.smi" | tail -1 >"$out/$name.mem"
  rm -f "$out/$name.smi"
  echo "gpu-check: $name exit $rc, peak GPU memory $(cat "$out/$name.mem") MiB: $(tail -c 400 "$out/$name.json" | tail -1)"
  [ $rc -eq 0 ] || tail -5 "$out/$name.err"
  return 0
}

run() {
  out=$(mkdir -p "$1" && cd "$1" && pwd)
  python="${PYTHON:-python3}"
  exec > >(tee -a "$out/gpu-check.log") 2>&1
  echo "gpu-check: $(date -u +%FT%TZ) on $(hostname)"
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu-check: no GPU (nvidia-smi finds no device)"
    echo '{"gpu": null, "error": "no GPU"}' >"$out/gpu-check.json"
    exit 2
  fi
  # The binaries, unpacked outside the output folder (which travels back).
  local packed=$bin
  bin=$(mktemp -d)
  for b in collie collie-gpu-check; do
    [ -f "$packed/$b.gz" ] || { echo "gpu-check: $packed/$b.gz missing: run scripts/gpu-check.sh build first"; exit 1; }
    gzip -dc "$packed/$b.gz" >"$bin/$b" && chmod +x "$bin/$b"
  done
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
  export LD_LIBRARY_PATH="$(find_libs)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "gpu-check: LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  export COLLIE_FIXTURES="$root/tests/fixtures"
  local seq=${SEQ:-2048} batch=${BATCH:-4} steps=${STEPS:-30} peak=${PEAK_TFLOPS:-989}
  local common=(--preset 1b --dtype bf16 --seq-len "$seq" --batch-size "$batch" --steps "$steps" --peak-tflops "$peak")

  # 1. Parity: PyTorch's bf16 trajectory on this GPU, then the whole suite on CUDA.
  measure torch_bf16 "$python" scripts/bench/torch_gpu.py --parity "$root/tests/fixtures/train"
  measure parity "$bin/collie-gpu-check" --bf16-reference "$out/torch_bf16.json"
  # 2. Throughput and MFU, ~1.1 B LLaMA, bf16, AdamW: ours (both attention paths) and PyTorch.
  measure torch_adamw "$python" scripts/bench/torch_gpu.py --seq-len "$seq" --batch-size "$batch" --steps "$steps" --peak-tflops "$peak"
  measure collie_adamw_flash "$bin/collie" --device cuda bench memory "${common[@]}" --optim adamw --attention flash
  measure collie_adamw_naive "$bin/collie" --device cuda bench memory "${common[@]}" --optim adamw --attention naive
  # 3. LOMO on the same config (peak memory against AdamW's).
  measure collie_lomo_flash "$bin/collie" --device cuda bench memory "${common[@]}" --optim lomo --attention flash
  # 4. Attention alone: naive vs memory-efficient at 2048 and 4096.
  for s in 2048 4096; do
    for a in naive flash; do
      measure "attention_${a}_$s" "$bin/collie" --device cuda bench attention --attention "$a" --seq-len "$s" --batch-size "$batch"
    done
  done

  "$python" - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
def last_json(name):
    try:
        lines = [l for l in open(os.path.join(out, name + ".json")) if l.strip().startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None
def mem(name):
    try:
        return float(open(os.path.join(out, name + ".mem")).read().strip())
    except (OSError, ValueError):
        return None
names = ["torch_bf16", "parity", "torch_adamw", "collie_adamw_flash", "collie_adamw_naive", "collie_lomo_flash"]
names += [f"attention_{a}_{s}" for s in (2048, 4096) for a in ("naive", "flash")]
res = {"gpu": open(os.path.join(out, "gpu.txt")).read().strip()}
for n in names:
    res[n] = {"result": last_json(n), "peak_gpu_mib": mem(n)}
checks = []
try:
    for l in open(os.path.join(out, "parity.json")):
        if l.startswith("{"):
            checks.append(json.loads(l))
except OSError:
    pass
res["parity_checks"] = checks
t, c = res["torch_adamw"]["result"], res["collie_adamw_flash"]["result"]
if t and c:
    res["tokens_per_s_ratio_collie_over_torch"] = c["tokens_per_s"] / t["tokens_per_s"]
json.dump(res, open(os.path.join(out, "gpu-check.json"), "w"), indent=1)
print(json.dumps({k: v for k, v in res.items() if k != "parity_checks"}, indent=1)[:6000])
PY
  if grep -Eq '"failed": ?\[\]' "$out/parity.json"; then
    echo "gpu-check: parity passed"
  else
    echo "gpu-check: parity FAILED (see $out/parity.json)"
    exit 1
  fi
}

case "${1:-}" in
  build) build ;;
  run) run "${2:?usage: scripts/gpu-check.sh run OUT_DIR}" ;;
  *) echo "usage: scripts/gpu-check.sh build | run OUT_DIR" >&2; exit 64 ;;
esac
