"""The Triton path of kind ``window_linear``: the exact sink and window keys and the linear rest in one pass per query
chunk, forward and backward (``kernel`` / ``supports`` for the registry).

For query i with ``cnt_i`` visible real keys (ranks 0..cnt_i-1 counted from its row's first real key), the exact
keys E_i are the ranks < ``sink_tokens`` and the ranks >= cnt_i - ``local_window``; the linear keys L_i the ranks in
[sink_tokens, cnt_i - local_window). With c_i the largest score over E_i (and the model's sink logit, if any),

    o_i = (sum_E e_ij v_j + sum_L w_ij v_j) / (l_i + sum_L w_ij + eps),   e_ij = exp(s_ij - c_i),  w_ij = fq_i . fk_j,
    l_i = sum_E e_ij (+ exp(sink - c_i)),

as ``kinds/window_linear.py`` defines it (fq, fk: the feature map on the learned projection of q, k, computed in
PyTorch, so gradients reach the projection through autograd).

Forward: the linear part is the chunk-parallel engine's (``linear_parallel``: per-chunk states of the linear keys --
real keys of rank >= sink_tokens -- and their prefix, then ``linear_rows``: query i sees them causally up to
position i + offset - local_window); ``_fwd_kernel`` adds, in the same program, the exact part as an online softmax
over the sink block(s) and the window band of the chunk, and writes o, the denominator, c_i and the key that holds
it (its argmax). Backward, with G_i = do_i / den_i and d_i = (do_i . o_i) / den_i:
  * the linear part: the engine's backward on the same o and den (it forms G and d itself);
  * the exact part: ds_ij = e_ij (G_i . v_j - d_i) on E_i, plus dL/dc_i = d_i l_i - sum_E e_ij G_i . v_j on the key
    holding the maximum (c_i moves with it; on an exact tie the whole term goes to the first such key, where torch's
    amax would split it); ``_dq_kernel`` per query chunk (two passes over its exact keys: dL/dc first), then
    ``_dkdv_kernel`` per key block (the queries that see it exactly: every later one for a sink key, a band of
    ``local_window`` queries otherwise); the sink logit's gradient in PyTorch.
Visibility: causal (any offset), no sliding window; key padding shared by the heads whose real keys end each row
(left padding, or none). Anything else -- right padding, holes, per-head masks, a sliding window, dense masks --
is declined with a reason (the PyTorch forms run it). Head dims up to 128, value head dim equal to the query's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..kinds.linear import FEATURE_MAPS
from . import linear_parallel as lp
from .feature_inputs import decode_shape, feature_pair, key_padding
from .linear_parallel import clamp, fp32_tile, linear_rows, query_chunk
from .tiles import common_support, tanh
from .tuning import interpreting

MAX_HEAD_DIM = 128


@triton.jit
def _exact_ok(rank, cnt, window, sink_tokens, row_ok, PART: tl.constexpr):
    """(rows, keys) bool: key ``rank`` is exact for a row that sees ``cnt`` real keys. PART 0: sink keys only, 1: window
    keys that are not sink keys, 2: both."""
    ok = (rank >= 0)[None, :] & (rank[None, :] < cnt[:, None]) & row_ok[:, None]
    sink = (rank < sink_tokens)[None, :]
    win = rank[None, :] >= cnt[:, None] - window
    if PART == 0:
        ok = ok & sink
    elif PART == 1:
        ok = ok & (rank >= sink_tokens)[None, :] & win
    else:
        ok = ok & (sink | win)
    return ok


@triton.jit
def _scores(q, K, bkv, offs_n, N_K, D, scale, softcap, HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
            D_PAD: tl.constexpr):
    """(s, tanh term, k tile): the scores of the query tile ``q`` (rows, D_PAD) against keys ``offs_n`` of KV head
    ``bkv``, scaled and softcapped as the model's; k (keys, D_PAD) fp32."""
    k = fp32_tile(K + bkv * N_K * D, offs_n, offs_n < N_K, tl.arange(0, D_PAD), D, D)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
    t = s
    if HAS_SOFTCAP:
        t = tanh(s / softcap)
        s = softcap * t
    return s, t, k


@triton.jit
def _online(acc, l_i, m_i, arg, q, K, V, bkv, n0, start, cnt, row_ok, N_K, D, window, sink_tokens, scale, softcap,
            PART: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_T: tl.constexpr,
            D_PAD: tl.constexpr):
    """Online-softmax update over the exact keys of part PART among [n0, n0 + BLOCK_T); ``arg`` follows the key of
    the running maximum (the first one on ties)."""
    offs_n = n0 + tl.arange(0, BLOCK_T)
    s, _, _ = _scores(q, K, bkv, offs_n, N_K, D, scale, softcap, HAS_SOFTCAP, DOT_PREC, D_PAD)
    s = tl.where(_exact_ok(offs_n - start, cnt, window, sink_tokens, row_ok, PART), s, float("-inf"))
    top = tl.max(s, 1)
    arg = tl.where(top > m_i, n0 + tl.argmax(s, 1), arg)
    m_new = tl.maximum(m_i, top)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_use[:, None])
    alpha = tl.exp(m_i - m_use)
    v = fp32_tile(V + bkv * N_K * D, offs_n, offs_n < N_K, tl.arange(0, D_PAD), D, D)
    acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, l_i * alpha + tl.sum(p, 1), m_new, arg


@triton.jit
def _exact_terms(q, g, K, V, bkv, n0, start, cnt, c_use, row_ok, N_K, D, window, sink_tokens, scale, softcap,
                 PART: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_T: tl.constexpr,
                 D_PAD: tl.constexpr):
    """For the exact keys of part PART among [n0, n0 + BLOCK_T): (e = exp(s - c) on them, else 0; G . v; the pair
    mask; the tanh term; k) -- what the backward of a query chunk needs."""
    offs_n = n0 + tl.arange(0, BLOCK_T)
    s, t, k = _scores(q, K, bkv, offs_n, N_K, D, scale, softcap, HAS_SOFTCAP, DOT_PREC, D_PAD)
    ok = _exact_ok(offs_n - start, cnt, window, sink_tokens, row_ok, PART)
    e = tl.where(ok, tl.exp(s - c_use[:, None]), 0.0)
    v = fp32_tile(V + bkv * N_K * D, offs_n, offs_n < N_K, tl.arange(0, D_PAD), D, D)
    dp = tl.dot(g, tl.trans(v), input_precision=DOT_PREC)
    return e, dp, ok, t, k, offs_n


@triton.jit
def _dc_block(ge, l_i, q, g, K, V, bkv, n0, start, cnt, c_use, row_ok, N_K, D, window, sink_tokens, scale, softcap,
              PART: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_T: tl.constexpr,
              D_PAD: tl.constexpr):
    """The backward's first pass over one block of exact keys: l_i += sum e, ge += sum e G . v."""
    e, dp, _, _, _, _ = _exact_terms(q, g, K, V, bkv, n0, start, cnt, c_use, row_ok, N_K, D, window, sink_tokens,
                                     scale, softcap, PART, HAS_SOFTCAP, DOT_PREC, BLOCK_T, D_PAD)
    return ge + tl.sum(e * dp, 1), l_i + tl.sum(e, 1)


@triton.jit
def _dq_block(dq, q, g, K, V, bkv, n0, start, cnt, c_use, delta, arg, dc, row_ok, N_K, D, window, sink_tokens, scale,
              softcap, PART: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_T: tl.constexpr,
              D_PAD: tl.constexpr):
    """The second pass: dq += ds k, ds = e (G . v - d) + dL/dc on the key of the maximum (softcap's chain rule)."""
    e, dp, ok, t, k, offs_n = _exact_terms(q, g, K, V, bkv, n0, start, cnt, c_use, row_ok, N_K, D, window,
                                           sink_tokens, scale, softcap, PART, HAS_SOFTCAP, DOT_PREC, BLOCK_T, D_PAD)
    ds = e * (dp - delta[:, None]) + tl.where(ok & (offs_n[None, :] == arg[:, None]), dc[:, None], 0.0)
    if HAS_SOFTCAP:
        ds = ds * (1.0 - t * t)
    return tl.dot(ds, k, dq, input_precision=DOT_PREC)


@triton.jit
def _rows_seen(offs_m, start_m, offset, start, N_K, BLOCK_T: tl.constexpr):
    """(cnt per row, cnt of the chunk's first row, of its last row): real keys each query sees."""
    length = N_K - start
    return (clamp(offs_m + offset + 1 - start, length), clamp(start_m + offset + 1 - start, length),
            clamp(start_m + BLOCK_T + offset - start, length))


@triton.jit
def _fwd_kernel(Q, K, V, FQ, FK, LMASK, P, PZ, STARTS, SINKS, O, DEN, CMAX, ARG, HQ, GROUP, N_Q, N_K, F, D, offset,
                window, sink_tokens, scale, softcap, eps, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
                DOT_PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, D_PAD: tl.constexpr):
    """o, den, c and argmax of one query chunk and head. Grid (Cq, b * Hq)."""
    start_m, bh, batch, bkv, slots, offs_m, row_ok = query_chunk(HQ, GROUP, N_Q, N_K, BLOCK_T)
    num, den = linear_rows(FQ, FK, V, LMASK, P, PZ, start_m, bh, batch, bkv, slots, offs_m, row_ok, N_Q, N_K, F, D, 0,
                           offset - window, 0, True, False, True, DOT_PREC, BLOCK_T, BLOCK_F, D_PAD)
    start = tl.load(STARTS + batch)
    cnt, c_first, c_last = _rows_seen(offs_m, start_m, offset, start, N_K, BLOCK_T)
    q = fp32_tile(Q + bh * N_Q * D, offs_m, row_ok, tl.arange(0, D_PAD), D, D)
    acc = tl.zeros([BLOCK_T, D_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_T], dtype=tl.float32)
    m_i = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    arg = tl.full([BLOCK_T], -2, dtype=tl.int32)
    for n0 in range(start, start + tl.minimum(sink_tokens, c_last), BLOCK_T):  # the sink keys
        acc, l_i, m_i, arg = _online(acc, l_i, m_i, arg, q, K, V, bkv, n0, start, cnt, row_ok, N_K, D, window,
                                     sink_tokens, scale, softcap, 0, HAS_SOFTCAP, DOT_PREC, BLOCK_T, D_PAD)
    for n0 in range(start + tl.maximum(c_first - window, sink_tokens), start + c_last, BLOCK_T):  # the window
        acc, l_i, m_i, arg = _online(acc, l_i, m_i, arg, q, K, V, bkv, n0, start, cnt, row_ok, N_K, D, window,
                                     sink_tokens, scale, softcap, 1, HAS_SOFTCAP, DOT_PREC, BLOCK_T, D_PAD)
    if HAS_SINKS:  # the model's sink logit joins c and the denominator of rows that see a key
        sink = tl.load(SINKS + bh % HQ)
        has = m_i > float("-inf")
        arg = tl.where(has & (sink > m_i), -1, arg)
        m_f = tl.where(has, tl.maximum(m_i, sink), 0.0)  # (0 on rows with nothing: no inf - inf)
        alpha = tl.where(has, tl.exp(m_i - m_f), 1.0)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha + tl.where(has, tl.exp(sink - m_f), 0.0)
        m_i = tl.where(has, m_f, m_i)
    total = l_i + den + eps
    total = tl.where(total == 0.0, 1.0, total)
    rows = bh * N_Q + offs_m
    offs_d = tl.arange(0, D_PAD)
    tl.store(O + rows[:, None] * D + offs_d[None, :], (acc + num) / total[:, None],
             mask=row_ok[:, None] & (offs_d < D)[None, :])
    tl.store(DEN + rows, total, mask=row_ok)
    tl.store(CMAX + rows, m_i, mask=row_ok)
    tl.store(ARG + rows, arg, mask=row_ok)


@triton.jit
def _dq_kernel(Q, K, V, G, DELTA, STARTS, SINKS, CMAX, ARG, DC, DQ, HQ, GROUP, N_Q, N_K, D, offset, window,
               sink_tokens, scale, softcap, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
               DOT_PREC: tl.constexpr, BLOCK_T: tl.constexpr, D_PAD: tl.constexpr):
    """The exact part's dq of one query chunk and head, and dL/dc per row (DC, for ``_dkdv_kernel`` and the sink).
    Grid (Cq, b * Hq)."""
    start_m, bh, batch, bkv, slots, offs_m, row_ok = query_chunk(HQ, GROUP, N_Q, N_K, BLOCK_T)
    start = tl.load(STARTS + batch)
    cnt, c_first, c_last = _rows_seen(offs_m, start_m, offset, start, N_K, BLOCK_T)
    rows = bh * N_Q + offs_m
    q = fp32_tile(Q + bh * N_Q * D, offs_m, row_ok, tl.arange(0, D_PAD), D, D)
    g = fp32_tile(G + bh * N_Q * D, offs_m, row_ok, tl.arange(0, D_PAD), D, D)
    delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
    c = tl.load(CMAX + rows, mask=row_ok, other=float("-inf"))
    arg = tl.load(ARG + rows, mask=row_ok, other=-2)
    c_use = tl.where(c == float("-inf"), 0.0, c)
    sink_hi = start + tl.minimum(sink_tokens, c_last)
    win_lo = start + tl.maximum(c_first - window, sink_tokens)
    # pass 1: l_i and sum_E e G . v, hence dL/dc_i = d_i l_i - sum_E e G . v
    ge = tl.zeros([BLOCK_T], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_T], dtype=tl.float32)
    for n0 in range(start, sink_hi, BLOCK_T):
        ge, l_i = _dc_block(ge, l_i, q, g, K, V, bkv, n0, start, cnt, c_use, row_ok, N_K, D, window, sink_tokens,
                            scale, softcap, 0, HAS_SOFTCAP, DOT_PREC, BLOCK_T, D_PAD)
    for n0 in range(win_lo, start + c_last, BLOCK_T):
        ge, l_i = _dc_block(ge, l_i, q, g, K, V, bkv, n0, start, cnt, c_use, row_ok, N_K, D, window, sink_tokens,
                            scale, softcap, 1, HAS_SOFTCAP, DOT_PREC, BLOCK_T, D_PAD)
    if HAS_SINKS:
        l_i += tl.where(c > float("-inf"), tl.exp(tl.load(SINKS + bh % HQ) - c_use), 0.0)
    dc = delta * l_i - ge
    tl.store(DC + rows, dc, mask=row_ok)
    # pass 2: ds = e (G . v - d) + dL/dc on the key of the maximum
    dq = tl.zeros([BLOCK_T, D_PAD], dtype=tl.float32)
    for n0 in range(start, sink_hi, BLOCK_T):
        dq = _dq_block(dq, q, g, K, V, bkv, n0, start, cnt, c_use, delta, arg, dc, row_ok, N_K, D, window, sink_tokens,
                       scale, softcap, 0, HAS_SOFTCAP, DOT_PREC, BLOCK_T, D_PAD)
    for n0 in range(win_lo, start + c_last, BLOCK_T):
        dq = _dq_block(dq, q, g, K, V, bkv, n0, start, cnt, c_use, delta, arg, dc, row_ok, N_K, D, window, sink_tokens,
                       scale, softcap, 1, HAS_SOFTCAP, DOT_PREC, BLOCK_T, D_PAD)
    offs_d = tl.arange(0, D_PAD)
    tl.store(DQ + rows[:, None] * D + offs_d[None, :], dq * scale, mask=row_ok[:, None] & (offs_d < D)[None, :])


@triton.jit
def _dkdv_kernel(Q, K, V, G, DELTA, STARTS, CMAX, ARG, DC, DK, DV, HQ, HKV, GROUP, N_Q, N_K, D, offset, window,
                 sink_tokens, scale, softcap, HAS_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
                 BLOCK_T: tl.constexpr, D_PAD: tl.constexpr):
    """The exact part's dk, dv of one key block and KV head, summed over the group's query heads, from the queries
    that see the block exactly. Grid (key blocks, b * Hkv)."""
    start_n = tl.program_id(0) * BLOCK_T
    bkv = tl.program_id(1).to(tl.int64)
    batch = bkv // HKV
    offs_n = start_n + tl.arange(0, BLOCK_T)
    start = tl.load(STARTS + batch)
    rank = offs_n - start
    offs_d = tl.arange(0, D_PAD)
    k = fp32_tile(K + bkv * N_K * D, offs_n, offs_n < N_K, offs_d, D, D)
    v = fp32_tile(V + bkv * N_K * D, offs_n, offs_n < N_K, offs_d, D, D)
    dk = tl.zeros([BLOCK_T, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_T, D_PAD], dtype=tl.float32)
    # query i sees key j (rank r) exactly when cnt_i > r and (r < sink_tokens or cnt_i <= r + window); cnt_i grows
    # with i (cnt_i = i + offset + 1 - start, clamped), so: i >= j - offset, and i < j - offset + window unless a
    # sink key is in the block
    i_lo = clamp(start_n - offset, N_Q)
    i_hi = tl.where(start_n - start < sink_tokens, N_Q, clamp(start_n + BLOCK_T - 1 - offset + window, N_Q))
    for grp in range(0, GROUP):
        bh = batch * HQ + (bkv % HKV) * GROUP + grp
        for m0 in range(i_lo, i_hi, BLOCK_T):
            offs_m = m0 + tl.arange(0, BLOCK_T)
            row_ok = offs_m < N_Q
            rows = bh * N_Q + offs_m
            cnt = clamp(offs_m + offset + 1 - start, N_K - start)
            q = fp32_tile(Q + bh * N_Q * D, offs_m, row_ok, offs_d, D, D)
            g = fp32_tile(G + bh * N_Q * D, offs_m, row_ok, offs_d, D, D)
            delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
            c = tl.load(CMAX + rows, mask=row_ok, other=0.0)
            arg = tl.load(ARG + rows, mask=row_ok, other=-2)
            dc = tl.load(DC + rows, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale  # queries x keys, as the forward
            t = s
            if HAS_SOFTCAP:
                t = tanh(s / softcap)
                s = softcap * t
            ok = _exact_ok(rank, cnt, window, sink_tokens, row_ok, 2)
            e = tl.where(ok, tl.exp(s - tl.where(c == float("-inf"), 0.0, c)[:, None]), 0.0)
            dv = tl.dot(tl.trans(e), g, dv, input_precision=DOT_PREC)
            dp = tl.dot(g, tl.trans(v), input_precision=DOT_PREC)
            ds = e * (dp - delta[:, None]) + tl.where(ok & (offs_n[None, :] == arg[:, None]), dc[:, None], 0.0)
            if HAS_SOFTCAP:
                ds = ds * (1.0 - t * t)
            dk = tl.dot(tl.trans(ds), q, dk, input_precision=DOT_PREC)
    out = (bkv * N_K + offs_n)[:, None] * D + offs_d[None, :]
    ok = (offs_n < N_K)[:, None] & (offs_d < D)[None, :]
    tl.store(DK + out, dk * scale, mask=ok)
    tl.store(DV + out, dv, mask=ok)


# ---------------------------------------------------------------- host


def _launch(f: int, d: int, dtype, chunk) -> tuple[dict, dict]:
    """(the engine's blocks, this kernel's launch args): chunks of BLOCK_T rows for both parts, all value columns in
    one tile (D_PAD), F in tiles of 32 and 8 warps above head dim 64."""
    bl = lp.blocks(chunk)
    la = lp.launch_args(bl, f, d, dtype)
    d_pad = max(16, triton.next_power_of_2(d))
    la.pop("BLOCK_V")
    if d_pad > 64 and not interpreting():  # (64 x 128 fp32 tiles: 4 warps spilled 100-500 B of registers on sm_90)
        la["BLOCK_F"] = min(la["BLOCK_F"], 32)
        la["num_warps"] = 8
    return bl, dict(la, D_PAD=d_pad)


def _bwd_launch(f: int, d: int, dtype, chunk) -> dict:
    """The exact part's backward launch args: its own blocks (32 rows above head dim 64: 64 x 128 spilled 200-500 B),
    independent of the engine's chunks."""
    _, la = _launch(f, d, dtype, chunk)
    la.pop("BLOCK_F")
    if la["D_PAD"] > 64 and not interpreting():
        la.update(BLOCK_T=32, num_warps=4)
    return la


def grid(b: int, hq: int, hkv: int, n: int, m: int, f: int, d: int, chunk: int | None = None) -> dict:
    """The launch grids, by kernel name (the engine's stages included): one program per chunk per head at least."""
    bl, _ = _launch(f, d, torch.float32, chunk)
    bwd = _bwd_launch(f, d, torch.float32, chunk)["BLOCK_T"]
    engine = lp.grid(b, hq, hkv, n, m, f, d, chunk)
    return {"key_states": engine["key_states"], "forward": (triton.cdiv(n, bl["BLOCK_T"]), b * hq),
            "dq": (triton.cdiv(n, bwd), b * hq), "dkdv": (triton.cdiv(m, bwd), b * hkv),
            **{f"linear_{name}": engine[name] for name in ("query_states", "dq", "dk", "dv")}}


class _WindowLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, fq, fk, sinks, starts, lmask, offset, window, sink_tokens, scaling, softcap, eps,
                chunk):
        b, hq, n, d = q.shape
        hkv, m, f = k.shape[1], k.shape[2], fq.shape[-1]
        bl, la = _launch(f, d, q.dtype, chunk)
        p, pz = lp.chunk_states(fk, v, None, lmask, group=1, chunk_rows=bl["BLOCK_T"], prefix=True, bl=bl,
                                prec=la["DOT_PREC"])
        o = torch.empty((b, hq, n, d), device=q.device, dtype=torch.float32)
        den, cmax = (torch.empty((b, hq, n), device=q.device, dtype=torch.float32) for _ in range(2))
        arg = torch.empty((b, hq, n), device=q.device, dtype=torch.int32)
        if n and b * hq:
            _fwd_kernel[(triton.cdiv(n, bl["BLOCK_T"]), b * hq)](
                q, k, v, fq, fk, lmask, p, pz, starts, sinks if sinks is not None else den, o, den, cmax, arg,
                hq, hq // hkv, n, m, f, d, offset, window, sink_tokens, scaling, softcap or 1.0, eps,
                HAS_SOFTCAP=softcap is not None, HAS_SINKS=sinks is not None, **la)
        ctx.save_for_backward(q, k, v, fq, fk, sinks, starts, lmask, o, den, cmax, arg, p, pz)
        ctx.args = (offset, window, sink_tokens, scaling, softcap, chunk)
        return o.to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, fq, fk, sinks, starts, lmask, o, den, cmax, arg, p, pz = ctx.saved_tensors
        offset, window, sink_tokens, scaling, softcap, chunk = ctx.args
        b, hq, n, d = q.shape
        hkv, m, f = k.shape[1], k.shape[2], fq.shape[-1]
        la = _bwd_launch(f, d, q.dtype, chunk)
        do = do.float()
        g = (do / den[..., None]).contiguous()
        delta = ((do * o).sum(-1) / den).contiguous()
        dfq, dfk, dv_lin = lp.backward(do, fq, fk, v, o, den, p, pz, causal=True, offset=offset - window,
                                       window=None, key_mask=lmask, chunk=chunk)
        dq = torch.zeros((b, hq, n, d), device=q.device, dtype=torch.float32)
        dk, dv = (torch.zeros((b, hkv, m, d), device=q.device, dtype=torch.float32) for _ in range(2))
        dc = torch.zeros((b, hq, n), device=q.device, dtype=torch.float32)
        common = (offset, window, sink_tokens, scaling, softcap or 1.0)
        if n and b * hq:
            _dq_kernel[(triton.cdiv(n, la["BLOCK_T"]), b * hq)](
                q, k, v, g, delta, starts, sinks if sinks is not None else den, cmax, arg, dc, dq, hq, hq // hkv, n,
                m, d, *common, HAS_SOFTCAP=softcap is not None, HAS_SINKS=sinks is not None, **la)
            _dkdv_kernel[(triton.cdiv(m, la["BLOCK_T"]), b * hkv)](
                q, k, v, g, delta, starts, cmax, arg, dc, dk, dv, hq, hkv, hq // hkv, n, m, d, *common,
                HAS_SOFTCAP=softcap is not None, **la)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[5]:
            seen = cmax > float("-inf")
            e_sink = torch.where(seen, torch.exp(sinks.float()[None, :, None] - cmax.clamp_min(-1e30)), 0.0)
            dsinks = (-e_sink * delta + torch.where(arg == -1, dc, 0.0)).sum((0, 2)).to(sinks.dtype)
        return (dq.to(q.dtype), dk.to(k.dtype), (dv + dv_lin).to(v.dtype), dfq.to(fq.dtype), dfk.to(fk.dtype),
                dsinks) + (None,) * 9


def left_padding_starts(vis, b: int, m: int, device):
    """(b,) int32 index of each row's first real key when the real keys of every row run to its end (left padding,
    or none) and the padding is shared by the heads; None otherwise."""
    mask = key_padding(vis)
    if mask is None:
        return torch.zeros(b, dtype=torch.int32, device=device)
    if mask.shape[1] != 1:
        return None
    real = mask[:, 0, 0].expand(b, m)
    starts = m - real.sum(-1)
    expected = torch.arange(m, device=real.device)[None, :] >= starts[:, None]
    if not torch.equal(real, expected):
        return None
    return starts.to(device=device, dtype=torch.int32)


def _features(query, key, feature_map, projection):
    """phi(P q) (b, Hq, n, F) and phi(P k) (b, Hkv, m, F) in the inputs' dtype (fp32 math), P the learned projection
    when there is one (its gradient flows through autograd)."""
    phi = FEATURE_MAPS[feature_map]
    if projection is None:
        return feature_pair(phi, query, key)
    b, hq, n, d = query.shape
    hkv = key.shape[1]
    pq = projection.apply(query.reshape(b, hkv, hq // hkv, n, d)).reshape(b, hq, n, d)
    pk = projection.apply(key[:, :, None])[:, :, 0]
    return phi(pq).to(query.dtype), phi(pk).to(key.dtype)


def window_linear_attention(query, key, value, fq, fk, *, local_window: int, sink_tokens: int, scaling: float,
                            offset: int = 0, softcap=None, sinks=None, starts=None, eps: float = 1e-6, chunk=None):
    """Causal ``window_linear`` through the kernels, differentiable in query, key, value, the features ``fq`` (b, Hq,
    n, F) / ``fk`` (b, Hkv, m, F) and ``sinks`` (Hq,). Query i sits at key position i + ``offset``; ``starts`` (b,)
    int: each row's first real key (left padding; None: 0). Returns (b, Hq, n, d) in query.dtype."""
    b, m = key.shape[0], key.shape[2]
    if starts is None:
        starts = torch.zeros(b, dtype=torch.int32, device=query.device)
    lmask = torch.arange(m, device=query.device)[None, :] >= starts[:, None].long() + int(sink_tokens)
    return _WindowLinear.apply(query.contiguous(), key.contiguous(), value.contiguous(), fq.contiguous(),
                               fk.contiguous(), None if sinks is None else sinks.float(),
                               starts.to(torch.int32).contiguous(), lmask.contiguous().view(torch.uint8), int(offset),
                               int(local_window), int(sink_tokens), float(scaling),
                               None if softcap is None else float(softcap), float(eps), chunk)


def kernel(query, key, value, vis, *, scaling, softcap=None, sinks=None, dropout=0.0, need_weights=False,
           local_window=64, sink_tokens=4, feature_map="hedgehog", eps=1e-6, form="auto", feature_proj=None,
           **options):
    """Registry kernel of ``window_linear``: ``(out (b, Hq, n, dv) in query.dtype, None)``; any ``form`` (the same
    math)."""
    starts, why = _plan(query, key, value, vis, sinks=sinks, dropout=dropout, need_weights=need_weights,
                        feature_map=feature_map)
    if starts is None:
        raise ValueError(f"the window_linear kernel cannot run these inputs: {why}")
    fq, fk = _features(query, key, feature_map, feature_proj)
    out = window_linear_attention(query, key, value, fq, fk, local_window=local_window, sink_tokens=sink_tokens,
                                  scaling=scaling, offset=vis.offset, softcap=softcap, sinks=sinks, eps=eps,
                                  starts=starts)
    return out, None


def _plan(query, key, value, vis, *, sinks, dropout, need_weights, feature_map) -> tuple[torch.Tensor | None, str]:
    """(each row's first real key (b,) int32, "") when the kernel can run these inputs, else (None, why not)."""
    ok, why = common_support(query, key, value, vis, dropout=dropout, need_weights=need_weights, sinks=sinks,
                             name="window_linear", max_head_dim=MAX_HEAD_DIM)
    if not ok:
        return None, why
    if value.shape[-1] != query.shape[-1]:
        return None, "the window_linear kernel needs the value head dim equal to the query's"
    if feature_map not in FEATURE_MAPS:
        return None, f"the window_linear kernel has no feature map {feature_map!r}"
    if not (vis.is_structured and vis.causal and vis.window is None):
        return None, ("the window_linear kernel takes causal attention without a sliding window and with key padding "
                      "only; other masks run the PyTorch forms")
    why = decode_shape(query, key)
    if why:
        return None, why
    if sinks is not None and tuple(sinks.shape) != (query.shape[1],):
        return None, f"sinks must have shape (Hq,) = ({query.shape[1]},)"
    starts = left_padding_starts(vis, key.shape[0], key.shape[2], query.device)
    if starts is None:
        return None, ("the window_linear kernel takes key padding shared by the heads whose real keys end each row "
                      "(left padding); right padding, holes and per-head masks run the PyTorch forms")
    return starts, ""


def supports(query, key, value, vis, *, scaling=None, softcap=None, sinks=None, dropout=0.0, need_weights=False,
             **options) -> tuple[bool, str]:
    """Whether ``kernel`` can run these inputs, and why not."""
    starts, why = _plan(query, key, value, vis, sinks=sinks, dropout=dropout, need_weights=need_weights,
                        feature_map=options.get("feature_map", "hedgehog"))
    return starts is not None, why
