"""The Triton path of kind ``topk``: softmax over each query row's k largest visible scores.

Two steps, no N x N tensor:
  1. ``kth_threshold``: one program per (block of queries, batch row x query head) finds each row's k-th largest
     visible score by bisection over a streamed count. A first sweep over the row block's key band gives each
     row's visible count and its smallest and largest score. Rows seeing <= k keys keep everything (threshold
     -inf). For the others the search runs in the order-preserving int32 image of the fp32 scores (negative
     floats get their 31 low bits flipped, so integer order = float order) on [lo, hi) with
     count(s >= lo) >= k > count(s >= hi): each step sweeps the keys once, counting the scores at or above the
     midpoint and noting the smallest score at or above it and the largest below it, and then moves lo up to that
     smallest score (count still >= k) or hi down to just above that largest one (count < k). A row is done
     when the count is exactly k or when hi == lo + 1; either way lo is then the k-th largest score, ties included.
     At most 32 steps (the image range halves each time); snapping to real scores makes it fewer in practice:
     for Gaussian scores a row takes ~10-14 steps (m = 1024..16384, k = 16..256), and a 16-row block, which
     loops until its slowest row is done, 11 (m = 256, k = 16) to 14 (m = 1024, k = 64).
  2. The softmax kernels (``flash_fwd`` / ``flash_decode`` / ``flash_bwd``) with ``threshold=``: a key scoring
     below its row's threshold is invisible. Every one of them forms a score exactly as the threshold pass does
     (``dot(q (rows x d), k^T (d x keys)) * scale``, then softcap, same padded head dim and dtype path), so the
     key at the threshold is never lost and the kept set is {j visible : s_ij >= k-th largest s_i.} exactly.

Selection gets no gradient (as in the reference, which selects under no_grad): the backward is the softmax
backward restricted to the kept keys. Attention sinks: the sink logit competes in the selection as an extra,
always-visible column (as in the reference) and joins a row's denominator only when it is at or above the
row's threshold.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .flash_bwd import flash_backward
from .flash_fwd import flash_forward
from .tiles import check_shapes, common_support, dot_f32, dot_prec, key_band, mask_strides, scores, visible
from .tuning import configs, interpreting, pruner

# int32 extremes as compile-time constants (a bare -2147483648 literal could be typed int64 by the compiler)
I32_MIN = tl.constexpr(-(2 ** 31))
I32_MAX = tl.constexpr(2 ** 31 - 1)
MAX_STEPS = 40  # > 32: the int32 image range at least halves every step, so this bound is never reached


@triton.jit
def _ordered(s):
    """fp32 -> int32 with the same order (the map is its own inverse: ``_from_ordered``)."""
    si = s.to(tl.int32, bitcast=True)
    return tl.where(si < 0, si ^ 0x7FFFFFFF, si)


@triton.jit
def _from_ordered(si):
    """Inverse of ``_ordered``: int32 image -> the fp32 score."""
    return tl.where(si < 0, si ^ 0x7FFFFFFF, si).to(tl.float32, bitcast=True)


@triton.jit
def _count_sweep(q, k_base, skn, skd, mask_base, smn, smm, offs_m, N_Q, N_K, key_lo, key_hi, mid,
                 scale, softcap, offset, window, sink_i,
                 IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, HEAD_DIM: tl.constexpr,
                 D_PAD: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr,
                 FIRST: tl.constexpr):
    """One streamed sweep over keys [key_lo, key_hi): per row, how many visible scores have an image >= mid[row],
    the smallest such image and the largest image below mid (int32; INT32_MAX / INT32_MIN when there is none).
    ``FIRST`` (mid = INT32_MIN): the last result is the largest visible image instead."""
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    count = tl.zeros(mid.shape, dtype=tl.int32)
    min_ge = tl.full(mid.shape, I32_MAX, dtype=tl.int32)
    max_lt = tl.full(mid.shape, I32_MIN, dtype=tl.int32)
    for start_n in range(key_lo, key_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=(offs_n < N_K)[None, :] & d_ok[:, None], other=0.0)
        if DOT_F32:
            kt = kt.to(tl.float32)
        s, _ = scores(q, kt, scale, softcap, HAS_SOFTCAP, DOT_PREC)
        vis = visible(offs_m, offs_n, N_Q, N_K, mask_base, smn, smm, offset, window,
                      IS_CAUSAL, HAS_WINDOW, HAS_MASK)
        si = _ordered(s)
        ge = vis & (si >= mid[:, None])
        if FIRST:
            lt = vis
        else:
            lt = vis & (si < mid[:, None])
        count += tl.sum(ge.to(tl.int32), 1)
        min_ge = tl.minimum(min_ge, tl.min(tl.where(ge, si, I32_MAX), 1))
        max_lt = tl.maximum(max_lt, tl.max(tl.where(lt, si, I32_MIN), 1))
    if HAS_SINKS:  # the sink logit: one more always-visible score of every real row
        row_ok = offs_m < N_Q
        sink_ge = row_ok & (sink_i >= mid)
        if FIRST:
            sink_lt = row_ok
        else:
            sink_lt = row_ok & (sink_i < mid)
        count += sink_ge.to(tl.int32)
        min_ge = tl.where(sink_ge, tl.minimum(min_ge, sink_i), min_ge)
        max_lt = tl.where(sink_lt, tl.maximum(max_lt, sink_i), max_lt)
    return count, min_ge, max_lt


@triton.jit(do_not_specialize=["N_Q", "N_K", "offset", "window", "K_TOP"])
def _threshold_kernel(Q, K, SINKS, MASK, THR, KEPT, SEEN, PASSES,
                      sqb, sqh, sqn, sqd, skb, skh, skn, skd, smb, smkv, smg, smn, smm,
                      H_Q, GROUPS, N_Q, N_K, N_Q_KEY, N_K_KEY, K_TOP, scale, softcap, offset, window,
                      IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
                      HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, HEAD_DIM: tl.constexpr,
                      D_PAD: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
                      MAX_STEPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Each row's k-th largest visible score -> THR (b, Hq, n) fp32 (-inf when the row sees <= K_TOP keys);
    KEPT / SEEN: how many scores (sink included) are >= THR / visible; PASSES: sweeps of this row block."""
    pid_m = tl.program_id(0)
    start_m = pid_m * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H_Q).to(tl.int64)
    h = bh % H_Q
    hk = (h // GROUPS).to(tl.int64)
    g = h % GROUPS

    # the query tile exactly as flash_fwd loads it (bit-identical scores)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < N_Q
    q = tl.load(Q + b * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    k_base = K + b * skb + hk * skh
    mask_base = MASK + b * smb + hk * smkv + g.to(tl.int64) * smg
    key_lo, key_hi = key_band(start_m, N_K, offset, window, IS_CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    sink_i = tl.zeros([BLOCK_M], dtype=tl.int32)
    if HAS_SINKS:
        sink_i = sink_i + _ordered(tl.load(SINKS + h).to(tl.float32))

    # sweep 0: every row's visible count and its smallest and largest score image
    floor = tl.full([BLOCK_M], I32_MIN, dtype=tl.int32)
    seen, lo, top = _count_sweep(q, k_base, skn, skd, mask_base, smn, smm, offs_m, N_Q, N_K, key_lo, key_hi,
                                 floor, scale, softcap, offset, window, sink_i, IS_CAUSAL, HAS_WINDOW, HAS_MASK,
                                 HAS_SOFTCAP, HAS_SINKS, HEAD_DIM, D_PAD, DOT_PREC, DOT_F32, BLOCK_N, True)
    # search [lo, hi) in int64 (hi may be 2^31); invariant count(>= lo) >= K_TOP > count(>= hi)
    lo = lo.to(tl.int64)
    hi = top.to(tl.int64) + 1
    kept = seen
    active = seen > K_TOP
    steps = tl.full([], 0, dtype=tl.int32)
    go = tl.max(active.to(tl.int32), 0) > 0
    while go:
        mid = ((lo + hi) >> 1).to(tl.int32)  # lo < mid < hi for active rows (hi - lo >= 2)
        count, min_ge, max_lt = _count_sweep(q, k_base, skn, skd, mask_base, smn, smm, offs_m, N_Q, N_K, key_lo,
                                             key_hi, mid, scale, softcap, offset, window, sink_i, IS_CAUSAL,
                                             HAS_WINDOW, HAS_MASK, HAS_SOFTCAP, HAS_SINKS, HEAD_DIM, D_PAD,
                                             DOT_PREC, DOT_F32, BLOCK_N, False)
        up = active & (count >= K_TOP)  # the k-th largest is >= mid: snap lo to the smallest score there
        down = active & (count < K_TOP)  # it is < mid: snap hi to just above the largest score below mid
        lo = tl.where(up, min_ge.to(tl.int64), lo)
        kept = tl.where(up, count, kept)
        hi = tl.where(down, max_lt.to(tl.int64) + 1, hi)
        active = active & (count != K_TOP) & (hi - lo > 1)
        steps += 1
        go = (tl.max(active.to(tl.int32), 0) > 0) & (steps < MAX_STEPS)

    thr = tl.where(seen > K_TOP, _from_ordered(lo.to(tl.int32)), float("-inf"))
    rows = bh.to(tl.int64) * N_Q + offs_m
    tl.store(THR + rows, thr, mask=row_ok)
    tl.store(KEPT + rows, kept, mask=row_ok)
    tl.store(SEEN + rows, seen, mask=row_ok)
    tl.store(PASSES + bh.to(tl.int64) * tl.num_programs(0) + pid_m, steps + 1)  # sweeps, the first included


# a q tile and a k tile live in registers, no V: the forward's tiles, at most 64 x 64 for fp32 / wide heads
_CONFIGS = configs([(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2),
                    (32, 32, 4, 2), (16, 32, 2, 1), (16, 16, 2, 1)])
_prune = pruner(lambda bm, bn, stages: bm * bn > 64 * 64 or stages > 2)
_threshold_tuned = _threshold_kernel if interpreting() else triton.autotune(
    configs=_CONFIGS, key=["N_Q_KEY", "N_K_KEY", "HEAD_DIM", "IS_CAUSAL", "HAS_WINDOW", "HAS_MASK", "HAS_SOFTCAP"],
    prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["PASSES"])(_threshold_kernel)


def _check_k_top(k_top) -> int:
    if isinstance(k_top, bool) or not isinstance(k_top, int) or k_top < 1:
        raise ValueError(f"k_top (keys kept per query) must be an integer >= 1, got {k_top!r}")
    return k_top


def _thresholds(q, k, *, k_top, scaling, causal=False, offset=0, window=None, softcap=None, mask=None,
                sinks=None):
    """Run the threshold kernel: (threshold fp32, kept int32, seen int32) of shape (b, Hq, n), and the sweeps
    of every row block (int32, 0 = unused entry). ``seen``/``kept`` count the sink column when ``sinks``."""
    b, hq, hkv, n, m, d = check_shapes(q, k, k)
    k_top = min(_check_k_top(k_top), m + 2)  # more than every row sees: all kept (and the count fits int32)
    if window is not None and window < 1:
        raise ValueError(f"window must be an integer >= 1 or None, got {window!r}")
    thr = torch.empty((b, hq, n), device=q.device, dtype=torch.float32)
    kept = torch.empty((b, hq, n), device=q.device, dtype=torch.int32)
    seen = torch.empty((b, hq, n), device=q.device, dtype=torch.int32)
    passes = torch.zeros(b * hq * max(1, triton.cdiv(n, 16)), device=q.device, dtype=torch.int32)
    if n == 0 or b * hq == 0:
        return thr, kept, seen, passes
    sinks_t = sinks.detach().float().contiguous() if sinks is not None else None
    mask_t, ms = mask_strides(mask, b, hq, hkv, n, m)
    d_pad = max(32, triton.next_power_of_2(d))  # flash_fwd's padded head dim: identical score tiles
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * hq)  # noqa: E731
    _threshold_tuned[grid](
        q, k, sinks_t if sinks_t is not None else thr, mask_t if mask_t is not None else thr,
        thr, kept, seen, passes, *q.stride(), *k.stride(), *ms,
        hq, hq // hkv, n, m, triton.next_power_of_2(n), triton.next_power_of_2(m), k_top, float(scaling),
        float(softcap or 1.0), int(offset), int(window or 0),
        IS_CAUSAL=bool(causal), HAS_WINDOW=window is not None, HAS_MASK=mask_t is not None,
        HAS_SOFTCAP=softcap is not None, HAS_SINKS=sinks_t is not None, HEAD_DIM=d, D_PAD=d_pad,
        DOT_PREC=dot_prec(q.dtype), DOT_F32=dot_f32(q.dtype), MAX_STEPS=MAX_STEPS,
        **({"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1} if interpreting() else {}),
    )
    return thr, kept, seen, passes


def kth_threshold(q, k, *, k_top, scaling, causal=False, offset=0, window=None, softcap=None, mask=None,
                  sinks=None) -> torch.Tensor:
    """Each query row's k-th largest visible score (natural units, after softcap), (b, Hq, n) fp32; -inf where
    a row sees at most ``k_top`` keys (it keeps them all, and a row that sees nothing gives -inf too).

    q (b, Hq, n, d), k (b, Hkv, m, d); visibility as ``flash_fwd.flash_forward`` (causal with ``offset``: query i
    sits at key position i + offset; sliding ``window``; bool ``mask`` broadcastable to (b, Hq, n, m)).
    ``sinks`` (Hq,) logits compete as one more always-visible score per row.
    """
    return _thresholds(q, k, k_top=k_top, scaling=scaling, causal=causal, offset=offset, window=window,
                       softcap=softcap, mask=mask, sinks=sinks)[0]


class _ThresholdedSoftmax(torch.autograd.Function):
    """Softmax attention over the keys at or above each row's threshold; the threshold gets no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, mask, thr, causal, offset, window, scaling, softcap):
        o, lse = flash_forward(q, k, v, scaling=scaling, causal=causal, offset=offset, window=window,
                               softcap=softcap, sinks=sinks, mask=mask, threshold=thr)
        ctx.save_for_backward(q, k, v, o, lse, sinks, mask, thr)
        ctx.args = (causal, offset, window, scaling, softcap)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, sinks, mask, thr = ctx.saved_tensors
        causal, offset, window, scaling, softcap = ctx.args
        dq, dk, dv, dsinks = flash_backward(do, q, k, v, o, lse, scaling=scaling, causal=causal, offset=offset,
                                            window=window, softcap=softcap, sinks=sinks, mask=mask,
                                            threshold=thr)
        if sinks is None or not ctx.needs_input_grad[3]:
            dsinks = None
        else:
            dsinks = dsinks.to(sinks.dtype)
        return dq, dk, dv, dsinks, None, None, None, None, None, None, None


def topk_attention(q, k, v, *, k_top, scaling, causal=False, offset=0, window=None, softcap=None, mask=None,
                   sinks=None, return_stats=False):
    """Top-k attention: softmax over each row's ``k_top`` largest visible scores (ties at the k-th all kept; all
    visible keys when a row sees at most ``k_top``), differentiable in q, k, v and ``sinks``.

    Returns o (b, Hq, n, d) in q.dtype, or ``(o, stats)`` with ``return_stats``: ``stats["passes"]``, the mean
    number of bisection sweeps per row block (each one a streamed q.k sweep; one more sweep counts first, then
    the attention itself), and ``stats["kept_fraction"]``, kept keys / visible (query, key) pairs.
    """
    thr, kept, seen, passes = _thresholds(q, k, k_top=k_top, scaling=scaling, causal=causal, offset=offset,
                                          window=window, softcap=softcap, mask=mask, sinks=sinks)
    o = _ThresholdedSoftmax.apply(q, k, v, sinks, mask, thr, bool(causal), int(offset), window, float(scaling),
                                  None if softcap is None else float(softcap))
    if not return_stats:
        return o
    return o, _stats(thr, kept, seen, passes, sinks)


def _stats(thr, kept, seen, passes, sinks) -> dict:
    """Benchmark statistics from the threshold pass (the sink column is not counted as a key)."""
    used = passes[passes > 0].double()
    kept_keys, seen_keys = kept.double(), seen.double()
    if sinks is not None:
        real = seen > 0
        sink_kept = (sinks.detach().float().view(1, -1, 1) >= thr) & real
        kept_keys = kept_keys - sink_kept.double()
        seen_keys = seen_keys - real.double()
    total = float(seen_keys.sum())
    return {"passes": float(used.mean()) - 1.0 if used.numel() else 0.0,
            "kept_fraction": float(kept_keys.sum()) / total if total > 0 else 0.0}


def kernel(query, key, value, vis, *, scaling, softcap=None, sinks=None, dropout=0.0, need_weights=False,
           **options):
    """Registry kernel of ``topk``: ``(out (b, Hq, n, d) in query.dtype, None)``; option ``k`` (keys kept)."""
    if dropout or need_weights or vis.has_bias:
        raise ValueError("the topk kernel takes no dropout, weights or float bias (see supports())")
    out = topk_attention(query, key, value, k_top=int(options.get("k", 64)), scaling=float(scaling),
                         causal=vis.causal, offset=vis.offset, window=vis.window, softcap=softcap,
                         mask=vis.flat_mask(), sinks=sinks)
    return out, None


def supports(query, key, value, vis, *, scaling=None, softcap=None, sinks=None, dropout=0.0, need_weights=False,
             **options) -> tuple[bool, str]:
    """Whether ``kernel`` can run these inputs, and why not."""
    ok, why = common_support(query, key, value, vis, dropout=dropout, need_weights=need_weights, sinks=sinks,
                             name="topk Triton")
    if not ok:
        return ok, why
    k_top = options.get("k", 64)
    if isinstance(k_top, bool) or not isinstance(k_top, int) or k_top < 1:
        return False, f"option k (keys kept per query) must be an integer >= 1, got {k_top!r}"
    return True, ""
