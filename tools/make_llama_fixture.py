#!/usr/bin/env python3
"""Builds the tiny Llama fixture that the TokenLake engine is tested against.

No download: two small random-init LlamaForCausalLM models are built from configs with a fixed
torch seed and saved with save_pretrained (safetensors):

  model/      float32 weights, untied embeddings, rope_theta 10000, GQA 4 heads / 2 KV heads,
              3 layers.
  tied_bf16/  bfloat16 weights, tied embeddings (no lm_head.weight in the file), rope_theta
              50000, 4 heads / 1 KV head, 2 layers; its config.json uses the *other* rope form
              than the one this transformers version writes (rope_theta <-> rope_parameters),
              so the engine's reader sees both forms.

Prompts (prompts.jsonl, JSON lines {"input_ids": [...]}) have shared prefixes, multi-turn
histories (a later prompt extends an earlier prompt + its greedy answer), long prompts of many
segments, prompts shorter than a segment, a one-token prompt and exact repeats.

For every model and prompt, transformers runs greedy decoding ON CPU in float32 (the bf16 model's
weights are converted to float32 first, exactly as the engine does at load) and records:
  greedy         the max_new_tokens generated ids (generate(do_sample=False), checked against a
                 plain argmax loop over full forward passes),
  last_logits    the logits at the last prompt position,
  decode_logits  the logits at the last fed position (after max_new_tokens - 1 decode steps),
  min_margin     the smallest top-1 minus top-2 logit gap over all greedy steps (how robust the
                 greedy tokens are to rounding).
Writes expected.json and README.md (with the torch and transformers versions).

Usage: python3 tools/make_llama_fixture.py --out DIR
"""

import argparse
import json
import os
import platform
import random
import struct
import sys

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

MAX_NEW_TOKENS = 8
SEGMENT_TOKENS_HINT = 16

MODELS = {
    "model": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        initializer_range=0.08,
        dtype="float32",
        seed=1234,
    ),
    "tied_bf16": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=50000.0,
        tie_word_embeddings=True,
        initializer_range=0.08,
        dtype="bfloat16",
        seed=4321,
    ),
}
TOKEN_LOW, TOKEN_HIGH = 3, 500  # random prompt ids (greedy answers may use the whole vocabulary)


def log(*args):
    print(*args, flush=True)


def build_model(spec):
    spec = dict(spec)
    seed = spec.pop("seed")
    dtype = spec.pop("dtype")
    kwargs = dict(spec, bos_token_id=1, eos_token_id=2, pad_token_id=0, attention_bias=False,
                  mlp_bias=False, hidden_act="silu", use_cache=True)
    try:
        config = LlamaConfig(attn_implementation="eager", **kwargs)
    except TypeError:
        config = LlamaConfig(**kwargs)
    try:
        config._attn_implementation = "eager"
    except Exception:  # noqa: BLE001 - a read-only property in some versions; sdpa is fine too
        pass
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    with torch.no_grad():
        # Non-trivial norm weights so that the engine must really load them.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        if dtype == "bfloat16":
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
    model.to(torch.float32)
    return model, dtype


@torch.no_grad()
def greedy(model, prompt, max_new_tokens):
    """Argmax loop over full forward passes. Returns (tokens, last_logits, decode_logits, margin)."""
    ids = list(prompt)
    out, last_logits, decode_logits, margin = [], None, None, float("inf")
    for step in range(max_new_tokens):
        logits = model(torch.tensor([ids], dtype=torch.long)).logits[0, -1].to(torch.float32)
        if step == 0:
            last_logits = logits.clone()
        decode_logits = logits.clone()
        top = torch.topk(logits, 2).values
        margin = min(margin, float(top[0] - top[1]))
        nxt = int(torch.argmax(logits))
        out.append(nxt)
        ids.append(nxt)
    return out, last_logits, decode_logits, margin


@torch.no_grad()
def hf_generate(model, prompt, max_new_tokens):
    """transformers' own greedy generation (do_sample=False), EOS disabled."""
    input_ids = torch.tensor([prompt], dtype=torch.long)
    try:
        model.generation_config.eos_token_id = None
    except Exception:  # noqa: BLE001
        pass
    gen = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=None,
                         pad_token_id=0, num_beams=1)
    return gen[0, len(prompt):].tolist()


def make_prompts(model1):
    rng = random.Random(77)

    def toks(n):
        return [rng.randrange(TOKEN_LOW, TOKEN_HIGH) for _ in range(n)]

    prompts, notes = [], []

    def add(p, note):
        prompts.append(list(p))
        notes.append(note)

    system = toks(36)
    p0 = system + toks(8)
    add(p0, "system prompt (36) + question")
    add(system + toks(13), "same system prompt, other question (shared prefix)")
    ans0, _, _, _ = greedy(model1, p0, MAX_NEW_TOKENS)
    p2 = p0 + ans0 + toks(9)
    add(p2, "turn 2: prompt 0 + its greedy answer + follow-up")
    ans2, _, _, _ = greedy(model1, p2, MAX_NEW_TOKENS)
    add(p2 + ans2 + toks(6), "turn 3: prompt 2 + its greedy answer + follow-up")
    doc = toks(180)
    add(doc + toks(7), "long document (180) + question: many segments")
    add(doc + toks(11), "same long document, other question")
    add(toks(5), "short prompt (shorter than a segment)")
    add(toks(1), "one-token prompt")
    add(doc + prompts[4][180:], "exact repeat of the long prompt")
    add(doc[:32], "exactly two 16-token segments, all of it cached before")
    add(system, "exactly the system prompt")
    add(system + toks(40) + toks(3), "system prompt + a new 43-token tail")
    return prompts, notes


def rewrite_rope_form(config_path):
    with open(config_path) as f:
        cfg = json.load(f)
    if "rope_parameters" in cfg and cfg["rope_parameters"]:
        theta = cfg["rope_parameters"]["rope_theta"]
        del cfg["rope_parameters"]
        cfg["rope_theta"] = theta
        cfg["rope_scaling"] = None
        form = "rope_theta (rewritten from rope_parameters)"
    else:
        theta = cfg.pop("rope_theta")
        cfg.pop("rope_scaling", None)
        cfg["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
        form = "rope_parameters (rewritten from rope_theta)"
    with open(config_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    return form


def safetensors_summary(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(4)
    log("torch", torch.__version__, "transformers", transformers.__version__)

    models = {name: build_model(spec) for name, spec in MODELS.items()}
    prompts, notes = make_prompts(models["model"][0])
    with open(os.path.join(args.out, "prompts.jsonl"), "w") as f:
        for p in prompts:
            f.write(json.dumps({"input_ids": p}) + "\n")

    expected = {
        "max_new_tokens": MAX_NEW_TOKENS,
        "segment_tokens_hint": SEGMENT_TOKENS_HINT,
        "notes": notes,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "models": {},
    }
    readme_models = []
    for name, (model, dtype) in models.items():
        log("model", name)
        entry = {"greedy": [], "last_logits": [], "decode_logits": [], "min_margin": [],
                 "generate_matches_argmax_loop": []}
        for i, p in enumerate(prompts):
            toks, last, dec, margin = greedy(model, p, MAX_NEW_TOKENS)
            try:
                gen = hf_generate(model, p, MAX_NEW_TOKENS)
                match = gen == toks
            except Exception as e:  # noqa: BLE001 - record, keep the argmax loop as the truth
                log("  generate() failed:", repr(e))
                gen, match = None, None
            log(f"  prompt {i} len {len(p)} greedy {toks} margin {margin:.4g} generate_match {match}")
            if match is False:
                log("  WARNING generate() gave", gen)
            entry["greedy"].append(toks)
            entry["last_logits"].append([float(x) for x in last.tolist()])
            entry["decode_logits"].append([float(x) for x in dec.tolist()])
            entry["min_margin"].append(margin)
            entry["generate_matches_argmax_loop"].append(match)
        expected["models"][name] = entry

        d = os.path.join(args.out, name)
        os.makedirs(d, exist_ok=True)
        save_model = model
        if dtype == "bfloat16":
            save_model = model.to(torch.bfloat16)
        save_model.save_pretrained(d, safe_serialization=True)
        for fn in os.listdir(d):
            if fn not in ("config.json", "model.safetensors"):
                os.remove(os.path.join(d, fn))
        form = "as written by save_pretrained"
        if name == "tied_bf16":
            form = rewrite_rope_form(os.path.join(d, "config.json"))
        tensors = safetensors_summary(os.path.join(d, "model.safetensors"))
        log("  tensors:", json.dumps(tensors))
        with open(os.path.join(d, "config.json")) as f:
            cfg_text = f.read()
        log("  config.json:", cfg_text)
        readme_models.append(
            f"- `{name}/`: {MODELS[name]['num_hidden_layers']} layers, hidden "
            f"{MODELS[name]['hidden_size']}, {MODELS[name]['num_attention_heads']} heads / "
            f"{MODELS[name]['num_key_value_heads']} KV heads, vocab {MODELS[name]['vocab_size']}, "
            f"{dtype} weights, tied embeddings {MODELS[name]['tie_word_embeddings']}, rope "
            f"theta {MODELS[name]['rope_theta']} (config form: {form}); {len(tensors)} tensors; "
            f"smallest greedy top-1/top-2 logit gap {min(entry['min_margin']):.4g}.")

    with open(os.path.join(args.out, "expected.json"), "w") as f:
        json.dump(expected, f)

    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write("# llama_tiny: the engine's correctness fixture\n\n")
        f.write("Generated by `tools/make_llama_fixture.py --out DIR` (no download: random-init\n")
        f.write("models from fixed seeds), run on CPU in float32 with\n")
        f.write(f"torch {torch.__version__}, transformers {transformers.__version__}, "
                f"python {platform.python_version()}.\n\n")
        f.write("\n".join(readme_models) + "\n")
        f.write(f"- `prompts.jsonl`: {len(prompts)} prompts (JSON lines `{{\"input_ids\": [...]}}`):\n")
        for i, (p, n) in enumerate(zip(prompts, notes)):
            f.write(f"  {i}. {len(p)} tokens: {n}\n")
        f.write(f"- `expected.json`: per model and prompt, `greedy` ({MAX_NEW_TOKENS} tokens of\n"
                "  greedy decoding, generate(do_sample=False) checked against a plain argmax loop),\n"
                "  `last_logits` (at the last prompt position), `decode_logits` (at the last fed\n"
                "  position), `min_margin` (smallest top-1 minus top-2 logit gap).\n")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
