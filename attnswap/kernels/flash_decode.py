"""Split-KV (flash-decoding) forward of ``softmax`` attention for a few queries against long K/V.

Grid: (KV splits, batch row x KV head). One program takes all G query heads sharing a KV head and all n
queries (rows r = g * n + i, padded to a power of two >= 16) against one contiguous split of the keys, so each
K/V block is read once for the whole group. It writes a partial output normalized within its split and the
split's natural-log logsumexp (-inf when it saw nothing); ``combine`` then merges the splits exactly in torch
(and adds the sink logit to the denominator). Same visibility arguments and conventions as
``flash_fwd.flash_forward`` (rows with no visible key: o = 0, lse = -inf). ``flash_forward`` routes here when
``use_split_kv(n, m)`` holds (n <= 16 and m >= 512).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .flash_fwd import (LOG2E, _attn_range, _common, _finish, _threshold_arg, dot_f32, dot_prec, interpreting,
                        mask_strides)


@triton.jit(do_not_specialize=["N_K", "split_len", "offset", "window"])
def _decode_kernel(Q, K, V, OP, LSEP, MASK, THR,
                   sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                   smb, smkv, smg, smn, smm,
                   H_KV, GROUPS, N_Q, N_K, SPLITS, split_len, qk_scale, scale, softcap, offset, window,
                   IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HAS_THRESHOLD: tl.constexpr = False):
    split = tl.program_id(0)
    bk = tl.program_id(1)
    b = (bk // H_KV).to(tl.int64)
    hk = bk % H_KV
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = offs_r < GROUPS * N_Q
    g = offs_r // N_Q
    i = offs_r % N_Q
    h = (hk * GROUPS + g).to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * sqb + h[:, None] * sqh + i[:, None] * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    k_base = K + b * skb + hk.to(tl.int64) * skh
    v_base = V + b * svb + hk.to(tl.int64) * svh
    mask_rows = MASK + b * smb + hk.to(tl.int64) * smkv + g.to(tl.int64) * smg + i.to(tl.int64) * smn

    start = split * split_len
    lo = start
    hi = tl.minimum(start + split_len, N_K)
    if IS_CAUSAL:  # the last query sees the most
        hi = tl.minimum(hi, tl.maximum(N_Q - 1 + offset + 1, 0))
    if HAS_WINDOW:  # the first query sees the earliest key
        lo = tl.maximum(lo, offset - window + 1)
    hi = tl.maximum(hi, lo)

    thr = tl.zeros([BLOCK_R], dtype=tl.float32)
    if HAS_THRESHOLD:  # (b, Hq, n) fp32 per-row score threshold (kind topk)
        thr = tl.load(THR + (b * H_KV * GROUPS + h) * N_Q + i, mask=row_ok, other=float("inf"))
    acc = tl.zeros([BLOCK_R, D_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _attn_range(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, i, row_ok, mask_rows, smm,
                                lo, hi, hi, qk_scale, scale, softcap, offset, window, thr,
                                True, IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_SOFTCAP, HEAD_DIM, D_PAD, DOT_PREC,
                                DOT_F32, BLOCK_N, HAS_THRESHOLD)
    o, lse = _finish(acc, l_i, m_i, LSEP, False, thr, False)
    # partials: OP (b, Hq, n, SPLITS, HEAD_DIM), LSEP (b, Hq, n, SPLITS), contiguous
    row = ((b * H_KV * GROUPS + h) * N_Q + i) * SPLITS + split
    tl.store(OP + row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSEP + row, lse, mask=row_ok)


def num_splits(b: int, hkv: int, m: int, block_n: int) -> int:
    """Enough programs to fill the GPU (~2 per SM), each with at least 4 key blocks."""
    if interpreting():
        return max(1, min(4, triton.cdiv(m, 4 * block_n)))
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    want = triton.cdiv(2 * sms, max(1, b * hkv))
    return max(1, min(want, triton.cdiv(m, 4 * block_n), 256))


def combine(op: torch.Tensor, lsep: torch.Tensor, sinks: torch.Tensor | None):
    """Merge split partials exactly: (b,Hq,n,S,d), (b,Hq,n,S) -> o fp32 (b,Hq,n,d), lse (b,Hq,n).
    ``sinks``: (Hq,) logits, or per-row (b, Hq, n) logits where -inf means no sink for that row."""
    seen = lsep > float("-inf")
    any_seen = seen.any(-1)
    top = lsep.amax(-1)
    if sinks is not None:
        sinks = sinks.view(1, -1, 1) if sinks.dim() == 1 else sinks
        top = torch.maximum(top, sinks.expand_as(top))
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(lsep - top[..., None])  # exp(-inf) = 0 for splits that saw nothing
    den = w.sum(-1)
    if sinks is not None:
        den = den + torch.exp(sinks - top)
    den_safe = torch.where(den > 0, den, torch.ones_like(den))
    o = (w[..., None] * op).sum(-2) / den_safe[..., None]
    o = torch.where(any_seen[..., None], o, torch.zeros_like(o))
    lse = torch.where(any_seen, top + torch.log(den_safe), torch.full_like(top, float("-inf")))
    return o, lse


def flash_decode(q, k, v, *, scaling, causal=False, offset=0, window=None, softcap=None, sinks=None, mask=None,
                 splits: int | None = None, threshold: torch.Tensor | None = None):
    """Split-KV forward: same arguments and results as ``flash_forward`` (o in q.dtype, lse fp32), the per-row
    score ``threshold`` of kind ``topk`` included (a sink below a row's threshold leaves that row's denominator)."""
    b, hq, hkv, n, m, d, sinks_t = _common(q, k, v, sinks)
    thr_t = _threshold_arg(threshold, b, hq, n)
    if thr_t is not None and sinks_t is not None:
        per_head = sinks_t.view(1, hq, 1)
        sinks_t = torch.where(per_head >= thr_t, per_head, float("-inf"))
    groups = hq // hkv
    rows = groups * n
    block_r = max(16, triton.next_power_of_2(rows))
    if block_r > 128:
        raise ValueError(f"split-KV path takes at most 128 rows (G*n), got {rows}")
    d_pad = max(32, triton.next_power_of_2(d))
    if interpreting():
        block_n, warps, stages = 16, 1, 1
    else:
        block_n = 64 if d_pad <= 128 and block_r <= 64 else 32
        warps, stages = 4, 2
    s = splits or num_splits(b, hkv, m, block_n)
    split_len = triton.cdiv(triton.cdiv(max(m, 1), s), block_n) * block_n
    s = max(1, triton.cdiv(max(m, 1), split_len))
    op = torch.empty((b, hq, n, s, d), device=q.device, dtype=torch.float32)
    lsep = torch.empty((b, hq, n, s), device=q.device, dtype=torch.float32)
    mask_t, ms = mask_strides(mask, b, hq, hkv, n, m)
    if n > 0:
        _decode_kernel[(s, b * hkv)](
            q, k, v, op, lsep, mask_t if mask_t is not None else op, thr_t if thr_t is not None else lsep,
            *q.stride(), *k.stride(), *v.stride(), *ms,
            hkv, groups, n, m, s, split_len, float(scaling) * LOG2E, float(scaling), float(softcap or 1.0),
            int(offset), int(window or 0),
            IS_CAUSAL=bool(causal), HAS_WINDOW=window is not None, HAS_MASK=mask_t is not None,
            HAS_SOFTCAP=softcap is not None, HEAD_DIM=d, D_PAD=d_pad, DOT_PREC=dot_prec(q.dtype),
            DOT_F32=dot_f32(q.dtype),
            BLOCK_R=block_r, BLOCK_N=block_n, num_warps=warps, num_stages=stages, HAS_THRESHOLD=thr_t is not None,
        )
    o, lse = combine(op, lsep, sinks_t)
    return o.to(q.dtype), lse
