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


def record(device_file: str, **fields) -> dict:
    """Append one measurement to ``benchmarks/results/<device_file>.jsonl``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    fields.setdefault("commit", commit())
    with open(RESULTS / f"{device_file}.jsonl", "a") as f:
        f.write(json.dumps(fields) + "\n")
    return fields
