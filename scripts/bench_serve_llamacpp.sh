#!/usr/bin/env bash
# Serving side by side: `edgelm serve --http` (decode steps batched, and with --no-batch) and
# llama.cpp's `llama-server` on the same weights (the SmolLM2-135M-shaped checkpoint, edgelm
# int4 against GGUF Q4_0), one after the other on the same port, driven by
# scripts/bench_serve.py at 1, 2, 4 and 8 clients.
#
# llama.cpp comes from the vendored tree of the llama-cpp-python sdist on PyPI
# (scripts/build-llamacpp.sh), built with its server.
#
# usage: bench_serve_llamacpp.sh CHECKPOINT INT4_BUNDLE [REQUESTS] [MAX_TOKENS]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
ck=$1 int4=$2 requests=${3:-16} max_tokens=${4:-64}
bin="$root/.llama.cpp/build-server/bin"
src=$("$root/scripts/build-llamacpp.sh" "$root/.llama.cpp/build-server" llama-server llama-quantize)
work="$root/out/bench-llamacpp"
mkdir -p "$work"
[ -f "$work/f32.gguf" ] || "$root/.venv/bin/python" "$root/scripts/hf_to_gguf.py" "$ck" "$work/f32.gguf" --gguf-py "$src/gguf-py"
[ -f "$work/Q4_0.gguf" ] || "$bin/llama-quantize" "$work/f32.gguf" "$work/Q4_0.gguf" Q4_0 >/dev/null 2>&1

port=18111
wait_up() {
  for _ in $(seq 1 300); do
    curl -fs "http://127.0.0.1:$port/$1" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "server on $port did not come up" >&2
  return 1
}
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; 2 threads; $requests requests per level, $max_tokens new tokens"
for mode in batched no-batch; do
  echo "== edgelm serve --http ($(basename "$int4"), $mode)"
  flag=(); [ "$mode" = no-batch ] && flag=(--no-batch)
  "$root/target/release/edgelm" serve --http "127.0.0.1:$port" --bundle "$int4" --threads 2 \
    --max-sequences 8 --queue 64 --cache-bytes 0 "${flag[@]}" 2>/dev/null &
  pid=$!
  wait_up healthz
  python3 "$root/scripts/bench_serve.py" "http://127.0.0.1:$port" --requests "$requests" --max-tokens "$max_tokens"
  curl -fs "http://127.0.0.1:$port/readyz" | python3 -c 'import json, sys; print("# batching:", json.load(sys.stdin)["batch"])'
  kill "$pid"; wait "$pid" 2>/dev/null || true
done
echo "== llama-server (Q4_0.gguf)"
# 8 slots as edgelm's 8 sequences; a context of 8 x 1024 shared among them.
"$bin/llama-server" -m "$work/Q4_0.gguf" --host 127.0.0.1 --port "$port" -t 2 -np 8 -c 8192 \
  --no-webui >/dev/null 2>&1 &
pid=$!
wait_up health
python3 "$root/scripts/bench_serve.py" "http://127.0.0.1:$port" --requests "$requests" --max-tokens "$max_tokens"
kill "$pid"; wait "$pid" 2>/dev/null || true
