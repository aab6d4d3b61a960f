"""Hugging Face transformers' half of the GPU proof (bench/gpu/README.md), run on the device by
bench/gpu/run.sh after the engine's half: the same checkpoint, the same GPU, and exactly the token
ids the engine ran (read from its engine.json).

  python hf.py --ckpt DIR --engine engine.json --out hf.json [--repeats 3]

1. correctness: per conversation, each decoder layer's output (a forward hook on
   model.model.layers[i], as the reference pipeline reads it) averaged over the positions the
   engine weighted, and 32 greedy tokens from the prompt;
2. the reference's step 2: a forward pass with hooks at batch 16 over Extract's conversations;
3. generate with a static KV cache over the engine's items, at the engine's slot count (halved
   until it fits), each batch running to its longest budget (min_new_tokens keeps every row going),
   its decoding step compiled once (transformers' default for a static cache; eager if the compile
   fails, as the report says).
"""
import argparse
import base64
import json
import time

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

EXTRACT_BATCH = 16


def b64(t):
    return base64.b64encode(t.detach().float().cpu().numpy().astype(np.float32).tobytes()).decode()


def load(ckpt):
    try:
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    except TypeError:  # transformers before `dtype` was the argument's name
        model = AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.bfloat16)
    return model.to("cuda").eval()


class Means:
    """Forward hooks summing each layer's output over weighted positions: [batch, layers, hidden]."""

    def __init__(self, model):
        self.layers = model.model.layers
        self.weights = None
        self.sums = None
        self.handles = [layer.register_forward_hook(self.hook(i)) for i, layer in enumerate(self.layers)]

    def hook(self, i):
        def fn(_module, _inputs, output):
            h = output[0] if isinstance(output, tuple) else output
            self.sums[:, i] = torch.einsum("bt,btd->bd", self.weights, h.float())

        return fn

    def run(self, model, ids, mask, weights):
        self.weights = weights
        self.sums = torch.zeros(ids.shape[0], len(self.layers), model.config.hidden_size, device="cuda")
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        return self.sums / weights.sum(dim=1).clamp(min=1e-9)[:, None, None]

    def close(self):
        for h in self.handles:
            h.remove()


def padded(rows, left=False, pad=0, width=None):
    width = width or max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        at = width - len(r) if left else 0
        ids[b, at : at + len(r)] = torch.tensor(r)
        mask[b, at : at + len(r)] = 1
    return ids.cuda(), mask.cuda()


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--engine", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    engine = json.load(open(args.engine))
    model = load(args.ckpt)
    log = lambda m: print(f"[hf {time.strftime('%H:%M:%S')}] {m}", flush=True)
    log(f"loaded {args.ckpt} on {torch.cuda.get_device_name(0)}")
    means = Means(model)

    correctness = []
    for c in engine["correctness"]:
        ids, mask = padded([c["ids"]])
        w = torch.tensor([c["weights"]], dtype=torch.float32, device="cuda")
        m = means.run(model, ids, mask, w)[0]
        prompt, pmask = padded([c["prompt_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=pmask, max_new_tokens=len(c["greedy_ids"]) or 1, do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0)
        correctness.append({"greedy_ids": out[0, prompt.shape[1] :].tolist(), "means": [b64(m[i]) for i in range(m.shape[0])]})
    log(f"correctness: {len(correctness)} conversations")

    convs = engine["extract"]["conversations"]
    def extract():
        for at in range(0, len(convs), EXTRACT_BATCH):
            batch = convs[at : at + EXTRACT_BATCH]
            ids, mask = padded([c["ids"] for c in batch])
            w = torch.zeros(ids.shape, dtype=torch.float32, device="cuda")
            for b, c in enumerate(batch):
                w[b, : len(c["weights"])] = torch.tensor(c["weights"])
            means.run(model, ids, mask, w)
    tokens = sum(len(c["ids"]) for c in convs)
    extract()  # warm-up
    extract_seconds = []
    for r in range(args.repeats):
        extract_seconds.append(timed(extract))
        log(f"forward with hooks {r + 1}/{args.repeats}: {tokens} tokens in {extract_seconds[-1]:.2f} s")
    means.close()

    items = engine["generate"]["items"]
    sampling = engine["generate"].get("sampling", {"temperature": 0.7, "topP": 0.9})
    # One compiled decoding step for every batch: transformers compiles the step of a static cache
    # for the cache's shape, and keeps a cache (reset) while a call needs no more rows or length than
    # it holds. So every batch is left-padded to the longest prompt and filled to the full batch
    # (extra rows repeat its first item and are not counted), and the warm-up allocates the cache at
    # the largest length any batch needs; no batch then recompiles inside the timed runs.
    width = max(len(it["prompt_ids"]) for it in items)
    options = {}

    def run_batch(batch, size, new):
        rows = [it["prompt_ids"] for it in batch] + [batch[0]["prompt_ids"]] * (size - len(batch))
        ids, mask = padded(rows, left=True, width=width)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=sampling["temperature"], top_p=sampling["topP"], top_k=0, cache_implementation="static", pad_token_id=0, **options)

    def generate(size):
        for at in range(0, len(items), size):
            batch = items[at : at + size]
            run_batch(batch, size, max(it["budget"] for it in batch))

    def warm_up(size):
        torch.cuda.reset_peak_memory_stats()
        run_batch(items[:size], size, max(it["budget"] for it in items))

    batch = engine["plan"]["slots"]
    while True:
        try:
            warm_up(batch)  # the compile, and whether the batch fits at the longest length
            break
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if batch == 1:
                raise
            log(f"batch {batch} does not fit; trying {batch // 2}")
            batch //= 2
            if hasattr(model, "_cache"):
                del model._cache
        except Exception as err:  # the compile failed (no C compiler for Triton, ...): eager steps
            if options:
                raise
            log(f"generate with the compiled step failed ({type(err).__name__}: {str(err)[:300]}); without compiling")
            options = {"disable_compile": True}
    log(f"generate: batch {batch}, {'eager' if options else 'compiled'} decoding step")
    generate_seconds = []
    for r in range(args.repeats):
        generate_seconds.append(timed(lambda: generate(batch)))
        log(f"generate {r + 1}/{args.repeats}: {len(items)} items at batch {batch} in {generate_seconds[-1]:.2f} s")

    json.dump(
        {
            "gpu": torch.cuda.get_device_name(0),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda},
            "correctness": correctness,
            "extract": {"tokens": tokens, "seconds": extract_seconds, "batch": EXTRACT_BATCH},
            # Useful tokens: each item's budget (a batch's shorter rows run on to its longest: static batching).
            "generate": {"tokens": sum(it["budget"] for it in items), "seconds": generate_seconds, "batch": batch, "compiled": not options, "memory_peak": torch.cuda.max_memory_allocated()},
        },
        open(args.out, "w"),
    )
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
