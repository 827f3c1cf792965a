"""Writes a llama-family checkpoint as a decoder in the layout Hugging Face Optimum's ONNX
export produces (`optimum-cli export onnx --task text-generation-with-past`), for testing that
edgelm runs such folders: one `model.onnx` in standard operators only (no contrib attention),
inputs `input_ids`, `attention_mask`, `position_ids`, `past_key_values.N.key|value`
[batch, kv_heads, past, head_dim]; outputs `logits` and `present.N.key|value` (past and this
step's keys concatenated); transformers' config.json, generation_config.json and the tokenizer
files beside it; no genai_config.json.

The graph is built here from the llama equations (RMSNorm, rotary embedding on the given
positions, grouped-query attention with a causal and padding mask, SwiGLU), not by Optimum.

usage: optimum_layout_export.py CHECKPOINT OUT [--fp16-cache]  (the cache inputs and outputs in
fp16, as an fp16 export has them)
"""
import json
import os
import shutil
import struct
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def read_safetensors(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", f"{name}: {info['dtype']} (this script reads f32 checkpoints)"
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=np.float32).reshape(info["shape"])
    return out


class Graph:
    def __init__(self):
        self.nodes, self.inits, self.count, self.names = [], [], 0, set()

    def const(self, name, array):
        if name not in self.names:  # shared constants are made once
            self.names.add(name)
            self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, kind, inputs, outputs=None, **attrs):
        self.count += 1
        outputs = outputs or [f"{kind}_{self.count}"]
        self.nodes.append(helper.make_node(kind, inputs, outputs, name=f"{kind}_node_{self.count}", **attrs))
        return outputs[0] if len(outputs) == 1 else outputs


def main():
    ck, out = sys.argv[1], sys.argv[2]
    fp16_cache = "--fp16-cache" in sys.argv[3:]
    cfg = json.load(open(os.path.join(ck, "config.json")))
    w = read_safetensors(os.path.join(ck, "model.safetensors"))
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    d = cfg.get("head_dim") or hidden // heads
    eps, theta = cfg.get("rms_norm_eps", 1e-6), cfg.get("rope_theta", 10000.0)
    assert not cfg.get("rope_scaling"), "plain rotary embedding only"
    assert not cfg.get("attention_bias") and cfg.get("model_type") in ("llama", "mistral")
    vocab, ctx = cfg["vocab_size"], cfg["max_position_embeddings"]

    g = Graph()
    f32 = np.float32
    two, epsilon = g.const("two", f32(2.0)), g.const("eps", f32(eps))
    last = g.const("axis_last", np.array([-1], np.int64))

    def rms(x, weight):
        mean = g.op("ReduceMean", [g.op("Pow", [x, two])], axes=[-1], keepdims=1)
        return g.op("Mul", [g.op("Div", [x, g.op("Sqrt", [g.op("Add", [mean, epsilon])])]), g.const(weight, w[weight])])

    def linear(x, weight):
        return g.op("MatMul", [x, g.const(weight + ".T", np.ascontiguousarray(w[weight].T))])

    # Rotary tables gathered at the given positions: [batch, 1, seq, head_dim].
    inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    angles = np.outer(np.arange(ctx, dtype=np.float64), inv)
    angles = np.concatenate([angles, angles], axis=1)
    one = g.const("axis_1", np.array([1], np.int64))
    cos = g.op("Unsqueeze", [g.op("Gather", [g.const("cos", np.cos(angles).astype(f32)), "position_ids"]), one])
    sin = g.op("Unsqueeze", [g.op("Gather", [g.const("sin", np.sin(angles).astype(f32)), "position_ids"]), one])
    half_a, half_b = g.const("half_a", np.array([0], np.int64)), g.const("half_b", np.array([d // 2], np.int64))
    end = g.const("end", np.array([d], np.int64))
    minus_one = g.const("minus_one", f32(-1.0))

    def rotate(x):  # x * cos + rotate_half(x) * sin, rotate_half = [-x2, x1]
        x1 = g.op("Slice", [x, half_a, half_b, last])
        x2 = g.op("Slice", [x, half_b, end, last])
        rotated = g.op("Concat", [g.op("Mul", [x2, minus_one]), x1], axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])

    # Mask [batch, 1, seq, total]: key i is seen by query j when i <= past + j and i is not padding.
    zero_i = g.const("zero_i", np.array(0, np.int64))
    one_i = g.const("one_i", np.array(1, np.int64))
    total = g.op("Gather", [g.op("Shape", ["attention_mask"]), one_i], axis=0)
    seq = g.op("Gather", [g.op("Shape", ["input_ids"]), one_i], axis=0)
    keys = g.op("Range", [zero_i, total, one_i])
    queries = g.op("Range", [g.op("Sub", [total, seq]), total, one_i])
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [keys, g.const("axis_0", np.array([0], np.int64))]),
                                  g.op("Unsqueeze", [queries, one])])
    padding = g.op("Cast", ["attention_mask"], to=TensorProto.BOOL)
    padding = g.op("Unsqueeze", [padding, g.const("axes_1_2", np.array([1, 2], np.int64))])
    allowed = g.op("And", [g.op("Unsqueeze", [causal, g.const("axis_0b", np.array([0], np.int64))]), padding])
    bias = g.op("Where", [allowed, g.const("zero_f", f32(0.0)), g.const("neg", f32(np.finfo(np.float32).min))])

    x = g.op("Gather", [g.const("model.embed_tokens.weight", w["model.embed_tokens.weight"]), "input_ids"])
    split = lambda n: g.const(f"shape_{n}", np.array([0, 0, n, d], np.int64))
    group = heads // kv
    for i in range(layers):
        p = f"model.layers.{i}."
        h = rms(x, p + "input_layernorm.weight")
        q = g.op("Transpose", [g.op("Reshape", [linear(h, p + "self_attn.q_proj.weight"), split(heads)])], perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [linear(h, p + "self_attn.k_proj.weight"), split(kv)])], perm=[0, 2, 1, 3])
        v = g.op("Transpose", [g.op("Reshape", [linear(h, p + "self_attn.v_proj.weight"), split(kv)])], perm=[0, 2, 1, 3])
        q, k = rotate(q), rotate(k)
        if fp16_cache:
            past_k = g.op("Cast", [f"past_key_values.{i}.key"], to=TensorProto.FLOAT)
            past_v = g.op("Cast", [f"past_key_values.{i}.value"], to=TensorProto.FLOAT)
            k = g.op("Concat", [past_k, k], axis=2)
            v = g.op("Concat", [past_v, v], axis=2)
            g.op("Cast", [k], [f"present.{i}.key"], to=TensorProto.FLOAT16)
            g.op("Cast", [v], [f"present.{i}.value"], to=TensorProto.FLOAT16)
        else:
            k = g.op("Concat", [f"past_key_values.{i}.key", k], [f"present.{i}.key"], axis=2)
            v = g.op("Concat", [f"past_key_values.{i}.value", v], [f"present.{i}.value"], axis=2)
        if group > 1:  # each kv head serves `group` query heads
            expand = g.const(f"expand_{i}", np.array([1, 1, group, 1, 1], np.int64))
            merged = g.const(f"merged_{i}", np.array([0, heads, -1, d], np.int64))
            axis2 = g.const(f"axis2_{i}", np.array([2], np.int64))
            k = g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [k, axis2]), expand]), merged])
            v = g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [v, axis2]), expand]), merged])
        scores = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
        scores = g.op("Add", [g.op("Mul", [scores, g.const(f"scale_{i}", f32(1.0 / np.sqrt(d)))]), bias])
        attn = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        attn = g.op("Reshape", [g.op("Transpose", [attn], perm=[0, 2, 1, 3]), g.const(f"flat_{i}", np.array([0, 0, heads * d], np.int64))])
        x = g.op("Add", [x, linear(attn, p + "self_attn.o_proj.weight")])
        h = rms(x, p + "post_attention_layernorm.weight")
        gate = linear(h, p + "mlp.gate_proj.weight")
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), linear(h, p + "mlp.up_proj.weight")])
        x = g.op("Add", [x, linear(act, p + "mlp.down_proj.weight")])
    x = rms(x, "model.norm.weight")
    head = "lm_head.weight" if "lm_head.weight" in w else "model.embed_tokens.weight"
    g.op("MatMul", [x, g.const("lm_head.T", np.ascontiguousarray(w[head].T))], ["logits"])

    kv_shape = lambda n: ["batch_size", kv, n, d]
    cache_type = TensorProto.FLOAT16 if fp16_cache else TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "past_sequence_length + 1"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab])]
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", cache_type, kv_shape("past_sequence_length")))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", cache_type, kv_shape("past_sequence_length + 1")))
    graph = helper.make_graph(g.nodes, "optimum-layout-decoder", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    os.makedirs(out, exist_ok=True)
    onnx.save(model, os.path.join(out, "model.onnx"))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if os.path.exists(os.path.join(ck, name)):
            shutil.copy(os.path.join(ck, name), os.path.join(out, name))


main()
