#!/usr/bin/env python3
"""Writes a tiny random-init Llama checkpoint folder for the OpenAI client test: config.json,
model.safetensors (float32, standard library only) and the files of a tokenizer fixture copied beside them,
with a vocabulary that covers the tokenizer's ids.

Usage: make_model.py --tokenizer DIR --out DIR [--seed N]
"""

import argparse
import json
import os
import shutil
import random
import struct
import sys
from array import array


def tokenizer_vocab(tokenizer_dir):
    with open(os.path.join(tokenizer_dir, "tokenizer.json"), encoding="utf-8") as f:
        t = json.load(f)
    ids = list(t["model"]["vocab"].values()) + [a["id"] for a in t.get("added_tokens", [])]
    return max(ids) + 1


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, shape, values in tensors:
        a = array("f", values)
        if sys.byteorder != "little":
            a.byteswap()
        data = a.tobytes()
        header[name] = {"dtype": "F32", "shape": shape,
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    vocab = (tokenizer_vocab(a.tokenizer) + 63) // 64 * 64
    hidden, heads, kv_heads, head_dim, inter, layers = 64, 4, 2, 16, 128, 2
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": inter, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "num_hidden_layers": layers,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "vocab_size": vocab, "torch_dtype": "float32",
    }
    os.makedirs(a.out, exist_ok=True)
    rng = random.Random(a.seed)

    def w(name, rows, cols):
        bound = (3.0 / cols) ** 0.5
        return (name, [rows, cols], [rng.uniform(-bound, bound) for _ in range(rows * cols)])

    def ones(name):
        return (name, [hidden], [1.0] * hidden)

    tensors = [w("model.embed_tokens.weight", vocab, hidden)]
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors += [
            ones(p + "input_layernorm.weight"),
            ones(p + "post_attention_layernorm.weight"),
            w(p + "self_attn.q_proj.weight", heads * head_dim, hidden),
            w(p + "self_attn.k_proj.weight", kv_heads * head_dim, hidden),
            w(p + "self_attn.v_proj.weight", kv_heads * head_dim, hidden),
            w(p + "self_attn.o_proj.weight", hidden, heads * head_dim),
            w(p + "mlp.gate_proj.weight", inter, hidden),
            w(p + "mlp.up_proj.weight", inter, hidden),
            w(p + "mlp.down_proj.weight", hidden, inter),
        ]
    tensors += [ones("model.norm.weight"), w("lm_head.weight", vocab, hidden)]
    write_safetensors(os.path.join(a.out, "model.safetensors"), tensors)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    for name in os.listdir(a.tokenizer):
        shutil.copy(os.path.join(a.tokenizer, name), os.path.join(a.out, name))


if __name__ == "__main__":
    main()
