"""What the ``softmax`` swap costs on a perplexity run: SmolLM2-135M, CPU, against the model's own sdpa
attention measured in the same run (interleaved repeats, medians).

    python benchmarks/perplexity_overhead.py [--tokens 4096] [--max-length 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import attnswap
from attnswap.default_model import load_default_model
from attnswap.evals.corpus import default_text
from attnswap.evals.perplexity import perplexity
from common import device_name, record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_default_model(attn_implementation="sdpa")
    ids = tok(default_text(), return_tensors="pt").input_ids[:, : args.tokens]
    times = {"sdpa": [], "softmax": []}
    ppl = {}
    perplexity(model, ids[:, : args.max_length], max_length=args.max_length)  # warm-up
    for _ in range(args.repeats):
        for label in ("sdpa", "softmax"):
            with attnswap.swapped(model, "softmax") if label == "softmax" else _nothing():
                t0 = time.perf_counter()
                ppl[label] = perplexity(model, ids, max_length=args.max_length).ppl
                times[label].append(time.perf_counter() - t0)
    base, ours = statistics.median(times["sdpa"]), statistics.median(times["softmax"])
    device, cpu_model = device_name("cpu")
    cfg = model.config
    row = record(device, bench="perplexity_overhead", kind="softmax", impl="torch", device=device,
                 cpu_model=cpu_model, dtype="float32", b=1, hq=cfg.num_attention_heads, hkv=cfg.num_key_value_heads,
                 n=args.max_length, d=cfg.head_dim, causal=True, mode="perplexity", tokens=int(ids.shape[1]),
                 ms=ours * 1e3, baseline="sdpa (the model's own)", baseline_ms=base * 1e3, speedup=base / ours,
                 overhead=ours / base - 1, spread_ms=[min(times["softmax"]) * 1e3, max(times["softmax"]) * 1e3],
                 baseline_spread_ms=[min(times["sdpa"]) * 1e3, max(times["sdpa"]) * 1e3],
                 ppl=ppl["softmax"], baseline_ppl=ppl["sdpa"], repeats=args.repeats, torch=torch.__version__)
    print(f"{ids.shape[1]} tokens, windows of {args.max_length}, {args.repeats} interleaved repeats on {cpu_model}")
    print(f"model's own sdpa: {base:.2f} s   softmax swap: {ours:.2f} s   overhead {100 * (ours / base - 1):+.1f}%")
    print(f"perplexity {ppl['sdpa']:.4f} vs {ppl['softmax']:.4f}; recorded in benchmarks/results/{device}.jsonl")
    return row


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
