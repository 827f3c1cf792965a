#!/usr/bin/env bash
# Structured pruning's speed, side by side in one run: the SmolLM2-135M-shaped checkpoint and
# the same with 30% of every layer's MLP units and one of its three KV groups removed, both
# exported fp32 and, with `int8-dynamic`, quantized too; edgelm bench on each in turn, the
# median of RUNS runs each, one bundle after the other in one run of this script (prompt 128,
# 128 new tokens, 2 threads). Random weights: speed only, accuracy comes from the
# pipeline (`just pipeline`, stage `pruned`).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
runs=${1:-3}
preset=${2:-smollm2-135m}
bin=$root/target/release
work=$root/out/$preset
ck=$work/checkpoint
pruned=$work/pruned
EDGELM_DISTILL=$bin/edgelm-distill
source "$root/scripts/fresh.sh"
[ -f "$ck/config.json" ] || "$bin/edgelm-distill" init --preset "$preset" -o "$ck"
# Importance on a few recipe commands (random weights: any text ranks the units the same way).
"$bin/edgelm-distill" prune-structured "$ck" --recipe "$root/models/devcmd/recipe.toml" \
  --mlp 0.3 --heads 0.3 --query-heads 0 --calibration 16 -o "$pruned"
# Every bundle from this build's exporter and quantizer (remade when older than it or than
# what it is made from), so the pairs compare like with like.
fresh "$work/bundle" "$ck" || "$bin/edgelm-distill" export "$ck" -o "$work/bundle"
fresh "$work/bundle-pruned" "$pruned" || "$bin/edgelm-distill" export "$pruned" -o "$work/bundle-pruned"
for b in bundle bundle-pruned; do
  fresh "$work/$b-int8-dynamic" "$work/$b" ||
    "$bin/edgelm-distill" quantize "$work/$b" -o "$work/$b-int8-dynamic" --precision int8-dynamic --max-kl 10
done
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; prompt 128, 128 new tokens, 2 threads, median of $runs"
printf '%-26s %8s %9s %9s\n' bundle MiB "TTFT ms" "decode/s"
for b in bundle bundle-pruned bundle-int8-dynamic bundle-pruned-int8-dynamic; do
  j=$("$bin/edgelm" bench "$work/$b" --runs "$runs" --json --threads 2)
  python3 - "$j" "$work/$b" <<'PY'
import json, os, sys
e, d = json.loads(sys.argv[1]), sys.argv[2]
size = sum(os.path.getsize(f"{d}/{f}") for f in ("model.onnx", "model.onnx.data") if os.path.exists(f"{d}/{f}"))
print(f"{os.path.basename(d):26} {size / 2**20:8.1f} {e['ttft_ms']:9.1f} {e['decode_tokens_per_s']:9.1f}")
PY
done
