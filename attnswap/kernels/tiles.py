"""Tile primitives every attention kernel shares: score tiles (scaling, softcap), visibility tiles (causal with
offset, sliding window, dense bool mask with any broadcast), the key band of a query block and the query band
of a key block, and the host-side mask views and dot precision rules.

Visibility, everywhere: query i sees key j iff j < N_K and i < N_Q and (not causal or j <= i + offset) and
(no window or j > i + offset - window) and mask[b, h, i, j]. The kernels of every kind call these, so one
kind's kernel never disagrees with another's about which keys a query sees.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tuning import interpreting

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
HEAD_DIMS = (32, 64, 80, 96, 128, 256)


@triton.jit
def tanh(x):
    """tanh via exp2: saturates cleanly to +-1 (exp2 overflow gives inf -> 1), never NaN."""
    e = tl.exp2(x * 2.8853900817779268)
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def scores(q, kt, scale, softcap, HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr):
    """(BLOCK_M, D) x (D, BLOCK_N) -> (scores fp32, tanh term for the softcap chain rule (or the scores))."""
    s = tl.dot(q, kt, input_precision=DOT_PREC) * scale
    t = s
    if HAS_SOFTCAP:
        t = tanh(s / softcap)
        s = softcap * t
    return s, t


@triton.jit
def split_heads(pid, H, GROUPS):
    """A program id over (batch row x head) -> (b, h, the KV head of h's group), all int64 (offsets past 2^31
    elements stay exact); H heads per batch row, GROUPS query heads per KV head (1 for a KV-head grid)."""
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    return b, h, h // GROUPS


@triton.jit
def row_block(pid_m, pid_bh, H, GROUPS, N_Q, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr):
    """A query-block program's coordinates: (b, h, kv head, offs_m, offs_d, row_ok) for query block ``pid_m`` of
    (batch row x head) ``pid_bh`` (``split_heads``); rows past N_Q are not ``row_ok``."""
    b, h, hk = split_heads(pid_bh, H, GROUPS)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return b, h, hk, offs_m, tl.arange(0, D_PAD), offs_m < N_Q


@triton.jit
def load_rows(base, offs, offs_d, s_row, s_d, N, HEAD_DIM: tl.constexpr, DOT_F32: tl.constexpr):
    """(len(offs), D_PAD) tile of rows ``offs`` of an (N, HEAD_DIM) matrix at ``base`` (q, k, v, do), zero past N
    and the head dim; fp32 when ``DOT_F32`` (the interpreter's bf16 dot)."""
    x = tl.load(base + offs[:, None] * s_row + offs_d[None, :] * s_d,
                mask=(offs < N)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    if DOT_F32:
        x = x.to(tl.float32)
    return x


@triton.jit
def load_cols(base, offs, offs_d, s_row, s_d, N, HEAD_DIM: tl.constexpr, DOT_F32: tl.constexpr):
    """``load_rows`` transposed: the (D_PAD, len(offs)) tile (K^T, V^T)."""
    x = tl.load(base + offs[None, :] * s_row + offs_d[:, None] * s_d,
                mask=(offs < N)[None, :] & (offs_d < HEAD_DIM)[:, None], other=0.0)
    if DOT_F32:
        x = x.to(tl.float32)
    return x


@triton.jit
def visible(offs_m, offs_n, N_Q, N_K, mask_base, smn, smm, offset, window,
            IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: query offs_m sees key offs_n (``mask_base`` already at (b, h))."""
    row_ok = offs_m < N_Q
    col_ok = offs_n < N_K
    vis = row_ok[:, None] & col_ok[None, :]
    if IS_CAUSAL:
        vis = vis & (offs_n[None, :] <= offs_m[:, None] + offset)
    if HAS_WINDOW:
        vis = vis & (offs_n[None, :] > offs_m[:, None] + offset - window)
    if HAS_MASK:
        mv = tl.load(mask_base + offs_m.to(tl.int64)[:, None] * smn + offs_n.to(tl.int64)[None, :] * smm,
                     mask=row_ok[:, None] & col_ok[None, :], other=0)
        vis = vis & (mv != 0)
    return vis


@triton.jit
def key_band(start_m, N_K, offset, window, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [lo, hi) some query of [start_m, start_m + BLOCK_M) may see; lo is a multiple of BLOCK_N."""
    lo = 0
    hi = N_K
    if IS_CAUSAL:
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + offset, 0), N_K)
    if HAS_WINDOW:
        lo = tl.minimum(tl.maximum(start_m + offset - window + 1, 0), N_K)
    hi = tl.maximum(hi, lo)
    lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def query_band(start_n, N_Q, offset, window, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Queries [lo, hi) that may see some key of [start_n, start_n + BLOCK_N); lo is a multiple of BLOCK_M."""
    lo = 0
    hi = N_Q
    if IS_CAUSAL:  # j <= i + offset  ->  i >= j - offset
        lo = tl.minimum(tl.maximum(start_n - offset, 0), N_Q)
    if HAS_WINDOW:  # j > i + offset - window  ->  i < j - offset + window
        hi = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - offset + window, 0), N_Q)
    hi = tl.maximum(hi, lo)
    lo = (lo // BLOCK_M) * BLOCK_M
    return lo, hi


def mask_strides(mask: torch.Tensor | None, b: int, hq: int, hkv: int, n: int, m: int):
    """A bool mask (b|1, Hq|1, n|1, m) or grouped (b|1, Hkv|1, G|1, n|1, m) -> (uint8 view, 5 strides
    (b, kv head, group member, query, key)); broadcast dims get stride 0."""
    if mask is None:
        return None, (0, 0, 0, 0, 0)
    if mask.dtype != torch.bool:
        raise TypeError(f"the kernel takes a bool mask only, got {mask.dtype}")
    groups = hq // hkv
    if mask.dim() == 4:
        mask = mask.expand(b, hq, n, m)
        st = mask.stride()
        strides = (st[0], st[1] * groups, st[1], st[2], st[3])
    elif mask.dim() == 5:
        mask = mask.expand(b, hkv, groups, n, m)
        strides = tuple(mask.stride())
    else:
        raise ValueError(f"mask must be 4D or 5D, got shape {tuple(mask.shape)}")
    return mask.view(torch.uint8), strides


def mask_view(mask: torch.Tensor | None, b: int, hq: int, hkv: int, n: int, m: int):
    """A bool mask as ``mask_strides`` takes it -> (uint8 view, 4 strides (b, query head, query, key))."""
    if mask is None:
        return None, (0, 0, 0, 0)
    if mask.dtype != torch.bool:
        raise TypeError(f"the kernel takes a bool mask only, got {mask.dtype}")
    if mask.dim() == 5:  # (b|1, Hkv|1, G|1, n|1, m) -> (b|1, Hq|1, n|1, m)
        mb, mkv, mg, mn, mm = mask.shape
        if mkv == 1 and mg == 1:
            mask = mask[:, :, 0]
        else:
            mask = mask.expand(mb, hkv, hq // hkv, mn, mm).reshape(mb, hq, mn, mm)
    if mask.dim() != 4:
        raise ValueError(f"mask must be 4D (b|1, Hq|1, n|1, m), got shape {tuple(mask.shape)}")
    mask = mask.expand(b, hq, n, m)
    return mask.view(torch.uint8), tuple(mask.stride())


def dot_f32(dtype) -> bool:
    """Upcast dot operands to fp32: only for bf16 in the interpreter (its bf16 tl.dot is wrong)."""
    return interpreting() and dtype == torch.bfloat16


def dot_prec(dtype) -> str:
    return "ieee" if dtype == torch.float32 or dot_f32(dtype) else "tf32"


def check_shapes(q, k, v, head_dims=HEAD_DIMS):
    """(b, Hq, n, d), (b, Hkv, m, d) x2 -> (b, hq, hkv, n, m, d), or ValueError naming what is wrong."""
    b, hq, n, d = q.shape
    hkv, m = k.shape[1], k.shape[2]
    if d not in head_dims:
        raise ValueError(f"head dim {d} is not one of {tuple(head_dims)}")
    if hq % hkv:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}")
    if k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError("the kernel needs key and value head dims equal to the query's")
    return b, hq, hkv, n, m, d


DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def common_support(query, key, value, vis, *, dropout=0.0, need_weights=False, sinks=None, name="Triton",
                   head_dims=HEAD_DIMS, max_head_dim=None) -> tuple[bool, str]:
    """The checks every kind's ``supports`` shares -> (ok, why not). Triton is importable (this module imports
    it); then: CUDA tensors (CPU ones under TRITON_INTERPRET=1) on one device, one dtype of ``DTYPES``, head dims
    (one of ``head_dims``, key and value equal to the query's; or, with ``max_head_dim``, query/key equal and
    every head dim in 1..max_head_dim), Hq a multiple of Hkv, no dropout, no weights, no float bias, sinks on
    the query's device. ``name`` names the kernel in the messages ("the {name} kernel ...")."""
    for t in (query, key, value):
        if not (t.is_cuda or (t.device.type == "cpu" and interpreting())):
            return False, "the Triton kernel needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"
    if query.device != key.device or query.device != value.device:
        return False, "query, key and value must be on one device"
    if query.dtype not in DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return False, (f"the {name} kernel takes fp16/bf16/fp32 query, key and value of one dtype, got "
                       f"{query.dtype}, {key.dtype}, {value.dtype}")
    d, dk, dv = query.shape[-1], key.shape[-1], value.shape[-1]
    if max_head_dim is not None:
        if dk != d or not (1 <= d <= max_head_dim and 1 <= dv <= max_head_dim):
            return False, (f"the {name} kernel takes query/key head dims equal and head dims 1..{max_head_dim}, "
                           f"got {d}, {dk}, {dv}")
    else:
        if d not in head_dims:
            return False, (f"head dim {d} is not supported by the {name} kernel; valid head dims: "
                           f"{list(head_dims)}")
        if dk != d or dv != d:
            return False, f"the {name} kernel needs key and value head dims equal to the query's"
    if query.shape[1] % key.shape[1]:
        return False, "the number of query heads must be a multiple of the KV heads"
    if dropout:
        return False, f"the {name} kernel has no attention dropout"
    if need_weights:
        return False, f"the {name} kernel does not return attention weights"
    if vis.has_bias:
        return False, f"the {name} kernel takes bool masks only, not float (additive) score biases"
    if sinks is not None and sinks.device != query.device:
        return False, "sinks must be on the query's device"
    return True, ""
