"""Backward Triton kernels of ``softmax`` attention (FlashAttention-2 style): ``flash_backward``.

Three launches, no atomics (deterministic):
  1. ``_bwd_delta``: delta_i = rowsum(do_i * o_i) in fp32 (= sum_j p_ij dp_ij over the real keys).
  2. ``_bwd_dkdv``: one program per (block of keys, batch row x KV head). It loops over the query heads of the
     GQA group and, for each, over the query blocks of the causal/window band, recomputing
     p = exp2(s * log2e - lse * log2e) from the saved ``lse``; dk and dv accumulate in fp32 registers and are
     stored once, already summed over the group.
  3. ``_bwd_dq``: one program per (block of queries, batch row x query head), looping over the key blocks of
     the band.
Scores are recomputed exactly as the forward (``flash_fwd.py``) computes them: s = scaling * q.k, softcap
c * tanh(s / c) when given, then visibility (causal with ``offset``, sliding ``window``, dense bool ``mask``
with any broadcast). With softcap the chain rule multiplies ds by (1 - tanh^2). Rows the forward left
empty (lse = -inf, o = 0) get p = 0, hence dq = 0 and no contribution to dk/dv. Sinks are extra logits in
the denominator only: dsink_h = -sum_rows exp(sink_h - lse) * delta (computed in PyTorch, fp32).
An optional per-row ``threshold`` (kind ``topk``) drops keys (and the sink) scoring below it, the scores formed
as queries x keys exactly as the forward and the threshold pass form them, so no key at the threshold flips.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .tiles import (dot_f32, dot_prec, key_band, load_cols, load_rows, mask_view, query_band, row_block,
                    split_heads, tanh, visible)
from .block_map import BlockList
from .tuning import INTERPRETER_BLOCKS, configs, interpreting, pruner


@triton.jit(do_not_specialize=["N_Q"])
def _bwd_delta(O, DO, DELTA, sob, soh, son, sod, sdb, sdh, sdn, sdd, H_Q, N_Q,
               HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h, _ = split_heads(bh, H_Q, 1)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    o = load_rows(O + b * sob + h * soh, offs_m, offs_d, son, sod, N_Q, HEAD_DIM, True)
    do = load_rows(DO + b * sdb + h * sdh, offs_m, offs_d, sdn, sdd, N_Q, HEAD_DIM, True)
    delta = tl.sum(o * do, 1)
    tl.store(DELTA + bh.to(tl.int64) * N_Q + offs_m, delta, mask=offs_m < N_Q)


@triton.jit
def _weights(s, lse2, vis, TAYLOR: tl.constexpr):
    """(p, dp/ds-factor) of visible scores ``s`` (natural domain, after softcap) given the row's saved lse in log2
    units (``lse2``, +inf on empty rows): softmax p = exp(s - lse), and ds = p (dp - delta); ``TAYLOR``
    p = (1 + s + s^2/2) / den and ds = (1 + s) / den (dp - delta), den = exp(lse). 0 where not visible."""
    if TAYLOR:
        inv = tl.exp2(-lse2)
        p = tl.where(vis, (1.0 + s + 0.5 * s * s) * inv, 0.0)
        w = tl.where(vis, (1.0 + s) * inv, 0.0)
    else:
        p = tl.where(vis, tl.exp2(s * 1.4426950408889634 - lse2), 0.0)
        w = p
    return p, w


@triton.jit
def _loop_bounds(LIST, COUNT, prog, N_LIST, lo, hi, HAS_BLOCK_LIST: tl.constexpr):
    """(list row, first i, end of i) of a key or query loop of program row ``prog``: i walks the list's entries
    (``HAS_BLOCK_LIST``), else i is a block's first index over the band [lo, hi), as in a loop without a list."""
    row_ptr = LIST
    i_lo = lo
    i_hi = hi
    if HAS_BLOCK_LIST:
        row_ptr = LIST + prog * N_LIST
        i_lo = 0
        i_hi = tl.load(COUNT + prog)
    return row_ptr, i_lo, i_hi


@triton.jit
def _block_start(row_ptr, i, BLOCK: tl.constexpr, HAS_BLOCK_LIST: tl.constexpr):
    """The first index of a loop's block: the i-th entry of the list at ``row_ptr`` (in blocks), or i itself (a loop
    without a list runs i over the band in BLOCK steps)."""
    start = i
    if HAS_BLOCK_LIST:
        start = tl.load(row_ptr + i) * BLOCK
    return start


@triton.jit(do_not_specialize=["N_Q", "N_K", "N_LIST", "offset", "window"])
def _bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, MASK, THR, QB_LIST, QB_COUNT,
              sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
              sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, smb, smh, smn, smm,
              H_Q, H_KV, GROUPS, N_Q, N_K, N_Q_KEY, N_K_KEY, N_LIST, scale, softcap, offset, window,
              IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
              DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_THRESHOLD: tl.constexpr = False, HAS_BLOCK_LIST: tl.constexpr = False,
              TAYLOR: tl.constexpr = False):
    """dk, dv of one block of keys and KV head. With ``HAS_BLOCK_LIST`` each query head of the group loops over
    its list of query blocks (QB_LIST (b Hq, key blocks, N_LIST) int32, QB_COUNT of them) instead of the band."""
    start_n = tl.program_id(0) * BLOCK_N
    b, hk, _ = split_heads(tl.program_id(1), H_KV, 1)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    n_ok = offs_n < N_K
    kv_ok = n_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = load_rows(K + b * skb + hk * skh, offs_n, offs_d, skn, skd, N_K, HEAD_DIM, DOT_F32)
    v = load_rows(V + b * svb + hk * svh, offs_n, offs_d, svn, svd, N_K, HEAD_DIM, DOT_F32)
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)

    # queries that may see some key of [start_n, start_n + BLOCK_N)
    q_lo, q_hi = query_band(start_n, N_Q, offset, window, IS_CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)

    for g in range(0, GROUPS):
        h = hk * GROUPS + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        row_base = (b * H_Q + h) * N_Q
        mask_base = MASK + b * smb + h * smh
        qb_row, i_lo, i_hi = _loop_bounds(QB_LIST, QB_COUNT, (b * H_Q + h).to(tl.int64) * tl.num_programs(0)
                                          + tl.program_id(0), N_LIST, q_lo, q_hi, HAS_BLOCK_LIST)
        for i in range(i_lo, i_hi, 1 if HAS_BLOCK_LIST else BLOCK_M):
            start_m = _block_start(qb_row, i, BLOCK_M, HAS_BLOCK_LIST)
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < N_Q
            # transposed tiles (D_PAD, BLOCK_M): the block's math runs as (keys x queries)
            qt = load_cols(q_base, offs_m, offs_d, sqn, sqd, N_Q, HEAD_DIM, DOT_F32)
            do = load_rows(do_base, offs_m, offs_d, sdon, sdod, N_Q, HEAD_DIM, DOT_F32)
            lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
            delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
            if HAS_THRESHOLD:  # queries x keys, exactly as the forward and the threshold pass form scores
                st = tl.trans(tl.dot(tl.trans(qt), tl.trans(k), input_precision=DOT_PREC)) * scale
            else:
                st = tl.dot(k, qt, input_precision=DOT_PREC) * scale  # (BLOCK_N, BLOCK_M) raw scaled scores
            if HAS_SOFTCAP:
                t = tanh(st / softcap)
                st = softcap * t
            vis = tl.trans(visible(offs_m, offs_n, N_Q, N_K, mask_base, smn, smm, offset, window,
                                    IS_CAUSAL, HAS_WINDOW, HAS_MASK))
            if HAS_THRESHOLD:
                thr = tl.load(THR + row_base + offs_m, mask=m_ok, other=float("inf"))
                vis = vis & (st >= thr[None, :])
            pt, wt = _weights(st, lse[None, :], vis, TAYLOR)
            dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            dst = wt * (dpt - delta[None, :])
            if HAS_SOFTCAP:
                dst = dst * (1.0 - t * t)
            dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PREC)
    dk = dk * scale
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit(do_not_specialize=["N_Q", "N_K", "N_LIST", "offset", "window"])
def _bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, MASK, THR, KB_LIST, KB_COUNT,
            sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
            sdqb, sdqh, sdqn, sdqd, smb, smh, smn, smm,
            H_Q, GROUPS, N_Q, N_K, N_Q_KEY, N_K_KEY, N_LIST, scale, softcap, offset, window,
            IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
            HAS_SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
            DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            HAS_THRESHOLD: tl.constexpr = False, HAS_BLOCK_LIST: tl.constexpr = False,
            TAYLOR: tl.constexpr = False):
    """dq of one block of queries and query head. With ``HAS_BLOCK_LIST`` the key loop runs over the block's list
    (KB_LIST (programs, N_LIST) int32 key-block indices, KB_COUNT of them) instead of the band."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h, hk, offs_m, offs_d, m_ok = row_block(tl.program_id(0), bh, H_Q, GROUPS, N_Q, BLOCK_M, D_PAD)
    row_ok = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = load_rows(Q + b * sqb + h * sqh, offs_m, offs_d, sqn, sqd, N_Q, HEAD_DIM, DOT_F32)
    do = load_rows(DO + b * sdob + h * sdoh, offs_m, offs_d, sdon, sdod, N_Q, HEAD_DIM, DOT_F32)
    row_base = bh.to(tl.int64) * N_Q
    lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    mask_base = MASK + b * smb + h * smh
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    thr = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_THRESHOLD:
        thr = tl.load(THR + row_base + offs_m, mask=m_ok, other=float("inf"))

    # keys that some query of [start_m, start_m + BLOCK_M) may see
    lo, hi = key_band(start_m, N_K, offset, window, IS_CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    kb_row, i_lo, i_hi = _loop_bounds(KB_LIST, KB_COUNT, bh.to(tl.int64) * tl.num_programs(0) + tl.program_id(0),
                                      N_LIST, lo, hi, HAS_BLOCK_LIST)
    for i in range(i_lo, i_hi, 1 if HAS_BLOCK_LIST else BLOCK_N):
        start_n = _block_start(kb_row, i, BLOCK_N, HAS_BLOCK_LIST)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = load_cols(k_base, offs_n, offs_d, skn, skd, N_K, HEAD_DIM, DOT_F32)
        vt = load_cols(v_base, offs_n, offs_d, svn, svd, N_K, HEAD_DIM, DOT_F32)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * scale
        if HAS_SOFTCAP:
            t = tanh(s / softcap)
            s = softcap * t
        vis = visible(offs_m, offs_n, N_Q, N_K, mask_base, smn, smm, offset, window,
                       IS_CAUSAL, HAS_WINDOW, HAS_MASK)
        if HAS_THRESHOLD:
            vis = vis & (s >= thr[:, None])
        p, w = _weights(s, lse[:, None], vis, TAYLOR)
        dp = tl.dot(do, vt, input_precision=DOT_PREC)
        ds = w * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PREC)
    dq = dq * scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqn + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok)


# dk/dv: many keys per program (dk, dv live in registers), few queries per step; dq: the other way round
_DKDV_CONFIGS = configs([(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (32, 64, 4, 2),
                         (16, 64, 4, 2), (16, 32, 4, 2), (16, 16, 2, 1)])
_DQ_CONFIGS = configs([(128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2),
                       (64, 16, 4, 2), (32, 16, 4, 2), (16, 16, 2, 1)])
# wide heads and fp32 keep to tiles of at most 32 x 64 and two stages; at head dim 128 the dk/dv configs
# (64, 64, 4 warps) and (64, 128, 8 warps) spill 230-550 B of registers on sm_90 and (32, 64, 4 warps) 8-24 B;
# with a topk threshold the largest ones spill 4-84 B (benchmarks/compile_stats.py)
_prune = pruner(lambda bm, bn, stages: bm * bn > 32 * 64 or stages > 2)
_prune_dkdv = pruner(lambda bm, bn, stages: bm * bn > 32 * 64 or stages > 2,
                     spills_wide={(64, 64, 4, 3), (64, 64, 4, 2), (64, 128, 8, 3), (32, 64, 4, 3), (32, 64, 4, 2)},
                     variant_spills={"HAS_THRESHOLD": ({(64, 128, 8, 3), (64, 64, 4, 3)}, {(32, 128, 8, 3)})})


_KEY = ["N_Q_KEY", "N_K_KEY", "HEAD_DIM", "GROUPS", "IS_CAUSAL", "HAS_WINDOW", "HAS_MASK", "HAS_SOFTCAP",
        "HAS_THRESHOLD", "TAYLOR"]
if interpreting():
    _dkdv_tuned, _dq_tuned = _bwd_dkdv, _bwd_dq
else:
    _dkdv_tuned = triton.autotune(configs=_DKDV_CONFIGS, key=_KEY,
                                  prune_configs_by={"early_config_prune": _prune_dkdv})(_bwd_dkdv)
    _dq_tuned = triton.autotune(configs=_DQ_CONFIGS, key=_KEY,
                                prune_configs_by={"early_config_prune": _prune})(_bwd_dq)


def flash_backward(do, q, k, v, o, lse, *, scaling, causal=False, offset=0, window=None, softcap=None,
                   sinks=None, mask=None, threshold=None, block_lists: tuple[BlockList, BlockList] | None = None,
                   taylor: bool = False):
    """Gradients of softmax attention: returns ``(dq, dk, dv, dsinks)``.

    ``q, do, o`` (b, Hq, n, d); ``k, v`` (b, Hkv, m, d) (kv head = h // (Hq // Hkv)); ``lse`` (b, Hq, n) fp32,
    the natural-log logsumexp the forward saved (sink included; -inf on rows with nothing visible). dq, dk, dv
    come back in the input dtype (dk, dv summed over the query heads of each KV head); ``dsinks`` is fp32
    (Hq,) or None without ``sinks``. Visibility, softcap, sinks and the per-row score ``threshold`` (kind
    ``topk``: keys, and the sink, scoring below it get no weight and no gradient) as in
    ``flash_fwd.flash_forward``. ``block_lists`` (with ``threshold``): the dk/dv kernel's lists (per key block, its
    query blocks holding a kept key: ``block_map.plan(..., by_key=True)``) and the dq kernel's (per query block,
    its key blocks); both kernels then skip the rest and launch with the lists' tiles. ``taylor``: the weights are
    1 + s + s^2/2 (kind ``taylor``'s score form, ``lse`` the log of each row's sum of weights, sink included).
    """
    b, hq, n, d = q.shape
    hkv, m = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}")
    if k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError("flash_backward needs key/value head dim == query head dim")
    groups = hq // hkv
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    lse = lse.detach().float().contiguous()
    delta = torch.empty((b, hq, n), device=q.device, dtype=torch.float32)
    dsinks = None
    if n == 0 or m == 0 or b == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        if sinks is not None:
            dsinks = torch.zeros(hq, device=q.device, dtype=torch.float32)
        return dq, dk, dv, dsinks
    do = do.to(q.dtype)
    d_pad = max(16, triton.next_power_of_2(d))
    _bwd_delta[(triton.cdiv(n, 32), b * hq)](o, do, delta, *o.stride(), *do.stride(), hq, n,
                                             HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=32)
    mask_t, ms = mask_view(mask, b, hq, hkv, n, m)
    mask_arg = mask_t if mask_t is not None else delta
    if threshold is not None:
        if tuple(threshold.shape) != (b, hq, n):
            raise ValueError(f"threshold must have shape (b, Hq, n) = {(b, hq, n)}, got {tuple(threshold.shape)}")
        threshold = threshold.detach().float().contiguous()
    thr_arg = threshold if threshold is not None else delta
    common = dict(IS_CAUSAL=bool(causal), HAS_WINDOW=window is not None, HAS_MASK=mask_t is not None,
                  HAS_SOFTCAP=softcap is not None, HEAD_DIM=d, D_PAD=d_pad, DOT_PREC=dot_prec(q.dtype),
                  DOT_F32=dot_f32(q.dtype), HAS_THRESHOLD=threshold is not None, TAYLOR=bool(taylor))
    if block_lists is not None and threshold is None:
        raise ValueError("flash_backward: block lists go with a threshold")
    common["HAS_BLOCK_LIST"] = block_lists is not None
    n_keys = (triton.next_power_of_2(n), triton.next_power_of_2(m))
    scalars = (float(scaling), float(softcap or 1.0), int(offset), int(window or 0))
    if block_lists is not None:  # the lists' own tiles, not autotuned
        (dkdv_list, dq_list), (dkdv_run, dq_run) = block_lists, (_bwd_dkdv, _bwd_dq)
        dkdv_launch, dq_launch = dkdv_list.launch, dq_list.launch
    else:
        dkdv_list = dq_list = None
        dkdv_run, dq_run = _dkdv_tuned, _dq_tuned
        dkdv_launch = dq_launch = (dict(INTERPRETER_BLOCKS, num_warps=1, num_stages=1) if interpreting() else {})

    def lists(bl):
        return (bl.order, bl.count, bl.order.shape[-1]) if bl is not None else (delta, delta, 0)

    qb_list, qb_count, n_qb = lists(dkdv_list)
    dkdv_run[lambda meta: (triton.cdiv(m, meta["BLOCK_N"]), b * hkv)](
        q, k, v, do, lse, delta, dk, dv, mask_arg, thr_arg, qb_list, qb_count,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *ms,
        hq, hkv, groups, n, m, *n_keys, n_qb, *scalars, **common, **dkdv_launch)
    kb_list, kb_count, n_kb = lists(dq_list)
    dq_run[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * hq)](
        q, k, v, do, lse, delta, dq, mask_arg, thr_arg, kb_list, kb_count,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *ms,
        hq, groups, n, m, *n_keys, n_kb, *scalars, **common, **dq_launch)
    if sinks is not None:
        finite = torch.isfinite(lse)
        sink = sinks.detach().float()[None, :, None]
        if taylor:  # d den / d sink = 1 + sink
            p_sink = torch.where(finite, (1.0 + sink) * torch.exp(-lse), 0.0)
        else:
            p_sink = torch.exp(torch.where(finite, sink - lse, float("-inf")))
        if threshold is not None:  # a sink below the row's threshold was not in its softmax
            p_sink = torch.where(sink >= threshold, p_sink, 0.0)
        dsinks = -(p_sink * delta).sum(dim=(0, 2))
    return dq, dk, dv, dsinks
