"""Our quantizer against ONNX Runtime's, on the same fp32 ONNX, in one run.

For a speed bundle (the SmolLM2-135M-shaped export) and an accuracy bundle (the trained
teacher's export) this makes, from the same fp32 model.onnx:
  edgelm int8 / int4     `edgelm-distill quantize` (MatMulNBits + GatherBlockQuantized)
  ORT int8 / int4        onnxruntime.quantization.MatMulNBitsQuantizer, same bits, block,
                         symmetry and accuracy level, MatMul and Gather
and prints size, TTFT, prefill and decode speed (`edgelm bench`, runs interleaved so every
variant sees the same machine) and task completion on the test split (`edgelm-distill eval`).

usage: bench_quant.py SPEED_BUNDLE ACCURACY_BUNDLE --edgelm BIN --distill BIN [--runs 3]
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

ap = argparse.ArgumentParser()
ap.add_argument("speed_bundle")
ap.add_argument("accuracy_bundle")
ap.add_argument("--edgelm", required=True)
ap.add_argument("--distill", required=True)
ap.add_argument("--runs", type=int, default=3)
ap.add_argument("--recipe", default="models/devcmd/recipe.toml", help="whose test split scores accuracy")
ap.add_argument("--examples", type=int, default=300, help="test commands scored per variant")
ap.add_argument("--work", default="out/bench-quant")
ap.add_argument("--prompt-tokens", type=int, default=128)
ap.add_argument("--new-tokens", type=int, default=128)
a = ap.parse_args()

SCHEMES = {"int8": (8, 64), "int4": (4, 32)}


def copy_without_manifest(src, dst):
    """A bundle folder whose model.onnx will be replaced: without edgelm.json the runtime reads
    it as a plain genai folder, so no recorded hash refuses the new file."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.onnx", "model.onnx.data", "edgelm.json"))
    template = json.load(open(f"{src}/edgelm.json")).get("chat_template")
    if template:
        open(f"{dst}/chat_template.jinja", "w").write(template)


def model_bytes(folder):
    """The graph and, where the weights are kept beside it, their data file."""
    return sum(os.path.getsize(f"{folder}/{f}") for f in ("model.onnx", "model.onnx.data")
               if os.path.exists(f"{folder}/{f}"))


def ours(src, dst, precision):
    shutil.rmtree(dst, ignore_errors=True)
    subprocess.run([a.distill, "quantize", src, "-o", dst, "--precision", precision, "--no-verify"],
                   check=True, stderr=subprocess.DEVNULL)


def ort_nbits(src, dst, precision):
    bits, block = SCHEMES[precision]
    copy_without_manifest(src, dst)
    q = MatMulNBitsQuantizer(onnx.load(f"{src}/model.onnx"), bits=bits, block_size=block, is_symmetric=True,
                             accuracy_level=4, op_types_to_quantize=("MatMul", "Gather"))
    q.process()
    onnx.save(q.model.model, f"{dst}/model.onnx")


def ort_dynamic(src, dst, _precision):
    copy_without_manifest(src, dst)
    # MatMul only (its Gather rewrite breaks the graph's shapes); the contrib attention operators
    # have no ONNX type inference, so the weights are declared fp32.
    quantize_dynamic(f"{src}/model.onnx", f"{dst}/model.onnx", weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul"],
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


VARIANTS = [
    ("edgelm fp32", None, None),
    ("edgelm int8", ours, "int8"),
    ("ORT MatMulNBits int8", ort_nbits, "int8"),
    # quantize_dynamic's output of our decoder does not load (ONNX Runtime's shape inference
    # refuses the first norm's Mul); kept for the encoder comparison, not run here.
    ("edgelm int4", ours, "int4"),
    ("ORT MatMulNBits int4", ort_nbits, "int4"),
]


def build(src, tag):
    dirs = {}
    for name, make, precision in VARIANTS:
        if make is None:
            dirs[name] = src
            continue
        dst = os.path.join(a.work, tag, name.replace(" ", "-"))
        print(f"making {tag}: {name}", file=sys.stderr, flush=True)
        make(src, dst, precision)
        dirs[name] = dst
    return dirs


speed = build(a.speed_bundle, "speed")
accuracy = build(a.accuracy_bundle, "accuracy")

# Interleaved: round r benches every variant once, so a slow spell hits all of them.
runs = {name: [] for name, _, _ in VARIANTS}
for r in range(a.runs):
    for name, _, _ in VARIANTS:
        out = subprocess.run([a.edgelm, "bench", speed[name], "--runs", "1", "--json", "--threads", "2",
                              "--prompt-tokens", str(a.prompt_tokens), "--new-tokens", str(a.new_tokens)],
                             check=True, capture_output=True, text=True)
        runs[name].append(json.loads(out.stdout))
        print(f"round {r + 1}/{a.runs}: {name} done", file=sys.stderr, flush=True)

rows = []
fp32_bytes = model_bytes(speed['edgelm fp32'])
for name, _, _ in VARIANTS:
    size = model_bytes(speed[name])
    med = lambda k: statistics.median(x[k] for x in runs[name])
    ev = subprocess.run([a.distill, "eval", accuracy[name], "--json", "--recipe", a.recipe,
                         "--examples", str(a.examples)], check=True, capture_output=True, text=True)
    score = json.loads(ev.stdout)[0]["score"]
    rows.append({
        "variant": name, "mib": size / 2**20, "x_fp32": size / fp32_bytes, "ttft_ms": med("ttft_ms"),
        "prefill_tok_s": med("prefill_tokens_per_s"), "decode_tok_s": med("decode_tokens_per_s"),
        "task_completion": score["task_completion"], "examples": score["examples"],
    })

cpu = platform.processor() or platform.machine()
try:
    cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
except (OSError, StopIteration):
    pass
print(f"\nCPU {cpu}, {os.cpu_count()} cores, 2 threads; prompt {a.prompt_tokens}, {a.new_tokens} new tokens, "
      f"median of {a.runs} interleaved runs; accuracy on {rows[0]['examples']} test commands")
print(f"{'files':28} {'MiB':>7} {'x fp32':>7} {'TTFT ms':>8} {'prefill/s':>10} {'decode/s':>9} {'completion':>11}")
for r in rows:
    print(f"{r['variant']:28} {r['mib']:7.1f} {r['x_fp32']:7.3f} {r['ttft_ms']:8.1f} {r['prefill_tok_s']:10.1f} "
          f"{r['decode_tok_s']:9.1f} {100 * r['task_completion']:10.1f}%")
print(json.dumps({"cpu": cpu, "rows": rows}))
