"""all-MiniLM-L6-v2 int8: our quantizer against ONNX Runtime's quantize_dynamic, one run, and a
shallower distilled student (fp32 and int8) when given.

Embeds an English text set (by default `models/minilm/bench-sentences.txt`: 188 sentences of
this repository's prose docs, frozen so runs of different days score the same text; `--text`
takes another file, one sentence per line) with the fp32 encoder
bundle, our `edgelm-distill quantize --precision int8` of it, and
`onnxruntime.quantization.quantize_dynamic` (int8 weights per channel, MatMulInteger) of the
same fp32 ONNX, all in ONNX Runtime with 2 threads, and prints per variant: size, mean and
lowest cosine to the fp32 embeddings, nearest-neighbour agreement (does each sentence's closest
other sentence stay the same) and sentences per second.

usage: bench_encoder_quant.py FP32_BUNDLE INT8_BUNDLE --work DIR [--text FILE] [--sentences N]
       [--ours-dynamic BUNDLE] [--student BUNDLE] [--student-int8 BUNDLE] [--variant NAME=BUNDLE ...]
       [--calibration TEXT_FILE] [--rounds N]
"""
import argparse
import json
import os
import platform
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic
from tokenizers import Tokenizer

ap = argparse.ArgumentParser()
ap.add_argument("fp32")
ap.add_argument("ours")
ap.add_argument("--work", required=True)
ap.add_argument("--ours-dynamic", help="our int8-dynamic bundle, compared too")
ap.add_argument("--student", help="a shallower student bundle (edgelm-distill distill-encoder), compared too")
ap.add_argument("--student-int8", help="its int8 bundle (dynamic or static), compared too")
ap.add_argument("--variant", action="append", default=[], metavar="NAME=BUNDLE",
                help="another bundle to compare (repeatable), e.g. 'edgelm int8-static=out/minilm/bundle-int8-static'")
ap.add_argument("--calibration", help="text file (one text per line): also run ONNX Runtime's quantize_static "
                "(QDQ, per channel, min-max) calibrated on its first 256 lines, as our int8-static is")
ap.add_argument("--text", help="sentences to embed, one per line [default: models/minilm/bench-sentences.txt]")
ap.add_argument("--sentences", type=int, default=0, help="use only the first N sentences (0: all)")
ap.add_argument("--rounds", type=int, default=5, help="passes over the text per variant, taken in turns; each sentence's fastest counts")
a = ap.parse_args()

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sentences = [l.strip() for l in open(a.text or f"{root}/models/minilm/bench-sentences.txt") if l.strip()]
if a.sentences < 0:
    ap.error("--sentences takes a count (0: all)")
if a.sentences:
    sentences = sentences[: a.sentences]
if len(sentences) < 3:
    ap.error(f"the text has {len(sentences)} sentences; nearest neighbours need at least 3")


def stale(out, *inputs):
    """Whether a cached file must be made again: missing, or older than what it was made from."""
    return not os.path.exists(out) or any(os.path.getmtime(i) > os.path.getmtime(out) for i in inputs)


os.makedirs(a.work, exist_ok=True)
theirs = f"{a.work}/minilm-quantize-dynamic.onnx"
if stale(theirs, f"{a.fp32}/model.onnx"):
    quantize_dynamic(f"{a.fp32}/model.onnx", theirs, weight_type=QuantType.QInt8, per_channel=True)

tok = Tokenizer.from_file(f"{a.fp32}/tokenizer.json")
tok.no_padding()
tok.no_truncation()  # as the runtime reads it: texts past max_tokens are cut below
max_tokens = json.load(open(f"{a.fp32}/edgelm.json"))["encoder"]["max_tokens"]

theirs_static = f"{a.work}/minilm-quantize-static.onnx"
if a.calibration and stale(theirs_static, f"{a.fp32}/model.onnx", a.calibration):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Lines(CalibrationDataReader):
        def __init__(self):
            lines = [l.strip() for l in open(a.calibration) if l.strip()][:256]
            self.feeds = iter([
                {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "attention_mask": np.ones_like(ids)}
                for ids in (np.array([tok.encode(l).ids[:max_tokens]], dtype=np.int64) for l in lines)
            ])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(f"{a.fp32}/model.onnx", theirs_static, Lines(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
encoded = [tok.encode(s) for s in sentences]


def session(model):
    o = ort.SessionOptions()
    o.intra_op_num_threads = 2
    return ort.InferenceSession(model, o)


def embed(s):
    """Every sentence's embedding and the seconds each took."""
    out, secs = [], []
    for e in encoded:
        ids = np.array([e.ids[:max_tokens]], dtype=np.int64)
        feed = {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "attention_mask": np.ones_like(ids)}
        t0 = time.perf_counter()
        out.append(s.run(["sentence_embedding"], feed)[0][0])
        secs.append(time.perf_counter() - t0)
    return np.array(out), np.array(secs)


def nearest(e):
    n = e / np.linalg.norm(e, axis=1, keepdims=True)
    sim = n @ n.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(axis=1)


variants = [("fp32", f"{a.fp32}/model.onnx"), ("edgelm int8", f"{a.ours}/model.onnx"), ("ORT quantize_dynamic int8", theirs)]
if a.ours_dynamic:
    variants.insert(2, ("edgelm int8-dynamic", f"{a.ours_dynamic}/model.onnx"))
for v in a.variant:
    name, _, b = v.partition("=")
    variants.insert(len(variants) - 1, (name, f"{b}/model.onnx"))
if a.calibration:
    variants.append(("ORT quantize_static int8", theirs_static))
def scheme(bundle):
    """The int8 scheme an edgelm bundle's manifest records: static when activation ranges were
    calibrated, dynamic when integer matmuls quantize activations as they run."""
    w = json.load(open(f"{bundle}/edgelm.json")).get("weights") or {}
    if w.get("activations"):
        return "int8-static"
    return "int8-dynamic" if w.get("operator") == "DynamicQuantizeMatMul" else "int8"


def depth(model):
    """How many encoder layers an ONNX file holds (None when its weights are not named so)."""
    graph = onnx.load(model, load_external_data=False).graph
    return len({i.name.split(".")[2] for i in graph.initializer if i.name.startswith("encoder.layer.")}) or None


def quantization(model):
    """The precision an edgelm bundle's manifest records for the bundle holding `model`; None
    for files of other tools."""
    manifest = os.path.join(os.path.dirname(model), "edgelm.json")
    return json.load(open(manifest)).get("quantization") if os.path.exists(manifest) else None


for name, b in [("student", a.student), (f"student {scheme(a.student_int8)}" if a.student_int8 else "", a.student_int8)]:
    if b:
        layers = depth(f"{b}/model.onnx")
        variants.append((f"{name}" + (f" ({layers} layers)" if layers else ""), f"{b}/model.onnx"))
sessions = [session(path) for _, path in variants]
base, _ = embed(sessions[0])
base_nn = nearest(base)
for s in sessions[1:]:
    embed(s)  # each session's first run (allocations, kernel selection) is not timed
fp32_size = os.path.getsize(variants[0][1])
# Speed: the variants take turns, pass after pass, and each sentence counts with its fastest
# time over the passes: this machine class's speed drifts by 2x within minutes (other tenants
# of the host), and the fastest of several tries of one sentence is the least disturbed.
embeddings = [None] * len(variants)
fastest = [np.full(len(encoded), np.inf) for _ in variants]
for _ in range(a.rounds):
    for i, s in enumerate(sessions):
        embeddings[i], secs = embed(s)
        fastest[i] = np.minimum(fastest[i], secs)
speeds = [len(encoded) / f.sum() for f in fastest]
cpuinfo = open("/proc/cpuinfo").read().splitlines()
flags = next((l.split(":", 1)[1].split() for l in cpuinfo if l.startswith("flags")), [])
simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni") if f in flags]
print(f"CPU {next((l.split(':', 1)[1].strip() for l in cpuinfo if l.startswith('model name')), platform.machine())} ({' '.join(simd)}), "
      f"ONNX Runtime {ort.__version__}, 2 threads; {len(sentences)} sentences; speed: each sentence's fastest of {a.rounds} passes, variants in turn")
print(f"{'variant':34} {'MiB':>6} {'x fp32':>7} {'cos mean':>9} {'cos min':>8} {'NN agree':>9} {'sent/s':>7}")
rows = []
for (name, path), e, speed in zip(variants, embeddings, speeds):
    cos = np.sum(e * base, axis=1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(base, axis=1))
    agree = float(np.mean(nearest(e) == base_nn))
    size = os.path.getsize(path)
    rows.append({"variant": name, "mib": size / 2**20, "x_fp32": size / fp32_size, "cos_mean": float(cos.mean()),
                 "cos_min": float(cos.min()), "nn_agreement": agree, "sentences_per_s": speed})
    print(f"{name:34} {size / 2**20:6.1f} {size / fp32_size:7.3f} {cos.mean():9.4f} {cos.min():8.4f} {100 * agree:8.1f}% {speed:7.1f}")
# The shallow students' goal is a speed ratio to the teacher-depth int8 bundles: each shallower
# edgelm int8 row against each of ours at the teacher's depth, from this run's figures.
teacher_depth = depth(variants[0][1])
deep_int8 = [(name, speed) for (name, path), speed in zip(variants, speeds)
             if quantization(path) == "int8" and depth(path) == teacher_depth]
for (name, path), speed in zip(variants, speeds):
    layers = depth(path)
    if deep_int8 and quantization(path) == "int8" and layers and teacher_depth and layers < teacher_depth:
        ratios = "; ".join(f"{speed / s:.2f}x {n}" for n, s in deep_int8)
        print(f"{name}: sentences/s against the {teacher_depth}-layer int8 bundles: {ratios}")
print(json.dumps(rows))
