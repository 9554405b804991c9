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
