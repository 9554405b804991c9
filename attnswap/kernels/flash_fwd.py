"""Forward Triton kernel of ``softmax`` attention (FlashAttention-2 style), returning ``(o, lse)``.

One program per (block of BLOCK_M queries, batch row x query head). K/V are read through the GQA head map
(kv head = h // (Hq // Hkv)), never repeated. Scores are accumulated in fp32 with an online softmax in the
exp2 domain (log2(e) folded into the scale). The key loop of a query block runs over three ranges: a masked
edge where the sliding window starts, an unmasked middle every query of the block sees, and a masked edge
at the causal diagonal / the end of the keys; key blocks outside the causal/window band are never visited.
A dense bool mask (any broadcast, stride 0 on broadcast dims) is applied in every visited block.

Conventions the backward kernel (``flash_bwd.py``) relies on:
  * ``lse`` (b, Hq, n) fp32 is the natural-log logsumexp of the visible scaled (softcapped) scores, plus the
    sink logit when ``sinks`` is given.
  * A row with no visible key gets ``o = 0`` exactly and ``lse = -inf`` (also when a sink is present: the
    sink alone gives no output), never NaN.
  * With an optional per-row ``threshold`` (kind ``topk``), keys scoring below the row's threshold (and the
    sink, when its logit is below) count as invisible; ``lse`` covers only what stayed.

Short queries against long K/V are routed to the split-KV path in ``flash_decode.py`` (see
``use_split_kv``).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .tiles import (HEAD_DIMS, LOG2E, check_shapes, dot_f32, dot_prec, load_rows, mask_strides,  # noqa: F401
                    row_block, tanh)  # (HEAD_DIMS, LOG2E re-exported)
from .block_map import BlockList
from .tuning import INTERPRETER_BLOCKS, configs, interpreting, pruner


@triton.jit
def _attn_range(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                q_pos, row_ok, mask_rows, stride_mm, lo, hi, key_end,
                qk_scale, scale, softcap, offset, window, thr,
                EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                HAS_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
                DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr, HAS_THRESHOLD: tl.constexpr = False,
                TAYLOR: tl.constexpr = False):
    """Online-softmax update of (acc, l_i, m_i) over keys [lo, hi) in BLOCK_N steps (log2 domain).

    With ``TAYLOR`` (kind ``taylor``'s score form) a visible key weighs w = 1 + s + s^2/2 (s the natural-domain
    score, > 0 always): no running max, no rescaling; m_i only records whether the row saw a key (0, else -inf).

    With ``HAS_THRESHOLD`` a key is also invisible to row r when its natural-domain score is below ``thr[r]``;
    that score is computed exactly as ``tiles.scores`` computes it (dot * scale, then softcap), so a threshold
    taken from the same scores (kind ``topk``) selects exactly the keys at or above it."""
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < key_end
        if EDGE:
            kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        elif D_PAD != HEAD_DIM:
            kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                         mask=d_ok[:, None], other=0.0)
        else:
            kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd)
        if DOT_F32:
            kt = kt.to(tl.float32)
        qk = tl.dot(q, kt, input_precision=DOT_PREC)
        if HAS_THRESHOLD or TAYLOR:
            s_nat = qk * scale
            if HAS_SOFTCAP:
                s_nat = softcap * tanh(s_nat / softcap)
            qk = s_nat * 1.4426950408889634
        elif HAS_SOFTCAP:
            s = qk * scale
            qk = (softcap * tanh(s / softcap)) * 1.4426950408889634
        else:
            qk = qk * qk_scale
        if EDGE or HAS_MASK or HAS_THRESHOLD:
            vis = n_ok[None, :] & row_ok[:, None]
            if HAS_THRESHOLD:
                vis = vis & (s_nat >= thr[:, None])
            if EDGE and IS_CAUSAL:
                vis = vis & (offs_n[None, :] <= q_pos[:, None] + offset)
            if EDGE and HAS_WINDOW:
                vis = vis & (offs_n[None, :] > q_pos[:, None] + offset - window)
            if HAS_MASK:
                mv = tl.load(mask_rows[:, None] + offs_n[None, :] * stride_mm,
                             mask=n_ok[None, :] & row_ok[:, None], other=0)
                vis = vis & (mv != 0)
            qk = tl.where(vis, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = m_new
        if TAYLOR:
            p = tl.where(qk > float("-inf"), 1.0 + s_nat + 0.5 * s_nat * s_nat, 0.0)
            m_new = tl.where(m_new > float("-inf"), 0.0, m_new)
            l_i = l_i + tl.sum(p, 1)
        else:
            p = tl.exp2(qk - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
        if EDGE:
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        elif D_PAD != HEAD_DIM:
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd)
        if DOT_F32:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _finish(acc, l_i, m_i, sink_ptr, HAS_SINKS: tl.constexpr, thr=0.0, HAS_THRESHOLD: tl.constexpr = False,
            TAYLOR: tl.constexpr = False):
    """Normalize: returns (o fp32, lse natural log); rows with nothing visible give o = 0, lse = -inf.
    With ``HAS_THRESHOLD`` the sink joins row r's denominator only when its logit is >= ``thr[r]``. With
    ``TAYLOR`` a sink adds its Taylor weight, and lse is the log of the row's sum of weights."""
    has_any = m_i > float("-inf")
    m_f = m_i
    if TAYLOR:
        if HAS_SINKS:
            sink = tl.load(sink_ptr).to(tl.float32)
            l_i = l_i + (1.0 + sink + 0.5 * sink * sink)
    elif HAS_SINKS:
        sink = tl.load(sink_ptr).to(tl.float32)
        s2 = sink * 1.4426950408889634
        if HAS_THRESHOLD:
            s2 = tl.where(sink >= thr, s2, float("-inf"))
            s2 = tl.where(m_i == float("-inf"), 0.0, s2)  # empty rows stay empty (and free of NaN)
        m_f = tl.maximum(m_i, s2)
        alpha = tl.exp2(m_i - m_f)
        l_i = l_i * alpha + tl.exp2(s2 - m_f)
        acc = acc * alpha[:, None]
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    o = tl.where(has_any[:, None], o, 0.0)
    lse = tl.where(has_any, (m_f + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    return o, lse


@triton.jit(do_not_specialize=["N_Q", "N_K", "N_KB", "offset", "window"])
def _fwd_kernel(Q, K, V, O, LSE, SINKS, MASK, THR, KB_LIST, KB_COUNT,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                smb, smkv, smg, smn, smm,
                H_Q, GROUPS, N_Q, N_K, N_Q_KEY, N_K_KEY, N_KB, qk_scale, scale, softcap, offset, window,
                IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
                HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_THRESHOLD: tl.constexpr = False,
                HAS_BLOCK_LIST: tl.constexpr = False, TAYLOR: tl.constexpr = False):
    """o and lse of one block of queries and query head. With ``HAS_BLOCK_LIST`` (kind ``topk``) the key loop
    runs over the block's list (KB_LIST (programs, N_KB) int32 key-block indices, KB_COUNT of them: the blocks
    that hold a kept key), every listed block with the full visibility test, instead of the band's three ranges."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h, hk, offs_m, offs_d, row_ok = row_block(tl.program_id(0), bh, H_Q, GROUPS, N_Q, BLOCK_M, D_PAD)
    d_ok = offs_d < HEAD_DIM
    q = load_rows(Q + b * sqb + h * sqh, offs_m, offs_d, sqn, sqd, N_Q, HEAD_DIM, DOT_F32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    mask_rows = MASK + b * smb + hk * smkv + (h % GROUPS) * smg + offs_m.to(tl.int64) * smn

    # key range of the block (multiples of BLOCK_N are kept non-negative before dividing)
    lo = 0
    hi = N_K
    full_lo = 0
    full_hi = N_K
    if IS_CAUSAL:
        hi = tl.minimum(N_K, tl.maximum(start_m + BLOCK_M + offset, 0))
        full_hi = tl.maximum(start_m + offset + 1, 0)
    if HAS_WINDOW:
        lo = tl.minimum(tl.maximum(start_m + offset - window + 1, 0), N_K)
        full_lo = tl.maximum(start_m + BLOCK_M - 1 + offset - window + 1, 0)
    hi = tl.maximum(hi, lo)
    lo = (lo // BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(tl.maximum(((full_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, lo), hi)
    full_hi = tl.minimum((full_hi // BLOCK_N) * BLOCK_N, (N_K // BLOCK_N) * BLOCK_N)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)

    thr = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_THRESHOLD:  # (b, Hq, n) fp32: keys scoring below the row's threshold are invisible
        thr = tl.load(THR + bh.to(tl.int64) * N_Q + offs_m, mask=row_ok, other=float("inf"))
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if HAS_BLOCK_LIST:
        prog = bh.to(tl.int64) * tl.num_programs(0) + tl.program_id(0)
        kb_row = KB_LIST + prog * N_KB
        for i in range(0, tl.load(KB_COUNT + prog)):
            start_n = tl.load(kb_row + i) * BLOCK_N
            acc, l_i, m_i = _attn_range(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, offs_m, row_ok,
                                        mask_rows, smm, start_n, start_n + BLOCK_N, N_K, qk_scale, scale, softcap,
                                        offset, window, thr, True, IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_SOFTCAP,
                                        HEAD_DIM, D_PAD, DOT_PREC, DOT_F32, BLOCK_N, HAS_THRESHOLD, TAYLOR)
    else:
        acc, l_i, m_i = _attn_range(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, offs_m, row_ok,
                                    mask_rows, smm, lo, full_lo, N_K, qk_scale, scale, softcap, offset, window,
                                    thr, True, IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_SOFTCAP, HEAD_DIM, D_PAD,
                                    DOT_PREC, DOT_F32, BLOCK_N, HAS_THRESHOLD, TAYLOR)
        acc, l_i, m_i = _attn_range(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, offs_m, row_ok,
                                    mask_rows, smm, full_lo, full_hi, N_K, qk_scale, scale, softcap, offset,
                                    window, thr, False, IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_SOFTCAP, HEAD_DIM,
                                    D_PAD, DOT_PREC, DOT_F32, BLOCK_N, HAS_THRESHOLD, TAYLOR)
        acc, l_i, m_i = _attn_range(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, offs_m, row_ok,
                                    mask_rows, smm, full_hi, hi, N_K, qk_scale, scale, softcap, offset, window,
                                    thr, True, IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_SOFTCAP, HEAD_DIM, D_PAD,
                                    DOT_PREC, DOT_F32, BLOCK_N, HAS_THRESHOLD, TAYLOR)
    o, lse = _finish(acc, l_i, m_i, SINKS + h, HAS_SINKS, thr, HAS_THRESHOLD, TAYLOR)
    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod, o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * N_Q + offs_m, lse, mask=row_ok)


# (128, 32, 4 warps, 2 stages) is left out: with head dim 64 and no causal mask it made an illegal memory access on
# an H200 (triton 3.6; every other config gave SDPA's output: benchmarks/results/logs/NVIDIA-H200-flash-fwd-configs.log)
_CONFIGS = configs([(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2),
                    (64, 32, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2), (16, 16, 2, 1)])
# wide heads and fp32 keep to tiles of at most 64 x 64 and two stages (shared memory); at head dim 128,
# (128, 64, 4 warps, 3 stages) spills ~600 B of registers on sm_90, and with a topk threshold (one more row vector
# and compare per tile) the largest tiles spill 4-144 B; with Taylor weights (no running max, but s and 1 + s + s^2/2
# both live) 12-316 B (benchmarks/results/sm90-compile.jsonl)
_prune = pruner(lambda bm, bn, stages: bn > 64 or bm * bn > 64 * 64 or stages > 2, spills_wide={(128, 64, 4, 3)},
                variant_spills={"HAS_THRESHOLD": ({(128, 128, 8, 3), (128, 64, 4, 3)},
                                                  {(128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2)}),
                                "TAYLOR": ({(128, 64, 4, 3)}, {(128, 128, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2)})})


# Tuned per (next_pow2(n), next_pow2(m), head dim, structure): a new length in the same bucket reuses the choice.
_fwd_tuned = _fwd_kernel if interpreting() else triton.autotune(
    configs=_CONFIGS, key=["N_Q_KEY", "N_K_KEY", "HEAD_DIM", "IS_CAUSAL", "HAS_WINDOW", "HAS_MASK", "HAS_SOFTCAP",
                                "HAS_THRESHOLD", "TAYLOR"],
    prune_configs_by={"early_config_prune": _prune})(_fwd_kernel)


def _common(q, k, v, sinks, head_dims=HEAD_DIMS):
    b, hq, hkv, n, m, d = check_shapes(q, k, v, head_dims)
    sinks_t = sinks.detach().float().contiguous() if sinks is not None else None
    return b, hq, hkv, n, m, d, sinks_t


def _threshold_arg(threshold, b: int, hq: int, n: int):
    """A per-row score threshold (b, Hq, n) -> contiguous fp32, or None; a clear error on a wrong shape."""
    if threshold is None:
        return None
    if tuple(threshold.shape) != (b, hq, n):
        raise ValueError(f"threshold must have shape (b, Hq, n) = {(b, hq, n)}, got {tuple(threshold.shape)}")
    return threshold.detach().float().contiguous()


def use_split_kv(n: int, m: int, groups: int = 1) -> bool:
    """The routing rule: split-KV (flash-decoding) when n <= 16 queries, m >= 512 keys and the query rows
    sharing a KV head fit one program (groups * n <= 128)."""
    return n <= 16 and m >= 512 and groups * n <= 128


def flash_forward(q, k, v, *, scaling, causal=False, offset=0, window=None, softcap=None, sinks=None, mask=None,
                  split_kv: bool | None = None, threshold: torch.Tensor | None = None,
                  block_list: BlockList | None = None, taylor: bool = False):
    """Softmax attention forward: returns ``o`` (b, Hq, n, d) in q.dtype and ``lse`` (b, Hq, n) fp32.

    Query i sees key j iff (not causal or j <= i + offset) and (window is None or j > i + offset - window) and
    mask[b, h, i, j]. ``mask``: bool, broadcastable to (b, Hq, n, m) (or grouped (b|1, Hkv|1, G|1, n|1, m)).
    ``sinks`` (Hq,) logits join the denominator. Rows with no visible key: o = 0, lse = -inf.
    ``split_kv``: None = ``use_split_kv(n, m)``; True/False force the decode path on/off.
    ``threshold`` (b, Hq, n) fp32 (kind ``topk``): row i also loses every key whose score (natural units, after
    softcap) is below threshold[b, h, i], and the sink logit when it is below; -inf keeps everything.
    ``block_list`` (kind ``topk``, with ``threshold``; not with the split-KV path): per query block the key blocks
    that hold a kept key (``block_map.plan``); the others are skipped, and the launch takes the list's tiles.
    ``taylor`` (kind ``taylor``'s score form): weights 1 + s + s^2/2 instead of exp(s) (a sink adds its Taylor
    weight), ``lse`` = log of each row's sum of weights; no threshold, no split-KV path.
    """
    b, hq, hkv, n, m, d, sinks_t = _common(q, k, v, sinks, range(1, 257) if taylor else HEAD_DIMS)
    if taylor and (split_kv or threshold is not None):
        raise ValueError("flash_forward: taylor weights take neither a threshold nor the split-KV path")
    if split_kv is None:
        split_kv = not taylor and use_split_kv(n, m, hq // hkv)
    if block_list is not None and (split_kv or threshold is None):
        raise ValueError("flash_forward: a block list goes with a threshold, and not with the split-KV path")
    if split_kv:
        from .flash_decode import flash_decode

        return flash_decode(q, k, v, scaling=scaling, causal=causal, offset=offset, window=window,
                            softcap=softcap, sinks=sinks, mask=mask, threshold=threshold)
    thr_t = _threshold_arg(threshold, b, hq, n)
    o = torch.empty_like(q)
    lse = torch.empty((b, hq, n), device=q.device, dtype=torch.float32)
    if n == 0:
        return o, lse
    mask_t, ms = mask_strides(mask, b, hq, hkv, n, m)
    d_pad = max(32, triton.next_power_of_2(d))
    dummy = o
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * hq)  # noqa: E731
    if block_list is not None:  # the list's own tiles, not autotuned
        run, launch = _fwd_kernel[grid], block_list.launch
        kb_list, kb_count = block_list.order, block_list.count
    else:
        run = _fwd_tuned[grid]
        launch = dict(INTERPRETER_BLOCKS, num_warps=1, num_stages=1) if interpreting() else {}
        kb_list = kb_count = lse
    run(
        q, k, v, o, lse, sinks_t if sinks_t is not None else dummy, mask_t if mask_t is not None else dummy,
        thr_t if thr_t is not None else lse, kb_list, kb_count,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *ms,
        hq, hq // hkv, n, m, triton.next_power_of_2(n), triton.next_power_of_2(m), kb_list.shape[-1],
        float(scaling) * LOG2E, float(scaling), float(softcap or 1.0), int(offset), int(window or 0),
        IS_CAUSAL=bool(causal), HAS_WINDOW=window is not None, HAS_MASK=mask_t is not None,
        HAS_SOFTCAP=softcap is not None, HAS_SINKS=sinks_t is not None,
        HEAD_DIM=d, D_PAD=d_pad, DOT_PREC=dot_prec(q.dtype), DOT_F32=dot_f32(q.dtype),
        HAS_THRESHOLD=thr_t is not None, HAS_BLOCK_LIST=block_list is not None, TAYLOR=bool(taylor), **launch,
    )
    return o, lse
