"""Threshold passes of the ``entmax`` Triton kernel: tau_i per query row, and the map of active key blocks.

alpha-entmax weights are p_ij = [z_ij - tau_i]_+^e with z = (alpha - 1) s, e = 1 / (alpha - 1), and tau_i the
root of f(tau) = sum_j [z_ij - tau]_+^e = 1 (f convex and decreasing). Below, w = z - max_j z (so w <= 0 and the
root lies in [-1, -(1/count)^(alpha-1)], count = visible keys). One program per (block of BLOCK_M queries,
batch row x query head) streams the key band a few times:
  1. ``_max_count``: row max of z and visible count; marks the band's key blocks with any visible pair and keeps
     each block's largest z.
  2. ``_histogram``: counts each row's w in NUM_BINS equal bins of the bracket (the top bin reaches 0). From the
     counts alone, f at every bin edge is bounded below (each w at its bin's start) and above (at its end), which
     gives a bracket [e_lo, e_hi) of one or a few bins (``_bin_bracket``). Key blocks whose largest z is at or
     below every row's lower end are not visited, and they and the visited ones without any w > -1 leave the map.
  3. ``_gather`` (sparsemax and alpha = 1.5, whose f is a known polynomial on each piece): sums count, sum w
     and sum w^2 over the w above the bracket, and collects the bracket's own w (at most CAP of them) into a
     scratch row; ``_solve_gathered`` then finds the root on these alone (Newton from the left in registers, no
     more passes over the keys, then the closed form on the support it settles on). The result holds for the
     whole row when every bracket score was gathered and tau lies between the w below the bracket and those
     above it (checked, not assumed).
  4. Rows not solved so (a bracket of more than CAP scores, other alphas, rounding at a bin edge) continue with
     safeguarded Newton passes (each a streamed pass computing f and f') from the histogram's bracket, which
     every pass shrinks with the sign of f (bisection when a Newton step would leave it), until every row of the
     block has converged in fp32 or MAX_ITER passes ran.
Every pass after the first visits only the blocks the map keeps and rewrites their mark with whether any visible
z exceeds a lower bound of the root (which only rises): a block once unmarked never carries weight, so the
output and backward passes skip it without computing its scores. Map entries: 1 active, 0 in the band but
without weight, 2 outside the causal/window band (never visited).

The shared tile pieces (``z_tile``, ``powers``) live here too: the output and backward passes (``entmax.py``)
must compute z and the powers bit for bit the same way.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .select_tiles import CAP, NUM_BINS, bin_counts, bin_index, collect
from .tiles import key_band, load_cols, load_rows, row_block, scores, visible

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
def z_tile(q, kt, offs_m, offs_n, N_Q, N_K, mask_base, smn, smm, scale, softcap, am1, offset, window,
           IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
           DOT_PREC: tl.constexpr):
    """(z = (alpha-1) s with -inf where invisible, tanh term for the softcap chain rule, visibility)."""
    s, t = scores(q, kt, scale, softcap, HAS_SOFTCAP, DOT_PREC)
    vis = visible(offs_m, offs_n, N_Q, N_K, mask_base, smn, smm, offset, window, IS_CAUSAL, HAS_WINDOW, HAS_MASK)
    return tl.where(vis, s * am1, float("-inf")), t, vis


@triton.jit
def _max_count(q, k_base, skn, skd, offs_m, offs_d, lo, hi, N_Q, N_K, mask_base, smn, smm, map_row, max_row,
               scale, softcap, am1, offset, window,
               IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """First pass: row max of z and visible key count over [lo, hi); marks the band's blocks with any visible
    pair active (1), the others (0) for good, and keeps each block's largest z (``max_row``)."""
    zmax = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    count = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = load_cols(k_base, offs_n, offs_d, skn, skd, N_K, HEAD_DIM, DOT_F32)
        z, _, vis = z_tile(q, kt, offs_m, offs_n, N_Q, N_K, mask_base, smn, smm, scale, softcap, am1, offset,
                           window, IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_SOFTCAP, DOT_PREC)
        tile_max = tl.max(z, 1)
        zmax = tl.maximum(zmax, tile_max)
        count += tl.sum(vis.to(tl.float32), 1)
        tl.store(map_row + start_n // BLOCK_N, (tl.max(tl.sum(vis.to(tl.int32), 1), 0) > 0).to(tl.int8))
        tl.store(max_row + start_n // BLOCK_N, tl.max(tile_max, 0))
    return zmax, count


@triton.jit
def _histogram(q, k_base, skn, skd, offs_m, offs_d, lo, hi, N_Q, N_K, mask_base, smn, smm, map_row, max_row,
               zmax, floor, inv_width, block_floor, scale, softcap, am1, offset, window,
               IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
               NUM_BINS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Second pass: (BLOCK_M, NUM_BINS) counts of w = z - zmax in the bins of [floor, ...) (width
    1 / inv_width, the last bin open above). Visits the active blocks whose largest z exceeds ``block_floor`` (the
    lowest row's zmax - 1) and keeps marked those with any w > floor (= -1: no weight below it, at any tau)."""
    counts = tl.zeros([BLOCK_M, NUM_BINS], dtype=tl.int32)
    for start_n in range(lo, hi, BLOCK_N):
        if tl.load(map_row + start_n // BLOCK_N) == 1:
            if tl.load(max_row + start_n // BLOCK_N) > block_floor:
                offs_n = start_n + tl.arange(0, BLOCK_N)
                kt = load_cols(k_base, offs_n, offs_d, skn, skd, N_K, HEAD_DIM, DOT_F32)
                z, _, vis = z_tile(q, kt, offs_m, offs_n, N_Q, N_K, mask_base, smn, smm, scale, softcap, am1,
                                   offset, window, IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_SOFTCAP, DOT_PREC)
                w = z - zmax[:, None]
                counts += bin_counts(bin_index(w, floor, inv_width, NUM_BINS), BLOCK_M, NUM_BINS)
                active = tl.max(tl.sum((w > floor[:, None]).to(tl.int32), 1), 0) > 0
                tl.store(map_row + start_n // BLOCK_N, active.to(tl.int8))
            else:
                tl.store(map_row + start_n // BLOCK_N, tl.zeros([], dtype=tl.int8))
    return counts


@triton.jit
def _pow_e(x, e, MODE: tl.constexpr):
    """x >= 0 -> x^e (0 -> 0)."""
    p, _ = powers(x, e, MODE)
    return p


@triton.jit
def _bin_bracket(counts, floor, width, e, MODE: tl.constexpr, NUM_BINS: tl.constexpr):
    """Bin counts of w (the row max, w = 0, counted in the last bin) -> (j_lo, j_hi) int32 with the root in
    [floor + j_lo width, floor + j_hi width] (j_hi = NUM_BINS: the bracket's upper end). f at the edge t_j is
    at least sum_c n_c [t_c - t_j]_+^e + (0 - t_j)^e (each w at its bin's start, the max exact) and at most
    sum_c n_c [t_(c+1) - t_j]_+^e (at its end; the last bin ends at 0): j_lo is the last edge whose lower bound
    is >= 1, j_hi the first after it whose upper bound is <= 1."""
    j = tl.arange(0, NUM_BINS)
    jf = j.to(tl.float32)
    t = floor[:, None] + jf[None, :] * width[:, None]  # edges t_j, (BLOCK_M, NUM_BINS)
    top = _pow_e(tl.maximum(-t, 0.0), e, MODE)  # (0 - t_j)^e: the max, exact
    lower = top
    upper = tl.zeros_like(top)
    for c in tl.static_range(NUM_BINS):
        n_c = tl.sum(tl.where(j[None, :] == c, counts, 0), 1).to(tl.float32)
        if c == NUM_BINS - 1:
            lower += (n_c - 1.0)[:, None] * _pow_e(tl.maximum(c - jf, 0.0)[None, :] * width[:, None], e, MODE)
            upper += n_c[:, None] * top
        else:
            lower += n_c[:, None] * _pow_e(tl.maximum(c - jf, 0.0)[None, :] * width[:, None], e, MODE)
            upper += n_c[:, None] * _pow_e(tl.maximum(c + 1.0 - jf, 0.0)[None, :] * width[:, None], e, MODE)
    j_lo = tl.max(tl.where(lower >= 1.0, j[None, :], 0), 1)
    j_hi = tl.min(tl.where((upper <= 1.0) & (j[None, :] > j_lo[:, None]), j[None, :], NUM_BINS), 1)
    return j_lo, j_hi


@triton.jit
def _gather_update(w, vis, floor, inv_width, j_lo, j_hi, n_hi, s1, s2, min_hi, max_lo, n_in, scratch_row,
                   NUM_BINS: tl.constexpr, CAP: tl.constexpr):
    """``_gather``'s running sums updated with a tile of w (BLOCK_M, BLOCK_N) (or the sink column)."""
    idx = bin_index(w, floor, inv_width, NUM_BINS)
    above = idx >= j_hi[:, None]
    wa = tl.where(above, w, 0.0)
    n_hi += tl.sum(above.to(tl.float32), 1)
    s1 += tl.sum(wa, 1)
    s2 += tl.sum(wa * wa, 1)
    min_hi = tl.minimum(min_hi, tl.min(tl.where(above, w, float("inf")), 1))
    max_lo = tl.maximum(max_lo, tl.max(tl.where(vis & (idx < j_lo[:, None]), w, float("-inf")), 1))
    n_in = collect(w, (idx >= j_lo[:, None]) & (idx < j_hi[:, None]), n_in, scratch_row, CAP)
    return n_hi, s1, s2, min_hi, max_lo, n_in


@triton.jit
def _gather(q, k_base, skn, skd, offs_m, offs_d, lo, hi, N_Q, N_K, mask_base, smn, smm, map_row, scratch_row,
            zmax, floor, inv_width, j_lo, j_hi, keep_floor, scale, softcap, am1, offset, window,
            IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
            HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, NUM_BINS: tl.constexpr,
            CAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Third pass (closed-form alphas): over the w in bins >= j_hi, their count, sum, sum of squares and
    smallest; the w in bins [j_lo, j_hi) into ``scratch_row`` (their count, even past CAP); the largest visible w
    in bins < j_lo. Keeps marked the blocks with any w > ``keep_floor`` (a bin below the bracket: a margin over
    the rounding of bin edges)."""
    n_hi = tl.zeros([BLOCK_M], dtype=tl.float32)
    s1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    min_hi = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
    max_lo = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    n_in = tl.zeros([BLOCK_M], dtype=tl.int32)
    for start_n in range(lo, hi, BLOCK_N):
        if tl.load(map_row + start_n // BLOCK_N) == 1:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kt = load_cols(k_base, offs_n, offs_d, skn, skd, N_K, HEAD_DIM, DOT_F32)
            z, _, vis = z_tile(q, kt, offs_m, offs_n, N_Q, N_K, mask_base, smn, smm, scale, softcap, am1, offset,
                               window, IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_SOFTCAP, DOT_PREC)
            w = z - zmax[:, None]
            n_hi, s1, s2, min_hi, max_lo, n_in = _gather_update(w, vis, floor, inv_width, j_lo, j_hi, n_hi, s1, s2,
                                                                min_hi, max_lo, n_in, scratch_row, NUM_BINS, CAP)
            active = tl.max(tl.sum((w > keep_floor[:, None]).to(tl.int32), 1), 0) > 0
            tl.store(map_row + start_n // BLOCK_N, active.to(tl.int8))
    return n_hi, s1, s2, min_hi, max_lo, n_in


@triton.jit
def _closed_form(n, s1, s2, MODE: tl.constexpr):
    """The root t of sum over a set of (w - t)^e = 1 from the set's count, sum and sum of squares (sparsemax:
    (s1 - 1) / n; alpha 1.5: the smaller root of n t^2 - 2 s1 t + s2 - 1 = 0) and whether it exists."""
    if MODE == 0:
        return (s1 - 1.0) / tl.maximum(n, 1.0), n > 0
    else:
        disc = s1 * s1 - n * (s2 - 1.0)
        return (s1 - tl.sqrt(tl.maximum(disc, 0.0))) / tl.maximum(n, 1.0), (n > 0) & (disc >= 0)


@triton.jit
def _solve_gathered(scratch_row, n_hi, s1, s2, min_hi, max_lo, n_in, t, e, tol, MODE: tl.constexpr,
                    CAP: tl.constexpr):
    """The root of f(t) = sum over the w above the bracket (count n_hi, sums s1, s2) and the gathered ones
    (``scratch_row``, n_in of them) of [w - t]_+^e = 1, from t (<= the root) -> (tau in w units, valid).
    Newton from the left on this convex decreasing f stays left of the root and converges; the last support
    {w > t} then gives tau in closed form when that is consistent (every w kept above tau, every other one not),
    else the converged Newton iterate. Valid when every bracket score was gathered and tau lies between the
    largest w below the bracket and the smallest above it (the w above are then all in the support, as f
    assumed), so tau is the root over all the row's keys."""
    cols = tl.arange(0, CAP)
    x = tl.load(scratch_row[:, None] + cols[None, :], mask=cols[None, :] < n_in[:, None], other=float("-inf"))
    go = tl.full(t.shape, 1, dtype=tl.int1)
    it = 0
    while (tl.max(go.to(tl.int32), 0) > 0) & (it < 4 * CAP):
        u = tl.maximum(x - t[:, None], 0.0)
        p, g = powers(u, e, MODE)
        if MODE == 0:
            f = s1 - n_hi * t + tl.sum(p, 1)
            df = n_hi + tl.sum(g, 1)
        else:
            f = s2 - 2.0 * t * s1 + n_hi * t * t + tl.sum(p, 1)
            df = 2.0 * (s1 - n_hi * t + tl.sum(g, 1))
        step = tl.where(df > 0, (f - 1.0) / tl.where(df > 0, df, 1.0), 0.0)
        step = tl.where(go, tl.maximum(step, 0.0), 0.0)
        t += step
        go = go & (step > tol * tl.maximum(tl.abs(t), 1.0))
        it += 1
    keep = x > t[:, None]
    xk = tl.where(keep, x, 0.0)
    tau_c, ok = _closed_form(n_hi + tl.sum(keep.to(tl.float32), 1), s1 + tl.sum(xk, 1), s2 + tl.sum(xk * xk, 1),
                             MODE)
    kept_min = tl.min(tl.where(keep, x, float("inf")), 1)
    left_max = tl.max(tl.where(keep, float("-inf"), x), 1)
    exact = ok & (kept_min > tau_c) & (left_max <= tau_c) & (min_hi > tau_c)
    tau = tl.where(exact, tau_c, t)
    valid = (n_in <= CAP) & (max_lo <= tau) & (min_hi > tau)
    return tau, valid


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
            kt = load_cols(k_base, offs_n, offs_d, skn, skd, N_K, HEAD_DIM, DOT_F32)
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
def tau_kernel(Q, K, SINKS, MASK, TAU, COUNT, BMAP, BMAX, SCRATCH, PASSES,
               sqb, sqh, sqn, sqd, skb, skh, skn, skd, smb, smh, smn, smm,
               H_Q, GROUPS, N_Q, N_K, N_QB, N_KB, scale, softcap, am1, e, tol, offset, window,
               MAX_ITER: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               HAS_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, MODE: tl.constexpr,
               HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
               NUM_BINS: tl.constexpr, CAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """tau (b, Hq, n) fp32 (+inf on rows with nothing visible and no sink), visible key count (b, Hq, n),
    block map (b*Hq, N_QB, N_KB) int8 (and each block's largest z, BMAX, fp32), and the streamed passes over the
    keys per program (b*Hq, N_QB) int32. SCRATCH: (b*Hq*N_Q, CAP) fp32 of the gathering pass."""
    qb = tl.program_id(0)
    start_m = qb * BLOCK_M
    bh = tl.program_id(1)
    b, h, hk, offs_m, offs_d, row_ok = row_block(qb, bh, H_Q, GROUPS, N_Q, BLOCK_M, D_PAD)
    q = load_rows(Q + b * sqb + h * sqh, offs_m, offs_d, sqn, sqd, N_Q, HEAD_DIM, DOT_F32)
    k_base = K + b * skb + hk * skh
    mask_base = MASK + b * smb + h * smh
    map_row = BMAP + (bh.to(tl.int64) * N_QB + qb) * N_KB
    max_row = BMAX + (bh.to(tl.int64) * N_QB + qb) * N_KB
    rows = bh.to(tl.int64) * N_Q + offs_m
    lo, hi = key_band(start_m, N_K, offset, window, IS_CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)

    # pass 1: row max and visible count
    zmax, count = _max_count(q, k_base, skn, skd, offs_m, offs_d, lo, hi, N_Q, N_K, mask_base, smn, smm, map_row,
                             max_row, scale, softcap, am1, offset, window, IS_CAUSAL, HAS_WINDOW, HAS_MASK,
                             HAS_SOFTCAP, HEAD_DIM, DOT_PREC, DOT_F32, BLOCK_M, BLOCK_N)
    tl.store(COUNT + rows, count, mask=row_ok)
    z_sink = 0.0
    if HAS_SINKS:
        z_sink = tl.load(SINKS + h).to(tl.float32) * am1
        zmax = tl.maximum(zmax, z_sink)
        count += 1.0
    empty = count == 0
    zmax = tl.where(empty, 0.0, zmax)
    todo_rows = row_ok & (count > 1)  # a single candidate: tau = max - 1 exactly
    passes = 1
    # in w = z - zmax: the root lies in [-1, -(1/count)^(alpha-1)]
    a = tl.full([BLOCK_M], -1.0, dtype=tl.float32)
    b_hi = -tl.exp2(-am1 * tl.log2(tl.maximum(count, 1.0)))
    tau = a
    if tl.sum(todo_rows.to(tl.int32), 0) > 0:
        # pass 2: histogram of the bracket -> a bracket of a few bins
        span = tl.where(todo_rows, b_hi - a, 1.0)  # 0 on rows with one candidate
        width = span / NUM_BINS
        inv_width = NUM_BINS / span
        block_floor = tl.min(tl.where(row_ok & (count > 0), zmax - 1.0, float("inf")), 0)
        counts = _histogram(q, k_base, skn, skd, offs_m, offs_d, lo, hi, N_Q, N_K, mask_base, smn, smm, map_row,
                            max_row, zmax, a, inv_width, block_floor, scale, softcap, am1, offset, window,
                            IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_SOFTCAP, HEAD_DIM, DOT_PREC, DOT_F32, NUM_BINS,
                            BLOCK_M, BLOCK_N)
        if HAS_SINKS:
            counts += bin_counts(bin_index((z_sink - zmax)[:, None], a, inv_width, NUM_BINS), BLOCK_M, NUM_BINS)
        passes = 2
        j_lo, j_hi = _bin_bracket(counts, a, width, e, MODE, NUM_BINS)
        e_lo = a + j_lo.to(tl.float32) * width
        e_hi = tl.where(j_hi < NUM_BINS, a + j_hi.to(tl.float32) * width, b_hi)
        if MODE != 2:
            # pass 3: sums above the bracket, the bracket's scores gathered, then the exact root on them
            scratch_row = SCRATCH + rows * CAP
            keep_floor = tl.where(todo_rows, tl.maximum(e_lo - width, a), a)
            n_hi, s1, s2, min_hi, max_lo, n_in = _gather(
                q, k_base, skn, skd, offs_m, offs_d, lo, hi, N_Q, N_K, mask_base, smn, smm, map_row, scratch_row,
                zmax, a, inv_width, j_lo, j_hi, keep_floor, scale, softcap, am1, offset, window, IS_CAUSAL,
                HAS_WINDOW, HAS_MASK, HAS_SOFTCAP, HEAD_DIM, DOT_PREC, DOT_F32, NUM_BINS, CAP, BLOCK_M, BLOCK_N)
            if HAS_SINKS:
                w_s = tl.where(row_ok, z_sink - zmax, float("-inf"))[:, None]  # no scratch row past N_Q
                n_hi, s1, s2, min_hi, max_lo, n_in = _gather_update(
                    w_s, row_ok[:, None], a, inv_width, j_lo, j_hi, n_hi, s1, s2, min_hi, max_lo, n_in,
                    scratch_row, NUM_BINS, CAP)
            passes = 3
            t_solved, solved = _solve_gathered(scratch_row, n_hi, s1, s2, min_hi, max_lo, n_in, e_lo, e, tol, MODE,
                                               CAP)
            done = todo_rows & solved
            tau = tl.where(done, t_solved, tau)
            a = tl.where(done, t_solved, a)
            todo_rows = todo_rows & (solved == 0)
        # the rest: safeguarded Newton from the histogram's bracket, in z units
        a = tl.where(todo_rows, e_lo, a)
        b_hi = tl.where(todo_rows, e_hi, b_hi)
        tau = tl.where(todo_rows, e_lo, tau)
    tau = tau + zmax
    a = a + zmax
    b_hi = b_hi + zmax
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
    tl.store(TAU + rows, tau, mask=row_ok)
    tl.store(PASSES + bh.to(tl.int64) * N_QB + qb, passes + it)
