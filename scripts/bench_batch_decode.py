"""One decode step of an exported bundle at batch 1, 2, 4 and 8 against that many batch-1 steps
run one after another: whether batching the steps of concurrent sequences would pay.

usage: bench_batch_decode.py BUNDLE [PAST_TOKENS] [THREADS]
Inputs are random (past keys and values, token ids): only the time is measured.
"""
import json
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort

bundle = sys.argv[1]
past = int(sys.argv[2]) if len(sys.argv) > 2 else 128
threads = int(sys.argv[3]) if len(sys.argv) > 3 else 2
opts = ort.SessionOptions()
opts.intra_op_num_threads = threads
s = ort.InferenceSession(f"{bundle}/model.onnx", opts, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)


def feeds(batch):
    f = {}
    for i in s.get_inputs():
        if i.name == "input_ids":
            f[i.name] = rng.integers(0, 1000, size=(batch, 1), dtype=np.int64)
        elif i.name == "attention_mask":
            f[i.name] = np.ones((batch, past + 1), dtype=np.int64)
        elif i.name == "position_ids":
            f[i.name] = np.full((batch, 1), past, dtype=np.int64)
        else:
            heads, dim = i.shape[1], i.shape[3]
            f[i.name] = rng.standard_normal((batch, heads, past, dim), dtype=np.float32) * 0.1
    return f


def step_ms(batch, runs=15):
    f = feeds(batch)
    s.run(["logits"], f)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        s.run(["logits"], f)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


one = step_ms(1)
for b in [1, 2, 4, 8]:
    batched = step_ms(b)
    print(json.dumps({"batch": b, "batched_step_ms": round(batched, 2), "side_by_side_ms": round(b * one, 2),
                      "speedup": round(b * one / batched, 2), "past_tokens": past, "threads": threads}))
