"""A llama-family Hugging Face checkpoint (config.json, model.safetensors, tokenizer.json) to a
GGUF F32 file for llama.cpp, with numpy and llama.cpp's own `gguf` package only.

llama.cpp's converter imports torch, which PyPI only ships with gigabytes of CUDA libraries;
for the side-by-side benchmark a plain writer is enough. It does what the converter does for
`LlamaForCausalLM`: GGUF tensor names, q/k rows permuted to llama.cpp's rotary layout, the
byte-level BPE vocabulary and merges from tokenizer.json.

usage: hf_to_gguf.py CHECKPOINT OUT.gguf --gguf-py LLAMA_CPP/gguf-py
"""
import argparse
import json
import struct
import sys

import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("checkpoint")
ap.add_argument("out")
ap.add_argument("--gguf-py", required=True, help="llama.cpp's gguf-py folder")
a = ap.parse_args()
sys.path.insert(0, a.gguf_py)
import gguf  # noqa: E402


def read_safetensors(path):
    """name -> float32 array, from a single safetensors file."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    kinds = {"F32": np.float32, "F16": np.float16}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] == "BF16":
            b, e = info["data_offsets"]
            u16 = np.frombuffer(raw[base + b:base + e], dtype=np.uint16)
            t = (u16.astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in kinds:
            b, e = info["data_offsets"]
            t = np.frombuffer(raw[base + b:base + e], dtype=kinds[info["dtype"]]).astype(np.float32)
        else:
            continue
        out[name] = t.reshape(info["shape"])
    return out


cfg = json.load(open(f"{a.checkpoint}/config.json"))
w = read_safetensors(f"{a.checkpoint}/model.safetensors")
heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
hidden = cfg["hidden_size"]
head_dim = cfg.get("head_dim") or hidden // heads


def permute(t, n_head):
    """HF's rotate-half q/k rows to llama.cpp's interleaved pairs."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


writer = gguf.GGUFWriter(a.out, "llama")
writer.add_name("edgelm-bench")
writer.add_context_length(cfg["max_position_embeddings"])
writer.add_embedding_length(hidden)
writer.add_block_count(cfg["num_hidden_layers"])
writer.add_feed_forward_length(cfg["intermediate_size"])
writer.add_head_count(heads)
writer.add_head_count_kv(kv_heads)
writer.add_rope_dimension_count(head_dim)
writer.add_key_length(head_dim)
writer.add_value_length(head_dim)
writer.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-5))
writer.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
writer.add_vocab_size(cfg["vocab_size"])
writer.add_file_type(gguf.LlamaFileType.ALL_F32)

tok = json.load(open(f"{a.checkpoint}/tokenizer.json"))
vocab = tok["model"]["vocab"]
tokens = [""] * cfg["vocab_size"]
types = [gguf.TokenType.UNUSED] * cfg["vocab_size"]
for t, i in vocab.items():
    if i < len(tokens):
        tokens[i], types[i] = t, gguf.TokenType.NORMAL
for t in tok.get("added_tokens", []):
    if t["id"] < len(tokens):
        tokens[t["id"]], types[t["id"]] = t["content"], gguf.TokenType.CONTROL
for i, t in enumerate(tokens):
    if not t:
        tokens[i] = f"[PAD{i}]"
merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
writer.add_tokenizer_model("gpt2")
writer.add_tokenizer_pre("smollm")
writer.add_token_list(tokens)
writer.add_token_types(types)
writer.add_token_merges(merges)
if cfg.get("bos_token_id") is not None:
    writer.add_bos_token_id(cfg["bos_token_id"])
eos = cfg.get("eos_token_id")
if eos is not None:
    writer.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)

names = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
writer.add_tensor("token_embd.weight", w["model.embed_tokens.weight"])
writer.add_tensor("output_norm.weight", w["model.norm.weight"])
if "lm_head.weight" in w and not cfg.get("tie_word_embeddings", False):
    writer.add_tensor("output.weight", w["lm_head.weight"])
for i in range(cfg["num_hidden_layers"]):
    for hf, gg in names.items():
        t = w[f"model.layers.{i}.{hf}.weight"]
        if hf == "self_attn.q_proj":
            t = permute(t, heads)
        elif hf == "self_attn.k_proj":
            t = permute(t, kv_heads)
        writer.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()
print(f"wrote {a.out}")
