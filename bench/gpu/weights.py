"""Random bf16 weights in a real model's shape, written on the device (nothing can be downloaded
there), over the base checkpoint `engine.js base` wrote (tokenizer, chat template, special ids).

  python weights.py --preset llama-3.2-1b|llama-3.2-3b|llama-3.1-8b|gemma-2-9b --ckpt DIR [--seed 0]

The shapes are the published configs' (depth, widths, heads, rope, soft caps); the vocabulary is
the base tokenizer's (GPT-2's merges and the family's special tokens, about 50k), not the real
one's. Weights are drawn as the project's tiny checkpoints draw them (services/model/tiny.ts):
norms around 1 (Gemma: around 0, it multiplies by 1 + w), matrices with a deviation scaled by
1/sqrt(hidden) so that activations stay in range. Shards of at most 4 GiB with the index file
transformers and `axis-model build` read.
"""
import argparse
import json
import math
import os

import torch
from safetensors.torch import save_file

LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
PRESETS = {
    "llama-3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "rope_theta": 500000.0, "rope_scaling": {**LLAMA3_ROPE, "factor": 32.0}, "tie_word_embeddings": True},
    "llama-3.2-3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 500000.0, "rope_scaling": {**LLAMA3_ROPE, "factor": 32.0}, "tie_word_embeddings": True},
    "llama-3.1-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 500000.0, "rope_scaling": {**LLAMA3_ROPE, "factor": 8.0}, "tie_word_embeddings": False},
    "gemma-2-9b": {"hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "sliding_window": 4096, "rope_theta": 10000.0, "tie_word_embeddings": True},
}
SHARD_BYTES = 4 * 2**30
TINY_HIDDEN = 64  # the tiny checkpoints' width, against which deviations are scaled


def tensors(config, arch):
    """(name, shape, std, mean) of every tensor, in the names Hugging Face uses."""
    d, i, h, kv = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or d // h
    norm = 0.0 if arch == "gemma2" else 1.0
    yield "model.embed_tokens.weight", (config["vocab_size"], d), 0.15 if arch == "gemma2" else 1.0, 0.0
    for l in range(config["num_hidden_layers"]):
        p = f"model.layers.{l}"
        norms = ["input_layernorm", "post_attention_layernorm"] + (["pre_feedforward_layernorm", "post_feedforward_layernorm"] if arch == "gemma2" else [])
        for n in norms:
            yield f"{p}.{n}.weight", (d,), 0.1, norm
        yield f"{p}.self_attn.q_proj.weight", (h * hd, d), 0.15, None
        yield f"{p}.self_attn.k_proj.weight", (kv * hd, d), 0.15, None
        yield f"{p}.self_attn.v_proj.weight", (kv * hd, d), 0.15, None
        yield f"{p}.self_attn.o_proj.weight", (d, h * hd), 0.15, None
        yield f"{p}.mlp.gate_proj.weight", (i, d), 0.15, None
        yield f"{p}.mlp.up_proj.weight", (i, d), 0.15, None
        yield f"{p}.mlp.down_proj.weight", (d, i), 0.1, None
    yield "model.norm.weight", (d,), 0.1, norm
    if not config["tie_word_embeddings"]:
        yield "lm_head.weight", (config["vocab_size"], d), 0.3, None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--ckpt", required=True, help="the base checkpoint directory (engine.js base), completed in place")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    path = os.path.join(args.ckpt, "config.json")
    config = json.load(open(path))
    arch = config["model_type"]
    want = "gemma2" if args.preset.startswith("gemma") else "llama"
    if arch != want:
        raise SystemExit(f"--preset {args.preset} needs a {want} base checkpoint, {path} is {arch}")
    config.update(PRESETS[args.preset])
    config.update({"_name_or_path": f"random-{args.preset}", "torch_dtype": "bfloat16", "max_position_embeddings": 8192})
    scale = math.sqrt(TINY_HIDDEN / config["hidden_size"])
    specs = list(tensors(config, arch))
    groups, size = [[]], 0
    for spec in specs:
        n = math.prod(spec[1]) * 2
        if size + n > SHARD_BYTES and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += n
    old = os.path.join(args.ckpt, "model.safetensors")
    if os.path.exists(old):
        os.remove(old)
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    weight_map, total = {}, 0
    # One shard in memory at a time: drawn on the GPU, written, let go.
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name, shape, std, mean in group:
            if mean is None:
                std, mean = std * scale, 0.0
            shard[name] = (torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32) * std + mean).to(torch.bfloat16).cpu()
            total += shard[name].numel() * 2
            weight_map[name] = file
        save_file(shard, os.path.join(args.ckpt, file), metadata={"format": "pt"})
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, open(os.path.join(args.ckpt, "model.safetensors.index.json"), "w"), indent=2)
    json.dump(config, open(path, "w"), indent=2)
    print(f"wrote {args.preset}: {total / 2**30:.1f} GiB of bf16 weights in {len(groups)} shards, vocabulary {config['vocab_size']}")


if __name__ == "__main__":
    main()
