"""The linear-time form shared by the feature-map kinds (``linear``, ``taylor``).

``o_i = phi(q_i) . S_i / (phi(q_i) . z_i + eps)`` with ``S_i = sum_{j in A_i} phi(k_j) v_j^T`` and
``z_i = sum_{j in A_i} phi(k_j)``. Queries go in chunks; for each chunk the keys every query sees are folded
into a running fp32 state (added as the causal edge advances, removed as the window edge passes), and the few
keys only some queries see (the diagonal and window edges) are done exactly in a small quadratic block. Key
padding zeroes the padded keys' features. Memory is O(chunk * features), never N x N.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import AttnSwapError
from .chunked import group_heads, grouped_matmul, ungroup_heads
from .visibility import Visibility

CHUNK = 128


def linear_time_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    vis: Visibility,
    *,
    feature_map: Callable[[torch.Tensor], torch.Tensor],
    eps: float = 0.0,
    extra_den: torch.Tensor | None = None,
    chunk: int | None = None,
    parts: bool = False,
):
    """``vis`` must be structured (causal/window/key padding only). ``extra_den`` (Hq,) joins every
    denominator (an attention sink's weight). Returns out (b,Hq,n,dv) fp32, or with ``parts`` the numerator
    (b,Hq,n,dv) and denominator (b,Hq,n) before the division (and without eps), to combine with other terms."""
    assert vis.is_structured and not vis.has_bias
    chunk = chunk or CHUNK
    b, hq, n, _ = query.shape
    hkv, m, dv = key.shape[1], key.shape[2], value.shape[-1]
    qg, kg, vg = group_heads(query, key, value)
    valid = vis.key_valid()  # (b|1, Hkv|1, G|1, 1, m) bool or None

    def key_features(k0: int, k1: int):
        fk = feature_map(kg[..., k0:k1, :].float())  # (b,Hkv,1,c,F)
        if valid is not None:
            fk = fk * valid[..., 0, k0:k1, None].to(fk.dtype)  # (b, Hkv, G|1, c, F)
        return fk

    def fold(k0: int, k1: int, sign: float, state, norm):
        if k1 <= k0:
            return state, norm
        fk = key_features(k0, k1)
        ds = torch.matmul(fk.transpose(-1, -2), vg[..., k0:k1, :].float())  # (..., F, dv)
        dz = fk.sum(dim=-2)  # (..., F)
        if state is None:
            return sign * ds, sign * dz
        return state + sign * ds, norm + sign * dz

    outs = []
    state = norm = None
    lo = hi = 0  # keys [lo, hi) are folded into the running state
    for q0 in range(0, n, chunk):
        q1 = min(n, q0 + chunk)
        a, bnd = vis.full_range(q0, q1)  # keys every query of the chunk sees
        use_state = bnd > a
        if use_state:  # move the state to hold exactly [a, bnd); both edges only move forward
            if state is None or a >= hi:
                state, norm = fold(a, bnd, 1.0, None, None)
            else:
                state, norm = fold(hi, bnd, 1.0, state, norm)
                state, norm = fold(lo, a, -1.0, state, norm)
            lo, hi = a, bnd
        fq = feature_map(qg[..., q0:q1, :].float())  # (b,Hkv,G,c,F)
        if use_state:
            num = grouped_matmul(fq, state)
            den = (fq * norm.unsqueeze(-2)).sum(-1)
        else:
            num = fq.new_zeros((*fq.shape[:-1], dv))
            den = fq.new_zeros(fq.shape[:-1])
        # keys only some queries of the chunk see: exact quadratic with the structural mask
        k0, k1 = vis.key_range(q0, q1)
        edges = ((k0, min(a, k1)), (max(bnd, k0), k1)) if use_state else ((k0, k1),)
        for e0, e1 in edges:
            if e1 <= e0:
                continue
            fk = key_features(e0, e1)
            a_ij = grouped_matmul(fq, fk.transpose(-1, -2))  # (b,Hkv,G,c,e)
            ok = vis.structural_block(q0, q1, e0, e1, query.device)
            if ok is not None:
                a_ij = a_ij * ok
            num = num + grouped_matmul(a_ij, vg[..., e0:e1, :].float())
            den = den + a_ij.sum(-1)
        if extra_den is not None:
            den = den + extra_den.float().reshape(1, hkv, -1, 1)
        if parts:
            outs.append((num, den))
            continue
        den = den + eps
        outs.append(num / torch.where(den == 0, torch.ones_like(den), den).unsqueeze(-1))
    if parts:
        return tuple(ungroup_heads(torch.cat(x, dim=3)) for x in zip(*outs))
    out = torch.cat(outs, dim=3) if len(outs) > 1 else outs[0]
    return ungroup_heads(out)


def prefix_parts(query_features: Callable[[int, int], torch.Tensor], key_features: Callable[[int, int], torch.Tensor],
                 values: torch.Tensor, ends, *, initial=None, chunk: int | None = None):
    """Numerator (b,Hkv,G,n,dv) and denominator (b,Hkv,G,n) of feature-map attention where query p sees a running
    state ``initial`` = (S (b,Hkv,1,F,dv), z (b,Hkv,1,F)) or None, plus keys ``[0, ends[p])`` of a key sequence,
    ``ends`` (n,) nondecreasing: a cache's continuation, whose queries see a growing prefix of its new keys.
    ``query_features(q0, q1)`` gives (b,Hkv,G,q1-q0,F), ``key_features(k0, k1)`` (b,Hkv,1,k1-k0,F) with padding
    zeroed; values (b,Hkv,1,m,dv). Linear time: per chunk of queries, the keys all of them see join the running
    state and the few only some see are an exact masked block."""
    chunk = chunk or CHUNK
    ends = torch.as_tensor(ends, dtype=torch.int64).cpu()
    vf = values.float()
    state, norm = initial if initial is not None else (None, None)
    folded = 0
    nums, dens = [], []
    for q0 in range(0, ends.numel(), chunk):
        q1 = min(ends.numel(), q0 + chunk)
        lo, hi = int(ends[q0]), int(ends[q1 - 1])
        if lo > folded:  # keys [folded, lo): this chunk's queries and every later one see them
            fk = key_features(folded, lo)
            ds, dz = torch.matmul(fk.transpose(-1, -2), vf[..., folded:lo, :]), fk.sum(dim=-2)
            state, norm = (ds, dz) if state is None else (state + ds, norm + dz)
            folded = lo
        fq = query_features(q0, q1)
        if state is not None:
            num, den = grouped_matmul(fq, state), (fq * norm.unsqueeze(-2)).sum(-1)
        else:
            num, den = fq.new_zeros((*fq.shape[:-1], vf.shape[-1])), fq.new_zeros(fq.shape[:-1])
        if hi > lo:  # keys [lo, hi): seen by the queries whose end is past them
            seen = (torch.arange(lo, hi)[None, :] < ends[q0:q1, None]).to(fq.device)
            a = grouped_matmul(fq, key_features(lo, hi).transpose(-1, -2)) * seen
            num = num + grouped_matmul(a, vf[..., lo:hi, :])
            den = den + a.sum(-1)
        nums.append(num)
        dens.append(den)
    return torch.cat(nums, dim=-2), torch.cat(dens, dim=-1)


FORMS = ("auto", "quadratic", "linear_time")


def use_linear_time(form: str, kind: str, vis: Visibility, *, n: int, m: int, min_keys: int,
                    softcap=None, dropout: float = 0.0, need_weights: bool = False) -> bool:
    """Pick the form of a feature-map kind: ``linear_time`` when asked or, under ``auto``, on long inputs."""
    blockers = []
    if not vis.is_structured:
        blockers.append("a dense mask (only causal, sliding window and key padding have a linear-time form)")
    if vis.has_bias:
        blockers.append("an additive score bias")
    if softcap is not None:
        blockers.append("a softcap (softcapped scores have no linear-time form)")
    if dropout > 0.0:
        blockers.append("attention dropout")
    if need_weights:
        blockers.append("returned attention weights")
    if form == "linear_time" and blockers:
        raise AttnSwapError(f"kind {kind!r} with form='linear_time' cannot honor {'; '.join(blockers)}; "
                            "use form='quadratic' or 'auto'")
    if form == "quadratic" or blockers:
        return False
    return form == "linear_time" or (n >= 2 * CHUNK and m >= min_keys)
