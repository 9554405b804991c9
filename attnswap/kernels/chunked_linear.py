"""Chunked Triton kernels of the feature-map kinds (``linear``: ELU+1, ``taylor``: 1 + s + s^2/2), forward and
backward, through one engine: ``sweep``.

Both kinds have weights w_ij = phi(q_i) . phi(k_j) for some feature map phi, so
``o_i = sum_j w_ij v_j / (sum_j w_ij + extra)``. The engine works on chunks of BLOCK_M queries in order, one
program per (batch row, query head, tile of value columns) (a *sequential sweep*; chosen over fla's per-chunk
state materialization + prefix because the Taylor state is (1 + d + d^2) x dv per head: materializing it per
chunk would need n / C times that memory, while a sweep keeps one copy; one engine then serves both kinds).
For each chunk:
  * the keys every query of the chunk sees, [a, bnd), are held in a running fp32 state
    ``S = sum_j phi(k_j) y_j^T`` and ``u = sum_j phi(k_j) ys_j``; the state moves forward by folding in
    the keys the causal edge passes and subtracting the keys the sliding-window edge leaves (a state that
    would have to drop all it holds is rebuilt from zero instead);
  * the keys only some queries see (the causal diagonal, the window edge) are done exactly in small
    quadratic blocks, the weights taken directly from the dot products (linear: phi(q) . phi(k) as a dot of
    mapped tiles; taylor: 1 + s + s^2/2 from the score tile; no d^2 expansion inside a chunk).
For ``taylor`` the state is split by feature order: S0 (dv), S1 (d x dv) and u0, u1 (d) in registers, and
S2 (d x d x dv), u2 (d x d) in an fp32 scratch per program (too large for registers at d = 128); a query's
contribution is S0 + scaling q.S1 + (scaling^2 / 2) sum_a q_a (q @ S2[a]).

One kernel serves forward and backward (modes, any combination):
  * OUT: ``num_i = sum_j w_ij y_j`` and ``den_i = sum_j w_ij ys_j`` (forward: y = v, ys = 1).
  * GRAD: the gradient of sum_ij w_ij dw_ij with dw_ij = x_i . y_j + xs_i ys_j wrt q_i (dq).
Backward of o = num / den: with g = do / den and c = -(do . o) / den, dw_ij = g_i . v_j + c_i, so
  * dq = GRAD(q, k, y = v, x = g, xs = c);
  * dk, dv: the same sweep on the transposed problem (keys as queries, both reversed so that causality keeps
    its direction: query i' = n-1-i sees key j' = m-1-j iff i' <= j' + n - m + offset): dv = OUT(k, q, y = g),
    dk = GRAD(k, q, y = g, ys = c, x = v). dk/dv are per query head and summed over the GQA group.
Key padding zeroes the padded keys' features (their weights are 0 everywhere). Rows with nothing visible
give 0, never NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import common_support, dot_prec
from .tuning import configs, interpreting, pruner

LINEAR, TAYLOR = 0, 1
FEATURES = {"linear": LINEAR, "taylor": TAYLOR}
MAX_HEAD_DIM = 128


@triton.jit
def _phi(x, d_ok, FEATURE: tl.constexpr):
    """The features the quadratic blocks take: ELU+1 (0 on padded dims) for linear, x itself for taylor."""
    if FEATURE == 0:
        return tl.where(d_ok[None, :], tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0))), 0.0)
    else:
        return x


@triton.jit
def _load_rows(base, offs, rows_ok, offs_d, stride, width):
    """fp32 tile (rows offs, columns offs_d < width) of a row-major matrix with row ``stride``; zeros outside."""
    ok = rows_ok[:, None] & (offs_d < width)[None, :]
    return tl.load(base + offs.to(tl.int64)[:, None] * stride + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _key_weight(offs_n, ok, sign, mask_base, smm, HAS_MASK: tl.constexpr):
    """Per-key multiplier: sign on valid keys in range, 0 on padded keys and outside."""
    wgt = tl.where(ok, sign, 0.0)
    if HAS_MASK:
        mv = tl.load(mask_base + offs_n.to(tl.int64) * smm, mask=ok, other=0)
        wgt = tl.where(mv != 0, wgt, 0.0)
    return wgt


@triton.jit
def _reset(S, u, S0, u0, s2_base, u2_base, FEATURE: tl.constexpr, DK_PAD: tl.constexpr, DV_PAD: tl.constexpr):
    """An empty state (the scratch of taylor's second-order part included)."""
    S = S * 0.0
    u = u * 0.0
    S0 = S0 * 0.0
    u0 = u0 * 0.0
    if FEATURE == 1:
        offs_k = tl.arange(0, DK_PAD)
        offs_v = tl.arange(0, DV_PAD)
        zero_s = tl.zeros([DK_PAD, DV_PAD], dtype=tl.float32)
        zero_u = tl.zeros([DK_PAD], dtype=tl.float32)
        for a in range(0, DK_PAD):
            tl.store(s2_base + a * DK_PAD * DV_PAD + offs_k[:, None] * DV_PAD + offs_v[None, :], zero_s)
            tl.store(u2_base + a * DK_PAD + offs_k, zero_u)
        tl.debug_barrier()
    return S, u, S0, u0


@triton.jit
def _fold(S, u, S0, u0, s2_base, u2_base, k_base, y_base, ys_base, mask_base, smm, start, end, sign, DK, DV, DV_LEFT,
          FEATURE: tl.constexpr, HAS_YS: tl.constexpr, HAS_MASK: tl.constexpr, DK_PAD: tl.constexpr,
          DV_PAD: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Add (sign = 1) or remove (sign = -1) keys [start, end) to/from the state."""
    offs_k = tl.arange(0, DK_PAD)
    offs_v = tl.arange(0, DV_PAD)
    for s in range(start, end, BLOCK_N):
        offs_n = s + tl.arange(0, BLOCK_N)
        ok = offs_n < end
        wgt = _key_weight(offs_n, ok, sign, mask_base, smm, HAS_MASK)
        k = _load_rows(k_base, offs_n, ok, offs_k, DK, DK)
        y = _load_rows(y_base, offs_n, ok, offs_v, DV, DV_LEFT) * wgt[:, None]
        ysw = wgt
        if HAS_YS:
            ysw = wgt * tl.load(ys_base + offs_n, mask=ok, other=0.0).to(tl.float32)
        f = _phi(k, offs_k < DK, FEATURE)
        S += tl.dot(tl.trans(f), y, input_precision=DOT_PREC)
        u += tl.sum(f * ysw[:, None], 0)
        if FEATURE == 1:
            S0 += tl.sum(y, 0)
            u0 += tl.sum(ysw, 0)
            for a in range(0, DK):
                ka = tl.load(k_base + offs_n.to(tl.int64) * DK + a, mask=ok, other=0.0).to(tl.float32)
                kk = k * ka[:, None]
                s2_ptrs = s2_base + a * DK_PAD * DV_PAD + offs_k[:, None] * DV_PAD + offs_v[None, :]
                s2 = tl.load(s2_ptrs)
                s2 += tl.dot(tl.trans(kk), y, input_precision=DOT_PREC)
                tl.store(s2_ptrs, s2)
                u2 = tl.load(u2_base + a * DK_PAD + offs_k)
                tl.store(u2_base + a * DK_PAD + offs_k, u2 + tl.sum(kk * ysw[:, None], 0))
            tl.debug_barrier()
    return S, u, S0, u0


@triton.jit
def _from_state(num, den, acc, q, fq, x, xs, S, u, S0, u0, s2_base, u2_base, q_base, offs_m, row_ok, scaling,
                DK, FEATURE: tl.constexpr, DO_OUT: tl.constexpr, DO_GRAD: tl.constexpr, DK_PAD: tl.constexpr,
                DV_PAD: tl.constexpr, DOT_PREC: tl.constexpr):
    """The state's contribution to the chunk's queries: num/den (OUT) and the feature gradient acc (GRAD)."""
    offs_k = tl.arange(0, DK_PAD)
    offs_v = tl.arange(0, DV_PAD)
    if FEATURE == 0:
        if DO_OUT:
            num = tl.dot(fq, S, num, input_precision=DOT_PREC)
            den += tl.sum(fq * u[None, :], 1)
        if DO_GRAD:  # d phi(q) = S x + u xs
            acc += tl.dot(x, tl.trans(S), input_precision=DOT_PREC) + xs[:, None] * u[None, :]
    else:
        half = 0.5 * scaling * scaling
        if DO_OUT:
            num += S0[None, :] + scaling * tl.dot(q, S, input_precision=DOT_PREC)
            den += u0 + scaling * tl.sum(q * u[None, :], 1)
        if DO_GRAD:  # dq = scaling (S1 x + u1 xs) + scaling^2 [sum_b q_b (S2[a, b] . x + u2[a, b] xs)]_a
            acc += scaling * (tl.dot(x, tl.trans(S), input_precision=DOT_PREC) + xs[:, None] * u[None, :])
        for a in range(0, DK):
            qa = tl.load(q_base + offs_m.to(tl.int64) * DK + a, mask=row_ok, other=0.0).to(tl.float32)
            s2 = tl.load(s2_base + a * DK_PAD * DV_PAD + offs_k[:, None] * DV_PAD + offs_v[None, :])
            u2 = tl.load(u2_base + a * DK_PAD + offs_k)
            if DO_OUT:
                qq = q * (qa * half)[:, None]
                num = tl.dot(qq, s2, num, input_precision=DOT_PREC)
                den += tl.sum(qq * u2[None, :], 1)
            if DO_GRAD:
                t = tl.dot(x, tl.trans(s2), input_precision=DOT_PREC) + xs[:, None] * u2[None, :]
                col = tl.sum(q * t, 1) * (scaling * scaling)
                acc += tl.where(offs_k[None, :] == a, col[:, None], 0.0)
        tl.debug_barrier()  # every read of the scratch is done before the next fold writes it
    return num, den, acc


@triton.jit
def _edge(num, den, acc, q, fq, x, xs, k_base, y_base, ys_base, mask_base, smm, offs_m, row_ok, start, end,
          offset, window, scaling, DK, DV, DV_LEFT, FEATURE: tl.constexpr, DO_OUT: tl.constexpr, DO_GRAD: tl.constexpr,
          HAS_YS: tl.constexpr, HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
          DK_PAD: tl.constexpr, DV_PAD: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [start, end) that only some queries of the chunk see: exact, masked quadratic blocks."""
    offs_k = tl.arange(0, DK_PAD)
    offs_v = tl.arange(0, DV_PAD)
    for s in range(start, end, BLOCK_N):
        offs_n = s + tl.arange(0, BLOCK_N)
        ok = offs_n < end
        keep = _key_weight(offs_n, ok, 1.0, mask_base, smm, HAS_MASK)
        vis = (keep != 0.0)[None, :] & row_ok[:, None]
        if IS_CAUSAL:
            vis = vis & (offs_n[None, :] <= offs_m[:, None] + offset)
        if HAS_WINDOW:
            vis = vis & (offs_n[None, :] > offs_m[:, None] + offset - window)
        k = _load_rows(k_base, offs_n, ok, offs_k, DK, DK)
        y = _load_rows(y_base, offs_n, ok, offs_v, DV, DV_LEFT)
        ys = keep
        if HAS_YS:
            ys = tl.load(ys_base + offs_n, mask=ok, other=0.0).to(tl.float32)
        fk = _phi(k, offs_k < DK, FEATURE)
        sc = tl.dot(fq, tl.trans(fk), input_precision=DOT_PREC)
        if FEATURE == 1:
            sc = sc * scaling
            w = 1.0 + sc + 0.5 * sc * sc
        else:
            w = sc
        w = tl.where(vis, w, 0.0)
        if DO_OUT:
            num = tl.dot(w, y, num, input_precision=DOT_PREC)
            den += tl.sum(w * ys[None, :], 1)
        if DO_GRAD:
            dw = tl.dot(x, tl.trans(y), input_precision=DOT_PREC) + xs[:, None] * ys[None, :]
            dw = tl.where(vis, dw, 0.0)
            if FEATURE == 1:  # dq = scaling sum_j dw_ij (1 + s_ij) k_j
                acc += scaling * tl.dot(dw * (1.0 + sc), k, input_precision=DOT_PREC)
            else:  # d phi(q) = sum_j dw_ij phi(k_j)
                acc = tl.dot(dw, fk, acc, input_precision=DOT_PREC)
    return num, den, acc


@triton.jit(do_not_specialize=["N_Q", "N_K", "offset", "window"])
def _sweep_kernel(Q, K, Y, YS, X, XS, OUT, DEN, DQ, MASK, S2, U2, smb, smh, smm,
                  H, QG, KG, HQ_IN, HK_IN, N_Q, N_K, offset, window, scaling, DK, DV,
                  FEATURE: tl.constexpr, DO_OUT: tl.constexpr, DO_GRAD: tl.constexpr, HAS_YS: tl.constexpr,
                  HAS_XS: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  HAS_MASK: tl.constexpr, DK_PAD: tl.constexpr, DV_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (batch row x head h, tile of DV_PAD value columns): sweeps the query chunks in order (see
    the module docstring). With several value tiles, DQ holds one partial per tile (the caller sums them)."""
    bh = tl.program_id(0)
    tile = tl.program_id(1)
    programs = tl.num_programs(0)
    v0 = tile * DV_PAD
    DV_LEFT = DV - v0
    b = (bh // H).to(tl.int64)
    h = bh % H
    hq = (h // QG).to(tl.int64)
    hk = (h // KG).to(tl.int64)
    bh64 = bh.to(tl.int64)
    q_rows = (b * HQ_IN + hq) * N_Q
    k_rows = (b * HK_IN + hk) * N_K
    q_base = Q + q_rows * DK
    x_base = X + q_rows * DV + v0
    xs_base = XS + q_rows
    k_base = K + k_rows * DK
    y_base = Y + k_rows * DV + v0
    ys_base = YS + k_rows
    mask_base = MASK + b * smb + h.to(tl.int64) * smh
    scratch = tile.to(tl.int64) * programs + bh64
    s2_base = S2 + scratch * DK_PAD * DK_PAD * DV_PAD
    u2_base = U2 + scratch * DK_PAD * DK_PAD

    offs_k = tl.arange(0, DK_PAD)
    offs_v = tl.arange(0, DV_PAD)
    S = tl.zeros([DK_PAD, DV_PAD], dtype=tl.float32)
    u = tl.zeros([DK_PAD], dtype=tl.float32)
    S0 = tl.zeros([DV_PAD], dtype=tl.float32)
    u0 = tl.sum(tl.zeros([DV_PAD], dtype=tl.float32), 0)
    lo = N_K * 0  # the state holds keys [lo, hi)
    hi = N_K * 0
    for q0 in range(0, N_Q, BLOCK_M):
        # keys every query of the chunk sees: [a, bnd); keys some query sees: [k_lo, k_hi)
        a = N_K * 0
        bnd = N_K
        k_lo = N_K * 0
        k_hi = N_K
        if IS_CAUSAL:
            bnd = tl.minimum(tl.maximum(q0 + offset + 1, 0), N_K)
            k_hi = tl.minimum(tl.maximum(q0 + BLOCK_M + offset, 0), N_K)
        if HAS_WINDOW:
            a = tl.minimum(tl.maximum(q0 + BLOCK_M + offset - window, 0), N_K)
            k_lo = tl.minimum(tl.maximum(q0 + offset - window + 1, 0), N_K)
        bnd = tl.maximum(bnd, a)
        k_hi = tl.maximum(k_hi, k_lo)

        if a >= hi:  # nothing held stays: start over
            S, u, S0, u0 = _reset(S, u, S0, u0, s2_base, u2_base, FEATURE, DK_PAD, DV_PAD)
            lo = a
            hi = a
        S, u, S0, u0 = _fold(S, u, S0, u0, s2_base, u2_base, k_base, y_base, ys_base, mask_base, smm, hi, bnd,
                             1.0, DK, DV, DV_LEFT, FEATURE, HAS_YS, HAS_MASK, DK_PAD, DV_PAD, DOT_PREC, BLOCK_N)
        S, u, S0, u0 = _fold(S, u, S0, u0, s2_base, u2_base, k_base, y_base, ys_base, mask_base, smm, lo, a,
                             -1.0, DK, DV, DV_LEFT, FEATURE, HAS_YS, HAS_MASK, DK_PAD, DV_PAD, DOT_PREC, BLOCK_N)
        lo = a
        hi = tl.maximum(hi, bnd)

        offs_m = q0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N_Q
        q = _load_rows(q_base, offs_m, row_ok, offs_k, DK, DK)
        fq = _phi(q, offs_k < DK, FEATURE)
        x = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)
        xs = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
        if DO_GRAD:
            x = _load_rows(x_base, offs_m, row_ok, offs_v, DV, DV_LEFT)
            if HAS_XS:
                xs = tl.load(xs_base + offs_m, mask=row_ok, other=0.0).to(tl.float32)
            xs = xs * (tile == 0).to(tl.float32)  # the scalar term of dw counts once over the value tiles
        num = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)
        den = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, DK_PAD], dtype=tl.float32)
        if bnd > a:
            num, den, acc = _from_state(num, den, acc, q, fq, x, xs, S, u, S0, u0, s2_base, u2_base, q_base,
                                        offs_m, row_ok, scaling, DK, FEATURE, DO_OUT, DO_GRAD, DK_PAD, DV_PAD,
                                        DOT_PREC)
        num, den, acc = _edge(num, den, acc, q, fq, x, xs, k_base, y_base, ys_base, mask_base, smm, offs_m,
                              row_ok, k_lo, tl.minimum(a, k_hi), offset, window, scaling, DK, DV, DV_LEFT, FEATURE,
                              DO_OUT, DO_GRAD, HAS_YS, HAS_MASK, IS_CAUSAL, HAS_WINDOW, DK_PAD, DV_PAD, DOT_PREC,
                              BLOCK_N)
        num, den, acc = _edge(num, den, acc, q, fq, x, xs, k_base, y_base, ys_base, mask_base, smm, offs_m,
                              row_ok, tl.maximum(bnd, k_lo), k_hi, offset, window, scaling, DK, DV, DV_LEFT, FEATURE,
                              DO_OUT, DO_GRAD, HAS_YS, HAS_MASK, IS_CAUSAL, HAS_WINDOW, DK_PAD, DV_PAD, DOT_PREC,
                              BLOCK_N)
        rows64 = offs_m.to(tl.int64)
        if DO_OUT:
            tl.store(OUT + (bh64 * N_Q + rows64)[:, None] * DV + v0 + offs_v[None, :], num,
                     mask=row_ok[:, None] & (offs_v < DV_LEFT)[None, :])
            tl.store(DEN + bh64 * N_Q + rows64, den, mask=row_ok)
        if DO_GRAD:
            if FEATURE == 0:  # chain rule through elu + 1: d/dx = 1 (x > 0) or exp(x)
                acc = acc * tl.where(q > 0, 1.0, fq)
            tl.store(DQ + ((tile.to(tl.int64) * programs + bh64) * N_Q + rows64)[:, None] * DK + offs_k[None, :], acc,
                     mask=row_ok[:, None] & (offs_k < DK)[None, :])


# (query chunk, key block, warps, stages). The sweep is sequential per (batch row, head): its work per chunk is
# fixed, so the tuning key is the head dims and the mode, not the lengths.
_CONFIGS = configs([(64, 64, 4, 1), (64, 64, 8, 1), (64, 32, 4, 1), (32, 32, 4, 1), (128, 64, 8, 1)])
_prune = pruner(lambda bm, bn, stages: bm * bn > 64 * 64)

_sweep_tuned = _sweep_kernel if interpreting() else triton.autotune(
    configs=_CONFIGS, key=["DK_PAD", "DV_PAD", "FEATURE", "DO_OUT", "DO_GRAD", "IS_CAUSAL", "HAS_WINDOW"],
    prune_configs_by={"early_config_prune": _prune})(_sweep_kernel)


def _launch(chunk) -> dict:
    """Chunk size: 16 in the interpreter; on a GPU the autotuner picks (or ``chunk`` forces one)."""
    if chunk is not None:
        return {"BLOCK_M": chunk, "BLOCK_N": chunk, "num_warps": 4, "num_stages": 1}
    if interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}
    return {}


# Value columns per program: registers hold the (d x tile) state, and d = dv = 128 gets two programs per head.
VALUE_TILE = 16 if interpreting() else 64


def _pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def sweep(q, k, y, *, feature: int, scaling: float, causal: bool, offset: int, window, key_mask=None,
          ys=None, x=None, xs=None, want_out=True, want_grad=False, q_groups=1, k_groups=1, chunk=None,
          value_tile=None):
    """Run the engine. q (b, Hq_in, n, dk), k (b, Hk_in, m, dk), y (b, Hk_in, m, dv), ys (b, Hk_in, m) | None,
    x (b, Hq_in, n, dv) | None, xs (b, Hq_in, n) | None; programs run per head h in [0, H) with
    H = Hq_in * q_groups = Hk_in * k_groups, reading query head h // q_groups and key head h // k_groups.
    ``key_mask``: bool (b|1, H|1, 1, m) key padding. ``chunk`` forces the chunk size; ``value_tile`` the
    width of the value-column tiles (one program each; default ``VALUE_TILE``).
    Returns (num (b, H, n, dv), den (b, H, n), dq (b, H, n, dk)) in fp32, the ones not asked for as None."""
    b, hq_in, n, dk = q.shape
    hk_in, m, dv = k.shape[1], k.shape[2], y.shape[-1]
    heads = hq_in * q_groups
    assert heads == hk_in * k_groups
    q, k, y = q.contiguous(), k.contiguous(), y.contiguous()
    dev = q.device
    num = torch.empty((b, heads, n, dv), device=dev, dtype=torch.float32) if want_out else None
    den = torch.empty((b, heads, n), device=dev, dtype=torch.float32) if want_out else None
    if n == 0 or b * heads == 0:
        zeros = torch.zeros((b, heads, n, dk), device=dev, dtype=torch.float32)
        return (None if num is None else num.zero_(), None if den is None else den.zero_(),
                zeros if want_grad else None)
    dk_pad, dv_pad = _pad(dk), _pad(dv)
    dv_pad = min(dv_pad, value_tile or VALUE_TILE)
    tiles = triton.cdiv(dv, dv_pad)
    dq = torch.empty((tiles, b, heads, n, dk), device=dev, dtype=torch.float32) if want_grad else None
    dummy = torch.empty(1, device=dev, dtype=torch.float32)
    if feature == TAYLOR:
        s2 = torch.empty((tiles * b * heads, dk_pad, dk_pad, dv_pad), device=dev, dtype=torch.float32)
        u2 = torch.empty((tiles * b * heads, dk_pad, dk_pad), device=dev, dtype=torch.float32)
    else:
        s2 = u2 = dummy
    if key_mask is not None:
        km = key_mask.expand(b, heads, 1, m)
        mask_t, (smb, smh, _, smm) = km.view(torch.uint8), km.stride()
    else:
        mask_t, smb, smh, smm = dummy, 0, 0, 0
    launch = _launch(chunk)
    kernel = _sweep_kernel if launch else _sweep_tuned
    kernel[(b * heads, tiles)](
        q, k, y, ys.contiguous() if ys is not None else dummy, x.contiguous() if x is not None else dummy,
        xs.contiguous() if xs is not None else dummy, num if num is not None else dummy,
        den if den is not None else dummy, dq if dq is not None else dummy, mask_t, s2, u2, smb, smh, smm,
        heads, q_groups, k_groups, hq_in, hk_in, n, m, int(offset), int(window or 0), float(scaling), dk, dv,
        FEATURE=feature, DO_OUT=bool(want_out), DO_GRAD=bool(want_grad), HAS_YS=ys is not None,
        HAS_XS=xs is not None, IS_CAUSAL=bool(causal), HAS_WINDOW=window is not None,
        HAS_MASK=key_mask is not None, DK_PAD=dk_pad, DV_PAD=dv_pad, DOT_PREC=dot_prec(q.dtype), **launch)
    if dq is not None:
        dq = dq[0] if tiles == 1 else dq.sum(0)
    return num, den, dq


def taylor_weight(s: torch.Tensor) -> torch.Tensor:
    return 1.0 + s + 0.5 * s * s


def _extra_den(sinks, eps: float, heads: int, device) -> torch.Tensor:
    """(1, Hq, 1) fp32 added to every denominator: eps, plus a sink's Taylor weight."""
    extra = torch.full((1, heads, 1), float(eps), device=device, dtype=torch.float32)
    if sinks is not None:
        extra = extra + taylor_weight(sinks.detach().float()).reshape(1, heads, 1)
    return extra


class _ChunkedFeatureAttention(torch.autograd.Function):
    """o = num / (den + extra) from the sweep; backward through three more sweeps' worth of work (two launches)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, key_mask, causal, offset, window, feature, scaling, eps):
        groups = q.shape[1] // k.shape[1]
        num, den, _ = sweep(q, k, v, feature=feature, scaling=scaling, causal=causal, offset=offset,
                            window=window, key_mask=key_mask, k_groups=groups)
        den = den + _extra_den(sinks, eps, q.shape[1], q.device)
        den = torch.where(den == 0, torch.ones_like(den), den)
        o = num / den.unsqueeze(-1)
        ctx.save_for_backward(q, k, v, sinks, key_mask, o, den)
        ctx.args = (causal, offset, window, feature, scaling)
        return o.to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, sinks, key_mask, o, den = ctx.saved_tensors
        causal, offset, window, feature, scaling = ctx.args
        b, hq, n, _ = q.shape
        hkv, m = k.shape[1], k.shape[2]
        groups = hq // hkv
        g = do.float() / den.unsqueeze(-1)
        c = -(do.float() * o).sum(-1) / den
        _, _, dq = sweep(q, k, v, feature=feature, scaling=scaling, causal=causal, offset=offset, window=window,
                         key_mask=key_mask, x=g, xs=c, want_out=False, want_grad=True, k_groups=groups)
        # keys as queries, both reversed: causal and window keep their form with offset n - m + offset
        dv_h, _, dk_h = sweep(k.flip(2), q.flip(2), g.flip(2), feature=feature, scaling=scaling, causal=causal,
                              offset=n - m + offset, window=window, ys=c.flip(2), x=v.flip(2), want_out=True,
                              want_grad=True, q_groups=groups)
        if key_mask is not None:  # padded keys have no features: no gradient
            keep = key_mask.expand(b, hq, 1, m)[:, :, 0].flip(-1).unsqueeze(-1)
            dv_h, dk_h = dv_h * keep, dk_h * keep
        dk = dk_h.reshape(b, hkv, groups, m, -1).sum(2).flip(2)
        dv = dv_h.reshape(b, hkv, groups, m, -1).sum(2).flip(2)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[3]:
            dsinks = (c.sum((0, 2)) * (1.0 + sinks.detach().float())).to(sinks.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks, None, None, None, None, None, None, None


def chunked_attention(query, key, value, *, feature: str, scaling: float = 1.0, causal: bool = False,
                      offset: int = 0, window=None, key_mask=None, sinks=None, eps: float = 0.0):
    """Feature-map attention (``feature`` in ``FEATURES``) through the chunked kernels, differentiable in query,
    key, value and sinks. query (b, Hq, n, dk), key (b, Hkv, m, dk), value (b, Hkv, m, dv); ``key_mask`` bool
    (b|1, Hq|1, 1, m) (True = attend); ``sinks`` (Hq,) logits whose Taylor weight joins every denominator;
    ``eps`` joins every denominator. Returns (b, Hq, n, dv) in query.dtype."""
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of {sorted(FEATURES)}, got {feature!r}")
    if query.shape[-1] > MAX_HEAD_DIM or value.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head dims up to {MAX_HEAD_DIM} are supported, got {query.shape[-1]}/{value.shape[-1]}")
    if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.dim() != 4 or key_mask.shape[2] != 1):
        raise ValueError(f"key_mask must be bool (b|1, Hq|1, 1, m), got {key_mask.dtype} {tuple(key_mask.shape)}")
    return _ChunkedFeatureAttention.apply(query, key, value, sinks, key_mask, bool(causal), int(offset),
                                          None if window is None else int(window), FEATURES[feature],
                                          float(scaling), float(eps))



def supports_common(kind: str, query, key, value, vis, *, dropout=0.0, need_weights=False) -> tuple[bool, str]:
    """The checks both feature-map kinds share: ``tiles.common_support`` (head dims 1..MAX_HEAD_DIM), then
    structured visibility."""
    ok, why = common_support(query, key, value, vis, dropout=dropout, need_weights=need_weights, name=kind,
                             max_head_dim=MAX_HEAD_DIM)
    if not ok:
        return ok, why
    if not vis.is_structured:
        return False, (f"the {kind} kernel takes causal, sliding-window and key-padding masks (b|1, 1, 1, m) "
                       "only; a dense mask runs the quadratic reference")
    return True, ""


def key_padding(vis) -> torch.Tensor | None:
    """``vis.mask`` (b|1, Hkv|1, G|1, 1, m) bool key padding -> (b|1, Hq|1, 1, m) bool, or None."""
    mask = vis.mask
    if mask is None:
        return None
    mb, mkv, mg, mn, mm = mask.shape
    if mkv == 1 and mg == 1:
        return mask[:, :, 0]
    return mask.reshape(mb, mkv * mg, mn, mm)
