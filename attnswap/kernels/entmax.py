"""The Triton path of kind ``entmax`` (and its alias ``sparsemax``, alpha = 2): forward and backward.

p_ij = [z_ij - tau_i]_+^e, z = (alpha - 1) s, e = 1 / (alpha - 1), any alpha in (1, 2]; s = scaling * q.k,
softcapped when asked; visibility (causal with offset, sliding window, bool masks with any broadcast) and GQA
(kv head = h // (Hq // Hkv)) as in the softmax kernels. Launches, all with the same BLOCK_M x BLOCK_N tiles so
that one block map serves them all:
  1. ``entmax_threshold.tau_kernel``: tau per row (streamed Newton passes with a bisection safeguard) and the
     map of key blocks that carry weight;
  2. ``_out_kernel``: o_i = sum_j p_ij v_j / sum_j p_ij over active blocks only; when a gradient is needed it
     also accumulates gsum_i = sum_j g_ij and u_i = sum_j g_ij v_j, g = p^(2-alpha) = [z - tau]_+^(e-1), so the
     backward gets delta_i = sum_j g_ij dp_ij / gsum_i = (do_i . u_i) / gsum_i from two small tensors without
     another pass over the keys (an extra (b, Hq, n, d) fp32 tensor instead of a recomputation of every
     active score block);
  3. ``_dkdv_kernel`` (per key block and KV head, looping over the GQA group, no atomics) and ``_dq_kernel``:
     ds = g (dp - delta), dp = do . v, over active blocks only; the (alpha - 1) factors of z cancel.
A sink logit (sinks, (Hq,)) is an extra always-visible column: it joins the threshold search and the
normalization, then its weight is dropped; dsinks = -sum_rows g_sink delta (PyTorch, fp32).
Rows with nothing visible give o = 0 and zero gradients, never NaN.
Generation shapes (n <= 16 queries against a long cache) with no gradient wanted go to the split-KV path of
``entmax_decode`` instead (``entmax_attention`` routes; ``entmax_forward`` itself never does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_map import block_lists
from .entmax_decode import decode_forward, decode_stats, use_decode
from .entmax_threshold import OUTSIDE_BAND, POW_GENERAL, power_mode, powers, tau_kernel, z_tile
from .select_tiles import CAP, NUM_BINS
from .tiles import (check_shapes, common_support, dot_f32, dot_prec, load_cols, load_rows, mask_view, row_block,
                    scores, split_heads, visible)
from .tuning import candidates, interpreting

MAX_ITER = 64  # Newton passes at most (each a pass over the key band)
TOL = 1e-6  # a row has converged when its Newton step is below TOL * max(1, |tau|)


@triton.jit(do_not_specialize=["N_Q", "N_K", "offset", "window"])
def _out_kernel(Q, K, V, O, SINKS, MASK, TAU, KB_LIST, KB_COUNT, RDEN, U, GSUM, SUPPORT,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                smb, smh, smn, smm, H_Q, GROUPS, N_Q, N_K, N_QB, N_KB, scale, softcap, am1, e, offset, window,
                IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, MODE: tl.constexpr, NEED_GRAD: tl.constexpr,
                HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """o (in O's dtype), 1 / sum p (RDEN), support size per row; with NEED_GRAD also U = sum g v, GSUM = sum g."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, hk, offs_m, offs_d, row_ok = row_block(qb, bh, H_Q, GROUPS, N_Q, BLOCK_M, D_PAD)
    tile_ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = load_rows(Q + b * sqb + h * sqh, offs_m, offs_d, sqn, sqd, N_Q, HEAD_DIM, DOT_F32)
    row = bh.to(tl.int64) * N_Q + offs_m
    tau = tl.load(TAU + row, mask=row_ok, other=float("inf"))
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    mask_base = MASK + b * smb + h * smh
    prog = bh.to(tl.int64) * N_QB + qb
    kb_row = KB_LIST + prog * N_KB

    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    u_acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    sum_p = tl.zeros([BLOCK_M], dtype=tl.float32)
    sum_g = tl.zeros([BLOCK_M], dtype=tl.float32)
    support = tl.zeros([BLOCK_M], dtype=tl.float32)
    for i in range(0, tl.load(KB_COUNT + prog)):
        start_n = tl.load(kb_row + i) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = load_cols(k_base, offs_n, offs_d, skn, skd, N_K, HEAD_DIM, DOT_F32)
        z, _, vis = z_tile(q, kt, offs_m, offs_n, N_Q, N_K, mask_base, smn, smm, scale, softcap, am1, offset,
                           window, IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_SOFTCAP, DOT_PREC)
        u = tl.maximum(z - tau[:, None], 0.0)
        p, g = powers(u, e, MODE)
        v = load_rows(v_base, offs_n, offs_d, svn, svd, N_K, HEAD_DIM, DOT_F32)
        sum_p += tl.sum(p, 1)
        support += tl.sum((u > 0).to(tl.float32), 1)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        if NEED_GRAD:
            sum_g += tl.sum(g, 1)
            u_acc = tl.dot(g.to(v.dtype), v, u_acc, input_precision=DOT_PREC)
    if HAS_SINKS:
        p_s, g_s = powers(tl.maximum(tl.load(SINKS + h).to(tl.float32) * am1 - tau, 0.0), e, MODE)
        sum_p += p_s
        sum_g += g_s
    rden = tl.where(sum_p > 0, 1.0 / tl.where(sum_p > 0, sum_p, 1.0), 0.0)
    o = acc * rden[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod, o.to(O.dtype.element_ty),
             mask=tile_ok)
    tl.store(RDEN + row, rden, mask=row_ok)
    tl.store(SUPPORT + row, support, mask=row_ok)
    if NEED_GRAD:
        tl.store(U + row[:, None] * HEAD_DIM + offs_d[None, :], u_acc, mask=tile_ok)
        tl.store(GSUM + row, sum_g, mask=row_ok)


@triton.jit(do_not_specialize=["N_Q", "N_K", "offset", "window"])
def _dkdv_kernel(Q, K, V, DO, TAU, RDEN, DELTA, QB_LIST, QB_COUNT, DK, DV, MASK,
                 sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
                 sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, smb, smh, smn, smm,
                 H_Q, H_KV, GROUPS, N_Q, N_K, N_QB, N_KB, scale, softcap, am1, e, offset, window,
                 IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, MODE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                 DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dk, dv of one key block and KV head, summed over the query heads of its group (transposed tiles)."""
    kb = tl.program_id(0)
    start_n = kb * BLOCK_N
    b, hk, _ = split_heads(tl.program_id(1), H_KV, 1)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    kv_ok = (offs_n < N_K)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = load_rows(K + b * skb + hk * skh, offs_n, offs_d, skn, skd, N_K, HEAD_DIM, DOT_F32)
    v = load_rows(V + b * svb + hk * svh, offs_n, offs_d, svn, svd, N_K, HEAD_DIM, DOT_F32)
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    for g in range(0, GROUPS):
        h = hk * GROUPS + g
        bh = b * H_Q + h
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        mask_base = MASK + b * smb + h * smh
        prog = bh * N_KB + kb
        qb_row = QB_LIST + prog * N_QB
        for i in range(0, tl.load(QB_COUNT + prog)):
            start_m = tl.load(qb_row + i) * BLOCK_M
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < N_Q
            qt = load_cols(q_base, offs_m, offs_d, sqn, sqd, N_Q, HEAD_DIM, DOT_F32)
            do = load_rows(do_base, offs_m, offs_d, sdon, sdod, N_Q, HEAD_DIM, DOT_F32)
            row = bh * N_Q + offs_m
            tau = tl.load(TAU + row, mask=m_ok, other=float("inf"))
            rden = tl.load(RDEN + row, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + row, mask=m_ok, other=0.0)
            st, t = scores(k, qt, scale, softcap, HAS_SOFTCAP, DOT_PREC)  # (BLOCK_N, BLOCK_M)
            vis = tl.trans(visible(offs_m, offs_n, N_Q, N_K, mask_base, smn, smm, offset, window,
                                   IS_CAUSAL, HAS_WINDOW, HAS_MASK))
            z = st * am1
            u = tl.where(vis, tl.maximum(z - tau[None, :], 0.0), 0.0)
            pt, gt = powers(u, e, MODE)
            pt = pt * rden[None, :]
            dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            dst = gt * (dpt - delta[None, :])
            if HAS_SOFTCAP:
                dst = dst * (1.0 - t * t)
            dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PREC)
    dk = dk * scale
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit(do_not_specialize=["N_Q", "N_K", "offset", "window"])
def _dq_kernel(Q, K, V, DO, TAU, DELTA, KB_LIST, KB_COUNT, DQ, MASK,
               sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
               sdqb, sdqh, sdqn, sdqd, smb, smh, smn, smm,
               H_Q, GROUPS, N_Q, N_K, N_QB, N_KB, scale, softcap, am1, e, offset, window,
               IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, MODE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
               DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq of one query block and query head, over the active key blocks of its band."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, hk, offs_m, offs_d, m_ok = row_block(qb, bh, H_Q, GROUPS, N_Q, BLOCK_M, D_PAD)
    tile_ok = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = load_rows(Q + b * sqb + h * sqh, offs_m, offs_d, sqn, sqd, N_Q, HEAD_DIM, DOT_F32)
    do = load_rows(DO + b * sdob + h * sdoh, offs_m, offs_d, sdon, sdod, N_Q, HEAD_DIM, DOT_F32)
    row = bh.to(tl.int64) * N_Q + offs_m
    tau = tl.load(TAU + row, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + row, mask=m_ok, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    mask_base = MASK + b * smb + h * smh
    prog = bh.to(tl.int64) * N_QB + qb
    kb_row = KB_LIST + prog * N_KB
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for i in range(0, tl.load(KB_COUNT + prog)):
        start_n = tl.load(kb_row + i) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = load_cols(k_base, offs_n, offs_d, skn, skd, N_K, HEAD_DIM, DOT_F32)
        vt = load_cols(v_base, offs_n, offs_d, svn, svd, N_K, HEAD_DIM, DOT_F32)
        z, t, vis = z_tile(q, kt, offs_m, offs_n, N_Q, N_K, mask_base, smn, smm, scale, softcap, am1, offset,
                           window, IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_SOFTCAP, DOT_PREC)
        _, g = powers(tl.maximum(z - tau[:, None], 0.0), e, MODE)
        dp = tl.dot(do, vt, input_precision=DOT_PREC)
        ds = g * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PREC)
    dq = dq * scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqn + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=tile_ok)


# ---------------------------------------------------------------------------------------------------------------
# host side

# One tile shape for every pass (the block map is per (query block, key block)); only warps/stages are tuned.
# Configs that spill registers on sm_90 are not tried (`python benchmarks/compile_stats.py --kernels entmax`,
# bf16, 64 x 64 tiles, triton 3.9 / ptxas 13.4): the threshold kernel with 4 warps (324-360 B at head dims 64
# and 128); for padded head dims >= 128 the output kernel's (4, 3) with gradients (44 B) and the dk/dv kernel's
# (4, 2), (4, 3), (8, 3) (96-248 B); the dk/dv kernel's (4, 3) at head dim 64 too (44 B).
_TUNE_KEY = ["HEAD_DIM", "BLOCK_M", "BLOCK_N", "IS_CAUSAL", "HAS_WINDOW", "HAS_MASK", "HAS_SOFTCAP", "MODE"]
_WARP_STAGES = [(4, 2), (4, 3), (8, 2), (8, 3)]
_TAU_WARP_STAGES = [(8, 2), (8, 3)]


def _tuned(fn, key, warp_stages=_WARP_STAGES, spills=(), spills_wide=()):
    """``fn`` autotuned over ``warp_stages`` less the (warps, stages) that spill: ``spills`` at every head dim,
    ``spills_wide`` at padded head dims >= 128 (left whole when nothing would remain)."""
    if interpreting():
        return fn

    def prune(configs, named_args, **kwargs):
        wide = kwargs.get("D_PAD", 0) >= 128
        kept = [c for c in configs if (c.num_warps, c.num_stages) not in spills
                and not (wide and (c.num_warps, c.num_stages) in spills_wide)]
        return kept or configs

    return triton.autotune(
        configs=[triton.Config({}, num_warps=w, num_stages=s) for w, s in candidates(warp_stages)],
        key=key, prune_configs_by={"early_config_prune": prune})(fn)


_tau_run = _tuned(tau_kernel, _TUNE_KEY, _TAU_WARP_STAGES)
_out_run = _tuned(_out_kernel, _TUNE_KEY + ["NEED_GRAD"], spills_wide={(4, 3)})
_dkdv_run = _tuned(_dkdv_kernel, _TUNE_KEY + ["GROUPS"], spills={(4, 3)}, spills_wide={(4, 2), (8, 3)})
_dq_run = _tuned(_dq_kernel, _TUNE_KEY)


def tile_shape(d: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) shared by all passes: 16 x 16 in the interpreter; on a GPU 64 x 64, smaller for wide
    heads or fp32 (registers: the backward holds two BLOCK_N x D fp32 accumulators)."""
    if interpreting():
        return 16, 16
    if d > 128:
        return 32, 32
    if dtype == torch.float32:
        return 32, 64
    return 64, 64


def _check_alpha(alpha) -> float:
    alpha = float(alpha)
    if not 1.0 < alpha <= 2.0:
        raise ValueError(f"entmax alpha must be a number in (1, 2] (2 is sparsemax), got {alpha!r}")
    return alpha


class _Plan:
    """Shapes, tiles, mask view and the constexprs every pass shares."""

    def __init__(self, q, k, v, *, alpha, scaling, causal, offset, window, softcap, mask):
        self.b, self.hq, self.hkv, self.n, self.m, self.d = check_shapes(q, k, v)
        self.alpha = _check_alpha(alpha)
        self.block_m, self.block_n = tile_shape(self.d, q.dtype)
        self.n_qb, self.n_kb = triton.cdiv(self.n, self.block_m), triton.cdiv(self.m, self.block_n)
        self.mask, self.mask_strides = mask_view(mask, self.b, self.hq, self.hkv, self.n, self.m)
        self.am1 = self.alpha - 1.0
        self.scalars = dict(scale=float(scaling), softcap=float(softcap or 1.0), am1=self.am1, e=1.0 / self.am1,
                            offset=int(offset), window=int(window or 0))
        self.flags = dict(IS_CAUSAL=bool(causal), HAS_WINDOW=window is not None, HAS_MASK=self.mask is not None,
                          HAS_SOFTCAP=softcap is not None, MODE=power_mode(self.alpha), HEAD_DIM=self.d,
                          D_PAD=max(16, triton.next_power_of_2(self.d)), DOT_PREC=dot_prec(q.dtype),
                          DOT_F32=dot_f32(q.dtype), BLOCK_M=self.block_m, BLOCK_N=self.block_n)
        if interpreting():
            self.launch = dict(num_warps=1, num_stages=1)
        else:
            self.launch = {}

    def mask_arg(self, fallback):
        return self.mask if self.mask is not None else fallback


def entmax_forward(q, k, v, *, alpha, scaling, causal=False, offset=0, window=None, softcap=None, sinks=None,
                   mask=None, need_grad=False):
    """Forward: returns ``(o (b, Hq, n, d) in q.dtype, saved)`` where ``saved`` holds tau (b, Hq, n) fp32
    (+inf on rows with nothing visible and no sink), rden = 1 / sum p, u = sum g v and gsum = sum g (with
    ``need_grad``), the block map (b*Hq, n_qblocks, n_kblocks) int8 (1 active, 0 no weight, 2 outside the
    band), the visible key count and support size per row, and the streamed threshold passes per program (``passes``)."""
    pl = _Plan(q, k, v, alpha=alpha, scaling=scaling, causal=causal, offset=offset, window=window,
               softcap=softcap, mask=mask)
    b, hq, n, m, d = pl.b, pl.hq, pl.n, pl.m, pl.d
    dev = q.device
    f32 = dict(device=dev, dtype=torch.float32)
    o = torch.empty_like(q)
    saved = dict(plan=pl, tau=torch.empty((b, hq, n), **f32), rden=torch.empty((b, hq, n), **f32),
                 count=torch.empty((b, hq, n), **f32), support=torch.empty((b, hq, n), **f32),
                 bmap=torch.full((b * hq, pl.n_qb, pl.n_kb), OUTSIDE_BAND, device=dev, dtype=torch.int8),
                 passes=torch.zeros((b * hq, pl.n_qb), device=dev, dtype=torch.int32),
                 u=torch.empty((b, hq, n, d), **f32) if need_grad else None,
                 gsum=torch.empty((b, hq, n), **f32) if need_grad else None)
    if o.numel() == 0 or m == 0:
        o.zero_()
        saved["tau"].fill_(float("inf")), saved["rden"].zero_(), saved["count"].zero_(), saved["support"].zero_()
        if need_grad:
            saved["u"].zero_(), saved["gsum"].zero_()
        return o, saved
    sinks_t = sinks.detach().float().contiguous() if sinks is not None else saved["tau"]
    mask_arg = pl.mask_arg(saved["tau"])
    grid = (pl.n_qb, b * hq)
    block_max = torch.empty((b * hq, pl.n_qb, pl.n_kb), **f32)
    closed_form = pl.flags["MODE"] != POW_GENERAL  # the gathering pass and its scratch rows
    scratch = torch.empty((b * hq * n, CAP) if closed_form else (1,), **f32)
    _tau_run[grid](q, k, sinks_t, mask_arg, saved["tau"], saved["count"], saved["bmap"], block_max, scratch,
                   saved["passes"], *q.stride(), *k.stride(), *pl.mask_strides, hq, hq // pl.hkv, n, m, pl.n_qb,
                   pl.n_kb, pl.scalars["scale"], pl.scalars["softcap"], pl.am1, pl.scalars["e"], TOL,
                   pl.scalars["offset"], pl.scalars["window"], MAX_ITER=MAX_ITER, HAS_SINKS=sinks is not None,
                   NUM_BINS=NUM_BINS, CAP=CAP, **pl.flags, **pl.launch)
    del scratch, block_max
    saved["kb_list"], saved["kb_count"] = block_lists(saved["bmap"] == 1)
    u_arg = saved["u"] if need_grad else saved["tau"]
    gsum_arg = saved["gsum"] if need_grad else saved["tau"]
    _out_run[grid](q, k, v, o, sinks_t, mask_arg, saved["tau"], saved["kb_list"], saved["kb_count"], saved["rden"],
                   u_arg, gsum_arg, saved["support"], *q.stride(), *k.stride(), *v.stride(), *o.stride(), *pl.mask_strides,
                   hq, hq // pl.hkv, n, m, pl.n_qb, pl.n_kb, **pl.scalars, HAS_SINKS=sinks is not None,
                   NEED_GRAD=bool(need_grad), **pl.flags, **pl.launch)
    return o, saved


def entmax_backward(do, q, k, v, saved, *, sinks=None):
    """Gradients ``(dq, dk, dv, dsinks)`` from the forward's ``saved`` (which must come from ``need_grad=True``).
    dq, dk, dv in the input dtype (dk, dv summed over each KV head's query heads); dsinks fp32 (Hq,) or None."""
    pl = saved["plan"]
    b, hq, hkv, n, m = pl.b, pl.hq, pl.hkv, pl.n, pl.m
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    gsum = saved["gsum"]
    if q.numel() == 0 or m == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv, (torch.zeros(hq, device=q.device) if sinks is not None else None)
    do = do.to(q.dtype).contiguous()
    # delta_i = sum_j g_ij dp_ij / sum_j g_ij = (do_i . u_i) / gsum_i   (O(n d), no pass over the keys)
    delta = (do.float() * saved["u"]).sum(-1) / torch.where(gsum > 0, gsum, torch.ones_like(gsum))
    delta = torch.where(gsum > 0, delta, torch.zeros_like(delta)).contiguous()
    mask_arg = pl.mask_arg(delta)
    qb_list, qb_count = block_lists(saved["bmap"].transpose(1, 2) == 1)  # per key block: its query blocks
    _dkdv_run[(pl.n_kb, b * hkv)](
        q, k, v, do, saved["tau"], saved["rden"], delta, qb_list, qb_count, dk, dv, mask_arg,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *pl.mask_strides,
        hq, hkv, hq // hkv, n, m, pl.n_qb, pl.n_kb, **pl.scalars, **pl.flags, **pl.launch)
    _dq_run[(pl.n_qb, b * hq)](
        q, k, v, do, saved["tau"], delta, saved["kb_list"], saved["kb_count"], dq, mask_arg,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *pl.mask_strides,
        hq, hq // hkv, n, m, pl.n_qb, pl.n_kb, **pl.scalars, **pl.flags, **pl.launch)
    dsinks = None
    if sinks is not None:  # ds_sink = g_sink (0 - delta): the sink's output is dropped
        u_sink = (sinks.detach().float()[None, :, None] * pl.am1 - saved["tau"]).clamp_min(0.0)
        g_sink = (u_sink > 0).float() if pl.alpha == 2.0 else u_sink.pow(1.0 / pl.am1 - 1.0)
        dsinks = -(g_sink * delta).sum(dim=(0, 2))
    return dq, dk, dv, dsinks


def forward_stats(saved) -> dict:
    """{"skipped_block_fraction", "zero_weight_fraction", "threshold_passes", "threshold_passes_max"} of a
    forward (synchronizes). Passes: streamed passes over the keys before the output pass, per query block (the
    median over blocks, and the most), every pass counted (the max/count and histogram passes included)."""
    bmap = saved["bmap"]
    in_band = int((bmap != OUTSIDE_BAND).sum())
    skipped = int((bmap == 0).sum())
    visible_pairs = float(saved["count"].sum())
    support = float(saved["support"].sum())
    passes = saved["passes"].flatten().float()
    return {"skipped_block_fraction": skipped / in_band if in_band else 0.0,
            "zero_weight_fraction": 1.0 - support / visible_pairs if visible_pairs else 0.0,
            "threshold_passes": float(passes.median()) if passes.numel() else 0.0,
            "threshold_passes_max": int(passes.max()) if passes.numel() else 0}


class _FlashEntmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, mask, alpha, scaling, causal, offset, window, softcap, stats):
        need_grad = any(ctx.needs_input_grad[:4])
        o, saved = entmax_forward(q, k, v, alpha=alpha, scaling=scaling, causal=causal, offset=offset,
                                  window=window, softcap=softcap, sinks=sinks, mask=mask, need_grad=need_grad)
        if stats is not None:
            stats.update(forward_stats(saved))
        if need_grad:
            ctx.save_for_backward(q, k, v, sinks)
            ctx.saved = saved
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, sinks = ctx.saved_tensors
        dq, dk, dv, dsinks = entmax_backward(do, q, k, v, ctx.saved, sinks=sinks)
        if sinks is None or not ctx.needs_input_grad[3]:
            dsinks = None
        else:
            dsinks = dsinks.to(sinks.dtype)
        return dq, dk, dv, dsinks, None, None, None, None, None, None, None, None


def entmax_attention(q, k, v, *, alpha, scaling, causal=False, offset=0, window=None, softcap=None, mask=None,
                     sinks=None, return_stats=False):
    """alpha-entmax attention (differentiable): o (b, Hq, n, d) in q.dtype, or (o, stats) with ``return_stats``:
    stats = {"skipped_block_fraction" (of the key blocks in the causal/window band), "zero_weight_fraction"
    (1 - support size / visible pairs), "threshold_passes" (median over query blocks of the streamed passes over
    the keys before the output pass) and "threshold_passes_max"}.

    q (b, Hq, n, d); k, v (b, Hkv, m, d); query i sits at key position i + offset; ``mask`` bool broadcastable to
    (b, Hq, n, m), True = visible; ``sinks`` (Hq,) logits. alpha in (1, 2]. Generation shapes (n <= 16 queries
    against a long cache) with no gradient wanted take the split-KV path of ``entmax_decode`` (``use_decode``);
    there the only pass over the keys before the output pass is the score pass (threshold_passes 1)."""
    alpha = _check_alpha(alpha)
    if use_decode(q, k, v, sinks, causal=causal, offset=offset, window=window):  # generation: split-KV, no grad
        o, saved = decode_forward(q, k, v, alpha=alpha, scaling=scaling, causal=causal, offset=offset,
                                  window=window, softcap=softcap, sinks=sinks, mask=mask)
        return (o, decode_stats(saved)) if return_stats else o
    stats = {} if return_stats else None
    o = _FlashEntmax.apply(q, k, v, sinks, mask, alpha, float(scaling), bool(causal), int(offset),
                           window, None if softcap is None else float(softcap), stats)
    return (o, stats) if return_stats else o


def kernel(query, key, value, vis, *, scaling, softcap=None, sinks=None, dropout=0.0, need_weights=False,
           **options):
    """Registry kernel of ``entmax`` / ``sparsemax``: ``(out (b, Hq, n, d) in query.dtype, None)``."""
    if dropout or need_weights or vis.has_bias:
        raise ValueError("the entmax kernel takes no dropout, weights or float bias (see supports())")
    if "alpha" not in options:
        raise ValueError("the entmax kernel needs option alpha, a number in (1, 2]")
    out = entmax_attention(query, key, value, alpha=options["alpha"], scaling=scaling, causal=vis.causal,
                           offset=vis.offset, window=vis.window, softcap=softcap, mask=vis.flat_mask(), sinks=sinks)
    return out, None


def supports(query, key, value, vis, *, scaling=None, softcap=None, sinks=None, dropout=0.0, need_weights=False,
             **kw) -> tuple[bool, str]:
    """Whether ``kernel`` can run these inputs, and why not."""
    return common_support(query, key, value, vis, dropout=dropout, need_weights=need_weights, sinks=sinks,
                          name="entmax")
