"""Independent O(N^2) float64 reference for every attention kind of attnswap.

Written from the contract only (not from the package): the full (b, Hq, n, m) score matrix is
materialized in float64, the visible set A_i of every query row is built explicitly from
causal / window / mask, entmax's threshold is found by bisection, topk by sorting.

``naive_attention`` is differentiable w.r.t. q, k, v (and sinks) through torch autograd; the entmax
threshold gets its implicit-function-theorem gradient through one detached Newton step.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

F64 = torch.float64


class Naive(NamedTuple):
    out: torch.Tensor  # (b, Hq, n, dv) float64
    weights: torch.Tensor  # (b, Hq, n, m) float64 (sink column dropped)
    visible: torch.Tensor  # (b, Hq, n, m) bool: A_i
    outside: torch.Tensor  # (b, Hq, n, m) bool: visible but clearly outside the support (topk / entmax)
    ambiguous: torch.Tensor  # (b, Hq, n) bool: topk rows whose selection is fragile (a score ~ threshold)


def visibility(b, hq, n, m, *, causal=False, window=None, mask=None):
    """A_i as a (b, Hq, n, m) bool tensor, and the float64 additive bias (0 where none)."""
    i = torch.arange(n).view(n, 1)
    j = torch.arange(m).view(1, m)
    off = m - n
    vis = torch.ones(n, m, dtype=torch.bool)
    if causal:
        vis &= j <= i + off
    if window is not None:
        vis &= j > i + off - window
    vis = vis.expand(b, hq, n, m).clone()
    bias = torch.zeros(b, hq, n, m, dtype=F64)
    if mask is not None:
        mk = mask.expand(b, hq, n, m)
        if mk.dtype == torch.bool:
            vis &= mk
        else:
            masked = (mk == torch.finfo(mk.dtype).min) | (mk == float("-inf"))
            vis &= ~masked
            bias = torch.where(masked, torch.zeros((), dtype=F64), mk.to(F64))
    return vis, bias


def _expand_kv(x, hq):
    hkv = x.shape[1]
    assert hq % hkv == 0
    return x.repeat_interleave(hq // hkv, dim=1)


def _phi(x, feature_map="elu"):
    if feature_map == "hedgehog":  # [softmax(x), softmax(-x)] over the head dimension
        return torch.cat([torch.softmax(x, -1), torch.softmax(-x, -1)], -1)
    return torch.nn.functional.elu(x) + 1.0


def _entmax_rows(z, valid, alpha, iters=200):
    """p = [z - tau]_+^(1/(alpha-1)) over ``valid`` entries, sum 1; z already multiplied by (alpha-1).

    Returns (p, tau). Rows with no valid entry give p = 0.
    """
    e = 1.0 / (alpha - 1.0)
    zz = torch.where(valid, z, torch.zeros((), dtype=z.dtype))
    with torch.no_grad():
        zd = zz.detach()
        neg = torch.full((), -math.inf, dtype=z.dtype)
        zmax = torch.where(valid, zd, neg).amax(-1, keepdim=True)
        zmax = torch.where(torch.isfinite(zmax), zmax, torch.zeros((), dtype=z.dtype))
        lo = zmax - 1.0  # sum f(z - lo) >= 1 (the max alone gives 1)
        hi = zmax.clone()  # sum f(z - hi) = 0
        for _ in range(iters):
            mid = (lo + hi) / 2
            s = ((zd - mid).clamp(min=0) ** e * valid).sum(-1, keepdim=True)
            big = s >= 1
            lo = torch.where(big, mid, lo)
            hi = torch.where(big, hi, mid)
        tau0 = (lo + hi) / 2
        u0 = zd - tau0
        pos = (u0 > 0) & valid
        fprime = torch.where(pos, e * u0.clamp(min=0) ** (e - 1.0), torch.zeros((), dtype=z.dtype)).sum(-1, keepdim=True)
        fprime = torch.where(fprime > 0, fprime, torch.ones((), dtype=z.dtype))
    # one Newton step with detached tau0/f': value unchanged (to ~1e-15), gradient = implicit-function one
    f0 = ((zz - tau0).clamp(min=0) ** e * valid).sum(-1, keepdim=True)
    tau = tau0 + (f0 - 1.0) / fprime
    p = (zz - tau).clamp(min=0) ** e * valid
    tot = p.sum(-1, keepdim=True)
    p = p / torch.where(tot > 0, tot, torch.ones((), dtype=z.dtype))
    return p, tau.detach()


def _softmax_rows(x, keep):
    has = keep.any(-1, keepdim=True)
    xs = torch.where(keep, x, torch.zeros((), dtype=x.dtype))
    with torch.no_grad():
        mx = torch.where(keep, xs, torch.full((), -math.inf, dtype=x.dtype)).amax(-1, keepdim=True)
        mx = torch.where(has, mx, torch.zeros((), dtype=x.dtype))
    ex = torch.exp(xs - mx) * keep
    tot = ex.sum(-1, keepdim=True)
    return ex / torch.where(tot > 0, tot, torch.ones((), dtype=x.dtype))


def naive_attention(
    q,
    k,
    v,
    kind,
    /,
    *,
    mask=None,
    causal=False,
    scaling=None,
    window=None,
    softcap=None,
    sinks=None,
    ambiguity_tol=2e-5,
    support_tol=1e-4,
    **options,
):
    b, hq, n, d = q.shape
    m = k.shape[2]
    vis, bias = visibility(b, hq, n, m, causal=causal, window=window, mask=mask)
    q64 = q.to(F64)
    k64 = _expand_kv(k.to(F64), hq)
    v64 = _expand_kv(v.to(F64), hq)
    outside = torch.zeros_like(vis)
    ambiguous = torch.zeros(b, hq, n, dtype=torch.bool)

    if kind == "linear":
        eps = options.get("eps", 1e-6)
        fm = options.get("feature_map", "elu")
        a = torch.einsum("bhid,bhjd->bhij", _phi(q64, fm), _phi(k64, fm)) * vis
        p = a / (a.sum(-1, keepdim=True) + eps)
    else:
        scale = d**-0.5 if scaling is None else scaling
        s = scale * torch.einsum("bhid,bhjd->bhij", q64, k64)
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        s = s + bias
        # the row of scores, with the sink logit appended as an always-visible extra column
        if sinks is not None:
            sk = sinks.to(F64).view(1, hq, 1, 1).expand(b, hq, n, 1)
            S = torch.cat([s, sk], -1)
            V = torch.cat([vis, torch.ones(b, hq, n, 1, dtype=torch.bool)], -1)
        else:
            S, V = s, vis
        if kind == "softmax":
            P = _softmax_rows(S, V)
        elif kind == "topk":
            kk = options.get("k", 64)
            cnt = V.sum(-1, keepdim=True)
            with torch.no_grad():
                Sd = torch.where(V, S.detach(), torch.full((), -math.inf, dtype=F64))
                srt = Sd.sort(-1, descending=True).values
                idx = min(kk, S.shape[-1]) - 1
                thr = srt[..., idx : idx + 1]
                full = cnt <= kk
                keep = V & (full | (Sd >= thr))
                tol = ambiguity_tol * (1 + thr.abs())
                near = V & ((Sd - thr).abs() < tol) & (Sd != thr)
                ambiguous = (near.any(-1) & ~full.squeeze(-1))
                out_sel = V & ~full & (Sd < thr - tol)
            P = _softmax_rows(S, keep)
            outside = out_sel[..., :m]
        elif kind in ("entmax", "sparsemax"):
            alpha = 2.0 if kind == "sparsemax" else options.get("alpha", 1.5)
            z = (alpha - 1.0) * S
            P, tau = _entmax_rows(z, V, alpha)
            outside = (V & (z.detach() - tau < -support_tol))[..., :m]
        elif kind == "window_linear":
            # exact softmax weights exp(s - max) on the row's first sink_tokens and last local_window visible keys
            # (and the sink logit), feature-map weights on its other visible keys, one shared denominator
            rank = torch.cumsum(vis.to(torch.int64), -1)
            exact = vis & ((rank[..., -1:] - rank < options.get("local_window", 64)) |
                           (rank <= options.get("sink_tokens", 4)))
            fm = options.get("feature_map", "hedgehog")
            lin = torch.einsum("bhid,bhjd->bhij", _phi(q64, fm), _phi(k64, fm)) * (vis & ~exact)
            E = exact if sinks is None else torch.cat([exact, torch.ones(b, hq, n, 1, dtype=torch.bool)], -1)
            lin = lin if sinks is None else torch.cat([lin, torch.zeros(b, hq, n, 1, dtype=F64)], -1)
            top = torch.where(E, S, torch.full((), -math.inf, dtype=F64)).amax(-1, keepdim=True)
            top = torch.where(torch.isfinite(top), top, torch.zeros((), dtype=F64))
            w = torch.where(E, torch.exp(torch.where(E, S, top) - top), lin)
            P = w / (w.sum(-1, keepdim=True) + options.get("eps", 1e-6))
        elif kind == "taylor":
            w = (1.0 + S + S * S / 2.0) * V
            tot = w.sum(-1, keepdim=True)
            P = w / torch.where(tot > 0, tot, torch.ones((), dtype=F64))
        else:
            raise ValueError(f"naive: unknown kind {kind!r}")
        p = P[..., :m]
    p = p * vis
    out = torch.einsum("bhij,bhjd->bhid", p, v64)
    return Naive(out, p, vis, outside, ambiguous)
