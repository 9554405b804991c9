"""The Triton path of kind ``topk``: softmax over each query row's k largest visible scores.

Two steps, no N x N tensor:
  1. ``kth_threshold``: one program per (block of queries, batch row x query head) finds each row's k-th largest
     visible score exactly in a few streamed sweeps over the row block's key band (a sweep recomputes the q.k
     score tiles; it is the unit of cost):
       sweep 0: every row's visible count, smallest and largest score, mean and variance (Chan's merge of tile
         moments). Rows seeing <= k keys keep everything (threshold -inf); a block of only such rows stops here.
       sweep 1: a histogram of each row's scores (``select_tiles.bin_index`` / ``bin_counts``) in NUM_BINS = 32
         equal bins over [start, largest], start = mean + sd (z - 2) clamped to the smallest score, z the upper
         (k / seen)-quantile of a normal: where the k-th largest of Gaussian scores would be, less a margin. With
         c_j the count of bin j (bin -1: everything below start), the k-th largest lies in the largest bin b with
         sum_{j >= b} c_j >= k, and `above` = sum_{j > b} c_j scores are larger.
       sweep 2: the scores whose bin is b go to the row's scratch (``collect``, CAP = 64 fp32 slots; the bin is
         recomputed by the same ``bin_index`` on bit-identical tiles, so both sweeps agree). If the bin holds
         <= CAP scores and the count matches the histogram's, the threshold is the (k - above)-th largest of
         them (a rank count over the slots) and every score >= it is kept.
       Sweep 0 also keeps each key block's largest score (over the block's rows): sweep 1 skips the blocks below
         every row's histogram start, sweep 2 those whose largest score's bin is below every row's target bin
         (``bin_index`` is monotone in the score, so both tests are exact), and after the search each key block
         of the band gets its level (``block_map``): no weight when its largest score is below every row's
         threshold (no row keeps a key of it), else weight.
       fallback (a bin over CAP, a count mismatch, a row whose range has no finite bins): a search on [lo, hi) in
         the order-preserving int32 image of the fp32 scores (negative floats map to minus their magnitude bits,
         so integer order = float order, -0.0 = +0.0), with count(>= lo) >= k > count(>= hi), from the bin's own
         smallest and largest score (a bin of equal scores is done at once: that value) or else the row's whole
         range. Each sweep bisects: it counts the scores >= the midpoint and snaps lo up to the smallest of them
         (count >= k) or hi down to just above the largest score below it (count < k); the row is done at a
         count of exactly k or hi == lo + 1. As soon as the bracket holds <= CAP scores, one sweep collects it
         and the rank count finishes. At most 33 sweeps (the image range halves each time).
     The range and the bin count are measured choices: on SmolLM2-135M's q/k (k = 64, layers 2, 15, 28, N = 2048
     and 8192) no row's bin exceeds CAP with 32 bins over the estimated range, while 32 bins over [smallest,
     largest] overflow in 0.1-0.4% of rows at N = 2048 and 3% at 8192 (42% of 64-row blocks), and 16 bins over
     either range in 1-25%; 64 bins cost twice the histogram work of 32 per score. In the interpreter (16-row
     blocks) a block takes a median of 3 sweeps on SmolLM2 at N = 2048 (the former bisection: 13-14, at most
     15-17; benchmarks/sparse_passes.py). Larger k fills the bin faster (~k/NUM_BINS scores around the k-th): at
     k = 128, N = 8192 about 2% of rows fall back, typically for two more sweeps (one bisection, one collection).
  2. The softmax kernels (``flash_fwd`` / ``flash_bwd``) with ``threshold=`` and block lists: the level map is
     carried to each kernel's own tiles (``block_map.plan``: a block takes the largest level it overlaps, so no
     block with a kept key is lost) and each kernel loops over its compact list (the forward and dq kernels per
     query block over its key blocks with weight, the dk/dv kernel per key block over its query blocks), with
     no per-block test in the loop; a key scoring below its row's threshold is invisible. Decode shapes
     (``flash_fwd.use_split_kv``) take the split-KV ``flash_decode`` over the whole band. Every one of these
     kernels forms a score as the threshold pass does (``dot(q (rows x d), k^T (d x keys)) * scale``, then
     softcap, same padded head dim and dtype path), but on tiles of its own, and a dot's rounding may depend on
     the tile's shape (the interpreter's numpy matmul on an AMD EPYC: 1.4e-6 apart between 16- and 32-row
     tiles; tensor-core instructions differ by tile too). So the kernels compare against the threshold less
     ``TIE_RTOL`` (2^-16) of max(|threshold|, 1) (``tie_floor``): the key at the k-th score is never lost, and
     a key within that allowance of it counts as a tie (kept, like exact ties); the level map uses the same
     floor. The kept set is {j visible : s_ij >= k-th largest s_i. - allowance}: the reference's set unless a
     score lies within ~1.5e-5 relative of the k-th, where fp32 rounding cannot order them anyway.

Selection gets no gradient (as in the reference, which selects under no_grad): the backward is the softmax
backward restricted to the kept keys. Attention sinks: the sink logit competes in the selection as an extra,
always-visible column (as in the reference: counted, binned, collected and searched like a key's score) and
joins a row's denominator only when it is at or above the row's threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .block_map import NO_WEIGHT, OUTSIDE, WEIGHT, plan
from .flash_bwd import flash_backward
from .flash_fwd import flash_forward, use_split_kv
from .select_tiles import CAP, bin_counts, bin_index, collect
from .tiles import (check_shapes, common_support, dot_f32, dot_prec, key_band, load_cols, load_rows, mask_strides,
                    row_block, scores, visible)
from .tuning import INTERPRETER_BLOCKS, configs, interpreting, pruner

# int32 extremes as compile-time constants (a bare -2147483648 literal could be typed int64 by the compiler)
I32_MIN = tl.constexpr(-(2 ** 31))
I32_MAX = tl.constexpr(2 ** 31 - 1)
PASS_STATS = 4  # per row block: sweeps, fallback rows, band key blocks, blocks sweeps 1-2 visited
MAX_STEPS = 40  # > 33: a fallback row's image range at least halves every step, so this bound is never reached
# Bins of the histogram sweep (CAP, the scratch slots per row, is select_tiles'): 32, not select_tiles' 16, as
# measured (see the module docstring): 16 leave the k-th's bin over CAP in ~1-25% of SmolLM2's rows.
NUM_BINS = 32
RANGE_MARGIN = 2.0  # the histogram starts this many standard deviations below the estimated k-th largest score
# Scores within this fraction of max(|k-th score|, 1) below a row's k-th count as ties (``tie_floor``): far above
# the rounding by which one q.k dot differs between tile shapes, far below the spacing of real scores.
TIE_RTOL = 2.0 ** -16
_TIE_RTOL = tl.constexpr(TIE_RTOL)  # the same, for the kernels


@triton.jit
def _tie_floor(thr):
    """The comparison threshold of a row's k-th score ``thr`` (``tie_floor`` in a kernel; -inf stays -inf)."""
    return thr - _TIE_RTOL * tl.maximum(tl.abs(thr), 1.0)


def tie_floor(thr: torch.Tensor) -> torch.Tensor:
    """The threshold the attention kernels compare scores with: each row's k-th score ``thr`` less ``TIE_RTOL``
    of max(|thr|, 1), so a dot rounded differently on another kernel's tiles still keeps the k-th key."""
    return thr - TIE_RTOL * thr.abs().clamp_min(1.0)


@triton.jit
def _ordered(s):
    """fp32 -> int32 image with the same order: a negative float maps to minus its magnitude bits, so -0.0 and
    +0.0 share the image 0 and images compare exactly as the floats do (the inverse is ``_from_ordered``)."""
    si = s.to(tl.int32, bitcast=True)
    return tl.where(si < 0, -(si & I32_MAX), si)


@triton.jit
def _from_ordered(si):
    """Inverse of ``_ordered``: int32 image -> the fp32 score (image 0 -> +0.0)."""
    return tl.where(si < 0, (-si) | I32_MIN, si).to(tl.float32, bitcast=True)


@triton.jit
def _tile(q, k_base, skn, skd, mask_base, smn, smm, offs_m, start_n, N_Q, N_K, scale, softcap, offset, window,
          IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
          HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
          BLOCK_N: tl.constexpr):
    """(scores, visible) of keys [start_n, start_n + BLOCK_N), (BLOCK_M, BLOCK_N): the k tile loaded and the
    scores formed exactly as ``flash_fwd`` does, so every sweep sees the attention's scores bit for bit."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kt = load_cols(k_base, offs_n, tl.arange(0, D_PAD), skn, skd, N_K, HEAD_DIM, DOT_F32)
    s, _ = scores(q, kt, scale, softcap, HAS_SOFTCAP, DOT_PREC)
    vis = visible(offs_m, offs_n, N_Q, N_K, mask_base, smn, smm, offset, window, IS_CAUSAL, HAS_WINDOW, HAS_MASK)
    return s, vis


@triton.jit
def _merge_moments(n, mean, m2, n_t, mean_t, m2_t):
    """Chan's pairwise update: (count, mean, sum of squared deviations) of two parts -> those of their union."""
    total = n + n_t
    f = n_t.to(tl.float32) / tl.maximum(total, 1).to(tl.float32)
    delta = mean_t - mean
    return total, mean + delta * f, m2 + m2_t + (delta * n.to(tl.float32)) * (delta * f)  # 0, not NaN, at n = 0


@triton.jit
def _range_sweep(q, k_base, skn, skd, mask_base, smn, smm, offs_m, N_Q, N_K, key_lo, key_hi, scale, softcap,
                 offset, window, sink, max_row,
                 IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                 DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sweep 0, per row over its visible scores (the sink included): (count int32, smallest, largest, mean,
    sum of squared deviations from the mean) fp32; the moments merge tile by tile (no cancellation). Each key
    block's largest visible score over the block's rows goes to ``max_row[start_n // BLOCK_N]`` (-inf: none)."""
    seen = tl.zeros(offs_m.shape, dtype=tl.int32)
    small = tl.full(offs_m.shape, float("inf"), dtype=tl.float32)
    large = tl.full(offs_m.shape, float("-inf"), dtype=tl.float32)
    mean = tl.zeros(offs_m.shape, dtype=tl.float32)
    m2 = tl.zeros(offs_m.shape, dtype=tl.float32)
    for start_n in range(key_lo, key_hi, BLOCK_N):
        s, vis = _tile(q, k_base, skn, skd, mask_base, smn, smm, offs_m, start_n, N_Q, N_K, scale, softcap, offset,
                       window, IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_SOFTCAP, HEAD_DIM, D_PAD, DOT_PREC, DOT_F32,
                       BLOCK_N)
        small = tl.minimum(small, tl.min(tl.where(vis, s, float("inf")), 1))
        tile_large = tl.max(tl.where(vis, s, float("-inf")), 1)
        large = tl.maximum(large, tile_large)
        tl.store(max_row + start_n // BLOCK_N, tl.max(tile_large, 0))
        n_t = tl.sum(vis.to(tl.int32), 1)
        mean_t = tl.sum(tl.where(vis, s, 0.0), 1) / tl.maximum(n_t, 1).to(tl.float32)
        dev = tl.where(vis, s - mean_t[:, None], 0.0)
        seen, mean, m2 = _merge_moments(seen, mean, m2, n_t, mean_t, tl.sum(dev * dev, 1))
    if HAS_SINKS:  # the sink logit: one more always-visible score of every real row
        row_ok = offs_m < N_Q
        small = tl.where(row_ok, tl.minimum(small, sink), small)
        large = tl.where(row_ok, tl.maximum(large, sink), large)
        seen, mean, m2 = _merge_moments(seen, mean, m2, row_ok.to(tl.int32), sink, tl.zeros_like(sink))
    return seen, small, large, mean, m2


@triton.jit
def _upper_quantile(p):
    """z with P(Z >= z) = p for a standard normal Z, p in (0, 1) (Abramowitz & Stegun 26.2.23, |error| < 4.5e-4;
    p outside is clamped to 1e-30 from its ends)."""
    t = tl.sqrt(-2.0 * tl.log(tl.maximum(tl.minimum(p, 1.0 - p), 1e-30)))
    z = t - (2.515517 + t * (0.802853 + t * 0.010328)) / (1.0 + t * (1.432788 + t * (0.189269 + t * 0.001308)))
    return tl.where(p > 0.5, -z, z)


@triton.jit
def _histogram_range(seen, small, large, mean, m2, K_TOP, NUM_BINS: tl.constexpr, MARGIN: tl.constexpr):
    """(start, inv_width) of each row's NUM_BINS equal bins over [start, largest score]. ``start`` = mean +
    sd (z - MARGIN), z the upper (K_TOP / seen)-quantile of a normal: the k-th largest of Gaussian scores, less a
    margin, clamped into [smallest, largest]. inv_width = 0 (and start = 0) where the bins are not well defined
    (no width, or an fp32 overflow of the width or its inverse): such a row skips the histogram."""
    count = tl.maximum(seen, 1).to(tl.float32)
    sd = tl.sqrt(tl.maximum(m2 / count, 0.0))
    start = mean + sd * (_upper_quantile(K_TOP / count) - MARGIN)
    start = tl.where((start > small) & (start < large), start, small)
    width = large - start
    inv = NUM_BINS / tl.where(width > 0.0, width, 1.0)
    ok = (width > 0.0) & (inv > 0.0) & (inv < float("inf"))
    return tl.where(ok, start, 0.0), tl.where(ok, inv, 0.0)


@triton.jit
def _histogram_sweep(q, k_base, skn, skd, mask_base, smn, smm, offs_m, N_Q, N_K, key_lo, key_hi, scale, softcap,
                     offset, window, sink, start, inv_width, max_row, block_floor,
                     IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     D_PAD: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, NUM_BINS: tl.constexpr):
    """Sweep 1: (BLOCK_M, NUM_BINS) int32, how many visible scores (the sink included) each bin of
    ``bin_index(s, start, inv_width)`` holds (scores below ``start`` are in no bin), and the key blocks visited:
    a block whose largest score (``max_row``) is below ``block_floor`` (every binned row's start) holds no binned
    score and is not visited (s >= start exactly when s - start >= 0, so the test is exact)."""
    counts = tl.zeros([BLOCK_M, NUM_BINS], dtype=tl.int32)
    visited = tl.full([], 0, dtype=tl.int32)
    for start_n in range(key_lo, key_hi, BLOCK_N):
        if tl.load(max_row + start_n // BLOCK_N) >= block_floor:
            s, vis = _tile(q, k_base, skn, skd, mask_base, smn, smm, offs_m, start_n, N_Q, N_K, scale, softcap,
                           offset, window, IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_SOFTCAP, HEAD_DIM, D_PAD, DOT_PREC,
                           DOT_F32, BLOCK_N)
            idx = tl.where(vis, bin_index(s, start, inv_width, NUM_BINS), -1)
            counts += bin_counts(idx, BLOCK_M, NUM_BINS)
            visited += 1
    if HAS_SINKS:
        idx = tl.where((offs_m < N_Q)[:, None], bin_index(sink[:, None], start, inv_width, NUM_BINS), -1)
        counts += bin_counts(idx, BLOCK_M, NUM_BINS)
    return counts, visited


@triton.jit
def _target_bin(counts, seen, K_TOP, NUM_BINS: tl.constexpr):
    """The bin that holds each row's k-th largest score -> (bin, scores above it, scores in it); bin -1 = below
    the histogram's start (when its bins hold fewer than K_TOP scores). With c_j the count of bin j, the bin is
    the largest j with sum_{i >= j} c_i >= K_TOP (that suffix sum falls as j grows)."""
    cols = tl.arange(0, NUM_BINS)
    total = tl.sum(counts, 1)
    from_here = total[:, None] - tl.cumsum(counts, 1) + counts  # scores in bin j or above
    target = tl.sum((from_here >= K_TOP).to(tl.int32), 1) - 1
    above = tl.sum(tl.where(cols[None, :] > target[:, None], counts, 0), 1)
    inside = tl.where(target >= 0, tl.sum(tl.where(cols[None, :] == target[:, None], counts, 0), 1), seen - total)
    return target, above, inside


@triton.jit
def _collect_sweep(q, k_base, skn, skd, mask_base, smn, smm, offs_m, N_Q, N_K, key_lo, key_hi, scale, softcap,
                   offset, window, sink, start, inv_width, target, row_ptr, max_row,
                   IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                   DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr,
                   NUM_BINS: tl.constexpr, CAP: tl.constexpr):
    """Sweep 2: the visible scores whose bin (the histogram's ``bin_index``, recomputed on identical score tiles)
    is ``target`` go to each row's scratch -> (how many there are, even past CAP; their smallest; their largest;
    the key blocks visited). ``bin_index`` is monotone in the score, so a block where the bin of its largest score
    (``max_row``) is below a row's target holds none of that row's scores: a block below every row's target (rows
    collecting nothing have target NUM_BINS) is not visited."""
    got = tl.zeros(offs_m.shape, dtype=tl.int32)
    small = tl.full(offs_m.shape, float("inf"), dtype=tl.float32)
    large = tl.full(offs_m.shape, float("-inf"), dtype=tl.float32)
    visited = tl.full([], 0, dtype=tl.int32)
    for start_n in range(key_lo, key_hi, BLOCK_N):
        top_bin = bin_index(tl.zeros(offs_m.shape, dtype=tl.float32)[:, None] + tl.load(max_row + start_n // BLOCK_N),
                            start, inv_width, NUM_BINS)
        if tl.max((tl.max(top_bin, 1) >= target).to(tl.int32), 0) > 0:
            s, vis = _tile(q, k_base, skn, skd, mask_base, smn, smm, offs_m, start_n, N_Q, N_K, scale, softcap,
                           offset, window, IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_SOFTCAP, HEAD_DIM, D_PAD, DOT_PREC,
                           DOT_F32, BLOCK_N)
            take = vis & (bin_index(s, start, inv_width, NUM_BINS) == target[:, None])
            got = collect(s, take, got, row_ptr, CAP)
            small = tl.minimum(small, tl.min(tl.where(take, s, float("inf")), 1))
            large = tl.maximum(large, tl.max(tl.where(take, s, float("-inf")), 1))
            visited += 1
    if HAS_SINKS:  # (BLOCK_M, 1) tiles of the sink column
        take = (offs_m < N_Q)[:, None] & (bin_index(sink[:, None], start, inv_width, NUM_BINS) == target[:, None])
        got = collect(sink[:, None], take, got, row_ptr, CAP)
        taken = tl.sum(take.to(tl.int32), 1) > 0
        small = tl.where(taken, tl.minimum(small, sink), small)
        large = tl.where(taken, tl.maximum(large, sink), large)
    return got, small, large, visited


@triton.jit
def _bisect_sweep(q, k_base, skn, skd, mask_base, smn, smm, offs_m, N_Q, N_K, key_lo, key_hi, scale, softcap,
                  offset, window, sink_i, mid, gather, lo, top, row_ptr,
                  IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                  DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr, CAP: tl.constexpr):
    """One fallback sweep, in int32 images: per row how many visible scores have an image >= mid[row], the smallest
    such image and the largest below mid (INT32_MAX / INT32_MIN when there is none); and for the ``gather`` rows,
    the scores with an image in [lo, top] go to the scratch (-> their count, the fourth result)."""
    count = tl.zeros(mid.shape, dtype=tl.int32)
    min_ge = tl.full(mid.shape, I32_MAX, dtype=tl.int32)
    max_lt = tl.full(mid.shape, I32_MIN, dtype=tl.int32)
    got = tl.zeros(mid.shape, dtype=tl.int32)
    for start_n in range(key_lo, key_hi, BLOCK_N):
        s, vis = _tile(q, k_base, skn, skd, mask_base, smn, smm, offs_m, start_n, N_Q, N_K, scale, softcap, offset,
                       window, IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_SOFTCAP, HEAD_DIM, D_PAD, DOT_PREC, DOT_F32,
                       BLOCK_N)
        si = _ordered(s)
        ge = vis & (si >= mid[:, None])
        count += tl.sum(ge.to(tl.int32), 1)
        min_ge = tl.minimum(min_ge, tl.min(tl.where(ge, si, I32_MAX), 1))
        max_lt = tl.maximum(max_lt, tl.max(tl.where(vis & ~ge, si, I32_MIN), 1))
        got = collect(s, vis & gather[:, None] & (si >= lo[:, None]) & (si <= top[:, None]), got, row_ptr, CAP)
    if HAS_SINKS:
        row_ok = offs_m < N_Q
        sink_ge = row_ok & (sink_i >= mid)
        count += sink_ge.to(tl.int32)
        min_ge = tl.where(sink_ge, tl.minimum(min_ge, sink_i), min_ge)
        max_lt = tl.where(row_ok & ~sink_ge, tl.maximum(max_lt, sink_i), max_lt)
        take = row_ok & gather & (sink_i >= lo) & (sink_i <= top)
        got = collect(_from_ordered(sink_i)[:, None], take[:, None], got, row_ptr, CAP)
    return count, min_ge, max_lt, got


@triton.jit
def _rth_largest(row_ptr, count, r, CAP: tl.constexpr):
    """(the r-th largest, how many are >= it) of each row's first ``count`` (<= CAP) scratch values, r in
    1..count: v = min{x_j : #{i : x_i > x_j} < r}, since the values with fewer than r above them are exactly those
    >= v. A rank count over the slots, not a sort: tl.sort takes seconds per tile in the interpreter, and this
    costs CAP row reductions once per program on a GPU, a fraction of one sweep."""
    slots = tl.arange(0, CAP)
    x = tl.load(row_ptr[:, None] + slots[None, :], mask=slots[None, :] < count[:, None], other=float("-inf"))
    v = tl.full(count.shape, float("inf"), dtype=tl.float32)
    for j in range(0, tl.max(count, 0)):
        xj = tl.load(row_ptr + j, mask=j < count, other=float("inf"))
        above = tl.sum((x > xj[:, None]).to(tl.int32), 1)
        v = tl.where((j < count) & (above < r), tl.minimum(v, xj), v)
    ties = tl.sum(((slots[None, :] < count[:, None]) & (x >= v[:, None])).to(tl.int32), 1)
    return v, ties


@triton.jit(do_not_specialize=["N_Q", "N_K", "offset", "window", "K_TOP"])
def _threshold_kernel(Q, K, SINKS, MASK, THR, KEPT, SEEN, PASSES, SCRATCH, BMAX, LEVELS,
                      sqb, sqh, sqn, sqd, skb, skh, skn, skd, smb, smkv, smg, smn, smm, N_KB,
                      H_Q, GROUPS, N_Q, N_K, N_Q_KEY, N_K_KEY, K_TOP, scale, softcap, offset, window,
                      IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
                      HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, HEAD_DIM: tl.constexpr,
                      D_PAD: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
                      NUM_BINS: tl.constexpr, CAP: tl.constexpr, MARGIN: tl.constexpr, MAX_STEPS: tl.constexpr,
                      PASS_STATS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Each row's k-th largest visible score -> THR (b, Hq, n) fp32 (-inf when the row sees <= K_TOP keys);
    KEPT / SEEN: how many scores (sink included) are >= THR / visible; PASSES (programs, PASS_STATS) int32: this
    row block's streamed sweeps, its rows that needed fallback sweeps, the key blocks of its band, those it visited
    in sweeps 1 and 2 (together); SCRATCH (b Hq n, CAP) fp32: each row's collected scores; BMAX (programs, N_KB)
    fp32: each key block's largest visible score; LEVELS (programs, N_KB) int8, zeroed (``block_map.OUTSIDE``):
    each key block of the band gets WEIGHT (2) when it may hold a kept key of some row of the block, NO_WEIGHT (1)
    when its largest score is below every row's threshold."""
    pid_m = tl.program_id(0)
    start_m = pid_m * BLOCK_M
    bh = tl.program_id(1)
    b, h, hk, offs_m, offs_d, row_ok = row_block(pid_m, bh, H_Q, GROUPS, N_Q, BLOCK_M, D_PAD)
    g = h % GROUPS
    # the query tile exactly as flash_fwd loads it (bit-identical scores)
    q = load_rows(Q + b * sqb + h * sqh, offs_m, offs_d, sqn, sqd, N_Q, HEAD_DIM, DOT_F32)
    k_base = K + b * skb + hk * skh
    mask_base = MASK + b * smb + hk * smkv + g.to(tl.int64) * smg
    key_lo, key_hi = key_band(start_m, N_K, offset, window, IS_CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    sink = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_SINKS:
        sink = sink + tl.load(SINKS + h).to(tl.float32)
    rows = bh.to(tl.int64) * N_Q + offs_m
    row_ptr = SCRATCH + rows * CAP
    program = bh.to(tl.int64) * tl.num_programs(0) + pid_m
    max_row = BMAX + program * N_KB

    # sweep 0: every row's visible count, smallest and largest score, mean and spread
    seen, small, large, mean, m2 = _range_sweep(
        q, k_base, skn, skd, mask_base, smn, smm, offs_m, N_Q, N_K, key_lo, key_hi, scale, softcap, offset, window,
        sink, max_row, IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_SOFTCAP, HAS_SINKS, HEAD_DIM, D_PAD, DOT_PREC, DOT_F32,
        BLOCK_N)
    active = seen > K_TOP  # the others keep every visible key
    thr = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    kept = seen
    sweeps = tl.full([], 1, dtype=tl.int32)
    fallback = tl.full([], 0, dtype=tl.int32)
    visited = tl.full([], 0, dtype=tl.int32)
    if tl.max(active.to(tl.int32), 0) > 0:
        # sweep 1: the histogram gives the k-th's bin, the scores above it and in it
        start, inv_width = _histogram_range(seen, small, large, mean, m2, K_TOP, NUM_BINS, MARGIN)
        binned = active & (inv_width > 0.0)
        block_floor = tl.min(tl.where(binned, start, float("inf")), 0)
        tl.debug_barrier()  # sweep 0's block maxima are visible to every thread
        counts, visited_1 = _histogram_sweep(
            q, k_base, skn, skd, mask_base, smn, smm, offs_m, N_Q, N_K, key_lo, key_hi, scale, softcap, offset,
            window, sink, start, inv_width, max_row, block_floor, IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_SOFTCAP,
            HAS_SINKS, HEAD_DIM, D_PAD, DOT_PREC, DOT_F32, BLOCK_M, BLOCK_N, NUM_BINS)
        target, above, inside = _target_bin(counts, seen, K_TOP, NUM_BINS)
        target = tl.where(binned, target, NUM_BINS)  # bin NUM_BINS holds nothing: those rows collect nothing
        # sweep 2: collect that bin's scores
        got, bin_small, bin_large, visited_2 = _collect_sweep(
            q, k_base, skn, skd, mask_base, smn, smm, offs_m, N_Q, N_K, key_lo, key_hi, scale, softcap, offset,
            window, sink, start, inv_width, target, row_ptr, max_row, IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_SOFTCAP,
            HAS_SINKS, HEAD_DIM, D_PAD, DOT_PREC, DOT_F32, BLOCK_N, NUM_BINS, CAP)
        agree = binned & (got == inside)  # both sweeps put the same scores in the bin
        gathered = tl.where(agree & (got <= CAP), got, 0)
        # the rest search [lo, hi) in images, count(>= lo) = at_lo >= K_TOP > count(>= hi) = at_hi: the bin's
        # own range when the counts agree (a single value when it holds ties only: done), else the row's range
        lo = tl.where(agree, _ordered(bin_small), _ordered(small)).to(tl.int64)
        hi = tl.where(agree, _ordered(bin_large), _ordered(large)).to(tl.int64) + 1
        at_lo = tl.where(agree, above + got, seen)
        at_hi = tl.where(agree, above, 0)
        search = active & (gathered == 0) & (at_lo != K_TOP) & (hi - lo > 1)
        sweeps += 2
        visited = visited_1 + visited_2
        fallback = tl.sum(search.to(tl.int32), 0)
        tried = tl.zeros([BLOCK_M], dtype=tl.int1)  # a gathering that missed scores (never: deterministic tiles)
        steps = tl.full([], 0, dtype=tl.int32)
        go = fallback > 0
        tl.debug_barrier()  # sweep 2's scratch stores land before a gathering sweep rewrites a row's slots
        while go:
            gather = search & ~tried & (at_lo - at_hi <= CAP)  # the bracket fits the scratch: collect it
            mid = ((lo + hi) >> 1).to(tl.int32)  # lo < mid < hi for searching rows (hi - lo >= 2)
            count, min_ge, max_lt, got = _bisect_sweep(
                q, k_base, skn, skd, mask_base, smn, smm, offs_m, N_Q, N_K, key_lo, key_hi, scale, softcap, offset,
                window, _ordered(sink), mid, gather, lo.to(tl.int32), (hi - 1).to(tl.int32), row_ptr, IS_CAUSAL,
                HAS_WINDOW, HAS_MASK, HAS_SOFTCAP, HAS_SINKS, HEAD_DIM, D_PAD, DOT_PREC, DOT_F32, BLOCK_N, CAP)
            done = gather & (got == at_lo - at_hi)
            gathered = tl.where(done, got, gathered)
            tried = tried | (gather & ~done)
            bisect = search & ~gather
            up = bisect & (count >= K_TOP)  # the k-th largest is >= mid: snap lo to the smallest score there
            down = bisect & (count < K_TOP)  # it is < mid: snap hi to just above the largest score below mid
            lo = tl.where(up, min_ge.to(tl.int64), lo)
            at_lo = tl.where(up, count, at_lo)
            hi = tl.where(down, max_lt.to(tl.int64) + 1, hi)
            at_hi = tl.where(down, count, at_hi)
            search = search & ~done & (at_lo != K_TOP) & (hi - lo > 1)
            steps += 1
            go = (tl.max(search.to(tl.int32), 0) > 0) & (steps < MAX_STEPS)
        sweeps += steps
        # gathered rows: the k-th largest is the (K_TOP - at_hi)-th largest of their scratch; the rest: lo
        tl.debug_barrier()  # the scratch stores of every thread are visible to the loads that follow
        value, ties = _rth_largest(row_ptr, gathered, K_TOP - at_hi, CAP)
        thr = tl.where(active, tl.where(gathered > 0, value, _from_ordered(lo.to(tl.int32))), thr)
        kept = tl.where(active, tl.where(gathered > 0, at_hi + ties, at_lo), kept)

    tl.store(THR + rows, thr, mask=row_ok)
    tl.store(KEPT + rows, kept, mask=row_ok)
    tl.store(SEEN + rows, seen, mask=row_ok)
    # the block's level map: a key block no row keeps a key of has its largest score below the smallest
    # threshold, less the tie allowance (a sufficient test; a row that keeps everything has -inf and rules
    # nothing out)
    thr_floor = tl.min(tl.where(row_ok, _tie_floor(thr), float("inf")), 0)
    level_row = LEVELS + program * N_KB
    for start_n in range(key_lo, key_hi, BLOCK_N):
        no_weight = tl.load(max_row + start_n // BLOCK_N) < thr_floor
        tl.store(level_row + start_n // BLOCK_N, tl.where(no_weight, 1, 2).to(tl.int8))
    stats = PASSES + program * PASS_STATS
    tl.store(stats, sweeps)
    tl.store(stats + 1, fallback)
    tl.store(stats + 2, tl.cdiv(key_hi - key_lo, BLOCK_N))
    tl.store(stats + 3, visited)


# a q tile, a k tile and the sweeps' row state (moments, bins, search bracket) live in registers, no V: on sm_90
# tiles of 64 x 64 and more spill 120-190 B at head dim 64 and 128, and at 128 so do (32, 32, 4) and (16, 32, 2)
# (benchmarks/results/sm90-compile.jsonl): those are not tried
_CONFIGS = configs([(128, 32, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 2, 1),
                    (16, 16, 2, 1)])
_prune = pruner(lambda bm, bn, stages: bm * bn > 64 * 64 or stages > 2, spills_wide={(32, 32, 4, 2), (16, 32, 2, 1)})
_threshold_tuned = _threshold_kernel if interpreting() else triton.autotune(
    configs=_CONFIGS, key=["N_Q_KEY", "N_K_KEY", "HEAD_DIM", "IS_CAUSAL", "HAS_WINDOW", "HAS_MASK", "HAS_SOFTCAP"],
    prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["PASSES", "LEVELS"])(_threshold_kernel)


def _smallest_tiles(q, n, m, d_pad) -> tuple[int, int]:
    """The smallest BLOCK_M and BLOCK_N among the configs the autotuner keeps for this shape: the per-program
    statistics, block maxima and levels are sized for them (a larger tile uses a prefix of each)."""
    kept = _prune(_CONFIGS, {"N_Q": n, "N_K": m, "Q": q}, D_PAD=d_pad)
    return min(c.kwargs["BLOCK_M"] for c in kept), min(c.kwargs["BLOCK_N"] for c in kept)


def _tiles_used(fallback: tuple[int, int]) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the threshold kernel's last launch: the autotuner's choice (``fallback`` where no
    launch ran it, as when compile_stats records launches instead)."""
    if interpreting():
        return INTERPRETER_BLOCKS["BLOCK_M"], INTERPRETER_BLOCKS["BLOCK_N"]
    best = getattr(_threshold_tuned, "best_config", None)
    return (best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"]) if best is not None else fallback


# The listed attention kernels (flash forward, dk/dv, dq with a block list) launch with fixed tiles, as the lists
# are made for them: per kernel (BLOCK_M, BLOCK_N, warps, stages) by padded head dim, from the configs their
# autotuners keep and that compile without spills on sm_90 (benchmarks/compile_stats.py --kernels topk); the
# fastest choice on a GPU is still to be measured (benchmarks/gpu_suite.sh). Wide heads / fp32: the smaller ones.
_LISTED = {"fwd": {64: (128, 64, 8, 3), 128: (64, 32, 4, 2), "tight": (32, 32, 4, 2)},
           "dkdv": {64: (32, 64, 4, 3), 128: (16, 64, 4, 2), "tight": (16, 32, 4, 2)},
           "dq": {64: (64, 32, 4, 3), 128: (64, 32, 4, 2), "tight": (32, 16, 4, 2)}}


def listed_config(kernel: str, d: int, dtype: torch.dtype, n: int, m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages) of a listed launch of ``kernel`` ("fwd", "dkdv", "dq") for head dim
    ``d``: the interpreter's 16 x 16; tiles never larger than the lengths (rounded up to a power of two)."""
    if interpreting():
        return INTERPRETER_BLOCKS["BLOCK_M"], INTERPRETER_BLOCKS["BLOCK_N"], 1, 1
    d_pad = max(32, triton.next_power_of_2(d))
    row = "tight" if d_pad >= 256 or dtype == torch.float32 else (64 if d_pad <= 64 else 128)
    bm, bn, warps, stages = _LISTED[kernel][row]
    cap_m, cap_n = max(16, triton.next_power_of_2(n)), max(16, triton.next_power_of_2(m))
    return min(bm, cap_m), min(bn, cap_n), warps, stages


def _check_k_top(k_top) -> int:
    if isinstance(k_top, bool) or not isinstance(k_top, int) or k_top < 1:
        raise ValueError(f"k_top (keys kept per query) must be an integer >= 1, got {k_top!r}")
    return k_top


@dataclass
class _Selection:
    """The threshold kernel's results: thr (b, Hq, n) fp32 (-inf where a row keeps every visible key), kept / seen
    (b, Hq, n) int32 (the sink column counted when there are sinks), passes (row blocks, PASS_STATS) int32 (its
    sweeps, 0 = unused entry; fallback rows; band key blocks; blocks sweeps 1-2 visited), and the key-block levels
    (b Hq, query blocks, key blocks) int8 (``block_map`` OUTSIDE / NO_WEIGHT / WEIGHT) on tiles ``tiles``."""

    thr: torch.Tensor
    kept: torch.Tensor
    seen: torch.Tensor
    passes: torch.Tensor
    levels: torch.Tensor
    tiles: tuple

    def lists(self, q, n, m):
        """The block lists of the listed forward, dk/dv and dq launches (``block_map.plan``)."""
        d = q.shape[-1]
        return tuple(plan(self.levels, self.tiles, listed_config(name, d, q.dtype, n, m), n, m,
                          by_key=name == "dkdv") for name in ("fwd", "dkdv", "dq"))


def _thresholds(q, k, *, k_top, scaling, causal=False, offset=0, window=None, softcap=None, mask=None,
                sinks=None) -> _Selection:
    """Run the threshold kernel (``_threshold_kernel``) and return its ``_Selection``."""
    b, hq, hkv, n, m, d = check_shapes(q, k, k)
    k_top = min(_check_k_top(k_top), m + 2)  # more than every row sees: all kept (and the count fits int32)
    if window is not None and window < 1:
        raise ValueError(f"window must be an integer >= 1 or None, got {window!r}")
    thr = torch.empty((b, hq, n), device=q.device, dtype=torch.float32)
    kept = torch.empty((b, hq, n), device=q.device, dtype=torch.int32)
    seen = torch.empty((b, hq, n), device=q.device, dtype=torch.int32)
    d_pad = max(32, triton.next_power_of_2(d))  # flash_fwd's padded head dim: identical score tiles
    block_m, block_n = _smallest_tiles(q, n, m, d_pad)  # the scratch fits every config the autotuner may pick
    passes = torch.zeros((b * hq * max(1, triton.cdiv(n, block_m)), PASS_STATS), device=q.device, dtype=torch.int32)
    n_kb = triton.cdiv(m, block_n)
    levels = torch.zeros((passes.shape[0], max(n_kb, 1)), device=q.device, dtype=torch.int8)
    if n == 0 or b * hq == 0:
        return _Selection(thr, kept, seen, passes, levels[:0].view(b * hq, 0, max(n_kb, 1)), (block_m, block_n))
    scratch = torch.empty((b * hq * n, CAP), device=q.device, dtype=torch.float32)
    block_max = torch.empty((passes.shape[0], n_kb), device=q.device, dtype=torch.float32)
    sinks_t = sinks.detach().float().contiguous() if sinks is not None else None
    mask_t, ms = mask_strides(mask, b, hq, hkv, n, m)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * hq)  # noqa: E731
    _threshold_tuned[grid](
        q, k, sinks_t if sinks_t is not None else thr, mask_t if mask_t is not None else thr,
        thr, kept, seen, passes, scratch, block_max, levels, *q.stride(), *k.stride(), *ms, n_kb,
        hq, hq // hkv, n, m, triton.next_power_of_2(n), triton.next_power_of_2(m), k_top, float(scaling),
        float(softcap or 1.0), int(offset), int(window or 0),
        IS_CAUSAL=bool(causal), HAS_WINDOW=window is not None, HAS_MASK=mask_t is not None,
        HAS_SOFTCAP=softcap is not None, HAS_SINKS=sinks_t is not None, HEAD_DIM=d, D_PAD=d_pad,
        DOT_PREC=dot_prec(q.dtype), DOT_F32=dot_f32(q.dtype), NUM_BINS=NUM_BINS, CAP=CAP, MARGIN=RANGE_MARGIN,
        MAX_STEPS=MAX_STEPS, PASS_STATS=PASS_STATS,
        **({"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1} if interpreting() else {}),
    )
    tiles = _tiles_used((block_m, block_n))  # the levels of the tiles the kernel ran with (a prefix of each row)
    n_qb, n_kb_used = triton.cdiv(n, tiles[0]), triton.cdiv(m, tiles[1])
    levels = levels[:b * hq * n_qb].view(b * hq, n_qb, -1)[:, :, :n_kb_used]
    return _Selection(thr, kept, seen, passes, levels, tiles)


def kth_threshold(q, k, *, k_top, scaling, causal=False, offset=0, window=None, softcap=None, mask=None,
                  sinks=None, return_stats=False):
    """Each query row's k-th largest visible score (natural units, after softcap), (b, Hq, n) fp32; -inf where
    a row sees at most ``k_top`` keys (it keeps them all, and a row that sees nothing gives -inf too).

    q (b, Hq, n, d), k (b, Hkv, m, d); visibility as ``flash_fwd.flash_forward`` (causal with ``offset``: query i
    sits at key position i + offset; sliding ``window``; bool ``mask`` broadcastable to (b, Hq, n, m)).
    ``sinks`` (Hq,) logits compete as one more always-visible score per row. ``return_stats``: ``(threshold,
    stats)``, the statistics of ``topk_attention`` (the block fraction on the threshold kernel's tiles).
    """
    sel = _thresholds(q, k, k_top=k_top, scaling=scaling, causal=causal, offset=offset, window=window,
                      softcap=softcap, mask=mask, sinks=sinks)
    return (sel.thr, _stats(sel, sel.levels, sinks)) if return_stats else sel.thr


class _ThresholdedSoftmax(torch.autograd.Function):
    """Softmax attention over the keys at or above each row's threshold, each kernel looping over its block list
    (``_Selection.lists``; None: over the band, the split-KV forward for decode shapes); the threshold gets no
    gradient."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, mask, thr, lists, causal, offset, window, scaling, softcap):
        fwd_list, *bwd_lists = lists if lists is not None else (None, None, None)
        o, lse = flash_forward(q, k, v, scaling=scaling, causal=causal, offset=offset, window=window,
                               softcap=softcap, sinks=sinks, mask=mask, threshold=thr, block_list=fwd_list,
                               split_kv=False if lists is not None else None)
        ctx.save_for_backward(q, k, v, o, lse, sinks, mask, thr)
        ctx.args = (causal, offset, window, scaling, softcap)
        ctx.lists = tuple(bwd_lists) if lists is not None else None
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, sinks, mask, thr = ctx.saved_tensors
        causal, offset, window, scaling, softcap = ctx.args
        dq, dk, dv, dsinks = flash_backward(do, q, k, v, o, lse, scaling=scaling, causal=causal, offset=offset,
                                            window=window, softcap=softcap, sinks=sinks, mask=mask,
                                            threshold=thr, block_lists=ctx.lists)
        if sinks is None or not ctx.needs_input_grad[3]:
            dsinks = None
        else:
            dsinks = dsinks.to(sinks.dtype)
        return dq, dk, dv, dsinks, None, None, None, None, None, None, None, None


def topk_attention(q, k, v, *, k_top, scaling, causal=False, offset=0, window=None, softcap=None, mask=None,
                   sinks=None, return_stats=False):
    """Top-k attention: softmax over each row's ``k_top`` largest visible scores (ties at the k-th all kept; all
    visible keys when a row sees at most ``k_top``), differentiable in q, k, v and ``sinks``.

    Returns o (b, Hq, n, d) in q.dtype, or ``(o, stats)`` with ``return_stats``, where every sweep is a streamed
    q.k pass of one row block over its key band before the attention itself:
    ``threshold_passes`` / ``threshold_passes_max``: the median / largest number of sweeps of a row block (the
    first sweep included: 1 when every row sees <= k keys, 3 when the histogram's bin settles every row);
    ``passes``: the mean number of sweeps after the first (histogram, collection, fallback), per row block;
    ``fallback_rows``: rows that needed fallback sweeps; ``kept_fraction``: kept keys / visible (query, key) pairs;
    ``sweep_block_fraction``: the key blocks of the bands that the histogram and collection sweeps visited (the
    others lie below every row's histogram or target bin); ``skipped_block_fraction``: the key blocks of the bands
    (on the forward kernel's tiles) that the attention forward skipped (no kept key of any row of the block).
    Short query blocks against a long cache (``flash_fwd.use_split_kv``) take the split-KV decode path, which
    visits every block.
    """
    sel = _thresholds(q, k, k_top=k_top, scaling=scaling, causal=causal, offset=offset, window=window,
                      softcap=softcap, mask=mask, sinks=sinks)
    n, m = q.shape[2], k.shape[2]
    decode = use_split_kv(n, m, q.shape[1] // k.shape[1])  # generation: the split-KV path visits every block
    lists = None if decode else sel.lists(q, n, m)
    o = _ThresholdedSoftmax.apply(q, k, v, sinks, mask, tie_floor(sel.thr), lists, bool(causal), int(offset),
                                  window, float(scaling), None if softcap is None else float(softcap))
    if not return_stats:
        return o
    levels = torch.where(sel.levels != OUTSIDE, WEIGHT, OUTSIDE) if decode else lists[0].levels
    return o, _stats(sel, levels, sinks)


def _stats(sel: _Selection, levels, sinks) -> dict:
    """Benchmark statistics from the threshold pass (the sink column is not counted as a key); the block fraction
    from ``levels``, a level map (``block_map``)."""
    thr, kept, seen, passes = sel.thr, sel.kept, sel.seen, sel.passes
    used = passes[passes[:, 0] > 0]
    sweeps = used[:, 0].double()
    kept_keys, seen_keys = kept.double(), seen.double()
    if sinks is not None:
        real = seen > 0
        sink_kept = (sinks.detach().float().view(1, -1, 1) >= tie_floor(thr)) & real
        kept_keys = kept_keys - sink_kept.double()
        seen_keys = seen_keys - real.double()
    total = float(seen_keys.sum())
    any_used = sweeps.numel() > 0
    band = float(used[:, 2].sum())
    in_band = int((levels != OUTSIDE).sum())
    return {"threshold_passes": float(sweeps.quantile(0.5)) if any_used else 0.0,
            "threshold_passes_max": float(sweeps.max()) if any_used else 0.0,
            "passes": float(sweeps.mean()) - 1.0 if any_used else 0.0,
            "fallback_rows": int(used[:, 1].sum()),
            "kept_fraction": float(kept_keys.sum()) / total if total > 0 else 0.0,
            "sweep_block_fraction": float(used[:, 3].sum()) / (2 * band) if band else 0.0,
            "skipped_block_fraction": int((levels == NO_WEIGHT).sum()) / in_band if in_band else 0.0}


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
