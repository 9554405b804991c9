"""Chunk-parallel Triton engine of linear attention over precomputed features, forward and backward.

The caller maps queries and keys to features itself (ELU+1 with F = d, Hedgehog with F = 2d, a learned map of
``attnswap.transfer``, any user map; F need not equal the head dim) and passes them in:
``fq`` (b, Hq, n, F), ``fk`` (b, Hkv, m, F), ``v`` (b, Hkv, m, dv). With w_ij = fq_i . fk_j on the visible pairs,

    o_i = num_i / den_i,   num_i = sum_j w_ij v_j = fq_i . S_i,   den_i = sum_j w_ij + eps = fq_i . z_i + eps,
    S_i = sum_{j visible to i} fk_j v_j^T  (F x dv),   z_i = sum_{j visible to i} fk_j  (F),

numerator and denominator accumulated apart in fp32 (eps: a number, or one per query head, e.g. a sink's Taylor
weight for ``taylor``'s feature form), a denominator of exactly 0 read as 1 (an empty row gives 0,
never NaN) -- the ``linear`` kind's linear-time form (``attnswap/kinds/feature_map.py``). Visibility: query i
sits at key position i + offset; causal: it sees keys j <= i + offset; a sliding window w: only j > i + offset - w;
a bool key-padding mask (b, m) drops keys (their features count as 0). GQA maps query head h to KV head
h // (Hq / Hkv); keys and values are never repeated.

Unlike a sequential sweep (one program per (batch row, head, value tile) walking the chunks
in order), every stage here is a parallel grid over chunks, so batch 1 fills a GPU. Chunks are BLOCK_T rows (64 on
a GPU, 16 in the interpreter): C = ceil(m / BLOCK_T) key chunks, Cq = ceil(n / BLOCK_T) query chunks; BLOCK_F and
BLOCK_V tile the features and the value columns (64 on a GPU), so any F and dv fit in registers.

Forward:
  1. ``_chunk_state_kernel``, grid (C, b*Hkv, F tiles x dv tiles): dS_c = fk_c^T v_c and dz_c = sum fk_c (fp32),
     written to slot c + 1 of a (b*Hkv, C + 1, F, dv) buffer whose slot 0 is zero;
  2. an in-place ``cumsum`` over the slot axis: slot c then holds the keys of chunks < c (prefix states);
  3. ``_fwd_kernel``, grid (Cq, b*Hq, dv tiles): per query chunk, the whole key chunks every query of the chunk
     sees from the prefix states (P[hi], or P[hi] - P[lo] under a window), plus the keys only some queries see --
     the causal diagonal and the window edge, a few BLOCK_T blocks -- as exact masked blocks (fq fk^T) v
     (``_key_plan``). Writes o (fp32) and den.
Backward (o = num / den; g_i = do_i / den_i, c_i = -(do_i . o_i) / den_i, so dL/dw_ij = g_i . v_j + c_i):
  * d fq_i = S_i g_i + c_i z_i (+ the edge blocks): ``_dq_kernel``, grid (Cq, b*Hq, F tiles), on the forward's
    saved prefix states;
  * d fk_j = R_j v_j + r_j and d v_j = R_j^T fk_j with the query-side states R_j = sum_{i sees j} fq_i g_i^T,
    r_j = sum_{i sees j} c_i fq_i, summed over the query heads of the KV head's group: ``_chunk_state_kernel`` over
    query chunks (grid (Cq, b*Hkv, F tiles x dv tiles)) and a reversed cumsum (suffix states, slot c = chunks
    >= c), then ``_dk_kernel`` (grid (C, b*Hkv, F tiles)) and ``_dv_kernel`` (grid (C, b*Hkv, dv tiles)), each
    with its edge blocks (``_query_plan``).
Padded keys get zero gradients. Gradients reach any feature map through autograd (``parallel_linear_attention`` is
differentiable in fq, fk and v). A window's states are differences of cumulative fp32 states (as the sequential
sweep subtracts keys leaving its window): their rounding is relative to the largest prefix, not to the window.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import dot_prec
from .tuning import interpreting


# ---------------------------------------------------------------- tile helpers


@triton.jit
def fp32_tile(base, offs, rows_ok, offs_c, stride, width):
    """fp32 (len(offs), len(offs_c)) tile: rows ``offs`` (where ``rows_ok``), columns ``offs_c`` < ``width`` of a
    row-major matrix with row ``stride`` at ``base``; 0 outside."""
    ok = rows_ok[:, None] & (offs_c < width)[None, :]
    return tl.load(base + offs.to(tl.int64)[:, None] * stride + offs_c[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _state_tile(base, offs_f, offs_v, DV, f_left, v_left):
    """fp32 (BLOCK_F, BLOCK_V) tile of an (F, DV) state slot, starting at ``base``: rows offs_f < f_left, columns
    offs_v < v_left; 0 outside."""
    ok = (offs_f < f_left)[:, None] & (offs_v < v_left)[None, :]
    return tl.load(base + offs_f.to(tl.int64)[:, None] * DV + offs_v[None, :], mask=ok, other=0.0)


@triton.jit
def _key_ok(mask_base, offs_n, N_K, HAS_MASK: tl.constexpr):
    """Keys offs_n that exist and are not padded."""
    ok = offs_n < N_K
    if HAS_MASK:
        ok = ok & (tl.load(mask_base + offs_n.to(tl.int64), mask=ok, other=0) != 0)
    return ok


@triton.jit
def _pair_ok(offs_m, offs_n, N_Q, N_K, offset, window, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """(len(offs_m), len(offs_n)) bool: query offs_m sees key offs_n (lengths, causal, window; not key padding)."""
    ok = (offs_m < N_Q)[:, None] & (offs_n < N_K)[None, :]
    if IS_CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + offset)
    if HAS_WINDOW:
        ok = ok & (offs_n[None, :] > offs_m[:, None] + offset - window)
    return ok


@triton.jit
def clamp(x, hi):
    return tl.minimum(tl.maximum(x, 0), hi)


@triton.jit
def _key_plan(start_m, N_K, offset, window, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              BLOCK_T: tl.constexpr):
    """How the query chunk at ``start_m`` sees the keys: (lo, hi, e1, e1_end, e2, e2_end). The whole key chunks
    [lo, hi) that every query of the chunk sees come from the prefix states, P[hi] - P[lo] (P[hi] alone without a
    window: lo = 0); the keys [e1, e1_end) and [e2, e2_end) that only some queries see (causal diagonal, window
    edge) go through exact masked blocks. With no whole chunk, lo = hi and [e1, e1_end) holds every key seen."""
    k0 = 0
    k1 = N_K
    a = 0
    bnd = N_K
    if IS_CAUSAL:
        k1 = clamp(start_m + BLOCK_T + offset, N_K)  # the chunk's last query sees keys < k1
        bnd = clamp(start_m + offset + 1, N_K)  # its first query sees keys < start_m + offset + 1
    if HAS_WINDOW:
        k0 = clamp(start_m + offset - window + 1, N_K)
        a = clamp(start_m + BLOCK_T - 1 + offset - window + 1, N_K)
    lo = (a + BLOCK_T - 1) // BLOCK_T
    hi = tl.where(bnd == N_K, (N_K + BLOCK_T - 1) // BLOCK_T, bnd // BLOCK_T)  # the last slot holds every key
    whole = hi > lo
    e1_end = tl.where(whole, tl.minimum(lo * BLOCK_T, k1), k1)
    e2 = tl.where(whole, tl.minimum(hi * BLOCK_T, k1), k1)
    hi = tl.where(whole, hi, lo)
    return lo, hi, k0, e1_end, e2, k1


@triton.jit
def _query_plan(start_n, N_Q, offset, window, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                BLOCK_T: tl.constexpr):
    """How the key chunk at ``start_n`` is seen by the queries: (lo, hi, e1, e1_end, e2, e2_end). The whole query
    chunks [lo, hi) that see every key of the chunk come from the suffix states, R[lo] - R[hi] (R[lo] alone
    without a window: hi = Cq, R[Cq] = 0); the queries [e1, e1_end) and [e2, e2_end) that see only some keys go
    through exact masked blocks. With no whole chunk, lo = hi and [e1, e1_end) holds every query that sees any."""
    i0 = 0
    i1 = N_Q
    a = 0
    bnd = N_Q
    if IS_CAUSAL:  # j <= i + offset
        i0 = clamp(start_n - offset, N_Q)
        a = clamp(start_n + BLOCK_T - 1 - offset, N_Q)
    if HAS_WINDOW:  # j > i + offset - window
        i1 = clamp(start_n + BLOCK_T - 1 - offset + window, N_Q)
        bnd = clamp(start_n - offset + window, N_Q)
    lo = (a + BLOCK_T - 1) // BLOCK_T
    hi = tl.where(bnd == N_Q, (N_Q + BLOCK_T - 1) // BLOCK_T, bnd // BLOCK_T)
    whole = hi > lo
    e1_end = tl.where(whole, tl.minimum(lo * BLOCK_T, i1), i1)
    e2 = tl.where(whole, tl.minimum(hi * BLOCK_T, i1), i1)
    lo = tl.where(whole, lo, hi)
    return lo, hi, i0, e1_end, e2, i1


# ---------------------------------------------------------------- stage kernels


@triton.jit
def query_chunk(HQ, GROUP, N_Q, N_K, BLOCK_T: tl.constexpr):
    """A query-chunk program's coordinates (program ids 0, 1 = chunk, batch row x query head): (first row, bh,
    batch row, its KV head's index bkv, prefix slots of the key chunks, row offsets, row mask)."""
    start_m = tl.program_id(0) * BLOCK_T
    bh = tl.program_id(1).to(tl.int64)
    batch = bh // HQ
    bkv = batch * (HQ // GROUP) + (bh % HQ) // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_T)
    return start_m, bh, batch, bkv, (N_K + BLOCK_T - 1) // BLOCK_T + 1, offs_m, offs_m < N_Q


@triton.jit
def _key_chunk(HKV, N_Q, BLOCK_T: tl.constexpr):
    """A key-chunk program's coordinates (program ids 0, 1 = chunk, batch row x KV head): (first key, bkv, batch
    row, prefix slots of the query chunks, key offsets)."""
    start_n = tl.program_id(0) * BLOCK_T
    bkv = tl.program_id(1).to(tl.int64)
    return start_n, bkv, bkv // HKV, (N_Q + BLOCK_T - 1) // BLOCK_T + 1, start_n + tl.arange(0, BLOCK_T)


@triton.jit
def _chunk_state_kernel(X, Y, W, MASK, P, PZ, H_OUT, GROUP, N_ROWS, F, DV, SLOT_SHIFT,
                        HAS_W: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr):
    """One chunk's state: P[bh, c + SLOT_SHIFT] = sum_g X_c^T Y_c (BLOCK_F x BLOCK_V tile) and, on value tile 0,
    PZ[bh, c + SLOT_SHIFT] = sum_g X_c^T w_c, summed over the GROUP input heads g of output head bh (input head
    = h * GROUP + g). X (b, H_OUT * GROUP, N_ROWS, F), Y (..., DV), W (..., N_ROWS) fp32 or ones; MASK (b, N_ROWS)
    zeroes padded rows. Grid (chunks, b * H_OUT, F tiles * dv tiles)."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    f_tile = tl.program_id(2) // tl.cdiv(DV, BLOCK_V)
    v_tile = tl.program_id(2) % tl.cdiv(DV, BLOCK_V)
    batch = bh // H_OUT
    offs_t = c * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_f = f_tile * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_v = v_tile * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = _key_ok(MASK + batch * N_ROWS, offs_t, N_ROWS, HAS_MASK)
    acc = tl.zeros([BLOCK_F, BLOCK_V], dtype=tl.float32)
    accz = tl.zeros([BLOCK_F], dtype=tl.float32)
    for g in range(0, GROUP):
        head = bh * GROUP + g
        x = fp32_tile(X + head * N_ROWS * F + f_tile * BLOCK_F, offs_t, ok, tl.arange(0, BLOCK_F), F, F - f_tile * BLOCK_F)
        y = fp32_tile(Y + head * N_ROWS * DV + v_tile * BLOCK_V, offs_t, ok, tl.arange(0, BLOCK_V), DV,
                  DV - v_tile * BLOCK_V)
        acc = tl.dot(tl.trans(x), y, acc, input_precision=DOT_PREC)
        if HAS_W:
            w = tl.load(W + head * N_ROWS + offs_t, mask=ok, other=0.0)
            accz += tl.sum(x * w[:, None], 0)
        else:
            accz += tl.sum(x, 0)
    slot = bh * (tl.num_programs(0) + 1) + c + SLOT_SHIFT
    tl.store(P + (slot * F + offs_f)[:, None] * DV + offs_v[None, :], acc,
             mask=(offs_f < F)[:, None] & (offs_v < DV)[None, :])
    if v_tile == 0:
        tl.store(PZ + slot * F + offs_f, accz, mask=offs_f < F)


@triton.jit
def _cumulative(base, take, drop, SLOT, offs_f, offs_v, STRIDE, f_left, v_left, HAS_DROP: tl.constexpr):
    """A (BLOCK_F, BLOCK_V) state tile (rows of STRIDE elements) from cumulative slots: slot ``take`` minus slot
    ``drop`` when ``HAS_DROP``. ``base`` at the tile's corner in slot 0; ``SLOT``
    elements per slot. Prefix states (slot c = chunks < c) give chunks [lo, hi) as take = hi, drop = lo; suffix
    states (slot c = chunks >= c) as take = lo, drop = hi; without a window the dropped slot is 0 (lo = 0, or
    hi = the last slot): ``HAS_DROP`` False."""
    s = _state_tile(base + take.to(tl.int64) * SLOT, offs_f, offs_v, STRIDE, f_left, v_left)
    if HAS_DROP:
        s -= _state_tile(base + drop.to(tl.int64) * SLOT, offs_f, offs_v, STRIDE, f_left, v_left)
    return s


@triton.jit
def _cumulative_vec(base, take, drop, SLOT, offs_f, f_left, HAS_DROP: tl.constexpr):
    """The (BLOCK_F,) vector of cumulative slots (the z / r normalizer states): slot ``take`` minus slot ``drop``."""
    z = tl.load(base + take.to(tl.int64) * SLOT + offs_f, mask=offs_f < f_left, other=0.0)
    if HAS_DROP:
        z -= tl.load(base + drop.to(tl.int64) * SLOT + offs_f, mask=offs_f < f_left, other=0.0)
    return z


@triton.jit
def _fwd_block(num, den, fq_base, fk_base, v_base, mask_base, offs_m, row_ok, n0, lim, N_Q, N_K, F, DV, v0,
               offset, window, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
               DOT_PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr):
    """num += (w * visible) v, den += rowsum for the keys [n0, min(n0 + BLOCK_T, lim)), w = fq fk^T."""
    offs_n = n0 + tl.arange(0, BLOCK_T)
    key_ok = _key_ok(mask_base, offs_n, N_K, HAS_MASK) & (offs_n < lim)
    offs_f = tl.arange(0, BLOCK_F)
    w = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        fq = fp32_tile(fq_base + f0, offs_m, row_ok, offs_f, F, F - f0)
        fk = fp32_tile(fk_base + f0, offs_n, key_ok, offs_f, F, F - f0)
        w = tl.dot(fq, tl.trans(fk), w, input_precision=DOT_PREC)
    w = tl.where(_pair_ok(offs_m, offs_n, N_Q, N_K, offset, window, IS_CAUSAL, HAS_WINDOW), w, 0.0)
    num = tl.dot(w, fp32_tile(v_base, offs_n, key_ok, tl.arange(0, BLOCK_V), DV, DV - v0), num, input_precision=DOT_PREC)
    return num, den + tl.sum(w, 1)


@triton.jit
def linear_rows(FQ, FK, V, MASK, P, PZ, start_m, bh, batch, bkv, slots, offs_m, row_ok, N_Q, N_K, F, DV, v0, offset,
                window, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
                DOT_PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr):
    """(num (BLOCK_T, BLOCK_V), den (BLOCK_T,)) fp32 of the query chunk at ``start_m`` and value tile ``v0``: the whole
    key chunks from the prefix states, the rest in exact blocks (eps not added). Shared with the kernels that put
    a linear part beside an exact one (``kernels/window_linear.py``)."""
    offs_f = tl.arange(0, BLOCK_F)
    offs_v = tl.arange(0, BLOCK_V)
    fq_base = FQ + bh * N_Q * F
    fk_base = FK + bkv * N_K * F
    v_base = V + bkv * N_K * DV + v0
    mask_base = MASK + batch * N_K
    lo, hi, e1, e1_end, e2, e2_end = _key_plan(start_m, N_K, offset, window, IS_CAUSAL, HAS_WINDOW, BLOCK_T)
    num = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
    den = tl.zeros([BLOCK_T], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):  # the whole key chunks: fq . S, fq . z
        fq = fp32_tile(fq_base + f0, offs_m, row_ok, offs_f, F, F - f0)
        s = _cumulative(P + (bkv * slots * F + f0) * DV + v0, hi, lo, F * DV, offs_f, offs_v, DV, F - f0, DV - v0,
                        HAS_WINDOW)
        z = _cumulative_vec(PZ + bkv * slots * F + f0, hi, lo, F, offs_f, F - f0, HAS_WINDOW)
        num = tl.dot(fq, s, num, input_precision=DOT_PREC)
        den += tl.sum(fq * z[None, :], 1)
    for n0 in range(e1, e1_end, BLOCK_T):  # the edges: exact masked blocks
        num, den = _fwd_block(num, den, fq_base, fk_base, v_base, mask_base, offs_m, row_ok, n0, e1_end, N_Q, N_K,
                              F, DV, v0, offset, window, IS_CAUSAL, HAS_WINDOW, HAS_MASK, DOT_PREC, BLOCK_T, BLOCK_F,
                              BLOCK_V)
    for n0 in range(e2, e2_end, BLOCK_T):
        num, den = _fwd_block(num, den, fq_base, fk_base, v_base, mask_base, offs_m, row_ok, n0, e2_end, N_Q, N_K,
                              F, DV, v0, offset, window, IS_CAUSAL, HAS_WINDOW, HAS_MASK, DOT_PREC, BLOCK_T, BLOCK_F,
                              BLOCK_V)
    return num, den


@triton.jit
def _fwd_kernel(FQ, FK, V, MASK, P, PZ, O, DEN, EPS, HQ, GROUP, N_Q, N_K, F, DV, offset, window,
                IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr):
    """o and den of one query chunk and value tile. Grid (Cq, b * Hq, dv tiles)."""
    start_m, bh, batch, bkv, slots, offs_m, row_ok = query_chunk(HQ, GROUP, N_Q, N_K, BLOCK_T)
    v0 = tl.program_id(2) * BLOCK_V
    offs_v = tl.arange(0, BLOCK_V)
    num, den = linear_rows(FQ, FK, V, MASK, P, PZ, start_m, bh, batch, bkv, slots, offs_m, row_ok, N_Q, N_K, F, DV,
                           v0, offset, window, IS_CAUSAL, HAS_WINDOW, HAS_MASK, DOT_PREC, BLOCK_T, BLOCK_F, BLOCK_V)
    den = den + tl.load(EPS + bh % HQ)
    den = tl.where(den == 0.0, 1.0, den)
    rows = bh * N_Q + offs_m.to(tl.int64)
    tl.store(O + rows[:, None] * DV + v0 + offs_v[None, :], num / den[:, None],
             mask=row_ok[:, None] & (offs_v < DV - v0)[None, :])
    if v0 == 0:
        tl.store(DEN + rows, den, mask=row_ok)


@triton.jit
def _dq_block(acc, g_base, v_base, fk_base, mask_base, c, offs_m, row_ok, n0, lim, N_Q, N_K, F, DV, f0, offset,
              window, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
              DOT_PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr):
    """acc += ((g v^T + c) * visible) fk[:, f0 tile] for the keys [n0, min(n0 + BLOCK_T, lim))."""
    offs_n = n0 + tl.arange(0, BLOCK_T)
    key_ok = _key_ok(mask_base, offs_n, N_K, HAS_MASK) & (offs_n < lim)
    offs_v = tl.arange(0, BLOCK_V)
    dw = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32) + c[:, None]
    for v0 in range(0, DV, BLOCK_V):
        g = fp32_tile(g_base + v0, offs_m, row_ok, offs_v, DV, DV - v0)
        v = fp32_tile(v_base + v0, offs_n, key_ok, offs_v, DV, DV - v0)
        dw = tl.dot(g, tl.trans(v), dw, input_precision=DOT_PREC)
    seen = _pair_ok(offs_m, offs_n, N_Q, N_K, offset, window, IS_CAUSAL, HAS_WINDOW) & key_ok[None, :]
    dw = tl.where(seen, dw, 0.0)
    fk = fp32_tile(fk_base + f0, offs_n, key_ok, tl.arange(0, BLOCK_F), F, F - f0)
    return tl.dot(dw, fk, acc, input_precision=DOT_PREC)


@triton.jit
def _dq_kernel(FK, V, G, CQ, MASK, P, PZ, DFQ, HQ, GROUP, N_Q, N_K, F, DV, offset, window,
               IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr):
    """d fq of one query chunk and feature tile: S g + c z from the prefix states (the forward's key plan), plus
    the edge blocks ((g . v + c) * visible) fk. G (b, Hq, n, dv), CQ (b, Hq, n) fp32. Grid (Cq, b * Hq, F tiles)."""
    start_m, bh, batch, bkv, slots, offs_m, row_ok = query_chunk(HQ, GROUP, N_Q, N_K, BLOCK_T)
    f0 = tl.program_id(2) * BLOCK_F
    offs_f = tl.arange(0, BLOCK_F)
    offs_v = tl.arange(0, BLOCK_V)
    g_base = G + bh * N_Q * DV
    v_base = V + bkv * N_K * DV
    fk_base = FK + bkv * N_K * F
    mask_base = MASK + batch * N_K
    c = tl.load(CQ + bh * N_Q + offs_m, mask=row_ok, other=0.0)
    lo, hi, e1, e1_end, e2, e2_end = _key_plan(start_m, N_K, offset, window, IS_CAUSAL, HAS_WINDOW, BLOCK_T)
    z = _cumulative_vec(PZ + bkv * slots * F + f0, hi, lo, F, offs_f, F - f0, HAS_WINDOW)
    acc = c[:, None] * z[None, :]
    for v0 in range(0, DV, BLOCK_V):
        g = fp32_tile(g_base + v0, offs_m, row_ok, offs_v, DV, DV - v0)
        s = _cumulative(P + (bkv * slots * F + f0) * DV + v0, hi, lo, F * DV, offs_f, offs_v, DV, F - f0, DV - v0,
                        HAS_WINDOW)
        acc = tl.dot(g, tl.trans(s), acc, input_precision=DOT_PREC)
    for n0 in range(e1, e1_end, BLOCK_T):
        acc = _dq_block(acc, g_base, v_base, fk_base, mask_base, c, offs_m, row_ok, n0, e1_end, N_Q, N_K, F, DV,
                        f0, offset, window, IS_CAUSAL, HAS_WINDOW, HAS_MASK, DOT_PREC, BLOCK_T, BLOCK_F, BLOCK_V)
    for n0 in range(e2, e2_end, BLOCK_T):
        acc = _dq_block(acc, g_base, v_base, fk_base, mask_base, c, offs_m, row_ok, n0, e2_end, N_Q, N_K, F, DV,
                        f0, offset, window, IS_CAUSAL, HAS_WINDOW, HAS_MASK, DOT_PREC, BLOCK_T, BLOCK_F, BLOCK_V)
    tl.store(DFQ + (bh * N_Q + offs_m.to(tl.int64))[:, None] * F + f0 + offs_f[None, :], acc,
             mask=row_ok[:, None] & (offs_f < F - f0)[None, :])


@triton.jit
def _dk_block(acc, FQ, G, CQ, v_base, bkv, offs_n, key_ok, m0, lim, GROUP, N_Q, N_K, F, DV, f0, offset, window,
              IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_T: tl.constexpr,
              BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr):
    """acc += sum over the group's query heads of ((v g^T + c) * visible) fq[:, f0 tile], for the queries
    [m0, min(m0 + BLOCK_T, lim))."""
    offs_m = m0 + tl.arange(0, BLOCK_T)
    row_ok = (offs_m < N_Q) & (offs_m < lim)
    offs_v = tl.arange(0, BLOCK_V)
    seen = tl.trans(_pair_ok(offs_m, offs_n, N_Q, N_K, offset, window, IS_CAUSAL, HAS_WINDOW)) & row_ok[None, :]
    for gi in range(0, GROUP):
        bh = bkv * GROUP + gi
        c = tl.load(CQ + bh * N_Q + offs_m, mask=row_ok, other=0.0)
        dw = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32) + c[None, :]
        for v0 in range(0, DV, BLOCK_V):
            v = fp32_tile(v_base + v0, offs_n, key_ok, offs_v, DV, DV - v0)
            g = fp32_tile(G + bh * N_Q * DV + v0, offs_m, row_ok, offs_v, DV, DV - v0)
            dw = tl.dot(v, tl.trans(g), dw, input_precision=DOT_PREC)
        dw = tl.where(seen, dw, 0.0)
        fq = fp32_tile(FQ + bh * N_Q * F + f0, offs_m, row_ok, tl.arange(0, BLOCK_F), F, F - f0)
        acc = tl.dot(dw, fq, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _dk_kernel(FQ, V, G, CQ, MASK, R, RZ, DFK, HKV, GROUP, N_Q, N_K, F, DV, offset, window,
               IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr):
    """d fk of one key chunk and feature tile: R v + r from the suffix states (group-summed), plus the edge blocks
    ((v . g + c) * visible)^T fq of each query head of the group; 0 on padded keys. Grid (C, b * Hkv, F tiles)."""
    start_n, bkv, batch, slots, offs_n = _key_chunk(HKV, N_Q, BLOCK_T)
    f0 = tl.program_id(2) * BLOCK_F
    key_ok = _key_ok(MASK + batch * N_K, offs_n, N_K, HAS_MASK)
    offs_f = tl.arange(0, BLOCK_F)
    offs_v = tl.arange(0, BLOCK_V)
    v_base = V + bkv * N_K * DV
    lo, hi, e1, e1_end, e2, e2_end = _query_plan(start_n, N_Q, offset, window, IS_CAUSAL, HAS_WINDOW, BLOCK_T)
    rz = _cumulative_vec(RZ + bkv * slots * F + f0, lo, hi, F, offs_f, F - f0, HAS_WINDOW)
    acc = tl.zeros([BLOCK_T, BLOCK_F], dtype=tl.float32) + rz[None, :]
    for v0 in range(0, DV, BLOCK_V):
        v = fp32_tile(v_base + v0, offs_n, key_ok, offs_v, DV, DV - v0)
        r = _cumulative(R + (bkv * slots * F + f0) * DV + v0, lo, hi, F * DV, offs_f, offs_v, DV, F - f0, DV - v0,
                        HAS_WINDOW)
        acc = tl.dot(v, tl.trans(r), acc, input_precision=DOT_PREC)
    for m0 in range(e1, e1_end, BLOCK_T):
        acc = _dk_block(acc, FQ, G, CQ, v_base, bkv, offs_n, key_ok, m0, e1_end, GROUP, N_Q, N_K, F, DV, f0,
                        offset, window, IS_CAUSAL, HAS_WINDOW, DOT_PREC, BLOCK_T, BLOCK_F, BLOCK_V)
    for m0 in range(e2, e2_end, BLOCK_T):
        acc = _dk_block(acc, FQ, G, CQ, v_base, bkv, offs_n, key_ok, m0, e2_end, GROUP, N_Q, N_K, F, DV, f0,
                        offset, window, IS_CAUSAL, HAS_WINDOW, DOT_PREC, BLOCK_T, BLOCK_F, BLOCK_V)
    acc = tl.where(key_ok[:, None], acc, 0.0)
    tl.store(DFK + (bkv * N_K + offs_n.to(tl.int64))[:, None] * F + f0 + offs_f[None, :], acc,
             mask=(offs_n < N_K)[:, None] & (offs_f < F - f0)[None, :])


@triton.jit
def _dv_block(acc, FQ, G, fk_base, bkv, offs_n, key_ok, m0, lim, GROUP, N_Q, N_K, F, DV, v0, offset, window,
              IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_T: tl.constexpr,
              BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr):
    """acc += sum over the group's query heads of ((fk fq^T) * visible) g[:, v0 tile], for the queries
    [m0, min(m0 + BLOCK_T, lim))."""
    offs_m = m0 + tl.arange(0, BLOCK_T)
    row_ok = (offs_m < N_Q) & (offs_m < lim)
    offs_f = tl.arange(0, BLOCK_F)
    seen = tl.trans(_pair_ok(offs_m, offs_n, N_Q, N_K, offset, window, IS_CAUSAL, HAS_WINDOW)) & row_ok[None, :]
    for gi in range(0, GROUP):
        bh = bkv * GROUP + gi
        w = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
        for f0 in range(0, F, BLOCK_F):
            fk = fp32_tile(fk_base + f0, offs_n, key_ok, offs_f, F, F - f0)
            fq = fp32_tile(FQ + bh * N_Q * F + f0, offs_m, row_ok, offs_f, F, F - f0)
            w = tl.dot(fk, tl.trans(fq), w, input_precision=DOT_PREC)
        w = tl.where(seen, w, 0.0)
        g = fp32_tile(G + bh * N_Q * DV + v0, offs_m, row_ok, tl.arange(0, BLOCK_V), DV, DV - v0)
        acc = tl.dot(w, g, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _dv_kernel(FQ, FK, G, MASK, R, DV_OUT, HKV, GROUP, N_Q, N_K, F, DV, offset, window,
               IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr):
    """d v of one key chunk and value tile: fk R from the suffix states, plus the edge blocks ((fk fq^T) * visible)
    g of each query head of the group; 0 on padded keys (their features are 0). Grid (C, b * Hkv, dv tiles)."""
    start_n, bkv, batch, slots, offs_n = _key_chunk(HKV, N_Q, BLOCK_T)
    v0 = tl.program_id(2) * BLOCK_V
    key_ok = _key_ok(MASK + batch * N_K, offs_n, N_K, HAS_MASK)
    offs_f = tl.arange(0, BLOCK_F)
    offs_v = tl.arange(0, BLOCK_V)
    fk_base = FK + bkv * N_K * F
    lo, hi, e1, e1_end, e2, e2_end = _query_plan(start_n, N_Q, offset, window, IS_CAUSAL, HAS_WINDOW, BLOCK_T)
    acc = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        fk = fp32_tile(fk_base + f0, offs_n, key_ok, offs_f, F, F - f0)
        r = _cumulative(R + (bkv * slots * F + f0) * DV + v0, lo, hi, F * DV, offs_f, offs_v, DV, F - f0, DV - v0,
                        HAS_WINDOW)
        acc = tl.dot(fk, r, acc, input_precision=DOT_PREC)
    for m0 in range(e1, e1_end, BLOCK_T):
        acc = _dv_block(acc, FQ, G, fk_base, bkv, offs_n, key_ok, m0, e1_end, GROUP, N_Q, N_K, F, DV, v0, offset,
                        window, IS_CAUSAL, HAS_WINDOW, DOT_PREC, BLOCK_T, BLOCK_F, BLOCK_V)
    for m0 in range(e2, e2_end, BLOCK_T):
        acc = _dv_block(acc, FQ, G, fk_base, bkv, offs_n, key_ok, m0, e2_end, GROUP, N_Q, N_K, F, DV, v0, offset,
                        window, IS_CAUSAL, HAS_WINDOW, DOT_PREC, BLOCK_T, BLOCK_F, BLOCK_V)
    tl.store(DV_OUT + (bkv * N_K + offs_n.to(tl.int64))[:, None] * DV + v0 + offs_v[None, :], acc,
             mask=(offs_n < N_K)[:, None] & (offs_v < DV - v0)[None, :])


# ---------------------------------------------------------------- host side

# chunk rows BLOCK_T, feature tile BLOCK_F, value tile BLOCK_V: 64 on a GPU (measured without spills on sm_90 with 4
# warps, ``benchmarks/compile_stats.py``), 16 in the interpreter so that small tests cross chunks and tiles
GPU_BLOCKS = {"BLOCK_T": 64, "BLOCK_F": 64, "BLOCK_V": 64}
INTERPRETER_BLOCKS = {"BLOCK_T": 16, "BLOCK_F": 16, "BLOCK_V": 16}
NUM_WARPS = 4


def blocks(chunk: int | None = None) -> dict:
    """The tile sizes a launch uses: ``GPU_BLOCKS`` (``INTERPRETER_BLOCKS`` under TRITON_INTERPRET=1), with
    ``chunk`` (a power of two >= 16) replacing BLOCK_T."""
    out = dict(INTERPRETER_BLOCKS if interpreting() else GPU_BLOCKS)
    if chunk is not None:
        if chunk < 16 or chunk & (chunk - 1):
            raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
        out["BLOCK_T"] = chunk
    return out


def _tile(width: int, block: int) -> int:
    """A tile width for a dimension of ``width``: ``block``, or less (>= 16) for a narrow dimension."""
    return max(16, min(block, triton.next_power_of_2(width)))


def grid(b: int, hq: int, hkv: int, n: int, m: int, f: int, dv: int, chunk: int | None = None) -> dict:
    """The launch grids, by kernel name, for fq (b, hq, n, f), fk (b, hkv, m, f), v (b, hkv, m, dv): every stage
    has one program per chunk per head (times feature / value tiles)."""
    bl = blocks(chunk)
    bt, bf, bv = bl["BLOCK_T"], _tile(f, bl["BLOCK_F"]), _tile(dv, bl["BLOCK_V"])
    ck, cq, tf, tv = triton.cdiv(m, bt), triton.cdiv(n, bt), triton.cdiv(f, bf), triton.cdiv(dv, bv)
    return {"key_states": (ck, b * hkv, tf * tv), "forward": (cq, b * hq, tv), "dq": (cq, b * hq, tf),
            "query_states": (cq, b * hkv, tf * tv), "dk": (ck, b * hkv, tf), "dv": (ck, b * hkv, tv)}


def launch_args(bl: dict, f: int, dv: int, dtype) -> dict:
    """Tiles (narrowed to F and dv), dot precision, warps and stages of a launch."""
    return {"BLOCK_T": bl["BLOCK_T"], "BLOCK_F": _tile(f, bl["BLOCK_F"]), "BLOCK_V": _tile(dv, bl["BLOCK_V"]),
            "DOT_PREC": dot_prec(dtype), "num_warps": 1 if interpreting() else NUM_WARPS, "num_stages": 1}


def chunk_states(x, y, w, mask, *, group: int, chunk_rows: int, prefix: bool, bl: dict, prec: str):
    """States of row chunks, summed over ``group`` consecutive input heads: (P (b*H, C + 1, F, dv), PZ (b*H, C + 1,
    F)) fp32 with H = x heads / group. ``prefix``: slot c holds chunks < c (slot 0 empty); else slot c holds chunks
    >= c (slot C empty). ``prec``: the dots' input precision."""
    b, hx, rows, f = x.shape
    dv = y.shape[-1]
    heads = hx // group
    chunks = triton.cdiv(rows, chunk_rows)
    p = torch.empty((b * heads, chunks + 1, f, dv), device=x.device, dtype=torch.float32)
    pz = torch.empty((b * heads, chunks + 1, f), device=x.device, dtype=torch.float32)
    empty = 0 if prefix else chunks
    p[:, empty].zero_()
    pz[:, empty].zero_()
    if chunks and b * heads:
        la = launch_args(bl, f, dv, x.dtype)
        la["DOT_PREC"] = prec
        tiles = triton.cdiv(f, la["BLOCK_F"]) * triton.cdiv(dv, la["BLOCK_V"])
        dummy = p  # the pointer passed for an absent W / MASK (never read)
        _chunk_state_kernel[(chunks, b * heads, tiles)](
            x, y, w if w is not None else dummy, mask if mask is not None else dummy, p, pz, heads, group, rows, f,
            dv, 1 if prefix else 0, HAS_W=w is not None, HAS_MASK=mask is not None, **la)
    if prefix:
        p.cumsum_(1)
        pz.cumsum_(1)
    else:
        p = p.flip(1).cumsum(1).flip(1)
        pz = pz.flip(1).cumsum(1).flip(1)
    return p, pz


def _key_mask(key_mask, b: int, m: int, device):
    """A bool key mask (b|1, m) -> contiguous uint8 (b, m), or None; ValueError for anything else."""
    if key_mask is None:
        return None
    if key_mask.dtype != torch.bool or key_mask.dim() != 2 or key_mask.shape[0] not in (1, b) \
            or key_mask.shape[1] != m:
        raise ValueError(f"key_mask must be bool (b|1, m) = ({b}|1, {m}), got {key_mask.dtype} "
                         f"{tuple(key_mask.shape)}")
    if key_mask.device != device:
        raise ValueError("key_mask must be on the features' device")
    return key_mask.expand(b, m).contiguous().view(torch.uint8)


def _check(fq, fk, v):
    """Shapes (b, Hq, n, F), (b, Hkv, m, F), (b, Hkv, m, dv) on one device, Hq a multiple of Hkv, float dtypes.
    (CUDA tensors, or CPU ones under TRITON_INTERPRET=1, are the caller's check -- ``supports`` of the kind -- so
    that ``benchmarks/compile_stats.py`` can drive this entry point on CPU tensors.)"""
    if fq.dim() != 4 or fk.dim() != 4 or v.dim() != 4:
        raise ValueError("fq, fk, v must be 4D: (b, Hq, n, F), (b, Hkv, m, F), (b, Hkv, m, dv)")
    b, hq, _, f = fq.shape
    if fk.shape[0] != b or fk.shape[-1] != f:
        raise ValueError(f"fk must be (b, Hkv, m, F) = ({b}, Hkv, m, {f}), got {tuple(fk.shape)}")
    if v.shape[:3] != fk.shape[:3]:
        raise ValueError(f"v must be (b, Hkv, m, dv) with fk's (b, Hkv, m) = {tuple(fk.shape[:3])}, got "
                         f"{tuple(v.shape)}")
    if fk.shape[1] == 0 or hq % fk.shape[1]:
        raise ValueError(f"the query heads ({hq}) must be a multiple of the KV heads ({fk.shape[1]})")
    if not (fq.device == fk.device == v.device):
        raise ValueError("fq, fk and v must be on one device")
    for name, t in (("fq", fq), ("fk", fk), ("v", v)):
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{name} must be fp16, bf16 or fp32, got {t.dtype}")


def _precision(*tensors):
    """The dots' precision, from the inputs (fq, fk, v): exact fp32 ("ieee") when any is fp32 (and for bf16 in the
    interpreter, ``tiles.dot_prec``), else tf32: every tile is fp32 in registers (the states are fp32)."""
    if any(t.dtype == torch.float32 for t in tensors):
        return dot_prec(torch.float32)
    return dot_prec(tensors[0].dtype)


def _flags(causal: bool, window, key_mask) -> dict:
    """The visibility constexprs of a launch."""
    return {"IS_CAUSAL": bool(causal), "HAS_WINDOW": window is not None, "HAS_MASK": key_mask is not None}


def forward(fq, fk, v, *, causal: bool, offset: int, window, key_mask, eps, chunk=None):
    """The forward stages (``eps``: fp32 (Hq,), one per query head) -> (o fp32 (b, Hq, n, dv), den fp32 (b, Hq, n)
    (eps included, 0 read as 1),
    prefix states P (b*Hkv, C + 1, F, dv), PZ (b*Hkv, C + 1, F))."""
    b, hq, n, f = fq.shape
    hkv, m, dv = fk.shape[1], fk.shape[2], v.shape[-1]
    bl = blocks(chunk)
    la = launch_args(bl, f, dv, fq.dtype)
    la["DOT_PREC"] = _precision(fq, fk, v)
    p, pz = chunk_states(fk, v, None, key_mask, group=1, chunk_rows=bl["BLOCK_T"], prefix=True, bl=bl,
                          prec=la["DOT_PREC"])
    o = torch.empty((b, hq, n, dv), device=fq.device, dtype=torch.float32)
    den = torch.empty((b, hq, n), device=fq.device, dtype=torch.float32)
    if n and b * hq:
        _fwd_kernel[(triton.cdiv(n, bl["BLOCK_T"]), b * hq, triton.cdiv(dv, la["BLOCK_V"]))](
            fq, fk, v, key_mask if key_mask is not None else p, p, pz, o, den, eps, hq, hq // hkv, n, m, f, dv,
            int(offset), int(window or 0), **_flags(causal, window, key_mask), **la)
    return o, den, p, pz


def rows_seeing_keys(n: int, m: int, *, causal: bool, offset: int, window, key_mask, device) -> torch.Tensor:
    """(b|1, n) bool: query i sees at least one real key (its causal / window range holds an unpadded key)."""
    i = torch.arange(n, device=device)
    k1 = (i + offset + 1).clamp(0, m) if causal else torch.full_like(i, m)
    k0 = (i + offset - window + 1).clamp(0, m) if window is not None else torch.zeros_like(i)
    k0 = torch.minimum(k0, k1)
    if key_mask is None:
        return (k1 > k0)[None]
    counts = torch.nn.functional.pad(key_mask.to(torch.int32).cumsum(-1), (1, 0))
    return (counts[:, k1] - counts[:, k0]) > 0


def backward(do, fq, fk, v, o, den, p, pz, *, causal: bool, offset: int, window, key_mask, chunk=None):
    """The backward stages -> (d fq, d fk, d v) in fp32."""
    b, hq, n, f = fq.shape
    hkv, m, dv = fk.shape[1], fk.shape[2], v.shape[-1]
    group = hq // hkv
    bl = blocks(chunk)
    la = launch_args(bl, f, dv, fq.dtype)
    la["DOT_PREC"] = _precision(fq, fk, v)
    sees = rows_seeing_keys(n, m, causal=causal, offset=offset, window=window, key_mask=key_mask, device=fq.device)
    # rows that see no key (den = eps) would put do / eps into the query-side states, whose window differences
    # would then lose everything else to rounding: their g and c are 0 (they reach no key anyway)
    g = torch.where(sees[:, None, :, None], do.float() / den.unsqueeze(-1), 0.0).contiguous()
    c = torch.where(sees[:, None, :], -(do.float() * o).sum(-1) / den, 0.0).contiguous()
    r, rz = chunk_states(fq, g, c, None, group=group, chunk_rows=bl["BLOCK_T"], prefix=False, bl=bl,
                          prec=la["DOT_PREC"])
    dfq = torch.empty((b, hq, n, f), device=fq.device, dtype=torch.float32)
    dfk = torch.empty((b, hkv, m, f), device=fq.device, dtype=torch.float32)
    dv_ = torch.empty((b, hkv, m, dv), device=fq.device, dtype=torch.float32)
    mask = key_mask if key_mask is not None else p
    flags = {**_flags(causal, window, key_mask), **la}
    vis = (int(offset), int(window or 0))
    tf, tv = triton.cdiv(f, la["BLOCK_F"]), triton.cdiv(dv, la["BLOCK_V"])
    if n and b * hq:
        _dq_kernel[(triton.cdiv(n, bl["BLOCK_T"]), b * hq, tf)](
            fk, v, g, c, mask, p, pz, dfq, hq, group, n, m, f, dv, *vis, **flags)
    if m and b * hkv:
        ck = triton.cdiv(m, bl["BLOCK_T"])
        _dk_kernel[(ck, b * hkv, tf)](fq, v, g, c, mask, r, rz, dfk, hkv, group, n, m, f, dv, *vis, **flags)
        _dv_kernel[(ck, b * hkv, tv)](fq, fk, g, mask, r, dv_, hkv, group, n, m, f, dv, *vis, **flags)
    return dfq, dfk, dv_


class _ParallelLinearAttention(torch.autograd.Function):
    """o = (fq . S) / (fq . z + eps) through the chunk-parallel stages; backward through the parallel form (and
    d eps_h = sum over head h's rows of dL/d den = -(do . o) / den, for an eps that needs a gradient)."""

    @staticmethod
    def forward(ctx, fq, fk, v, eps, key_mask, causal, offset, window, chunk):
        o, den, p, pz = forward(fq, fk, v, causal=causal, offset=offset, window=window, key_mask=key_mask,
                                eps=eps.detach().float().contiguous(), chunk=chunk)
        ctx.save_for_backward(fq, fk, v, key_mask, o, den, p, pz)
        ctx.args = (causal, offset, window, chunk)
        ctx.eps_dtype = eps.dtype
        return o.to(v.dtype)

    @staticmethod
    def backward(ctx, do):
        fq, fk, v, key_mask, o, den, p, pz = ctx.saved_tensors
        causal, offset, window, chunk = ctx.args
        dfq, dfk, dv = backward(do, fq, fk, v, o, den, p, pz, causal=causal, offset=offset, window=window,
                                key_mask=key_mask, chunk=chunk)
        deps = None
        if ctx.needs_input_grad[3]:
            deps = (-(do.float() * o).sum(-1) / den).sum((0, 2)).to(ctx.eps_dtype)
        return dfq.to(fq.dtype), dfk.to(fk.dtype), dv.to(v.dtype), deps, None, None, None, None, None


def parallel_linear_attention(fq, fk, v, *, causal: bool = False, offset: int = 0, window: int | None = None,
                              key_mask=None, eps: float | torch.Tensor = 1e-6, chunk: int | None = None):
    """Linear attention over precomputed features through the chunk-parallel kernels, differentiable in fq, fk and
    v (so gradients reach the feature map that made them). fq (b, Hq, n, F), fk (b, Hkv, m, F), v (b, Hkv, m, dv)
    (fp16/bf16/fp32, any F and dv). Query i sits at key position i + ``offset``: with ``causal`` it sees keys
    j <= i + offset; with ``window`` (>= 1) only keys j > i + offset - window; ``key_mask`` bool (b|1, m),
    True = a real key. ``eps`` joins every denominator: a number, or a (Hq,) tensor, one per query head (kind
    ``taylor`` adds a sink's weight so; differentiable); ``chunk`` forces the chunk rows (a power of two >= 16).
    Returns o (b, Hq, n, dv) in v's dtype (rows that see nothing: 0)."""
    _check(fq, fk, v)
    b, m = fk.shape[0], fk.shape[2]
    mask = _key_mask(key_mask, b, m, fq.device)
    if window is not None and (isinstance(window, bool) or int(window) != window or window < 1):
        raise ValueError(f"window must be an integer >= 1 or None, got {window!r}")
    blocks(chunk)  # validates chunk
    hq = fq.shape[1]
    if not torch.is_tensor(eps):
        eps = torch.full((hq,), float(eps), device=fq.device, dtype=torch.float32)
    elif tuple(eps.shape) != (hq,) or eps.device != fq.device:
        raise ValueError(f"eps must be a number or a ({hq},) tensor on the features' device, got "
                         f"{tuple(eps.shape)} on {eps.device}")
    return _ParallelLinearAttention.apply(fq.contiguous(), fk.contiguous(), v.contiguous(), eps, mask, bool(causal),
                                          int(offset), None if window is None else int(window), chunk)
