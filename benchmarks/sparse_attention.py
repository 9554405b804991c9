"""Speed and sparsity of the sparse kinds (``entmax``, ``sparsemax``, ``topk``) against our ``softmax`` kernel,
torch SDPA and the ``entmax`` package, all measured in the same run.

    python benchmarks/sparse_attention.py [--modes fwd,fwd_bwd] [--lengths 1k,4k,16k] [--inputs random|smollm2]
    python benchmarks/sparse_attention.py --smoke --device cpu          # tiny sizes, seconds, the torch path

Causal attention, b * H * N = 32k * 16 query rows (H = 2048 // d), head dim 128 by default (bf16 on a GPU).
Rows per (mode, N): ``softmax`` (our kernel: the baseline of every other row), ``sdpa`` (the flash backend on a
GPU), each sparse kind through ``attnswap.attention(..., impl=--impl)``, AdaSplash (``adasplash_v2`` for entmax 1.5,
``adasplash_v1`` for other alphas and sparsemax: causal, N a power of two; its own wheel, ``pip install --no-deps
benchmarks/wheels/adasplash-*.whl``; each AdaSplash row also gives its largest difference from our output, as its
default ``niter`` stops before the exact threshold) and the ``entmax`` package on materialized causal-masked scores
(``entmax_bisect``, ``entmax15``, ``sparsemax``; optional imports; out of memory is recorded as ``error: "OOM"``).
Mode ``decode``: the last query of each row against all N keys (b * H rows of one query; AdaSplash and the package
have no decode form). Sparsity per (kind, N): the fraction of zero weights among the visible
ones and of skipped (all-zero) 64x64 blocks, and the threshold passes over the keys before the output pass, from the
kernel's ``return_stats=True`` when it has one, else from the PyTorch reference on the last ``--sparsity-rows``
queries of the first batch row.

``--inputs smollm2`` takes q, k, v of one layer of SmolLM2-135M on the default text (b = 1, Hq = 9, Hkv = 3,
d = 64): random q, k give near-uniform scores and so unrepresentative sparsity. TFLOP/s use the dense causal
softmax count (fwd = 2 b H N^2 D, fwd+bwd = 3.5 x fwd) for every row, so they compare work per second.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (attempt, bench_parser, choices, device_label, emitter, kernel_missing, sdpa_run,  # noqa: E402
                    settle_args, summary, with_speedup)

import attnswap  # noqa: E402

BENCH = "sparse_attention"
GPU_LENGTHS = "1k,2k,4k,8k,16k,32k,64k"
CPU_LENGTHS = "256,512,1024"
SMOKE_LENGTHS = "64"
CAPTURE_KIND = "bench_capture"
TABLE = [("mode", "mode"), ("kind", "kind"), ("impl", "impl"), ("n", "N"), ("ms", "ms", ".3f"),
         ("tflops", "TFLOP/s", ".3g"), ("speedup", "vs softmax", ".2f"), ("zero_weight_fraction", "zero w", ".3f"),
         ("skipped_block_fraction", "skip blk", ".3f"), ("kept_fraction", "kept", ".3f"),
         ("threshold_passes", "passes", ".1f"), ("max_abs_diff_vs_ours", "diff", ".1e"),
         ("peak_mem_mb", "peak MiB", ".0f"), ("error", "error")]


def parse_args(argv=None) -> argparse.Namespace:
    ap = bench_parser(__doc__.splitlines()[0], f"N values; default {GPU_LENGTHS} on GPU, {CPU_LENGTHS} on CPU")
    ap.add_argument("--modes", default="fwd,fwd_bwd", help="fwd,fwd_bwd,decode")
    ap.add_argument("--kinds", default="entmax,sparsemax,topk", help="entmax,sparsemax,topk")
    ap.add_argument("--alpha", type=float, default=1.5, help="entmax alpha")
    ap.add_argument("--topk", type=int, default=64, help="k of the topk kind")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rows", type=int, default=32768 * 16, help="b * H * N, held fixed across N (b >= 1)")
    ap.add_argument("--baselines", default="softmax,sdpa,adasplash,entmax_pkg",
                    help="softmax,sdpa,adasplash,entmax_pkg")
    ap.add_argument("--inputs", default="random", choices=("random", "smollm2"))
    ap.add_argument("--layer", type=int, default=15, help="the SmolLM2 layer whose q/k/v --inputs smollm2 takes")
    ap.add_argument("--qkv-file", default=None,
                    help="--inputs smollm2: read q/k/v from this .pt file when it exists, else capture and write "
                         "them there (carries real inputs to a machine without the model)")
    ap.add_argument("--sparsity-rows", type=int, default=128, help="queries of the reference sparsity slice")
    ap.add_argument("--block", type=int, default=64, help="block size of the reference skipped-block fraction")
    ap.add_argument("--no-sparsity", action="store_true")
    args = ap.parse_args(argv)
    settle_args(args, gpu_lengths=GPU_LENGTHS, cpu_lengths=CPU_LENGTHS, smoke_lengths=SMOKE_LENGTHS)
    if args.smoke:
        args.rows = min(args.rows, 2 * 4 * 96)
        args.head_dim = 32 if args.head_dim == 128 else args.head_dim
        args.sparsity_rows = min(args.sparsity_rows, 32)
        args.block = min(args.block, 16)
    args.modes = choices("--modes", args.modes, ("fwd", "fwd_bwd", "decode"))
    args.kinds = choices("--kinds", args.kinds, ("entmax", "sparsemax", "topk"))
    args.baselines = choices("--baselines", args.baselines, ("softmax", "sdpa", "adasplash", "entmax_pkg"))
    return args


def kind_options(kind: str, args) -> dict:
    """The options of a kind as this run uses them."""
    return {"entmax": {"alpha": args.alpha}, "topk": {"k": args.topk}}.get(kind, {})


# ---------------------------------------------------------------- inputs

def random_inputs(n: int, args, device: str):
    """q, k, v (b, H, n, d) ~ N(0, 1), H = 2048 // d (at least 2), b = rows // (H n) (at least 1)."""
    d = args.head_dim
    h = max(2, 2048 // d) if not args.smoke else 4
    b = max(1, args.rows // (h * n))
    g = torch.Generator(device=device).manual_seed(n)
    return tuple(torch.randn(b, h, n, d, device=device, dtype=args.dtype, generator=g) for _ in range(3))


class _Captured(Exception):
    """Raised by the capture kind to stop the model's forward once the layer's q/k/v are taken."""


def capture_qkv(model, input_ids: torch.Tensor, layer: int):
    """q (b,Hq,n,d), k, v (b,Hkv,n,d) as attention layer ``layer`` of ``model`` receives them on ``input_ids``.

    Swaps that layer for a kind that records its inputs and stops the forward there (the later layers and the
    logits are never computed, so long inputs stay cheap).
    """
    taken = {}

    def record_inputs(query, key, value, vis, **kw):
        taken["qkv"] = (query.detach(), key.detach(), value.detach())
        raise _Captured

    attnswap.register_kind(CAPTURE_KIND, forward=record_inputs, doc="benchmarks: records q/k/v", overwrite=True)
    with attnswap.swapped(model, CAPTURE_KIND, layers=[layer]), torch.no_grad():
        try:
            model(input_ids=input_ids, use_cache=False)
        except _Captured:
            pass
    if "qkv" not in taken:
        raise RuntimeError(f"layer {layer} of {type(model).__name__} never ran its attention")
    return taken["qkv"]


def smollm2_inputs(n_max: int, args, device: str):
    """q/k/v of layer ``args.layer`` of SmolLM2-135M on the default text (tiled when shorter than ``n_max``), or
    from ``args.qkv_file`` when it holds them (written there after a capture)."""
    path = Path(args.qkv_file) if args.qkv_file else None
    key = f"layer{args.layer}-n{n_max}"
    saved = torch.load(path) if path is not None and path.exists() else {}
    if key in saved:
        return tuple(t.to(device, args.dtype) for t in saved[key])
    q, k, v = _capture_smollm2(n_max, args, device)
    if path is not None:
        saved[key] = tuple(t.detach().to("cpu", torch.bfloat16) for t in (q, k, v))
        torch.save(saved, path)
        print(f"note: q/k/v of {key} written to {path}")
    return q, k, v


def _capture_smollm2(n_max: int, args, device: str):
    from attnswap.default_model import load_default_model
    from attnswap.evals.corpus import default_text

    model, tok = load_default_model(attn_implementation="sdpa", dtype=args.dtype)
    model.to(device)
    ids = tok(default_text(), return_tensors="pt").input_ids
    if ids.shape[1] < n_max:
        print(f"note: the default text has {ids.shape[1]} tokens; tiled to {n_max} (repeats lower the sparsity "
              "of later rows)")
        ids = ids.repeat(1, -(-n_max // ids.shape[1]))
    q, k, v = capture_qkv(model, ids[:, :n_max].to(device), args.layer)
    del model
    return q, k, v


# ---------------------------------------------------------------- the runners

def ours(kind: str, q, k, v, impl: str, options: dict):
    return lambda: attnswap.attention(q, k, v, kind, causal=True, impl=impl, **options)


def entmax_package():
    try:
        import entmax
    except ImportError:
        return None
    return entmax


def package_baselines(kind: str, alpha: float) -> dict:
    """name -> normalize(scores) of the ``entmax`` package for ``kind`` (empty when it is not installed)."""
    pkg = entmax_package()
    if pkg is None:
        return {}
    if kind == "entmax":
        found = {"entmax_bisect": lambda s: pkg.entmax_bisect(s, alpha, dim=-1)}
        if alpha == 1.5:
            found["entmax15"] = lambda s: pkg.entmax15(s, dim=-1)
        return found
    if kind == "sparsemax":
        return {"entmax_bisect": lambda s: pkg.entmax_bisect(s, 2.0, dim=-1),
                "sparsemax_pkg": lambda s: pkg.sparsemax(s, dim=-1)}
    return {}


def adasplash_package():
    try:
        import adasplash
    except ImportError:
        return None
    return adasplash


def adasplash_baselines(kind: str, alpha: float, n: int, d: int) -> dict:
    """name -> run(q, k, v) of AdaSplash for ``kind`` at this shape (empty when it is not installed or cannot take
    it: causal only, N a power of two >= 64, head dim 16-256 a power of two, scaling d^-1/2 as ours here)."""
    pkg = adasplash_package()
    if pkg is None or kind == "topk" or n < 64 or n & (n - 1) or d not in (16, 32, 64, 128, 256):
        return {}
    a = 2.0 if kind == "sparsemax" else alpha
    if a == 1.5:  # AdaSplash-2: histogram threshold, block-sparse kernels (its default niter)
        return {"adasplash_v2": lambda q, k, v: pkg.adasplash_v2(q, k, v)}
    return {"adasplash_v1": lambda q, k, v: pkg.adasplash_v1(q, k, v, alpha=a, is_causal=True)}


def materialized(normalize, q, k, v):
    """Attention with the full (b, H, n, n) causal-masked score matrix: the torch way the package needs."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    n, scale = q.shape[2], q.shape[-1] ** -0.5
    made = {}

    def run():
        if "future" not in made:  # built on the first call, inside the OOM guard (4 GiB at 64k)
            made["future"] = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)
        scores = (q @ k.transpose(-1, -2)) * scale
        scores = scores.masked_fill(made["future"], torch.finfo(scores.dtype).min)
        return normalize(scores) @ v

    return run


def with_backward(forward, tensors):
    """``forward()`` then the backward of a fixed random output gradient; input grads cleared each call."""
    grad_out = {}

    def run():
        for t in tensors:
            t.grad = None
        out = forward()
        if "g" not in grad_out:
            grad_out["g"] = torch.randn_like(out)
        out.backward(grad_out["g"])

    return run


# ---------------------------------------------------------------- sparsity

def kernel_stats(kind: str, q, k, v, options: dict) -> dict | None:
    """The kernel's own sparsity counters (``return_stats=True``), when its module offers them.

    ``entmax_attention(q, k, v, *, alpha, scaling, causal, return_stats)`` and ``topk_attention(q, k, v, *,
    k_top, scaling, causal, return_stats)``; keyword names are matched to the function's signature.
    """
    import importlib
    import inspect

    name, fn_name = {"entmax": ("entmax", "entmax_attention"), "sparsemax": ("entmax", "entmax_attention"),
                     "topk": ("topk", "topk_attention")}[kind]
    try:
        fn = getattr(importlib.import_module(f"attnswap.kernels.{name}"), fn_name, None)
    except ImportError:
        return None
    if fn is None:
        return None
    params = inspect.signature(fn).parameters
    kwargs = {"causal": True, "return_stats": True}
    if "scaling" in params:
        kwargs["scaling"] = q.shape[-1] ** -0.5
    if kind == "topk":
        kwargs[next((p for p in ("k_top", "topk", "top_k") if p in params), "k_top")] = options["k"]
    else:
        kwargs["alpha"] = 2.0 if kind == "sparsemax" else options["alpha"]
    try:
        with torch.no_grad():
            _, stats = fn(q, k, v, **kwargs)
    except Exception as err:  # noqa: BLE001  (an API still in the making: fall back to the reference)
        print(f"note: {name}.{fn_name}(return_stats=True) failed ({type(err).__name__}: {str(err)[:100]}); "
              "sparsity from the reference slice")
        return None
    found = {key: _number(value) for key, value in dict(stats).items()}
    return {key: value for key, value in found.items() if value is not None} | {"sparsity_source": "kernel"}


def _number(value) -> float | None:
    """A plain float of a Python number or a one-element tensor; None for anything else."""
    if isinstance(value, torch.Tensor):
        return float(value.float().mean()) if value.numel() else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def reference_sparsity(kind: str, q, k, v, options: dict, rows: int, block: int) -> dict:
    """Sparsity of the last ``rows`` queries of batch row 0 from the PyTorch reference's weights.

    zero_weight_fraction: zeros among visible (causal) weights; kept_fraction = 1 - that; skipped_block_fraction:
    (block x block) tiles of visible keys whose weights are all zero, over the visible tiles.
    """
    n = q.shape[2]
    rows = min(rows, n)
    qs, ks, vs = q[:1, :, n - rows:], k[:1], v[:1]
    with torch.no_grad():
        _, w = attnswap.attention(qs, ks, vs, kind, causal=True, impl="torch", return_weights=True, **options)
    i = torch.arange(n - rows, n, device=q.device)[:, None]
    visible = torch.arange(n, device=q.device)[None, :] <= i
    nonzero = (w != 0) & visible
    zero_fraction = 1.0 - nonzero.sum().item() / (visible.sum().item() * w.shape[1])
    skipped = _skipped_blocks(nonzero, visible, block)
    return {"zero_weight_fraction": zero_fraction, "kept_fraction": 1.0 - zero_fraction,
            "skipped_block_fraction": skipped, "sparsity_source": f"reference, last {rows} queries of row 0"}


def _skipped_blocks(nonzero: torch.Tensor, visible: torch.Tensor, block: int) -> float:
    """Fraction of visible (block x block) tiles, aligned to absolute positions, holding no nonzero weight."""
    h, rows, n = nonzero.shape[1:]
    pad_r, pad_c = (-rows) % block, (-n) % block
    pad = torch.nn.functional.pad
    nz = pad(nonzero[0].float(), (0, pad_c, pad_r, 0)).reshape(h, -1, block, (n + pad_c) // block, block)
    vis = pad(visible.float(), (0, pad_c, pad_r, 0)).reshape(-1, block, (n + pad_c) // block, block)
    tile_visible = vis.amax(dim=(1, 3)) > 0
    tile_used = nz.amax(dim=(2, 4)) > 0
    total = tile_visible.sum().item() * h
    return ((~tile_used) & tile_visible).sum().item() / total if total else 0.0


def sparsity(kind: str, q, k, v, args) -> dict:
    options = kind_options(kind, args)
    stats = None
    if args.impl != "torch" and kernel_missing(kind, args.impl, q.device.type) is None:
        stats = kernel_stats(kind, q, k, v, options)
    return stats or reference_sparsity(kind, q, k, v, options, args.sparsity_rows, args.block)


# ---------------------------------------------------------------- main

def runs_for(mode: str, q, k, v, args, device: str) -> list[tuple]:
    """(kind, impl, options, callable) of every row of one (mode, N), the softmax baseline first."""
    impl = args.impl
    decode = mode == "decode"
    runs = []
    if "softmax" in args.baselines:
        runs.append(("softmax", impl, {}, ours("softmax", q, k, v, impl, {})))
    if "sdpa" in args.baselines:
        runs.append(("softmax", "sdpa_flash" if device.startswith("cuda") else "sdpa", {},
                     sdpa_run(q, k, v, device, causal=not decode)))
    for kind in args.kinds:
        why = kernel_missing(kind, impl, device)
        options = kind_options(kind, args)
        if why:
            print(f"note: {kind} skipped: {why}")
        else:
            runs.append((kind, impl, options, ours(kind, q, k, v, impl, options)))
        if "adasplash" in args.baselines and not decode and device.startswith("cuda"):
            for name, run in adasplash_baselines(kind, args.alpha, q.shape[2], q.shape[-1]).items():
                runs.append((kind, name, options, (lambda r: lambda: r(q, k, v))(run)))
        if "entmax_pkg" in args.baselines and not decode:
            for name, normalize in package_baselines(kind, args.alpha).items():
                runs.append((kind, name, options, materialized(normalize, q, k, v)))
    if mode == "fwd_bwd":
        runs = [(kind, name, opts, with_backward(fn, (q, k, v))) for kind, name, opts, fn in runs]
    return runs


def bench_length(n: int, qkv, args, device: str, emit) -> None:
    """Every mode and row at length ``n``; the sparsity of each kind once."""
    q, k, v = qkv
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    stats = {}
    if not args.no_sparsity:
        for kind in args.kinds:
            try:
                stats[kind] = sparsity(kind, q, k, v, args)
            except Exception as err:  # noqa: BLE001
                print(f"note: sparsity of {kind} at n={n} not measured ({type(err).__name__}: {str(err)[:100]})")
    for mode in args.modes:
        grad = mode == "fwd_bwd"
        q, k, v = (t.detach().requires_grad_(grad) for t in qkv)
        if mode == "decode":
            q = q[:, :, -1:].contiguous()
        flops = 2 * b * hq * q.shape[2] * n * d * (3.5 if grad else 1.0)
        results = []
        outputs = {}
        for kind, impl, options, fn in runs_for(mode, q, k, v, args, device):
            with torch.set_grad_enabled(grad):
                got = attempt(fn, device, args)
                if mode == "fwd" and kind != "softmax" and "error" not in got:
                    outputs[(kind, impl)] = _output(fn)
            results.append((kind, impl, options, got))
        for kind, impl, _, got in results:  # how far each baseline is from our kernel's output
            mine, theirs = outputs.get((kind, args.impl)), outputs.get((kind, impl))
            if impl != args.impl and mine is not None and theirs is not None and theirs.shape == mine.shape:
                got["max_abs_diff_vs_ours"] = float((theirs.float() - mine.float()).abs().max())
        base = next((got.get("ms") for kind, impl, _, got in results if kind == "softmax" and impl == args.impl), None)
        pkg_ms = {(kind, impl): got.get("ms") for kind, impl, _, got in results if impl not in (args.impl,)}
        for kind, impl, options, got in results:
            is_base = kind == "softmax" and impl == args.impl
            row = dict(bench=BENCH, kind=kind, impl=impl, b=b, hq=hq, hkv=hkv, n=n, queries=q.shape[2], d=d, causal=True,
                       mode=mode,
                       **got, tflops=flops / got["ms"] * 1e-9 if got.get("ms") else None,
                       baseline=None if is_base else f"softmax ({args.impl})", baseline_ms=None if is_base else base,
                       inputs=args.inputs, **options)
            if impl == args.impl and kind != "softmax":
                row.update(stats.get(kind, {}) if mode != "decode" else {})
                for (pkind, pimpl), pms in pkg_ms.items():
                    if pkind == kind and pms:
                        row[f"{pimpl}_ms"] = pms
                        row[f"speedup_vs_{pimpl}"] = pms / got["ms"] if got.get("ms") else None
            emit(with_speedup(row))


def _output(fn):
    """One more call of a forward row, its output kept (None when it fails)."""
    try:
        with torch.no_grad():
            return fn()
    except Exception:  # noqa: BLE001  (already recorded by the timed attempt)
        return None


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = args.device
    if args.impl == "torch":
        print("note: impl=torch: the PyTorch references of attnswap are timed, not the Triton kernels")
    if "adasplash" in args.baselines and adasplash_package() is None:
        print("note: AdaSplash is not installed (pip install --no-deps benchmarks/wheels/adasplash-*.whl): skipped")
    if "entmax_pkg" in args.baselines and entmax_package() is None:
        print("note: the `entmax` package is not installed (pip install entmax): its baselines are skipped")
    label = device_label(device)
    rows = []
    emit = emitter(args, label, rows, widths=(9, 13), vs="vs softmax")

    captured = smollm2_inputs(max(args.lengths), args, device) if args.inputs == "smollm2" else None
    for n in args.lengths:
        if captured is not None:
            qkv = tuple(t[:, :, :n].contiguous() for t in captured)
        else:
            qkv = random_inputs(n, args, device)
        bench_length(n, qkv, args, device, emit)
        del qkv
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    summary(rows, TABLE, args, label)
    return rows


if __name__ == "__main__":
    main()
