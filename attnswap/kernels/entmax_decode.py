"""Split-KV decode path of the ``entmax`` Triton kernel: a few queries (n <= ``DECODE_MAX_QUERIES``, generation)
against a long key cache, inference only (no backward).

The prefill kernel (``entmax.py``) runs one program per (query block, batch row x query head): at decode that is
b * Hq programs streaming the whole cache, too few to fill a GPU. Here the key band (the keys some query may see)
is cut into ``splits`` contiguous pieces of whole key blocks, and every pass runs one program per (split, batch row
x query head), each holding the n queries of its head (BLOCK_M rows, n padded):
  1. ``_scores_kernel``: z = (alpha - 1) s of its split into the scores buffer Z (b*Hq*n, band + sink) fp32,
     -inf where hidden (``entmax_threshold.z_tile``: the prefill kernel's score formation, bit for bit). The only
     streamed pass over the keys; at decode Z is small (n * band floats per head, n <= 16).
  2. tau per row from Z: the reference's own exact solver (``attnswap.kinds.entmax.solve_threshold``, PyTorch) on
     z with target 1, so tau is the fp32 root, in z units like the prefill kernel's. The sink logit is Z's last
     column (``z = (alpha - 1) * sinks[h]``, always visible): it joins the threshold.
  3. ``_out_kernel``: per split, the partial sums acc = sum_j p_ij v_j and den = sum_j p_ij, p = [z - tau]_+^e,
     reading z back from Z (no K, no recomputed scores) and V only for key blocks where some row has z > tau.
  4. ``combine``: o = sum of the acc partials / (sum of the den partials + p_sink) (entmax partials add up: no
     running max, no lse); the sink's own weight is dropped. Rows with nothing visible give o = 0, never NaN.
Visibility (causal with offset, sliding window, bool masks with any broadcast), softcap and GQA as in the prefill
kernel (``tiles.visible``, ``tiles.mask_view``). ``entmax.entmax_attention`` routes here when ``use_decode``
holds: n <= DECODE_MAX_QUERIES, no gradient wanted, and more than one split pays on this device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..kinds.entmax import solve_threshold
from .entmax_threshold import power_mode, powers, z_tile
from .flash_decode import num_splits
from .tiles import check_shapes, dot_f32, dot_prec, load_cols, load_rows, mask_view, row_block
from .tuning import interpreting

DECODE_MAX_QUERIES = 16  # queries per (batch row, head) that the decode path takes: one BLOCK_M of rows
BLOCK_M = 16  # rows of a program: the n <= DECODE_MAX_QUERIES queries of one head, padded
DECODE_MIN_BLOCKS = 8  # key blocks of the band at least (512 keys on a GPU, as softmax's split-KV rule)


@triton.jit(do_not_specialize=["N_Q", "N_K", "band_lo", "band_len", "split_len", "offset", "window"])
def _scores_kernel(Q, K, MASK, Z, sqb, sqh, sqn, sqd, skb, skh, skn, skd, smb, smh, smn, smm, szr,
                   H_Q, GROUPS, N_Q, N_K, band_lo, band_len, split_len, scale, softcap, am1, offset, window,
                   IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                   DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """z = (alpha - 1) s (-inf where hidden) of the N_Q queries of one (batch row, query head) against one split of
    the key band: Z[row, c] for key band_lo + c, columns [split * split_len, ... + split_len) of band_len."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, hk, offs_m, offs_d, row_ok = row_block(0, bh, H_Q, GROUPS, N_Q, BLOCK_M, D_PAD)
    q = load_rows(Q + b * sqb + h * sqh, offs_m, offs_d, sqn, sqd, N_Q, HEAD_DIM, DOT_F32)
    k_base = K + b * skb + hk * skh
    mask_base = MASK + b * smb + h * smh
    z_rows = Z + (bh.to(tl.int64) * N_Q + offs_m) * szr
    c_lo = split * split_len
    c_hi = tl.minimum(c_lo + split_len, band_len)
    for start in range(c_lo, c_hi, BLOCK_N):
        offs_c = start + tl.arange(0, BLOCK_N)
        offs_n = band_lo + offs_c
        kt = load_cols(k_base, offs_n, offs_d, skn, skd, N_K, HEAD_DIM, DOT_F32)
        z, _, _ = z_tile(q, kt, offs_m, offs_n, N_Q, N_K, mask_base, smn, smm, scale, softcap, am1, offset, window,
                         IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_SOFTCAP, DOT_PREC)
        tl.store(z_rows[:, None] + offs_c[None, :], z, mask=row_ok[:, None] & (offs_c < c_hi)[None, :])


@triton.jit(do_not_specialize=["N_Q", "N_K", "band_lo", "band_len", "split_len"])
def _out_kernel(Z, TAU, V, ACC, DEN, svb, svh, svn, svd, szr, H_Q, GROUPS, N_Q, N_K, band_lo, band_len, split_len,
                SPLITS, e, MODE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
                DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The partials of one split for the N_Q rows of one (batch row, query head): ACC (rows, SPLITS, HEAD_DIM) =
    sum_j p_ij v_j and DEN (rows, SPLITS) = sum_j p_ij, p = [z - tau]_+^e with z read from Z; a key block whose z
    are all <= tau (no weight) is not read from V."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, hk, offs_m, offs_d, row_ok = row_block(0, bh, H_Q, GROUPS, N_Q, BLOCK_M, D_PAD)
    rows = bh.to(tl.int64) * N_Q + offs_m
    tau = tl.load(TAU + rows, mask=row_ok, other=float("inf"))
    z_rows = Z + rows * szr
    v_base = V + b * svb + hk * svh
    c_lo = split * split_len
    c_hi = tl.minimum(c_lo + split_len, band_len)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(c_lo, c_hi, BLOCK_N):
        offs_c = start + tl.arange(0, BLOCK_N)
        z = tl.load(z_rows[:, None] + offs_c[None, :], mask=row_ok[:, None] & (offs_c < c_hi)[None, :],
                    other=float("-inf"))
        u = tl.maximum(z - tau[:, None], 0.0)
        if tl.max(tl.max(u, 1), 0) > 0:
            p, _ = powers(u, e, MODE)
            v = load_rows(v_base, band_lo + offs_c, offs_d, svn, svd, N_K, HEAD_DIM, DOT_F32)
            den += tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    part = rows * SPLITS + split
    tl.store(ACC + part[:, None] * HEAD_DIM + offs_d[None, :], acc,
             mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(DEN + part, den, mask=row_ok)


# ---------------------------------------------------------------------------------------------------------------
# host side


def decode_band(n: int, m: int, *, causal: bool, offset: int, window: int | None) -> tuple[int, int]:
    """Keys [lo, hi) that some of the n queries may see (query i at key position i + offset): causal stops at the
    last query's position, a window starts at the first query's oldest key."""
    lo, hi = 0, m
    if causal:
        hi = min(max(n - 1 + offset + 1, 0), m)
    if window is not None:
        lo = min(max(offset - window + 1, 0), m)
    return lo, max(hi, lo)


def decode_tiles() -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of both decode kernels: 16 keys in the interpreter; on a GPU 64 keys and 8
    warps at every head dim and dtype (compiled for sm_90 without register spills, ``benchmarks/compile_stats.py``:
    with 4 warps the output kernel spills in fp32 at head dims 64 and 256, with 32 keys and 8 warps in bf16 at 64)."""
    if interpreting():
        return 16, 1, 1
    return 64, 8, 2


def split_plan(b: int, hq: int, band_len: int, block_n: int, splits: int | None = None) -> tuple[int, int]:
    """(splits, keys per split, a multiple of block_n) over a band of ``band_len`` keys: ``flash_decode.num_splits``
    (about two programs per SM, at least 4 key blocks each) unless ``splits`` is given; no split left empty."""
    want = splits or num_splits(b, hq, band_len, block_n)
    split_len = triton.cdiv(triton.cdiv(max(band_len, 1), want), block_n) * block_n
    return max(1, triton.cdiv(band_len, split_len)), split_len


def use_decode(q, k, v, sinks=None, *, causal=False, offset=0, window=None) -> bool:
    """Whether ``entmax_attention`` takes the split-KV decode path: at most ``DECODE_MAX_QUERIES`` queries, no
    gradient wanted (nothing requires grad, or grad mode off), a key band of ``DECODE_MIN_BLOCKS`` key blocks or
    more, and more than one split there (``split_plan``)."""
    n, m = q.shape[2], k.shape[2]
    if not 0 < n <= DECODE_MAX_QUERIES or q.shape[0] * q.shape[1] == 0:
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sinks)):
        return False
    lo, hi = decode_band(n, m, causal=causal, offset=offset, window=window)
    block_n = decode_tiles()[0]
    return hi - lo >= DECODE_MIN_BLOCKS * block_n and split_plan(q.shape[0], q.shape[1], hi - lo, block_n)[0] > 1


def _sink_weight(u: torch.Tensor, alpha: float) -> torch.Tensor:
    """u = [z_sink - tau]_+ -> u^(1/(alpha-1)), as ``powers`` (no pow for alpha 2 and 1.5)."""
    if alpha == 2.0:
        return u
    if alpha == 1.5:
        return u * u
    return u.pow(1.0 / (alpha - 1.0))


def combine(acc: torch.Tensor, den: torch.Tensor, p_sink: torch.Tensor | None) -> torch.Tensor:
    """Split partials (rows, S, d), (rows, S) and the sink's weight (rows,) or None -> o (rows, d) fp32: plain sums
    (entmax weights need no rescaling across splits); 0 on rows without weight."""
    total = den.sum(1)
    if p_sink is not None:
        total = total + p_sink
    o = acc.sum(1) / torch.where(total > 0, total, torch.ones_like(total))[:, None]
    return torch.where((total > 0)[:, None], o, torch.zeros_like(o))


def _thresholds(z: torch.Tensor, alpha: float) -> torch.Tensor:
    """tau (rows,) fp32 in z units from the scores buffer (sink column included): the exact root of
    sum_j [z_j - tau]_+^e = 1; +inf on rows with nothing visible."""
    if z.shape[-1] == 0:
        return torch.full(z.shape[:1], float("inf"), device=z.device)
    tau = solve_threshold(z, 1.0 / (alpha - 1.0), 1.0).squeeze(-1)
    return torch.where(torch.isinf(z.amax(-1)), float("inf"), tau)


def decode_forward(q, k, v, *, alpha, scaling, causal=False, offset=0, window=None, softcap=None, sinks=None,
                   mask=None, splits: int | None = None):
    """Split-KV entmax forward (no gradient): returns ``(o (b, Hq, n, d) in q.dtype, saved)``; ``saved`` holds tau
    (b, Hq, n) fp32 (+inf on rows with nothing visible and no sink), the scores buffer ``z`` (b*Hq*n, band (+1 sink
    column)) fp32, the key band ``(lo, hi)``, ``splits``, ``split_len`` and ``block_n`` (for ``decode_stats``).
    Arguments as ``entmax.entmax_forward``; ``splits`` forces the number of key splits."""
    alpha = float(alpha)
    if not 1.0 < alpha <= 2.0:
        raise ValueError(f"entmax alpha must be a number in (1, 2] (2 is sparsemax), got {alpha!r}")
    b, hq, hkv, n, m, d = check_shapes(q, k, v)
    if n > DECODE_MAX_QUERIES:
        raise ValueError(f"the entmax decode path takes at most {DECODE_MAX_QUERIES} queries, got {n}")
    block_n, warps, stages = decode_tiles()
    lo, hi = decode_band(n, m, causal=causal, offset=offset, window=window)
    s, split_len = split_plan(b, hq, hi - lo, block_n, splits)
    rows, am1 = b * hq * n, alpha - 1.0
    has_sinks = sinks is not None
    z = torch.empty((rows, hi - lo + has_sinks), device=q.device, dtype=torch.float32)
    if has_sinks:
        z[:, -1] = (sinks.detach().float() * am1).view(1, hq, 1).expand(b, hq, n).reshape(rows)
    mask_t, mask_st = mask_view(mask, b, hq, hkv, n, m)
    flags = dict(HEAD_DIM=d, D_PAD=max(16, triton.next_power_of_2(d)), DOT_PREC=dot_prec(q.dtype),
                 DOT_F32=dot_f32(q.dtype), BLOCK_M=BLOCK_M, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    grid = (s, b * hq)
    if rows and hi > lo:
        _scores_kernel[grid](
            q, k, mask_t if mask_t is not None else z, z, *q.stride(), *k.stride(), *mask_st, z.stride(0),
            hq, hq // hkv, n, m, lo, hi - lo, split_len, float(scaling), float(softcap or 1.0), am1, int(offset),
            int(window or 0), IS_CAUSAL=bool(causal), HAS_WINDOW=window is not None, HAS_MASK=mask_t is not None,
            HAS_SOFTCAP=softcap is not None, **flags)
    tau = _thresholds(z, alpha)
    acc = torch.zeros((rows, s, d), device=q.device, dtype=torch.float32)
    den = torch.zeros((rows, s), device=q.device, dtype=torch.float32)
    if rows and hi > lo:
        _out_kernel[grid](z, tau, v, acc, den, *v.stride(), z.stride(0), hq, hq // hkv, n, m, lo, hi - lo,
                          split_len, s, 1.0 / am1, MODE=power_mode(alpha), **flags)
    p_sink = _sink_weight((z[:, -1] - tau).clamp_min(0.0), alpha) if has_sinks else None
    o = combine(acc, den, p_sink).view(b, hq, n, d).to(q.dtype)
    saved = dict(tau=tau.view(b, hq, n), z=z, band=(lo, hi), splits=s, split_len=split_len, block_n=block_n,
                 has_sinks=has_sinks)
    return o, saved


def decode_stats(saved) -> dict:
    """The stats of ``entmax.forward_stats`` for a decode forward (synchronizes): "skipped_block_fraction" (key
    blocks of the band, per (batch row, head), where no query has z > tau: the output pass reads no V there),
    "zero_weight_fraction" (1 - support size / visible pairs, the sink left out), "threshold_passes" and
    "threshold_passes_max" (1: the score pass is the only streamed pass over the keys; the threshold is solved on
    the scores buffer, the output pass is not counted)."""
    tau, block_n = saved["tau"], saved["block_n"]
    lo, hi = saved["band"]
    z = saved["z"][:, :hi - lo]
    bh, n = tau.shape[0] * tau.shape[1], tau.shape[2]
    carries = z > tau.reshape(-1, 1)
    visible_pairs = float(torch.isfinite(z).sum())
    support = float(carries.sum())
    n_blocks = triton.cdiv(hi - lo, block_n)
    padded = torch.nn.functional.pad(carries, (0, n_blocks * block_n - (hi - lo)))
    active = padded.view(bh, n, n_blocks, block_n).any(-1).any(1)
    in_band = active.numel()
    return {"skipped_block_fraction": 1.0 - float(active.sum()) / in_band if in_band else 0.0,
            "zero_weight_fraction": 1.0 - support / visible_pairs if visible_pairs else 0.0,
            "threshold_passes": 1.0 if in_band else 0.0,
            "threshold_passes_max": 1 if in_band else 0}
