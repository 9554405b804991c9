"""What attnswap's dispatch costs on top of the path it dispatches to, per call (CPU, and CUDA when present).

Each pair is timed in one run, in alternating rounds (microseconds per call, the fastest round of each; the overhead
is their difference):
- ``attention``: ``attnswap.attention(q, k, v, "softmax", causal=True)`` against the torch call it makes
  (``F.scaled_dot_product_attention`` with the same arguments: the GQA group's queries as one KV head's rows for a
  decode call, ``is_causal`` and ``enable_gqa`` for a prefill), and the same for ``topk`` with k >= the keys (plain
  softmax, routed to SDPA too);
- ``backend``: the function a swapped transformers layer calls (``attnswap_softmax`` from ``AttentionInterface``,
  on a real llama layer with GQA) against the same torch call, and transformers' own ``sdpa_attention_forward``
  beside it (``transformers_sdpa_us``).
Shapes: decode (one query against ``--kv`` keys) and prefill (``--prefill`` queries and keys, causal).

    python benchmarks/dispatch_overhead.py [--device cpu|cuda] [--kv 64,1024,4096] [--prefill 512,2048] [--calls 300]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import attnswap
from common import device_label, parse_lengths, record

BENCH = "dispatch_overhead"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kv", default="64,1024,4096", help="key lengths of the decode calls")
    ap.add_argument("--prefill", default="512,2048", help="lengths of the prefill calls")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--calls", type=int, default=300, help="timed calls per function (decode; prefill takes fewer)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: the overhead, not the parallel speedup)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and few calls (tests)")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--out", default=None, help="folder for the JSONL rows (default benchmarks/results)")
    return ap.parse_args(argv)


def time_pair(ours, theirs, device: str, calls: int, rounds: int = 21) -> tuple[float, float, float]:
    """Microseconds per call of ``ours`` and ``theirs``, each the fastest of ``rounds`` rounds of ``calls`` calls, the
    two alternating (on a shared machine noise only ever adds time: the minimum is the steadiest estimate of a cost),
    and their difference."""
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def per_call(fn):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        return (time.perf_counter() - t0) / calls * 1e6

    for fn in (ours, theirs):  # warm-up (first calls build caches, compile kernels)
        for _ in range(3):
            fn()
    a, b = [], []
    for i in range(rounds):
        for fn, times in ((ours, a), (theirs, b)) if i % 2 == 0 else ((theirs, b), (ours, a)):
            times.append(per_call(fn))
    return min(a), min(b), min(a) - min(b)


def tiny_layer(heads: int, kv_heads: int, head_dim: int, device: str, dtype):
    """One attention layer of a small llama (for ``module`` and its config) and the two backend functions."""
    from transformers import LlamaConfig
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaAttention

    config = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, num_hidden_layers=1, intermediate_size=64, vocab_size=64)
    config._attn_implementation = "sdpa"
    layer = LlamaAttention(config, layer_idx=0).to(device, dtype).eval()
    return layer, ALL_ATTENTION_FUNCTIONS["attnswap_softmax"], sdpa_attention_forward


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.smoke:
        args.kv, args.prefill, args.calls, args.heads, args.kv_heads, args.head_dim = "64", "32", 3, 4, 2, 16
    torch.manual_seed(0)
    device = args.device
    if device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    b, hq, hkv, d = 1, args.heads, args.kv_heads, args.head_dim
    scaling = d ** -0.5
    layer, ours_backend, own_backend = tiny_layer(hq, hkv, d, device, dtype)
    rows = []
    label = device_label(device)

    def emit(**fields):
        row = dict(bench=BENCH, impl="auto", device=label, dtype=str(dtype).removeprefix("torch."), b=b, hq=hq,
                   hkv=hkv, d=d, threads=torch.get_num_threads() if device == "cpu" else None, tflops=None,
                   peak_mem_mb=None, torch=torch.__version__, **fields)
        row["ms"], row["baseline_ms"] = row["us"] / 1e3, row["baseline_us"] / 1e3
        row["speedup"] = row["baseline_us"] / row["us"]
        if not args.no_record:
            row = record(label, out_dir=args.out, **row)
        rows.append(row)
        own = (f"   (transformers sdpa_attention_forward {row['transformers_sdpa_us']:.1f} us)"
               if "transformers_sdpa_us" in row else "")
        print(f"{row['mode']:8s} {row['kind']:8s} {row['path']:9s} n={row['n']:<5d} m={row['m']:<6d} "
              f"{row['us']:9.1f} us vs torch {row['baseline_us']:9.1f} us   overhead {row['overhead_us']:+7.1f} us{own}")

    shapes = [("decode", 1, m) for m in parse_lengths(args.kv)] + [("prefill", n, n) for n in parse_lengths(args.prefill)]
    with torch.inference_mode():
        for mode, n, m in shapes:
            calls = args.calls if mode == "decode" else max(3, args.calls * 64 // (n * n // 1024 + 64))
            q = torch.randn(b, hq, n, d, device=device, dtype=dtype)
            k = torch.randn(b, hkv, m, d, device=device, dtype=dtype)
            v = torch.randn(b, hkv, m, d, device=device, dtype=dtype)
            if mode == "decode":  # what attnswap runs: the G queries of each KV head as one head's rows
                direct = lambda: F.scaled_dot_product_attention(q.reshape(b, hkv, hq // hkv, d), k, v, scale=scaling)
            else:
                direct = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                                                enable_gqa=True)
            for kind, options in (("softmax", {}), ("topk", {"k": m})):
                ours, base, extra = time_pair(lambda: attnswap.attention(q, k, v, kind, causal=True, **options),
                                              direct, device, calls)
                emit(mode=mode, kind=kind, path="attention", n=n, m=m, us=ours, overhead_us=extra,
                     baseline="F.scaled_dot_product_attention", baseline_us=base, causal=True)
            with attnswap.swapped(layer, "softmax"):  # the layer's private config names attnswap_softmax
                ours, base, extra = time_pair(
                    lambda: ours_backend(layer, q, k, v, None, scaling=scaling, dropout=0.0), direct, device, calls)
                own, _, own_extra = time_pair(
                    lambda: own_backend(layer, q, k, v, None, scaling=scaling, dropout=0.0), direct, device, calls)
            emit(mode=mode, kind="softmax", path="backend", n=n, m=m, us=ours, overhead_us=extra,
                 baseline="F.scaled_dot_product_attention", baseline_us=base, causal=True,
                 transformers_sdpa_us=own, transformers_sdpa_overhead_us=own_extra)
    return rows


if __name__ == "__main__":
    main()
