"""Speed of the linear-time kinds (``linear``, ``taylor``, ``window_linear``): prefill time against N versus
our ``softmax`` kernel and SDPA, and decode tokens/s and cache memory against the context length, on a GPU and
on the CPU.

    python benchmarks/linear_attention.py [--modes prefill,decode] [--lengths 1k,4k,16k] [--device cpu --threads 2]
    python benchmarks/linear_attention.py --smoke --device cpu          # tiny sizes, seconds

prefill: ``attnswap.attention`` causal with SmolLM2's shape (b = 1, Hq = 9, Hkv = 3, d = 64). GPU: bf16, our
kernels (``--impl triton``), against our ``softmax`` kernel (the baseline) and SDPA's flash backend; CPU: fp32,
the PyTorch paths (``--impl torch``), against the ``softmax`` reference and SDPA. speedup = baseline_ms / ms.

decode: a model (``--model tiny``: a random Llama with SmolLM2's head layout; ``--model default``: SmolLM2-135M)
swapped to each kind generates ``--new-tokens`` tokens after a context of L tokens with ``attnswap.StateCache``
(its recurrent state; for ``window_linear`` also its sink and window K/V); the baseline is the
same model on its own attention with a ``DynamicCache``. Recorded: ms per decoded token (the steps after the
first, clocked at each step), tokens/s, prefill ms, cache bytes and their ratio to the KV cache. Skipped with a note while ``attnswap.StateCache`` does not exist.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (attempt, bench_parser, choices, device_label, emitter, error_text, kernel_missing,  # noqa: E402
                    parse_lengths, sdpa_run, settle_args, summary, with_speedup)

import attnswap  # noqa: E402

BENCH = "linear_attention"
GPU_LENGTHS, CPU_LENGTHS, SMOKE_LENGTHS = "1k,2k,4k,8k,16k,32k,64k", "1024,4096,16384", "64"
GPU_DECODE, CPU_DECODE, SMOKE_DECODE = "1k,4k,16k,32k", "256,1024,4096", "16,48"
TABLE = [("mode", "mode"), ("kind", "kind"), ("impl", "impl"), ("n", "N / context"), ("ms", "ms", ".3f"),
         ("speedup", "speedup", ".2f"), ("tokens_per_s", "tok/s", ".1f"), ("cache_bytes", "cache B", ",d"),
         ("cache_ratio", "vs KV", ".4f"), ("peak_mem_mb", "peak MiB", ".0f"), ("error", "error")]


def parse_args(argv=None) -> argparse.Namespace:
    ap = bench_parser(__doc__.splitlines()[0], f"prefill N; default {GPU_LENGTHS} on GPU, {CPU_LENGTHS} on CPU")
    ap.add_argument("--decode-lengths", default=None,
                    help=f"decode context L; default {GPU_DECODE} on GPU, {CPU_DECODE} on CPU")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--modes", default="prefill,decode", help="prefill,decode")
    ap.add_argument("--kinds", default="linear,taylor,window_linear", help="linear,taylor,window_linear")
    ap.add_argument("--form", default="auto", choices=("auto", "quadratic", "linear_time"),
                    help="the form option of the kinds (auto picks linear_time on long inputs)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--model", default="tiny", choices=("tiny", "default"), help="decode model")
    ap.add_argument("--layers", type=int, default=4, help="layers of the tiny decode model")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens decoded per run; GPU 64, CPU 16")
    args = ap.parse_args(argv)
    on_gpu = settle_args(args, gpu_lengths=GPU_LENGTHS, cpu_lengths=CPU_LENGTHS, smoke_lengths=SMOKE_LENGTHS)
    if args.smoke:
        args.decode_lengths = args.decode_lengths or SMOKE_DECODE
        args.new_tokens = args.new_tokens or 4
        args.layers = min(args.layers, 1)
    args.decode_lengths = parse_lengths(args.decode_lengths or (GPU_DECODE if on_gpu else CPU_DECODE))
    args.new_tokens = args.new_tokens or (64 if on_gpu else 16)
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be >= 2 (decode speed is clocked between steps)")
    if args.heads % args.kv_heads:
        raise SystemExit(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    args.modes = choices("--modes", args.modes, ("prefill", "decode"))
    args.kinds = choices("--kinds", args.kinds, ("linear", "taylor", "window_linear"))
    return args


# ---------------------------------------------------------------- prefill

def prefill(args, device: str, emit) -> None:
    """Causal forward of every kind at each N, against softmax (our kernel on a GPU, the reference on a CPU)."""
    for n in args.lengths:
        prefill_length(n, args, device, emit)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def prefill_length(n: int, args, device: str, emit) -> None:
    """The rows of one N (its tensors are freed on return)."""
    b, hq, hkv, d = args.batch, args.heads, args.kv_heads, args.head_dim
    base_impl = "triton" if device.startswith("cuda") else "torch"
    g = torch.Generator(device=device).manual_seed(n)
    q = torch.randn(b, hq, n, d, device=device, dtype=args.dtype, generator=g)
    k, v = (torch.randn(b, hkv, n, d, device=device, dtype=args.dtype, generator=g) for _ in range(2))
    runs = [("softmax", base_impl, {}, lambda: attnswap.attention(q, k, v, "softmax", causal=True,
                                                                   impl=base_impl)),
            ("softmax", "sdpa_flash" if device.startswith("cuda") else "sdpa", {}, sdpa_run(q, k, v, device))]
    for kind in args.kinds:
        why = kernel_missing(kind, args.impl, device)
        if why:
            print(f"note: prefill of {kind} skipped: {why}")
            continue
        runs.append((kind, args.impl, {"form": args.form},
                     lambda kind=kind: attnswap.attention(q, k, v, kind, causal=True, impl=args.impl,
                                                          form=args.form)))
    results = []
    with torch.no_grad():
        for kind, impl, options, fn in runs:
            results.append((kind, impl, options, attempt(fn, device, args)))
    base = results[0][3].get("ms")
    flops = 2 * b * hq * n * n * d
    for i, (kind, impl, options, got) in enumerate(results):
        row = dict(bench=BENCH, kind=kind, impl=impl, b=b, hq=hq, hkv=hkv, n=n, d=d, causal=True,
                   mode="prefill", **got,
                   tflops=flops / got["ms"] * 1e-9 if kind == "softmax" and got.get("ms") else None,
                   baseline=None if i == 0 else f"softmax ({base_impl})", baseline_ms=None if i == 0 else base,
                   threads=torch.get_num_threads() if device == "cpu" else None, **options)
        emit(with_speedup(row))


# ---------------------------------------------------------------- decode

def tiny_llama(args, max_positions: int):
    """A random Llama with SmolLM2's attention layout (9 heads, 3 KV heads, head dim 64), ``--layers`` deep."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=args.heads * args.head_dim, intermediate_size=1536,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
                         max_position_embeddings=max_positions, rope_theta=100000.0, tie_word_embeddings=True,
                         pad_token_id=0, bos_token_id=1, eos_token_id=None)
    return LlamaForCausalLM(config).eval()


def decode_model(args, device: str, max_positions: int):
    """(model on ``device`` in ``--dtype`` with sdpa attention, its name)."""
    if args.model == "default":
        from attnswap.default_model import NAME, load_default_model

        model, _ = load_default_model(attn_implementation="sdpa", dtype=args.dtype)
        return model.to(device), NAME
    model = tiny_llama(args, max_positions)
    model.config._attn_implementation = "sdpa"
    return model.to(device=device, dtype=args.dtype), f"tiny-llama-{args.layers}L"


def kv_cache_bytes(cache) -> int:
    """Bytes of the keys and values a transformers ``DynamicCache`` holds."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.nbytes
    return total


def timed_generate(model, ids, cache, new_tokens: int, device: str) -> dict:
    """Generate ``new_tokens`` greedily into ``cache``; clock every step (a logits processor runs once per step).

    Returns prefill_ms (the first step: the whole context and the first token) and ms per later token.
    """
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps = []

    class StepClock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            return scores

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                       logits_processor=LogitsProcessorList([StepClock()]))
    if len(stamps) < 2:
        raise RuntimeError(f"generate stopped after {len(stamps)} step(s); expected {new_tokens}")
    return {"prefill_ms": (stamps[0] - start) * 1e3, "ms": (stamps[-1] - stamps[0]) * 1e3 / (len(stamps) - 1)}


def decode_one(model, ids, make_cache, cache_bytes, args, device: str) -> dict:
    """Median over ``--repeats`` generations of ms per token and prefill ms, the cache bytes and peak memory."""
    timed_generate(model, ids[:, : min(ids.shape[1], 16)], make_cache(), 2, device)  # warm-up
    runs, cache = [], None
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(max(args.repeats, 1)):
        cache = make_cache()
        runs.append(timed_generate(model, ids, cache, args.new_tokens, device))
    ms = statistics.median(r["ms"] for r in runs)
    return {"ms": ms, "tokens_per_s": 1e3 / ms, "prefill_ms": statistics.median(r["prefill_ms"] for r in runs),
            "cache_bytes": int(cache_bytes(cache)),
            "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None}


def decode(args, device: str, emit) -> None:
    """Tokens/s and cache bytes against context L: each kind on ``attnswap.StateCache`` vs softmax + DynamicCache."""
    state_cache = getattr(attnswap, "StateCache", None)
    if state_cache is None:
        print("note: decode skipped: attnswap.StateCache (the recurrent-state cache) does not exist yet")
        return
    from transformers import DynamicCache

    max_positions = max(args.decode_lengths) + args.new_tokens + 8
    model, model_name = decode_model(args, device, max_positions)
    cfg = model.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    common = dict(bench=BENCH, b=1, hq=hq, hkv=hkv, d=d, causal=True, mode="decode", tflops=None, model=model_name,
                  layers=cfg.num_hidden_layers, new_tokens=args.new_tokens)
    for length in args.decode_lengths:
        g = torch.Generator().manual_seed(length)
        ids = torch.randint(2, cfg.vocab_size, (1, length), generator=g).to(device)
        try:
            base = decode_one(model, ids, DynamicCache, kv_cache_bytes, args, device)
        except Exception as err:  # noqa: BLE001
            base = {"ms": None, "error": error_text(err)}
        emit(with_speedup(dict(common, kind="softmax", impl="sdpa", n=length, baseline=None, baseline_ms=None,
                               **base)))
        for kind in args.kinds:
            try:
                with attnswap.swapped(model, kind) as handle:
                    if handle.kind.decodes_with_state:
                        got = decode_one(model, ids, lambda: state_cache(model), lambda c: c.nbytes(), args, device)
                    else:  # a kind without a state decodes with K/V
                        got = decode_one(model, ids, DynamicCache, kv_cache_bytes, args, device)
            except Exception as err:  # noqa: BLE001
                got = {"ms": None, "error": error_text(err)}
            kv = base.get("cache_bytes")
            row = dict(common, kind=kind, impl="auto", n=length, baseline="softmax (sdpa, DynamicCache)",
                       baseline_ms=base.get("ms"), baseline_cache_bytes=kv, **got)
            row["cache_ratio"] = row["cache_bytes"] / kv if kv and row.get("cache_bytes") else None
            emit(with_speedup(row))
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- main

def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = args.device
    threads_before = torch.get_num_threads()
    if args.threads and device == "cpu":
        torch.set_num_threads(args.threads)
    label = device_label(device)
    rows = []
    emit = emitter(args, label, rows, widths=(8, 11), vs="speedup")
    try:
        if "prefill" in args.modes:
            prefill(args, device, emit)
        if "decode" in args.modes:
            decode(args, device, emit)
    finally:
        torch.set_num_threads(threads_before)
    summary(rows, TABLE, args, label)
    return rows


if __name__ == "__main__":
    main()
