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
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (attempt, bench_parser, choices, device_label, emitter, error_text, is_oom,  # noqa: E402
                    kernel_missing,
                    parse_lengths, sdpa_run, settle_args, summary, with_speedup)

import attnswap  # noqa: E402

BENCH = "linear_attention"
GPU_LENGTHS, CPU_LENGTHS, SMOKE_LENGTHS = "1k,2k,4k,8k,16k,32k,64k", "1024,4096,16384", "64"
GPU_DECODE, CPU_DECODE, SMOKE_DECODE = "1k,4k,16k,32k", "256,1024,4096", "16,48"
TABLE = [("mode", "mode"), ("passes", "pass"), ("kind", "kind"), ("impl", "impl"), ("feature_map", "map"),
         ("form", "form"), ("d", "d"), ("b", "batch"), ("n", "N / context"), ("ms", "ms", ".3f"),
         ("speedup", "speedup", ".2f"), ("tokens_per_s", "tok/s", ".1f"), ("cache_bytes", "cache B", ",d"),
         ("cache_ratio", "vs KV", ".4f"), ("peak_mem_mb", "peak MiB", ".0f"), ("error", "error")]


def parse_args(argv=None) -> argparse.Namespace:
    ap = bench_parser(__doc__.splitlines()[0], f"prefill N; default {GPU_LENGTHS} on GPU, {CPU_LENGTHS} on CPU")
    ap.add_argument("--decode-lengths", default=None,
                    help=f"decode context L; default {GPU_DECODE} on GPU, {CPU_DECODE} on CPU")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--modes", default="prefill,decode", help="prefill,engines,decode,batch (engines: ours and fla's "
                    "on the same features, forward and forward + backward; GPU. batch: decode steps of a whole model "
                    "at batch sizes --batches and context --decode-lengths, and --max-batch)")
    ap.add_argument("--engine-dims", default="64,128", help="head dims of the engines mode")
    ap.add_argument("--kinds", default="linear,taylor,window_linear", help="linear,taylor,window_linear")
    ap.add_argument("--form", default="auto", choices=("auto", "quadratic", "linear_time"),
                    help="the form option of the kinds (auto picks linear_time on long inputs)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--model", default="tiny", choices=("tiny", "default", "llama-1b"),
                    help="decode model: tiny (SmolLM2's attention layout, random), default (SmolLM2-135M), llama-1b "
                         "(Llama 3.2 1B's shape, random weights: 16 layers, 32 heads, 8 KV heads, d 64)")
    ap.add_argument("--batches", default=None, help="batch sizes of the batch mode; default 1,16,64 on GPU, 1,4 on CPU")
    ap.add_argument("--max-batch", type=int, default=None,
                    help="batch mode: also find, per attention, the largest batch (doubling up to this) whose decode "
                         "steps fit in memory at each context")
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
    args.modes = choices("--modes", args.modes, ("prefill", "engines", "decode", "batch"))
    args.batches = parse_lengths(args.batches or ("1,16,64" if on_gpu else "1,4"))
    args.engine_dims = [int(x) for x in args.engine_dims.split(",") if x]
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


# ---------------------------------------------------------------- engines (same inputs as fla)

def fla_ops() -> dict:
    """flash-linear-attention's ops by name (``fla-core``, carried to the GPU machine as its wheel), or {} when it is
    not installed."""
    try:
        from fla.ops.based import parallel_based
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception as err:  # noqa: BLE001
        print(f"note: fla rows skipped: {error_text(err)}")
        return {}
    return {"chunk_linear_attn": chunk_linear_attn, "parallel_based": parallel_based}


def _tokens_first(*tensors, groups: int = 1) -> tuple:
    """(b, H, T, K) -> fla's (b, T, H, K), the heads repeated ``groups`` times (fla has no GQA)."""
    return tuple(t.repeat_interleave(groups, dim=1).transpose(1, 2).contiguous() for t in tensors)


def engine_runs(q, k, v, fla: dict) -> list:
    """(kind, impl, options, inputs, fn(*inputs) -> out (b, Hq, T, dv) or fla's (b, T, Hq, dv)) of every engine, each
    on inputs prepared outside the clock: our chunk-parallel engine and fla's ``chunk_linear_attn`` on the same
    ELU+1 and Hedgehog features (fla: tokens first, K/V heads repeated for GQA), our two Taylor forms and fla's
    ``parallel_based`` on q/k/v (scale 1/sqrt(d), causal), our ``window_linear`` kernel (64 window keys, 4 sinks,
    Hedgehog), and our ``softmax`` kernel, the baseline, first."""
    from attnswap.kernels.linear_parallel import parallel_linear_attention
    from attnswap.kinds.linear import FEATURE_MAPS

    groups = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5
    runs = [("softmax", "triton", {}, (q, k, v),
             lambda q, k, v: attnswap.attention(q, k, v, "softmax", causal=True, impl="triton"))]
    for name in ("elu", "hedgehog"):
        phi = FEATURE_MAPS[name]
        fq, fk = phi(q.float()).to(q.dtype), phi(k.float()).to(k.dtype)
        runs.append(("linear", "engine", {"feature_map": name}, (fq, fk, v),
                     lambda fq, fk, v: parallel_linear_attention(fq, fk, v, causal=True, eps=0.0)))
        if fla:
            runs.append(("linear", "fla_chunk_linear_attn", {"feature_map": name},
                         (*_tokens_first(fq), *_tokens_first(fk, v, groups=groups)),
                         lambda fq, fk, v: fla["chunk_linear_attn"](fq, fk, v, scale=1.0, normalize=True)[0]))
    for form in ("quadratic", "linear_time"):
        runs.append(("taylor", "triton", {"form": form}, (q, k, v),
                     lambda q, k, v, form=form: attnswap.attention(q, k, v, "taylor", causal=True, impl="triton",
                                                                   form=form, scaling=scale)))
    runs.append(("window_linear", "triton", {}, (q, k, v),
                 lambda q, k, v: attnswap.attention(q, k, v, "window_linear", causal=True, impl="triton",
                                                    scaling=scale)))
    if fla:
        runs.append(("taylor", "fla_parallel_based", {}, (*_tokens_first(q), *_tokens_first(k, v, groups=groups)),
                     lambda q, k, v: fla["parallel_based"](q, k, v, scale=scale, use_norm=True)))
    return runs


def engines(args, device: str, emit) -> None:
    """Forward and forward + backward of each engine at each N and head dim (``--engine-dims``), same inputs; our
    ``softmax`` kernel is the baseline of its (N, d, pass). Our kernels and fla's are Triton: a GPU, or the
    interpreter (TRITON_INTERPRET=1) for a smoke run without fla."""
    if not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        print("note: engines skipped: our kernels and fla's need a GPU (or TRITON_INTERPRET=1 for a smoke run)")
        return
    fla = fla_ops() if device.startswith("cuda") else {}
    b, hq, hkv = args.batch, args.heads, args.kv_heads
    for d in args.engine_dims:
        for n in args.lengths:
            g = torch.Generator(device=device).manual_seed(n + d)
            q = torch.randn(b, hq, n, d, device=device, dtype=args.dtype, generator=g)
            k, v = (torch.randn(b, hkv, n, d, device=device, dtype=args.dtype, generator=g) for _ in range(2))
            for passes in ("fwd", "fwd+bwd"):
                base = None
                for i, (kind, impl, options, inputs, fn) in enumerate(engine_runs(q, k, v, fla)):
                    got = attempt(_timed_pass(fn, inputs, passes), device, args)
                    base = got.get("ms") if i == 0 else base
                    row = dict(bench=BENCH, mode="engines", passes=passes, kind=kind, impl=impl, b=b, hq=hq,
                               hkv=hkv, n=n, d=d, causal=True, **got, baseline="softmax (triton)",
                               baseline_ms=base, **options)
                    emit(with_speedup(row))
            del q, k, v
            if device.startswith("cuda"):
                torch.cuda.empty_cache()


def _timed_pass(fn, inputs, passes: str):
    """The callable a row times: ``fn(*inputs)`` under no_grad, or forward + backward (a fixed random upstream
    gradient) into leaves made once."""
    if passes == "fwd":
        def forward():
            with torch.no_grad():
                return fn(*inputs)
        return forward
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    upstream = {}

    def train():
        out = fn(*leaves)
        if "do" not in upstream:
            upstream["do"] = torch.randn_like(out)
        out.backward(upstream["do"])
        for t in leaves:
            t.grad = None
    return train


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


def llama_1b(max_positions: int, layers: int | None = None):
    """A random Llama with Llama 3.2 1B's shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, head dim 64, MLP 8192;
    a 32000-word vocabulary): ~1.0B parameters. ``layers`` shortens it (smoke runs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers or 16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         max_position_embeddings=max_positions, rope_theta=500000.0, tie_word_embeddings=True,
                         pad_token_id=0, bos_token_id=1, eos_token_id=None)
    return LlamaForCausalLM(config).eval()


def decode_model(args, device: str, max_positions: int):
    """(model on ``device`` in ``--dtype`` with sdpa attention, its name)."""
    if args.model == "llama-1b":
        layers = args.layers if args.smoke else None
        model = llama_1b(max_positions, layers)
        model.config._attn_implementation = "sdpa"
        return model.to(device=device, dtype=args.dtype), f"llama-1b-shape-{model.config.num_hidden_layers}L"
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


# ---------------------------------------------------------------- batch: decoding a whole model at a batch size

def filled_kv_cache(model, batch: int, context: int, device: str):
    """A ``DynamicCache`` holding ``context`` random keys and values per layer (the model's own attention at that
    context, without running its prefill: what a decode step reads and what memory holds are the same)."""
    from transformers import DynamicCache

    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache = DynamicCache(config=cfg)
    dtype = next(model.parameters()).dtype
    for layer in range(cfg.num_hidden_layers):
        k, v = (torch.randn(batch, cfg.num_key_value_heads, context, d, device=device, dtype=dtype)
                for _ in range(2))
        cache.update(k, v, layer)
    return cache


def state_cache_after_prompt(model, batch: int, device: str, prompt: int = 16):
    """An ``attnswap.StateCache`` after a ``prompt``-token prefill: a state's size and a decode step's work do not
    depend on how many tokens went into it (``window_linear`` keeps at most its sinks + window of K/V)."""
    cache = attnswap.StateCache(model)
    ids = torch.randint(2, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(batch))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        model(input_ids=ids.to(device), past_key_values=cache, use_cache=True)
    return cache


def step_ms(model, cache, batch: int, context: int, steps: int, device: str) -> float:
    """Median ms of a greedy decode step (one new token per row) through ``model`` with ``cache``, positions from
    ``context`` on; the first step is a warm-up."""
    tok = torch.full((batch, 1), 5, dtype=torch.long, device=device)
    times = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        for t in range(steps + 1):
            pos = torch.full((batch, 1), context + t, dtype=torch.long, device=device)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            logits = model(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True).logits
            tok = logits[:, -1:].argmax(-1)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[1:])


def batch_decode_one(model, kind: str | None, batch: int, context: int, args, device: str) -> dict:
    """{ms per step, tokens/s over the batch, cache bytes, peak MiB} of one attention at one batch and context, or
    the error (out of memory recorded as such)."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        if kind is None:
            cache = filled_kv_cache(model, batch, context, device)
            ms = step_ms(model, cache, batch, context, args.new_tokens, device)
            size = kv_cache_bytes(cache)
        else:
            with attnswap.swapped(model, kind):
                cache = state_cache_after_prompt(model, batch, device)
                ms = step_ms(model, cache, batch, context, args.new_tokens, device)
                size = cache.nbytes()
    except Exception as err:  # noqa: BLE001
        return {"ms": None, "error": ("out of memory: " if is_oom(err) else "") + error_text(err)}
    finally:
        cache = None
    return {"ms": ms, "tokens_per_s": batch * 1e3 / ms, "cache_bytes": int(size),
            "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None}


def largest_batch(model, kind: str | None, context: int, args, device: str) -> tuple[int, dict]:
    """The largest batch (1, 2, 4, ... up to ``--max-batch``) whose decode steps ran, and that run's figures."""
    best, figures, batch = 0, {}, 1
    while batch <= args.max_batch:
        got = batch_decode_one(model, kind, batch, context, args, device)
        if got.get("ms") is None:
            break
        best, figures, batch = batch, got, batch * 2
    return best, figures


def batch_decode(args, device: str, emit) -> None:
    """Decode steps of the whole ``--model`` at each context and batch: the model's own attention with its K/V
    cache (filled to the context) against each kind with ``attnswap.StateCache``; then, with ``--max-batch``, the
    largest batch each fits."""
    max_positions = max(args.decode_lengths) + args.new_tokens + 8
    model, model_name = decode_model(args, device, max_positions)
    cfg = model.config
    common = dict(bench=BENCH, hq=cfg.num_attention_heads, hkv=cfg.num_key_value_heads, causal=True,
                  model=model_name, layers=cfg.num_hidden_layers, d=getattr(cfg, "head_dim", None),
                  params=sum(p.numel() for p in model.parameters()), steps=args.new_tokens)
    for context in args.decode_lengths:
        for batch in args.batches:
            base = batch_decode_one(model, None, batch, context, args, device)
            emit(with_speedup(dict(common, mode="batch", kind="own", impl="sdpa+kv", b=batch, n=context,
                                   baseline=None, baseline_ms=None, **base)))
            for kind in args.kinds:
                got = batch_decode_one(model, kind, batch, context, args, device)
                row = dict(common, mode="batch", kind=kind, impl="state", b=batch, n=context,
                           baseline="own attention (sdpa, K/V cache)", baseline_ms=base.get("ms"), **got)
                kv = base.get("cache_bytes")
                row["cache_ratio"] = row["cache_bytes"] / kv if kv and row.get("cache_bytes") else None
                emit(with_speedup(row))
        if args.max_batch:
            own = None
            for kind in [None, *args.kinds]:
                best, figures = largest_batch(model, kind, context, args, device)
                own = best if kind is None else own
                emit(dict(common, mode="max_batch", kind=kind or "own", impl="state" if kind else "sdpa+kv", n=context,
                          b=best, max_batch_tried=args.max_batch, batch_vs_own=best / own if own else None,
                          ms=figures.get("ms"), tokens_per_s=figures.get("tokens_per_s"),
                          peak_mem_mb=figures.get("peak_mem_mb")))


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
        if "engines" in args.modes:
            engines(args, device, emit)
        if "decode" in args.modes:
            decode(args, device, emit)
        if "batch" in args.modes:
            batch_decode(args, device, emit)
    finally:
        torch.set_num_threads(threads_before)
    summary(rows, TABLE, args, label)
    return rows


if __name__ == "__main__":
    main()
