"""Tile pieces of the few-pass threshold searches (``entmax``, ``topk``): a per-row histogram of a score tile and
the collection of one row's scores that fall in a narrow bracket into a small scratch row.

A threshold search streams the keys a few times: one pass finds each row's range, one counts the scores in
``NUM_BINS`` bins of it (``bin_counts``), and one gathers the scores of the bin that holds the answer
(``collect``), on which the kind then solves exactly in registers. Rows whose bin holds more than the scratch
row's ``CAP`` slots fall back to the kind's own iteration, started from the bracket the histogram gave.
"""

from __future__ import annotations

import triton
import triton.language as tl

NUM_BINS = 16  # bins of one histogram pass (a multiple of 8: 8 bins per packed int64 word)
CAP = 64  # scratch slots per row: the scores of the answer's bin that one collecting pass can hold


@triton.jit
def bin_index(x, lo, inv_width, NUM_BINS: tl.constexpr):
    """Bin of each x (BLOCK_M, BLOCK_N) in NUM_BINS equal bins from lo (BLOCK_M,) of width 1 / inv_width:
    -1 below lo (and for -inf/NaN), NUM_BINS - 1 for everything at or past the last bin's start."""
    t = (x - lo[:, None]) * inv_width[:, None]
    ok = t >= 0.0
    t = tl.where(ok, tl.minimum(t, NUM_BINS - 1.0), 0.0)
    return tl.where(ok, t.to(tl.int32), -1)


@triton.jit
def bin_counts(idx, BLOCK_M: tl.constexpr, NUM_BINS: tl.constexpr):
    """(BLOCK_M, BLOCK_N) int32 bins (out of 0..NUM_BINS-1 = not counted) -> (BLOCK_M, NUM_BINS) int32 counts per
    row. Eight bins share one int64 word (8 bits each: a row of a tile holds at most BLOCK_N <= 255 keys), so a
    tile costs NUM_BINS / 8 row reductions and a few integer ops per score."""
    cols = tl.arange(0, NUM_BINS)
    counts = tl.zeros([BLOCK_M, NUM_BINS], dtype=tl.int32)
    for w in tl.static_range(NUM_BINS // 8):
        local = idx - 8 * w
        inside = (local >= 0) & (local < 8)
        shift = (tl.where(inside, local, 0) * 8).to(tl.int64)
        one = tl.full(idx.shape, 1, dtype=tl.int64)
        word = tl.sum(tl.where(inside, one << shift, 0), 1)
        col_shift = (tl.where(cols // 8 == w, cols - 8 * w, 0) * 8).to(tl.int64)
        byte = ((word[:, None] >> col_shift[None, :]) & 255).to(tl.int32)
        counts += tl.where((cols // 8 == w)[None, :], byte, 0)
    return counts


@triton.jit
def collect(x, take, base, row_ptr, CAP: tl.constexpr):
    """Append the x (BLOCK_M, BLOCK_N) with ``take`` to each row's scratch (``row_ptr`` (BLOCK_M,) pointers to CAP
    slots) after the ``base`` (BLOCK_M,) int32 already there -> the new count (may pass CAP: what does not fit is
    not stored, and the count says so)."""
    t = take.to(tl.int32)
    pos = base[:, None] + tl.cumsum(t, 1) - t
    tl.store(row_ptr[:, None] + pos, x, mask=take & (pos < CAP))
    return base + tl.sum(t, 1)
