"""One fused decode step of a feature-map kind's running state (``attnswap.StateCache``, one new token per row).

Per (batch row, KV head) one program reads the state ``S`` (F x dv) and ``z`` (F) once, folds the new key in
(S += phi(k) v^T, z += phi(k), in place, fp32) and writes every query head of the group:
o = phi(q) . S / (phi(q) . z + extra), ``extra`` = eps plus a sink's weight per query head. A padded new token
(``real`` 0 for its row) adds nothing to the state. No host synchronization and no shape that depends on the data:
the step's launch is the same at every position, as a CUDA graph or ``torch.compile`` needs. The features come
from the caller (any map, learned projections included), computed in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tuning import interpreting


@triton.jit
def _step_kernel(FQ, FK, V, S, Z, REAL, EXTRA, O, HKV, GROUP, F, DV, HAS_REAL: tl.constexpr, G_PAD: tl.constexpr,
                 BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)  # batch row x KV head
    hk = pid % HKV
    offs_v = tl.arange(0, BLOCK_V)
    v_ok = offs_v < DV
    offs_g = tl.arange(0, G_PAD)
    g_ok = offs_g < GROUP
    rows = pid.to(tl.int64) * GROUP + offs_g  # the group's query heads
    v = tl.load(V + pid.to(tl.int64) * DV + offs_v, mask=v_ok, other=0.0).to(tl.float32)
    real = 1.0
    if HAS_REAL:
        real = tl.load(REAL + pid // HKV)
    num = tl.zeros([G_PAD, BLOCK_V], dtype=tl.float32)
    den = tl.zeros([G_PAD], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        f_ok = offs_f < F
        fk = tl.load(FK + pid.to(tl.int64) * F + offs_f, mask=f_ok, other=0.0).to(tl.float32) * real
        s_ptr = S + (pid.to(tl.int64) * F + offs_f)[:, None] * DV + offs_v[None, :]
        s_ok = f_ok[:, None] & v_ok[None, :]
        s = tl.load(s_ptr, mask=s_ok, other=0.0) + fk[:, None] * v[None, :]
        tl.store(s_ptr, s, mask=s_ok)
        z_ptr = Z + pid.to(tl.int64) * F + offs_f
        z = tl.load(z_ptr, mask=f_ok, other=0.0) + fk
        tl.store(z_ptr, z, mask=f_ok)
        fq = tl.load(FQ + rows[:, None] * F + offs_f[None, :], mask=g_ok[:, None] & f_ok[None, :],
                     other=0.0).to(tl.float32)
        num = tl.dot(fq, s, num, input_precision="ieee")
        den += tl.sum(fq * z[None, :], 1)
    den = den + tl.load(EXTRA + hk * GROUP + offs_g, mask=g_ok, other=0.0)
    den = tl.where(den == 0.0, 1.0, den)
    tl.store(O + rows[:, None] * DV + offs_v[None, :], num / den[:, None], mask=g_ok[:, None] & v_ok[None, :])


def launch_config(f: int, dv: int, groups: int) -> dict:
    """Tiles and warps of a step: all dv columns and the group's query heads in one program, F in tiles."""
    block_v = max(16, triton.next_power_of_2(dv))
    # F tiles of 32 up to dv 128 (a 64 x 64 tile spilled 432 B of registers on sm_90: benchmarks/compile_stats.py)
    block_f = 16 if interpreting() or block_v > 128 else 32
    return {"G_PAD": max(16, triton.next_power_of_2(groups)), "BLOCK_F": block_f, "BLOCK_V": block_v,
            "num_warps": 1 if interpreting() else 4, "num_stages": 1}


def state_step(fq, fk, v, state, norm, extra, real=None):
    """One decode step: ``fq`` (b, Hkv, G, F), ``fk`` (b, Hkv, F), ``v`` (b, Hkv, dv) the new token's features and
    value; ``state`` (b, Hkv, F, dv) and ``norm`` (b, Hkv, F) fp32 contiguous, updated in place; ``extra`` (Hq,)
    fp32 joins each query head's denominator; ``real`` (b,) (1 = a real new token, 0 = padding) or None.
    Returns o (b, Hq, 1, dv) fp32."""
    b, hkv, groups, f = fq.shape
    dv = v.shape[-1]
    if state.shape != (b, hkv, f, dv) or norm.shape != (b, hkv, f) or state.dtype != torch.float32 \
            or norm.dtype != torch.float32 or not (state.is_contiguous() and norm.is_contiguous()):
        raise ValueError(f"state must be fp32 contiguous ({b}, {hkv}, {f}, {dv}) and norm ({b}, {hkv}, {f}), got "
                         f"{state.dtype} {tuple(state.shape)}, {norm.dtype} {tuple(norm.shape)}")
    out = torch.empty((b, hkv * groups, 1, dv), device=fq.device, dtype=torch.float32)
    if b * hkv:
        real_t = real.float().contiguous() if real is not None else out
        _step_kernel[(b * hkv,)](fq.contiguous(), fk.contiguous(), v.contiguous(), state, norm, real_t,
                                 extra.float().contiguous(), out, hkv, groups, f, dv, HAS_REAL=real is not None,
                                 **launch_config(f, dv, groups))
    return out
