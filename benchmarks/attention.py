"""Speed of the Triton ``softmax`` attention kernels on a GPU, against torch SDPA (flash backend) and
flash-attn (when importable), all measured in the same run with ``triton.testing.do_bench``.

    python benchmarks/attention.py [--modes fwd,fwd_bwd,decode] [--dims 64,128] [--max-n 32768] [--quick]

Modes: ``fwd`` and ``fwd_bwd`` (through autograd; needs ``attnswap/kernels/flash_bwd.py``), causal and not,
bf16, N from 1k to 32k with b * H * N = 16k * 32 (H * D = 2048); ``decode``: one query (n = 1) against KV
lengths 1k..128k (b = 1, Hq = 32, Hkv = 8, D = 128, the split-KV path). FLOPs: fwd = 4 b H N^2 D, half when
causal; fwd+bwd = 3.5 x fwd. Prints a table and appends JSON lines to ``benchmarks/results/<device>.jsonl``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import torch

from common import device_name, record


def _flash_attn():
    try:
        from flash_attn import flash_attn_func

        return flash_attn_func
    except Exception:  # noqa: BLE001  (not installed or built for another torch)
        return None


def bench(fn, grad_to_none=None):
    import triton.testing

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none)
    return ms, torch.cuda.max_memory_allocated() / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="fwd,fwd_bwd,decode")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--max-n", type=int, default=32768)
    ap.add_argument("--max-kv", type=int, default=131072)
    ap.add_argument("--quick", action="store_true", help="N in 1k, 4k, 16k only; KV in 1k, 16k, 128k")
    ap.add_argument("--out", default=None, help="folder of the JSON lines (default benchmarks/results)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/attention.py needs a CUDA GPU (the Triton kernels); none found — nothing measured.")
        sys.exit(0)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("benchmarks/attention.py needs Triton; it is not installed.")
        sys.exit(0)

    import attnswap
    import attnswap.kernels  # noqa: F401  (registers the kernel)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    dev = device_name("cuda")
    fa = _flash_attn()
    has_bwd = importlib.util.find_spec("attnswap.kernels.flash_bwd") is not None
    modes = args.modes.split(",")
    dims = [int(x) for x in args.dims.split(",")]
    dtype = torch.bfloat16
    ns = [1024, 2048, 4096, 8192, 16384, 32768]
    kvs = [1024, 4096, 16384, 32768, 65536, 131072]
    if args.quick:
        ns, kvs = [1024, 4096, 16384], [1024, 16384, 131072]
    ns = [n for n in ns if n <= args.max_n]
    kvs = [m for m in kvs if m <= args.max_kv]
    rows = []

    def emit(**f):
        f.update(bench="attention", kind="softmax", device=dev, dtype="bfloat16")
        if f.get("baseline_ms") and f.get("ms"):
            f["speedup"] = f["baseline_ms"] / f["ms"]
        if not args.no_record:
            record(dev, out_dir=args.out, **f)
        rows.append(f)
        tf = f"{f['tflops']:.1f}" if f.get("tflops") is not None else "-"
        sp = f"{f['speedup']:.2f}x" if f.get("speedup") else "-"
        print(f"{f['mode']:8s} {f['impl']:12s} d={f['d']:<4d} causal={str(f['causal']):5s} b={f['b']:<3d} "
              f"h={f['hq']:<3d} n={f['n']:<6d} m={f.get('m', f['n']):<7d} {f['ms']:9.3f} ms {tf:>7s} TFLOP/s "
              f"{f['peak_mem_mb']:9.0f} MB  vs {f.get('baseline')}: {sp}", flush=True)

    if "fwd_bwd" in modes and not has_bwd:
        print("note: attnswap/kernels/flash_bwd.py is missing: fwd_bwd is skipped (the fallback backward is the "
              "PyTorch reference, not a kernel)")
    for d in dims:
        h = 2048 // d
        for causal in (False, True):
            for n in ns:
                b = max(1, 16384 * 32 // (h * n))
                flops = 4 * b * h * n * n * d / (2 if causal else 1)
                g = torch.Generator(device="cuda").manual_seed(0)
                q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype, generator=g) for _ in range(3))
                for mode in ("fwd", "fwd_bwd"):
                    if mode not in modes or (mode == "fwd_bwd" and not has_bwd):
                        continue
                    mult = 1.0 if mode == "fwd" else 3.5
                    for t in (q, k, v):
                        t.requires_grad_(mode == "fwd_bwd")
                    do = torch.randn_like(q)
                    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_(mode == "fwd_bwd")
                                  for t in (q, k, v))

                    def ours():
                        out = attnswap.attention(q, k, v, "softmax", causal=causal, impl="triton")
                        if mode == "fwd_bwd":
                            out.backward(do)

                    def sdpa():
                        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                        if mode == "fwd_bwd":
                            out.backward(do)

                    def flash():
                        out = fa(qt, kt, vt, causal=causal)
                        if mode == "fwd_bwd":
                            out.backward(do.transpose(1, 2))

                    grads = [q, k, v] if mode == "fwd_bwd" else None
                    results = {}
                    for name, fn, gs in (("sdpa_flash", sdpa, grads), ("flash_attn", flash, [qt, kt, vt]),
                                         ("triton", ours, grads)):
                        if name == "flash_attn" and fa is None:
                            continue
                        try:
                            with torch.set_grad_enabled(mode == "fwd_bwd"):
                                results[name] = bench(fn, gs if mode == "fwd_bwd" else None)
                        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                            print(f"{mode} {name} d={d} n={n}: {type(e).__name__}: {str(e)[:120]}")
                            torch.cuda.empty_cache()
                    base = results.get("sdpa_flash")
                    for name, (ms, mem) in results.items():
                        emit(impl=name, b=b, hq=h, hkv=h, n=n, d=d, causal=causal, mode=mode, ms=ms,
                             tflops=mult * flops / ms * 1e-9, peak_mem_mb=mem,
                             baseline=None if name == "sdpa_flash" else "sdpa_flash",
                             baseline_ms=None if (name == "sdpa_flash" or base is None) else base[0])
                del q, k, v, qt, kt, vt, do
                torch.cuda.empty_cache()

    if "decode" in modes:
        b, hq, hkv, d = 1, 32, 8, 128
        for m in kvs:
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(b, hq, 1, d, device="cuda", dtype=dtype, generator=g)
            k, v = (torch.randn(b, hkv, m, d, device="cuda", dtype=dtype, generator=g) for _ in range(2))
            kt, vt, qt = (t.transpose(1, 2).contiguous() for t in (k, v, q))
            fns = {
                "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                "triton": lambda: attnswap.attention(q, k, v, "softmax", causal=True, impl="triton"),
            }
            if fa is not None:
                fns["flash_attn"] = lambda: fa(qt, kt, vt, causal=True)
            results = {}
            with torch.no_grad():
                for name, fn in fns.items():
                    try:
                        results[name] = bench(fn)
                    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                        print(f"decode {name} m={m}: {type(e).__name__}: {str(e)[:120]}")
            base = results.get("sdpa")
            kv_bytes = 2 * b * hkv * m * d * 2
            for name, (ms, mem) in results.items():
                emit(impl=name, b=b, hq=hq, hkv=hkv, n=1, m=m, d=d, causal=True, mode="decode", ms=ms, tflops=None,
                     gbps=kv_bytes / ms * 1e-6, peak_mem_mb=mem, baseline=None if name == "sdpa" else "sdpa",
                     baseline_ms=None if (name == "sdpa" or base is None) else base[0])
            del q, k, v, kt, vt, qt
            torch.cuda.empty_cache()
    print(f"{len(rows)} measurements" + ("" if args.no_record else f" appended to benchmarks/results/{dev}.jsonl"))


if __name__ == "__main__":
    main()
