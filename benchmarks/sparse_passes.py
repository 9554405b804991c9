"""Streamed sweeps of the sparse kinds' threshold searches on real attention scores: how many times a query block
recomputes its q.k scores over the keys before the attention pass itself.

    python benchmarks/sparse_passes.py [--kinds topk,entmax] [--layers 2,15,28] [--n 2048] [--heads 0,4,8]
                                       [--k 64] [--alphas 1.5,2] [--last 128]
    python benchmarks/sparse_passes.py --smoke          # a tiny random llama, seconds

Inputs: q, k of layers ``--layers`` of SmolLM2-135M on the default text (``sparse_attention.capture_qkv``; b = 1,
Hq = 9, Hkv = 3, d = 64), causal, the first ``--n`` tokens; the query heads ``--heads`` with their KV heads;
``--last L``: only the last L queries (the longest rows; query i at key position n - L + i), all by default.
``topk``: its threshold kernel alone; ``entmax`` (each of ``--alphas``, 2 = sparsemax): the whole forward
(threshold passes, then the output pass over the active key blocks), its output checked against the float64
reference. On a CPU in the Triton interpreter (TRITON_INTERPRET=1 is set here), whose tiles are 16 x 16, so a
query block is 16 rows.

One row per (kind, alpha, layer): ``threshold_passes`` (the median over query blocks of their streamed passes over
the keys before the attention, every pass counted), ``threshold_passes_max``; topk also ``passes`` (the mean after
the first sweep), ``fallback_rows``, ``sweep_block_fraction`` (key blocks the histogram and collection sweeps
visited), ``skipped_block_fraction`` (key blocks holding no kept key) and ``max_err`` (largest |threshold - the
reference's|); entmax
``skipped_block_fraction``, ``zero_weight_fraction`` and ``max_err`` (largest |output - the float64 reference's|).
Each kind is a function ``<kind>_rows(q, k, v, args) -> rows``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before triton is imported: the kernels run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import choices, device_label, emitter, summary  # noqa: E402

BENCH = "sparse_passes"
KINDS = ("topk", "entmax")
TABLE = [("kind", "kind"), ("layer", "layer"), ("n", "N"), ("k", "k"), ("threshold_passes", "median sweeps", ".1f"),
         ("threshold_passes_max", "max sweeps", ".0f"), ("alpha", "alpha"), ("passes", "mean after 1st", ".2f"),
         ("fallback_rows", "fallback rows", "d"), ("skipped_block_fraction", "skipped blocks", ".2f"), ("rows", "rows", "d"), ("max_err", "max err", ".2g"),
         ("ms", "ms", ".0f")]


def parse_args(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="topk,entmax", help=",".join(KINDS))
    ap.add_argument("--layers", default="2,15,28", help="SmolLM2 layers (early, middle, late)")
    ap.add_argument("--n", type=int, default=2048, help="tokens (queries = keys, causal)")
    ap.add_argument("--heads", default="0,4,8", help="query heads (each with its KV head)")
    ap.add_argument("--k", type=int, default=64, help="k of the topk kind")
    ap.add_argument("--alphas", default="1.5,2", help="alphas of the entmax kind (2 = sparsemax)")
    ap.add_argument("--last", type=int, default=0, help="only the last L queries (0: all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="a tiny random llama, n = 64: seconds")
    ap.add_argument("--out", default=None, help="folder of the JSON lines (default benchmarks/results)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    args.kinds = choices("--kinds", args.kinds, KINDS)
    if args.smoke:
        args.layers, args.n, args.heads, args.k = "0,1", min(args.n, 64), "0,3", min(args.k, 8)
        args.last = min(args.last, 32) if args.last else 0
    args.layers = [int(x) for x in args.layers.split(",") if x]
    args.heads = [int(x) for x in args.heads.split(",") if x]
    args.alphas = [float(x) for x in args.alphas.split(",") if x]
    if args.last < 0 or args.last > args.n:
        raise SystemExit(f"--last {args.last}: must be in [0, --n = {args.n}]")
    args.dtype = torch.float32
    return args


# ---------------------------------------------------------------- inputs

def tiny_llama():
    """A random 2-layer llama (4 query heads, 2 KV heads, head dim 32) and a vocabulary size: the smoke input."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval(), cfg.vocab_size


def model_inputs(args):
    """(model, input ids (1, n), model name): SmolLM2 on the default text, or the tiny llama on random ids."""
    if args.smoke:
        model, vocab = tiny_llama()
        return model, torch.randint(2, vocab, (1, args.n), generator=torch.Generator().manual_seed(0)), "tiny-llama"
    from attnswap.default_model import NAME, load_default_model
    from attnswap.evals.corpus import default_text

    model, tok = load_default_model(attn_implementation="sdpa", dtype=args.dtype)
    ids = tok(default_text(), return_tensors="pt").input_ids
    if ids.shape[1] < args.n:
        ids = ids.repeat(1, -(-args.n // ids.shape[1]))
    return model, ids[:, :args.n], NAME


def head_slice(q, k, v, heads):
    """q (1, Hq, n, d), k, v (1, Hkv, n, d) -> the query heads ``heads`` and a copy of each one's KV head, so the
    selected heads run in one call with Hq == Hkv."""
    groups = q.shape[1] // k.shape[1]
    bad = [h for h in heads if not 0 <= h < q.shape[1]]
    if bad:
        raise SystemExit(f"--heads {bad}: the model has {q.shape[1]} query heads")
    kv = [h // groups for h in heads]
    return q[:, heads].contiguous(), k[:, kv].contiguous(), v[:, kv].contiguous()


def last_queries(q, args):
    """(the queries measured, their causal offset): the last ``--last`` rows of q, or all of them."""
    last = args.last or q.shape[2]
    return q[:, :, q.shape[2] - last:].contiguous(), q.shape[2] - last


def reference_scores(q, k, offset=0):
    """float64 causal scores (b, H, n, m) (-inf where key j > i + offset) of q, k with one KV head per query head."""
    s = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    n, m = s.shape[-2:]
    return s.masked_fill(torch.ones(n, m, dtype=torch.bool, device=s.device).triu(1 + offset), float("-inf"))


# ---------------------------------------------------------------- one function per kind

def topk_rows(q, k, v, args) -> list[dict]:
    """The topk threshold kernel alone (``kth_threshold``) on q, k: its sweep statistics, and its largest error
    against the k-th largest causal score of the float64 reference."""
    from attnswap.kernels.topk import kth_threshold

    q, offset = last_queries(q, args)
    t0 = time.perf_counter()
    thr, stats = kth_threshold(q, k, k_top=args.k, scaling=q.shape[-1] ** -0.5, causal=True, offset=offset,
                               return_stats=True)
    ms = (time.perf_counter() - t0) * 1e3
    s = reference_scores(q, k, offset)
    want = s.topk(min(args.k, s.shape[-1]), -1).values[..., -1]
    seen = torch.arange(s.shape[-2], device=s.device) + offset + 1
    want = torch.where(seen > args.k, want, float("-inf"))
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(thr)), "rows that keep everything differ from the reference"
    err = float((thr.double() - want)[finite].abs().max()) if finite.any() else 0.0
    return [{"k": args.k, "alpha": None, "ms": ms, "rows": int(finite.sum()), "max_err": err,
             **{key: stats[key] for key in ("threshold_passes", "threshold_passes_max", "passes", "fallback_rows",
                                            "kept_fraction", "sweep_block_fraction", "skipped_block_fraction")}}]


def entmax_rows(q, k, v, args) -> list[dict]:
    """The entmax forward (threshold passes and output pass) on q, k, v, for each alpha: its pass statistics and
    its largest error against the float64 reference (``attnswap.kinds.entmax.entmax_weights``)."""
    from attnswap.kernels.entmax import entmax_attention
    from attnswap.kinds.entmax import entmax_weights

    q, offset = last_queries(q, args)
    s = reference_scores(q, k, offset)
    rows = []
    for alpha in args.alphas:
        t0 = time.perf_counter()
        with torch.no_grad():
            o, stats = entmax_attention(q, k, v, alpha=alpha, scaling=q.shape[-1] ** -0.5, causal=True,
                                        offset=offset, return_stats=True)
        ms = (time.perf_counter() - t0) * 1e3
        want = entmax_weights(s.clone(), None, alpha) @ v.double()
        rows.append({"k": None, "alpha": alpha, "ms": ms, "rows": q.shape[1] * q.shape[2],
                     "max_err": float((o.double() - want).abs().max()),
                     **{key: stats[key] for key in ("threshold_passes", "threshold_passes_max",
                                                    "skipped_block_fraction", "zero_weight_fraction")}})
    return rows


ROWS = {"topk": topk_rows, "entmax": entmax_rows}


# ---------------------------------------------------------------- main

def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    from sparse_attention import capture_qkv

    label = device_label(args.device)
    rows = []
    emit = emitter(args, label, rows, widths=(6, 6), vs="vs")
    model, ids, model_name = model_inputs(args)
    model.to(args.device)
    for layer in args.layers:
        q, k, v = capture_qkv(model, ids.to(args.device), layer)
        q, k, v = head_slice(q, k, v, args.heads)
        for kind in args.kinds:
            for found in ROWS[kind](q, k, v, args):
                emit({"bench": BENCH, "kind": kind, "impl": "triton", "model": model_name,
                      "mode": "threshold" if kind == "topk" else "forward",
                      "layer": layer, "heads": args.heads, "b": q.shape[0], "hq": q.shape[1], "hkv": k.shape[1],
                      "n": q.shape[2], "queries": args.last or q.shape[2], "d": q.shape[3], "causal": True,
                      "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
                      "tflops": None, "peak_mem_mb": None, "baseline": None, "baseline_ms": None, "speedup": None,
                      **found})
    summary(rows, TABLE, args, label)
    return rows


if __name__ == "__main__":
    main()
