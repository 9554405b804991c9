"""Shared by the kernels: interpreter detection, autotune configs, and pruning configs to the shape."""

from __future__ import annotations

import os

import torch
import triton

# the one config the Triton interpreter (CPU tests) uses
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def candidates(choices: list) -> list:
    """The autotune candidates, largest first: all of them, or with ``ATTNSWAP_AUTOTUNE=0`` only the first and the
    last (the smallest, which every shape can take): two compiles per key instead of up to ten, for test runs on
    a GPU where many shapes each compile their own kernels."""
    if os.environ.get("ATTNSWAP_AUTOTUNE", "1") == "0" and len(choices) > 2:
        return [choices[0], choices[-1]]
    return list(choices)


def configs(shapes) -> list:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) tuples -> autotune configs (one small one in the interpreter)."""
    if interpreting():
        return [triton.Config(dict(INTERPRETER_BLOCKS), num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in candidates(shapes)]


def pruner(heavy, spills_wide=(), variant_spills=None):
    """An ``early_config_prune`` that drops tiles larger than the sequence lengths (rounded up to a power of two),
    for wide heads (padded head dim >= 256) or fp32 inputs the configs ``heavy(bm, bn, stages)`` flags, and the
    (BLOCK_M, BLOCK_N, num_warps, num_stages) measured to spill registers on sm_90 (``benchmarks/compile_stats.py``):
    ``spills_wide`` for padded head dims >= 128; ``variant_spills`` {constexpr flag: (at any head dim, at >= 128)}
    for the launches that set that flag (a variant that holds more per tile, e.g. ``HAS_THRESHOLD``)."""
    variants = dict(variant_spills or {})

    def spilling(key, d_pad, flags):
        if d_pad >= 128 and key in spills_wide:
            return True
        return any(flags.get(flag) and (key in every or (d_pad >= 128 and key in wide))
                   for flag, (every, wide) in variants.items())

    def prune(configs, named_args, **kwargs):
        n, m = named_args["N_Q"], named_args["N_K"]
        d_pad = kwargs.get("D_PAD", named_args.get("D_PAD", 128))
        flags = {flag: kwargs.get(flag, named_args.get(flag, False)) for flag in variants}
        tight = d_pad >= 256 or named_args["Q"].dtype == torch.float32
        cap_m, cap_n = max(16, triton.next_power_of_2(n)), max(16, triton.next_power_of_2(m))
        kept = [c for c in configs
                if c.kwargs["BLOCK_M"] <= cap_m and c.kwargs["BLOCK_N"] <= cap_n
                and not (tight and heavy(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages))
                and not spilling((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages), d_pad,
                                 flags)]
        return kept or [triton.Config(dict(INTERPRETER_BLOCKS), num_warps=2, num_stages=1)]

    return prune
