#!/usr/bin/env bash
# edgelm against llama.cpp on the same weights, side by side in one run: the SmolLM2-135M-shaped
# checkpoint as GGUF F32 / Q8_0 / Q4_0 (llama-bench) and as edgelm bundles fp32 / int8 / int4
# (edgelm bench), prompt 128, 128 new tokens, 2 threads, the two engines taking turns file by
# file; each figure is the median of the runs (llama-bench's per-run samples, edgelm's medians).
#
# llama.cpp is built from the vendored tree of the llama-cpp-python sdist on PyPI (cmake from
# Debian), once, into .llama.cpp/.
#
# usage: bench_llamacpp.sh CHECKPOINT FP32_BUNDLE INT8_BUNDLE INT4_BUNDLE [RUNS] [INT8_DYNAMIC_BUNDLE]
#        [INT4_BUNDLE_2...]   (more int4 bundles, e.g. larger blocks, each against Q4_0 again)
# BENCH_ROUNDS=N (default 1) goes over the files N times, the engines still taking turns, and
# ends with each pair's median ratio over the rounds: on a shared machine whose speed drifts from
# minute to minute, the ratio of two figures taken seconds apart is steadier than either figure.
# BENCH_ISA=avx2 measures both engines' AVX2 kernels on an AVX-512 host: llama.cpp built for
# AVX2 (GGML_NATIVE=OFF) and both run with scripts/avx2_only.c preloaded, which hides AVX-512,
# AVX-VNNI and AMX from CPUID (needs the cpuid_fault CPU flag).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
ck=$1 fp32=$2 int8=$3 int4=$4 runs=${5:-3} int8d=${6:-}
more_int4=("${@:7}")
isa=${BENCH_ISA:-native}
rounds=${BENCH_ROUNDS:-1}
case "$rounds" in
  '' | *[!0-9]* | 0) echo "BENCH_ROUNDS must be a positive whole number, not '$rounds'" >&2; exit 1 ;;
esac
case "$isa" in
  native) build="$root/.llama.cpp/build" preload="" ;;
  avx2)
    build="$root/.llama.cpp/build-avx2" preload="$build/avx2_only.so"
    grep -qw cpuid_fault /proc/cpuinfo || { echo "BENCH_ISA=avx2 needs the cpuid_fault CPU flag" >&2; exit 1; }
    export GGML_NATIVE=OFF
    ;;
  *) echo "BENCH_ISA is native or avx2, not $isa" >&2; exit 1 ;;
esac
bin="$build/bin"
src=$("$root/scripts/build-llamacpp.sh" "$build" llama-bench llama-quantize)
if [ -n "$preload" ] && [ ! -f "$preload" ]; then
  cc -O2 -shared -fPIC -o "$preload" "$root/scripts/avx2_only.c"
fi

work="$root/out/bench-llamacpp"
mkdir -p "$work"
# GGUF files are made again when the checkpoint is newer, and written under a temporary name
# first, so an interrupted conversion is never taken for a finished one.
if [ ! -f "$work/f32.gguf" ] || [ -n "$(find "$ck" -name '*.safetensors' -newer "$work/f32.gguf")" ]; then
  "$root/.venv/bin/python" "$root/scripts/hf_to_gguf.py" "$ck" "$work/f32.gguf.tmp" --gguf-py "$src/gguf-py"
  mv "$work/f32.gguf.tmp" "$work/f32.gguf"
fi
for q in Q8_0 Q4_0; do
  if [ ! "$work/$q.gguf" -nt "$work/f32.gguf" ]; then
    "$bin/llama-quantize" "$work/f32.gguf" "$work/$q.gguf.tmp" "$q" >"$work/$q.log" 2>&1 || { cat "$work/$q.log" >&2; exit 1; }
    mv "$work/$q.gguf.tmp" "$work/$q.gguf"
  fi
done

flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|avx512f|avx512_vnni|avx_vnni|amx_int8)$' | xargs)
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, $flags; kernels: $isa; prompt 128, 128 new tokens, 2 threads, median of $runs"
printf '%-22s %8s %9s %9s\n' files MiB "TTFT ms" "decode/s"
pairs=("f32.gguf:$fp32" "Q8_0.gguf:$int8")
[ -n "$int8d" ] && pairs+=("Q8_0.gguf:$int8d")
pairs+=("Q4_0.gguf:$int4")
for b in "${more_int4[@]}"; do pairs+=("Q4_0.gguf:$b"); done
ratios=$(mktemp)
trap 'rm -f "$ratios"' EXIT
for round in $(seq "$rounds"); do
[ "$rounds" -gt 1 ] && echo "round $round of $rounds"
for i in "${!pairs[@]}"; do
  pair=${pairs[$i]}
  gg=${pair%%:*} bundle=${pair#*:}
  # llama-bench: pp128 on an empty context gives the prompt's time (its TTFT); tg128 with 128
  # tokens already in the context (-d 128) the decode rate after that prompt, as edgelm measures.
  lj=$(LD_PRELOAD="$preload" "$bin/llama-bench" -m "$work/$gg" -p 128 -n 128 -d 0,128 -t 2 -r "$runs" -o json 2>"$work/llama-bench.log") \
    || { cat "$work/llama-bench.log" >&2; exit 1; }
  ej=$(LD_PRELOAD="$preload" "$root/target/release/edgelm" bench "$bundle" --runs "$runs" --json --threads 2 \
    --prompt-tokens 128 --new-tokens 128)
  python3 - "$lj" "$ej" "$work/$gg" "$bundle" "$ratios" "$i" <<'EOF'
import json, os, statistics, sys
l, e = json.loads(sys.argv[1]), json.loads(sys.argv[2])
pp = next(r for r in l if r["n_prompt"] > 0 and r.get("n_depth", 0) == 0)
tg = next(r for r in l if r["n_gen"] > 0 and r.get("n_depth", 0) == 128)
mib = lambda p: os.path.getsize(p) / 2**20
# A bundle's graph and, where the weights are kept beside it, their data file.
bundle_mib = lambda d: sum(mib(f"{d}/{f}") for f in ("model.onnx", "model.onnx.data") if os.path.exists(f"{d}/{f}"))
rate = lambda r: statistics.median(r.get("samples_ts") or [r["avg_ts"]])
print(f"{'llama.cpp ' + os.path.basename(sys.argv[3]):22} {mib(sys.argv[3]):8.1f} {128e3 / rate(pp):9.1f} {rate(tg):9.1f}")
print(f"{'edgelm ' + os.path.basename(sys.argv[4].rstrip('/')):22} {bundle_mib(sys.argv[4]):8.1f} {e['ttft_ms']:9.1f} {e['decode_tokens_per_s']:9.1f}")
# edgelm / llama.cpp for this pair and round: first token (below 1 is faster), decode (above 1).
# Keyed by the pair's place in the list: two bundles may share a folder name.
with open(sys.argv[5], "a") as f:
    pair = os.path.basename(sys.argv[4].rstrip('/')) + " / " + os.path.basename(sys.argv[3])
    f.write(f"{sys.argv[6]}\t{pair}\t{e['ttft_ms'] / (128e3 / rate(pp))}\t{e['decode_tokens_per_s'] / rate(tg)}\n")
EOF
done
done
python3 - "$ratios" "$rounds" <<'EOF'
import statistics, sys
pairs = {}
for line in open(sys.argv[1]):
    i, pair, ttft, decode = line.rstrip("\n").split("\t")
    pairs.setdefault((int(i), pair), []).append((float(ttft), float(decode)))
print(f"\nedgelm / llama.cpp, median over {sys.argv[2]} round(s) (lowest to highest);")
print("first token: under 1x is edgelm faster; decode: over 1x is edgelm faster")
print(f"{'pair':32} {'first token':>22} {'decode':>22}")
for (_, pair), r in sorted(pairs.items()):
    cell = lambda v: f"{statistics.median(v):.2f}x ({min(v):.2f}-{max(v):.2f})"
    print(f"{pair:32} {cell([t for t, _ in r]):>22} {cell([d for _, d in r]):>22}")
EOF
