"""Golden hidden states from Hugging Face transformers' own forward pass.

Runs on a machine that has torch and transformers (the GPU machines do; this one cannot install
them). For each tiny checkpoint made by `axis-model tiny --arch A --seed 3 --merges 2000`, writes
<out>/<arch>.safetensors with
  hidden_states [num_layers, seq, hidden]  each decoder block's output (a forward hook on
                                           model.model.layers[l]: before the final norm)
  logits        [seq, vocab]
computed in float64 on the CPU and stored as float32, and <out>/golden.json with, per arch, the
checkpoint's sha256 (so a test can tell a changed checkpoint from a wrong graph) and greedy
generations: each prompt alone, and the prompts together as one left-padded batch.

usage: python3 make_golden.py <dir with one checkpoint per arch> <out dir>
"""
import hashlib
import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

IDS = [5, 300, 17, 901, 44, 1500, 2, 77, 640, 1200, 9, 333]
PROMPTS = [[5, 300, 17, 901, 44], [1500, 2, 77, 640, 1200, 9, 333, 12, 48], [700]]
NEW_TOKENS = 10
PAD = 0


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def main(ckpts, out):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    summary = {}
    for arch in sorted(os.listdir(ckpts)):
        path = os.path.join(ckpts, arch)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="eager").eval()
        except Exception as err:  # report and go on with the other architectures
            print(arch, "does not load in transformers:", repr(err)[:2000], flush=True)
            continue
        print(arch, "config as transformers reads it:", model.config.to_json_string(use_diff=True), flush=True)
        layers = model.model.layers
        captured = {}

        def hook(index):
            def keep(_module, _inputs, output):
                captured[index] = (output[0] if isinstance(output, tuple) else output).detach()
            return keep

        handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
        with torch.no_grad():
            result = model(input_ids=torch.tensor([IDS]), use_cache=False)
        for h in handles:
            h.remove()
        hidden = torch.stack([captured[i][0] for i in range(len(layers))]).to(torch.float32).contiguous()
        logits = result.logits[0].to(torch.float32).contiguous()
        save_file({"hidden_states": hidden, "logits": logits}, os.path.join(out, f"{arch}.safetensors"))

        # Greedy generation, its stop tokens from generation_config.json.
        def generate(batch):
            width = max(len(p) for p in batch)
            ids = torch.tensor([[PAD] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            with torch.no_grad():
                gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=PAD)
            return [row[width:].tolist() for row in gen]

        alone = [generate([p])[0] for p in PROMPTS]
        together = generate(PROMPTS)
        model = model.to(torch.float32)
        alone32 = [generate([p])[0] for p in PROMPTS]
        together32 = generate(PROMPTS)
        meta = {
            "arch": arch,
            "checkpoint_sha256": sha256(os.path.join(path, "model.safetensors")),
            "ids": IDS,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "eos_token_id": model.generation_config.eos_token_id,
            "prompts": PROMPTS,
            "max_new_tokens": NEW_TOKENS,
            "greedy_alone": alone,
            "greedy_left_padded_batch": together,
            "greedy_alone_f32": alone32,
            "greedy_left_padded_batch_f32": together32,
        }
        summary[arch] = meta
        print(arch, "alone", alone, "batch", together, "alone f32", alone32, "batch f32", together32, flush=True)
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
