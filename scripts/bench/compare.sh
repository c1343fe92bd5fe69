#!/usr/bin/env bash
# Runs a collie benchmark and its PyTorch twin back to back, on the same machine, in one command,
# and prints both JSON lines with /usr/bin/time's peak RSS.
#
#   scripts/bench/compare.sh forward --preset tiny --seq-len 256 --batch-size 4
#   scripts/bench/compare.sh matmul --size 1024
#
# COLLIE: the collie binary (default target/release/collie); PYTHON: a Python with torch and
# transformers (default python3). Extra collie flags (e.g. --device cuda) go in COLLIE_FLAGS.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
collie="${COLLIE:-$here/../../target/release/collie}"
python="${PYTHON:-python3}"
echo "# machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "# collie ${COLLIE_FLAGS:-} bench $*"
/usr/bin/time -f '# collie peak RSS %M KiB, wall %e s' "$collie" ${COLLIE_FLAGS:-} bench "$@"
echo "# pytorch: torch_bench.py $*"
/usr/bin/time -f '# pytorch peak RSS %M KiB, wall %e s' "$python" "$here/torch_bench.py" "$@"
