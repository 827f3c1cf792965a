"""edgelm vs onnxruntime-genai on the same bundle: prompt N tokens, M new tokens, greedy.

Runs genai (Python API) in this process and `edgelm bench` as a subprocess with the same
synthetic prompt ids, prints medians and the edgelm/genai ratios, and optionally a JSON line.

usage: bench_genai.py BUNDLE --edgelm PATH [--runs 5] [--prompt-tokens 128] [--new-tokens 128]
"""
import argparse
import json
import platform
import resource
import statistics
import subprocess
import time

import onnxruntime_genai as og

ap = argparse.ArgumentParser()
ap.add_argument("bundle")
ap.add_argument("--edgelm", required=True)
ap.add_argument("--runs", type=int, default=5)
ap.add_argument("--warmup", type=int, default=1)
ap.add_argument("--prompt-tokens", type=int, default=128)
ap.add_argument("--new-tokens", type=int, default=128)
ap.add_argument("--edgelm-args", default="", help="extra arguments for edgelm bench")
a = ap.parse_args()

cfg = json.load(open(f"{a.bundle}/genai_config.json"))
vocab = cfg["model"]["vocab_size"]
# Same synthetic prompt as `edgelm bench`.
prompt = [(1000 + i * 7919) % (vocab - 3) + 3 for i in range(a.prompt_tokens)]

model = og.Model(a.bundle)
ttfts, decodes = [], []
for run in range(a.warmup + a.runs):
    params = og.GeneratorParams(model)
    total = a.prompt_tokens + a.new_tokens
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    t0 = time.perf_counter()
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    gen.generate_next_token()
    t1 = time.perf_counter()
    n = 1
    while not gen.is_done():
        gen.generate_next_token()
        n += 1
    t2 = time.perf_counter()
    if run >= a.warmup:
        ttfts.append((t1 - t0) * 1e3)
        decodes.append((n - 1) / (t2 - t1))
    del gen
genai = {
    "ttft_ms": statistics.median(ttfts),
    "decode_tokens_per_s": statistics.median(decodes),
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
}

cmd = [a.edgelm, "bench", a.bundle, "--json", "--runs", str(a.runs), "--warmup", str(a.warmup),
       "--prompt-tokens", str(a.prompt_tokens), "--new-tokens", str(a.new_tokens)] + a.edgelm_args.split()
edgelm = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)

print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, onnxruntime-genai {og.__version__}")
print(f"bundle: {a.bundle}; prompt {a.prompt_tokens}, new {a.new_tokens}, median of {a.runs} runs")
print(f"{'':10}{'TTFT ms':>10}{'decode tok/s':>14}{'peak RSS MiB':>14}")
for name, r in (("genai", genai), ("edgelm", edgelm)):
    print(f"{name:10}{r['ttft_ms']:>10.1f}{r['decode_tokens_per_s']:>14.1f}{r['peak_rss_bytes'] / 2**20:>14.1f}")
print(f"ratio edgelm/genai: decode {edgelm['decode_tokens_per_s'] / genai['decode_tokens_per_s']:.2f}x, "
      f"TTFT {edgelm['ttft_ms'] / genai['ttft_ms']:.2f}x (lower is better)")
print(json.dumps({"genai": genai, "edgelm": edgelm}))
