"""Shared by the benchmark scripts: the device name, the commit, and appending result lines as SPEC.md says."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0).replace(" ", "-")
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu-{os.cpu_count()}core", model


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def record(device_file: str, *, out_dir: str | os.PathLike | None = None, **fields) -> dict:
    """Append one measurement to ``<out_dir>/<device_file>.jsonl`` (``out_dir`` default ``benchmarks/results``)."""
    folder = Path(out_dir) if out_dir is not None else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    fields.setdefault("commit", commit())
    with open(folder / f"{device_file}.jsonl", "a") as f:
        f.write(json.dumps(fields) + "\n")
    return fields


def device_label(device: str) -> str:
    """The results-file name of a device as one string: the GPU's name, or ``cpu-<N>core``."""
    name = device_name(device)
    return name if isinstance(name, str) else name[0]


def with_speedup(row: dict) -> dict:
    """Set ``speedup = baseline_ms / ms`` when both are measured, else None (SPEC: same run, same formula)."""
    ms, base = row.get("ms"), row.get("baseline_ms")
    row["speedup"] = base / ms if ms and base else None
    return row


def is_oom(err: BaseException) -> bool:
    """True for an out-of-memory error of CUDA or of the CPU allocator."""
    import torch

    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, (RuntimeError, MemoryError)) and (
        isinstance(err, MemoryError) or "out of memory" in text or "can't allocate memory" in text)


def measure(fn, device: str, *, warmup: int = 3, repeats: int = 10, slow_s: float = 2.0) -> tuple[float, float | None]:
    """(median milliseconds of ``fn()`` over ``repeats`` after ``warmup`` calls, peak memory in MiB or None).

    CUDA: timed with events, peak from ``max_memory_allocated`` over the timed calls. CPU: ``perf_counter``;
    no peak (the allocator is not traced). A call slower than ``slow_s`` cuts warmup to 1 and repeats to 3,
    so the long lengths do not eat the run.
    """
    import statistics
    import time

    import torch

    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    if time.perf_counter() - t0 > slow_s:
        warmup, repeats = 0, min(repeats, 3)
    for _ in range(max(warmup - 1, 0)):
        fn()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(max(repeats, 1)):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return statistics.median(times), peak


def parse_lengths(text: str) -> list[int]:
    """``"1024,4k,16k"`` -> [1024, 4096, 16384]; a clear error on anything else."""
    lengths = []
    for part in str(text).split(","):
        part = part.strip().lower()
        scale = 1024 if part.endswith("k") else 1
        try:
            value = int(part[:-1] if scale > 1 else part) * scale
        except ValueError:
            raise SystemExit(f"--lengths takes comma-separated integers (1024,4k,16k), got {text!r}") from None
        if value < 1:
            raise SystemExit(f"--lengths must be >= 1, got {value}")
        lengths.append(value)
    return lengths


DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def parse_dtype(name: str):
    """A torch dtype from ``float32|fp32|bfloat16|bf16|float16|fp16``."""
    import torch

    if name not in DTYPES:
        raise SystemExit(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return getattr(torch, DTYPES[name])


# ---------------------------------------------------------------- shared by the attention benchmark scripts

def bench_parser(description: str, lengths_help: str):
    """The options every attention benchmark takes: device, dtype, lengths, repeats, warmup, smoke, out, no-record
    (the script adds its own)."""
    import argparse

    import torch

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda | cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 (GPU default) | float16 | float32 (CPU default)")
    ap.add_argument("--lengths", default=None, help=lengths_help)
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (median); GPU 10, CPU 3")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--impl", default=None, help="triton (GPU default) | torch (CPU default) | auto")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes that finish in seconds on a CPU")
    ap.add_argument("--out", default=None, help="folder of the JSON lines (default benchmarks/results)")
    ap.add_argument("--no-record", action="store_true")
    return ap


def settle_args(args, *, gpu_lengths: str, cpu_lengths: str, smoke_lengths: str) -> bool:
    """Check ``--device`` and fill the shared defaults (``--smoke``: its lengths, 1 repeat, no warmup); parse
    lengths and dtype, check ``--impl``. Returns whether the run is on a GPU."""
    import torch

    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here; use --device cpu")
    if args.smoke:
        args.lengths = args.lengths or smoke_lengths
        args.repeats = args.repeats or 1
        args.warmup = 0
    args.lengths = parse_lengths(args.lengths or (gpu_lengths if on_gpu else cpu_lengths))
    args.repeats = args.repeats or (10 if on_gpu else 3)
    args.dtype = parse_dtype(args.dtype or ("bfloat16" if on_gpu else "float32"))
    args.impl = args.impl or ("triton" if on_gpu else "torch")
    if args.impl not in ("triton", "torch", "auto"):
        raise SystemExit(f"--impl must be triton, torch or auto, got {args.impl!r}")
    return on_gpu


def choices(flag: str, text: str, valid: tuple) -> list[str]:
    """``"a,b"`` -> ["a", "b"], each one of ``valid``; a SystemExit naming the valid choices otherwise."""
    picked = [p for p in text.split(",") if p]
    bad = [p for p in picked if p not in valid]
    if bad:
        raise SystemExit(f"{flag}: unknown {bad}; valid choices: {','.join(valid)}")
    return picked


def kernel_missing(kind: str, impl: str, device: str) -> str | None:
    """Why ``attnswap.attention(..., impl=impl)`` cannot run ``kind`` (or the kind it aliases) as a kernel here,
    or None when it can."""
    if impl == "torch":
        return None
    from attnswap import registry

    entry = registry.get(kind)
    base = registry.get(entry.alias_of) if entry.alias_of else entry
    if base.kernel is None:
        return f"no Triton kernel for {kind!r} yet (attnswap/kernels/{base.name}.py is missing)"
    if not device.startswith("cuda") and impl == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        return "impl='triton' on a CPU needs TRITON_INTERPRET=1 (the Triton interpreter)"
    return None


def error_text(err: BaseException) -> str:
    """``"OOM"`` for an out-of-memory error, else the error's type and the start of its message."""
    return "OOM" if is_oom(err) else f"{type(err).__name__}: {str(err)[:160]}"


def attempt(fn, device: str, args) -> dict:
    """{ms, peak_mem_mb} of ``measure(fn)`` with ``--warmup``/``--repeats``, or those as None and the error."""
    try:
        ms, peak = measure(fn, device, warmup=args.warmup, repeats=args.repeats)
        return {"ms": ms, "peak_mem_mb": peak}
    except Exception as err:  # noqa: BLE001
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        return {"ms": None, "peak_mem_mb": None, "error": error_text(err)}


def sdpa_run(q, k, v, device: str, causal: bool = True):
    """torch SDPA, causal unless told (the flash backend on a GPU); K/V are expanded for GQA outside the timed
    call. ``causal=False`` for decode rows (one query after every key: SDPA's causal is aligned top-left)."""
    import torch.nn.functional as F

    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))

    def run():
        if device.startswith("cuda"):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def emitter(args, label: str, rows: list, *, widths: tuple[int, int], vs: str):
    """``emit(row)``: add device and dtype, record it (unless ``--no-record``), keep it in ``rows``, print one line
    (kind and impl padded to ``widths``, the speedup after ``vs``)."""
    dtype_name = str(args.dtype).replace("torch.", "")

    def emit(row):
        row = dict(row, device=label, dtype=dtype_name)
        if not args.no_record:
            row = record(label, out_dir=args.out, **row)
        rows.append(row)
        ms = f"{row['ms']:.3f} ms" if row.get("ms") else row.get("error", "-")
        sp = f"{row['speedup']:.2f}x" if row.get("speedup") else "-"
        print(f"{row['mode']:7s} {row['kind']:{widths[0]}s} {row['impl']:{widths[1]}s} n={row['n']:<6d} {ms:>12s} "
              f"{vs} {sp}", flush=True)

    return emit


def summary(rows: list, table, args, label: str) -> None:
    """Print the rows as a table and where they were appended."""
    from attnswap.evals.report import format_table

    print(format_table(rows, table))
    where = Path(args.out) if args.out else RESULTS
    print(f"{len(rows)} rows" + ("" if args.no_record else f" appended to {where / (label + '.jsonl')}"))
