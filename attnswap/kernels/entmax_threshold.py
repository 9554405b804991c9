"""Threshold pass of the ``entmax`` Triton kernel: tau_i per query row, and the map of active key blocks.

alpha-entmax weights are p_ij = [z_ij - tau_i]_+^e with z = (alpha - 1) s, e = 1 / (alpha - 1), and tau_i the
root of f(tau) = sum_j [z_ij - tau]_+^e - 1 (convex and decreasing). One program per (block of BLOCK_M queries,
batch row x query head):
  1. a streamed pass over the key band gives the row max of z and the visible count (sink included), hence the
     bracket [max - 1, max - (1/count)^(alpha-1)] that holds the root;
  2. Newton passes (each a streamed pass computing f and f') kept inside the bracket, which every pass shrinks
     with the sign of f (bisection when a Newton step would leave it), until every row of the block has
     converged in fp32 or MAX_ITER passes ran.
The first pass marks the key blocks with any visible pair; every Newton pass visits only the marked blocks and
rewrites their mark with whether any visible z exceeds the bracket's lower end (which only rises and never
exceeds the final tau): a block once unmarked never carries weight again, so later Newton passes skip it, and the
last pass leaves a map whose zero entries are key blocks without any weight, so the output and backward passes
skip them without computing their scores. Map entries: 1 active, 0 in the band
but without weight, 2 outside the causal/window band (never visited).

The shared tile pieces (``z_tile``, ``powers``) live here too: the output and backward passes (``entmax.py``)
must compute z and the powers bit for bit the same way.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import key_band, scores, visible

# powers of u = [z - tau]_+ : MODE 0 is alpha = 2 (e = 1), MODE 1 alpha = 1.5 (e = 2), MODE 2 any other alpha
POW_SPARSEMAX, POW_ONE_HALF, POW_GENERAL = 0, 1, 2
OUTSIDE_BAND = 2


def power_mode(alpha: float) -> int:
    """The closed form of the powers for ``alpha`` (no pow for alpha 2 and 1.5)."""
    if alpha == 2.0:
        return POW_SPARSEMAX
    if alpha == 1.5:
        return POW_ONE_HALF
    return POW_GENERAL


@triton.jit
def powers(u, e, MODE: tl.constexpr):
    """u >= 0 -> (u^e, u^(e-1)) with 0^0 taken as 0 (outside the support). u^(e-1) is g = p^(2-alpha)."""
    if MODE == 0:
        return u, (u > 0).to(tl.float32)
    elif MODE == 1:
        return u * u, u
    else:
        pos = u > 0
        ue1 = tl.where(pos, tl.exp2((e - 1.0) * tl.log2(tl.where(pos, u, 1.0))), 0.0)
        return ue1 * u, ue1


@triton.jit
def load_kt(k_base, offs_n, offs_d, skn, skd, N_K, HEAD_DIM: tl.constexpr, DOT_F32: tl.constexpr):
    """(D_PAD, BLOCK_N) tile of K^T, zero past the keys / head dim."""
    kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                 mask=(offs_n < N_K)[None, :] & (offs_d < HEAD_DIM)[:, None], other=0.0)
    if DOT_F32:
        kt = kt.to(tl.float32)
    return kt


@triton.jit
def z_tile(q, kt, offs_m, offs_n, N_Q, N_K, mask_base, smn, smm, scale, softcap, am1, offset, window,
           IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
           DOT_PREC: tl.constexpr):
    """(z = (alpha-1) s with -inf where invisible, tanh term for the softcap chain rule, visibility)."""
    s, t = scores(q, kt, scale, softcap, HAS_SOFTCAP, DOT_PREC)
    vis = visible(offs_m, offs_n, N_Q, N_K, mask_base, smn, smm, offset, window, IS_CAUSAL, HAS_WINDOW, HAS_MASK)
    return tl.where(vis, s * am1, float("-inf")), t, vis


@triton.jit
def _max_count(q, k_base, skn, skd, offs_m, offs_d, lo, hi, N_Q, N_K, mask_base, smn, smm, map_row,
               scale, softcap, am1, offset, window,
               IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """First pass: row max of z and visible key count over [lo, hi); marks the band's blocks with any visible
    pair active (1), the others (0) for good."""
    zmax = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    count = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = load_kt(k_base, offs_n, offs_d, skn, skd, N_K, HEAD_DIM, DOT_F32)
        z, _, vis = z_tile(q, kt, offs_m, offs_n, N_Q, N_K, mask_base, smn, smm, scale, softcap, am1, offset,
                           window, IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_SOFTCAP, DOT_PREC)
        zmax = tl.maximum(zmax, tl.max(z, 1))
        count += tl.sum(vis.to(tl.float32), 1)
        tl.store(map_row + start_n // BLOCK_N, (tl.max(tl.sum(vis.to(tl.int32), 1), 0) > 0).to(tl.int8))
    return zmax, count


@triton.jit
def _objective(q, k_base, skn, skd, offs_m, offs_d, lo, hi, N_Q, N_K, mask_base, smn, smm, map_row,
               tau, floor, scale, softcap, am1, e, offset, window,
               IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, MODE: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr,
               DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One Newton pass over the keys: (sum u^e, sum u^(e-1)) with u = [z - tau]_+; rewrites the block map with
    threshold ``floor``, the bracket's lower end. ``floor`` only rises and every later tau (the final one
    included) is >= it, so a block found inactive stays without weight for good: later passes skip it."""
    sum_p = tl.zeros([BLOCK_M], dtype=tl.float32)
    sum_g = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        if tl.load(map_row + start_n // BLOCK_N) == 1:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kt = load_kt(k_base, offs_n, offs_d, skn, skd, N_K, HEAD_DIM, DOT_F32)
            z, _, vis = z_tile(q, kt, offs_m, offs_n, N_Q, N_K, mask_base, smn, smm, scale, softcap, am1, offset,
                               window, IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_SOFTCAP, DOT_PREC)
            u = tl.maximum(z - tau[:, None], 0.0)
            p, g = powers(u, e, MODE)
            sum_p += tl.sum(p, 1)
            sum_g += tl.sum(g, 1)
            active = tl.max(tl.sum((z > floor[:, None]).to(tl.int32), 1), 0) > 0
            tl.store(map_row + start_n // BLOCK_N, active.to(tl.int8))
    return sum_p, sum_g


@triton.jit
def _safeguarded_step(tau, f, df, a, b, tol):
    """Shrink the bracket [a, b] with the sign of f(tau); Newton step tau + f / f' (f' = e sum u^(e-1) > 0 is
    minus the derivative) when it stays inside, else bisection. Returns (next tau, a, b, converged)."""
    a = tl.where(f >= 0, tau, a)
    b = tl.where(f <= 0, tau, b)
    newton = tau + f / tl.where(df > 0, df, 1.0)
    ok = (df > 0) & (newton >= a) & (newton <= b)
    nxt = tl.where(ok, newton, 0.5 * (a + b))
    size = tol * tl.maximum(tl.abs(tau), 1.0)
    done = (tl.abs(nxt - tau) <= size) | (f == 0) | (b - a <= size)
    return nxt, a, b, done


@triton.jit(do_not_specialize=["N_Q", "N_K", "offset", "window"])
def tau_kernel(Q, K, SINKS, MASK, TAU, COUNT, BMAP, ITERS,
               sqb, sqh, sqn, sqd, skb, skh, skn, skd, smb, smh, smn, smm,
               H_Q, GROUPS, N_Q, N_K, N_QB, N_KB, scale, softcap, am1, e, tol, offset, window,
               MAX_ITER: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               HAS_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, MODE: tl.constexpr,
               HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """tau (b, Hq, n) fp32 (+inf on rows with nothing visible and no sink), visible key count (b, Hq, n),
    block map (b*Hq, N_QB, N_KB) int8 and Newton passes per program (b*Hq, N_QB) int32."""
    qb = tl.program_id(0)
    start_m = qb * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H_Q).to(tl.int64)
    h = (bh % H_Q).to(tl.int64)
    hk = h // GROUPS
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < N_Q
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    k_base = K + b * skb + hk * skh
    mask_base = MASK + b * smb + h * smh
    map_row = BMAP + (bh.to(tl.int64) * N_QB + qb) * N_KB
    lo, hi = key_band(start_m, N_K, offset, window, IS_CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)

    zmax, count = _max_count(q, k_base, skn, skd, offs_m, offs_d, lo, hi, N_Q, N_K, mask_base, smn, smm, map_row,
                             scale, softcap, am1, offset, window, IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_SOFTCAP,
                             HEAD_DIM, DOT_PREC, DOT_F32, BLOCK_M, BLOCK_N)
    tl.store(COUNT + bh.to(tl.int64) * N_Q + offs_m, count, mask=row_ok)
    z_sink = 0.0
    if HAS_SINKS:
        z_sink = tl.load(SINKS + h).to(tl.float32) * am1
        zmax = tl.maximum(zmax, z_sink)
        count += 1.0
    empty = count == 0
    zmax = tl.where(empty, 0.0, zmax)
    a = zmax - 1.0  # f(a) >= 0: the max alone has weight 1
    b_hi = zmax - tl.exp2(-am1 * tl.log2(tl.maximum(count, 1.0)))  # f(b) <= 0: every weight <= 1/count
    tau = a
    todo_rows = row_ok & (count > 1)  # a single candidate: tau = max - 1 exactly
    todo = tl.sum(todo_rows.to(tl.int32), 0)
    it = 0
    while todo > 0:
        sum_p, sum_g = _objective(q, k_base, skn, skd, offs_m, offs_d, lo, hi, N_Q, N_K, mask_base, smn, smm,
                                  map_row, tau, a, scale, softcap, am1, e, offset, window, IS_CAUSAL, HAS_WINDOW,
                                  HAS_MASK, HAS_SOFTCAP, MODE, HEAD_DIM, DOT_PREC, DOT_F32, BLOCK_M, BLOCK_N)
        if HAS_SINKS:
            p_s, g_s = powers(tl.maximum(z_sink - tau, 0.0), e, MODE)
            sum_p += p_s
            sum_g += g_s
        nxt, a_new, b_new, done = _safeguarded_step(tau, sum_p - 1.0, e * sum_g, a, b_hi, tol)
        tau = tl.where(todo_rows, nxt, tau)
        a = tl.where(todo_rows, a_new, a)
        b_hi = tl.where(todo_rows, b_new, b_hi)
        todo_rows = todo_rows & (done == 0)
        it += 1
        todo = tl.where(it >= MAX_ITER, 0, tl.sum(todo_rows.to(tl.int32), 0))
    tau = tl.where(empty, float("inf"), tau)
    tl.store(TAU + bh.to(tl.int64) * N_Q + offs_m, tau, mask=row_ok)
    tl.store(ITERS + bh.to(tl.int64) * N_QB + qb, it)
