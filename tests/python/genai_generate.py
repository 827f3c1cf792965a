"""Greedy generation with onnxruntime-genai, for comparison with edgelm.

usage: genai_generate.py MODEL_DIR --ids 1,2,3 --max-new-tokens N [--ignore-eos]
prints a JSON list of the generated token ids (prompt excluded)."""
import argparse
import json

import onnxruntime_genai as og

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--ids", required=True)
ap.add_argument("--max-new-tokens", type=int, required=True)
ap.add_argument("--ignore-eos", action="store_true")
a = ap.parse_args()

prompt = [int(x) for x in a.ids.split(",")]
model = og.Model(a.model)
params = og.GeneratorParams(model)
params.set_search_options(
    do_sample=False,
    max_length=len(prompt) + a.max_new_tokens,
    min_length=len(prompt) + a.max_new_tokens if a.ignore_eos else 0,
)
gen = og.Generator(model, params)
gen.append_tokens(prompt)
out = []
while not gen.is_done():
    gen.generate_next_token()
    out.append(int(gen.get_next_tokens()[0]))
print(json.dumps(out))
