"""The memory-bounded engine every kind runs on: GQA without repeating K/V, blocks of queries (and of
batch rows / heads when a row of keys is long), fp32 accumulation, and recomputation in backward so that no
N x N tensor outlives its block.

A score-based kind only supplies ``normalize(scores, visible, **options) -> p``: a row-wise map from fp32
scores to weights that are exactly 0 where ``visible`` is False and on rows with nothing visible. The score block
is the engine's own: where it does not require grad, ``normalize`` may overwrite it (``fill_hidden_``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .visibility import Visibility

# The largest score block (elements) one step materializes. Temporaries are a few times this, in fp32. 2**20 (4 MB)
# runs the sparse kinds' prefill ~30% faster on a CPU than 2**22 (their temporaries stay in cache, fewer page
# faults, less causal waste; SmolLM2's heads, N = 1k-4k, 2 threads).
BLOCK_ELEMENTS = 1 << 20


def group_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """(b,Hq,n,d), (b,Hkv,m,d) -> (b,Hkv,G,n,d), (b,Hkv,1,m,d): GQA as a broadcast, K/V never repeated."""
    b, hq, n, d = query.shape
    hkv = key.shape[1]
    return query.reshape(b, hkv, hq // hkv, n, d), key[:, :, None], value[:, :, None]


def ungroup_heads(x: torch.Tensor) -> torch.Tensor:
    b, hkv, g = x.shape[:3]
    return x.reshape(b, hkv * g, *x.shape[3:])


def grouped_sinks(sinks: torch.Tensor | None, hkv: int, groups: int) -> torch.Tensor | None:
    """(Hq,) sink logits -> (1, Hkv, G, 1, 1) fp32."""
    if sinks is None:
        return None
    return sinks.float().reshape(1, hkv, groups, 1, 1)


def grouped_matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x (r, h, G, n, a) @ y (r, h, 1, a, c) -> (r, h, G, n, c) fp32-or-input dtype, with the G query heads of a KV
    head stacked as rows of one matrix product: broadcasting y over G would copy it G times per call (for one decode
    query that copy of K and V costs more than the products themselves)."""
    groups = x.shape[2]
    if groups == 1 or y.shape[2] != 1 or x.shape[:2] != y.shape[:2]:
        return torch.matmul(x, y)
    r, h, _, n, a = x.shape
    return torch.matmul(x.reshape(r, h, groups * n, a), y[:, :, 0]).view(r, h, groups, n, y.shape[-1])


def dot_scores(qb: torch.Tensor, kb: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling * q.k; the scaling is applied to the (smaller) query block rather than to the scores."""
    return grouped_matmul(qb * scaling if scaling != 1.0 else qb, kb.transpose(-1, -2))


def with_sink_column(s, visible, sink):
    """Append the sink logit as an always-visible last column."""
    col = sink.expand(*s.shape[:-1], 1)
    s = torch.cat([s, col], dim=-1)
    if visible is not None:
        visible = torch.cat([visible.expand(*s.shape[:-1], s.shape[-1] - 1), visible.new_ones(col.shape)], dim=-1)
    return s, visible


def masked_fill_min(s: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    if visible is None:
        return s
    return s.masked_fill(~visible, torch.finfo(s.dtype).min)


def fill_hidden_(s: torch.Tensor, visible: torch.Tensor | None, value: float | None = None) -> torch.Tensor:
    """``masked_fill_min`` (or fill with ``value``) in place when nothing differentiates through ``s``: a ``normalize``
    may overwrite the score block the engine hands it (it is the engine's own and is not read again).

    On a CPU, a mask shared by the heads (causal, window, padding: a few times smaller than ``s``) is first reduced to
    the span of key columns where some query cannot see: only that span is filled (the diagonal band of a causal
    block). (Reading the span is a host sync: not on an accelerator.)"""
    fill = torch.finfo(s.dtype).min if value is None else value
    if visible is None:
        return s
    if s.requires_grad:
        return s.masked_fill(~visible, fill)
    hidden = ~visible
    if s.is_cpu and hidden.dim() >= 2 and hidden.shape[-1] == s.shape[-1] and 4 * hidden.numel() <= s.numel():
        cols = hidden.reshape(-1, hidden.shape[-1]).any(0).nonzero()
        if cols.numel() == 0:
            return s
        lo, hi = int(cols[0]), int(cols[-1]) + 1
        s[..., lo:hi].masked_fill_(hidden[..., lo:hi], fill)
        return s
    return s.masked_fill_(hidden, fill)


def plan(b: int, hkv: int, groups: int, n: int, m: int, budget: int | None = None):
    """Step sizes over batch rows, KV heads and queries so a block has at most ``budget`` scores."""
    budget = budget or BLOCK_ELEMENTS
    m = max(m, 1)
    row_step = b if b * hkv * groups * m <= budget else 1
    head_step = hkv if row_step * hkv * groups * m <= budget else 1
    q_step = max(1, min(n, budget // (row_step * head_step * groups * m)))
    return row_step, head_step, q_step


def scored_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    vis: Visibility,
    *,
    normalize: Callable,
    options: dict,
    scaling: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    dropout: float = 0.0,
    need_weights: bool = False,
    pair_scores: Callable | None = None,
    observe=None,
    fused: Callable | None = None,
    pair_weights: Callable | None = None,
):
    """Attention whose weights are ``normalize`` of each row's scores, in blocks.

    ``query`` (b,Hq,n,d), ``key``/``value`` (b,Hkv,m,d|dv); ``vis`` with its mask already grouped. Returns
    ``(out (b,Hq,n,dv) fp32, weights (b,Hq,n,m) fp32 | None)``. ``pair_scores(qb, kb)`` replaces
    ``scaling * q.k`` (the feature-map kinds). ``observe(p, visible, q0=, k0=, rows=, heads=)`` sees every
    weight block (see ``attnswap.observe``). ``fused(qb, kb, vb, visible, dropout) -> out`` computes a whole block
    at once when nothing but the mask applies (no softcap, sinks, bias, weights or observer): softmax uses
    torch's fused SDPA kernels there. ``pair_weights(qb, kb, heads)`` computes a second per-pair block (feature-map
    weights beside the scores: window_linear) that ``normalize`` receives as ``pairs=`` (0 in a sink's column).
    """
    b, hq, n, _ = query.shape
    hkv, m, dv = key.shape[1], key.shape[2], value.shape[-1]
    groups = hq // hkv
    qg, kg, vg = group_heads(query, key, value)
    sink_g = grouped_sinks(sinks, hkv, groups)
    score_fn = pair_scores or (lambda qb, kb: dot_scores(qb, kb, scaling))
    device = query.device

    use_fused = (fused is not None and softcap is None and sink_g is None and not need_weights and observe is None
                 and pair_weights is None)

    def block(qb, kb, vb, sink, q0, q1, k0, k1, rows, heads):
        if use_fused:
            visible, bias = vis.block(q0, q1, k0, k1, rows, heads, device)
            if bias is None:
                return fused(qb, kb, vb, visible, dropout).float(), None
        s = score_fn(qb.float(), kb.float())
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        visible, bias = vis.block(q0, q1, k0, k1, rows, heads, device)
        if bias is not None:
            s = s + bias
        extra = {}
        if pair_weights is not None:
            pairs = pair_weights(qb.float(), kb.float(), heads)
            extra["pairs"] = pairs if sink is None else F.pad(pairs, (0, 1))
        if sink is not None:
            s, with_sink = with_sink_column(s, visible, sink)
            p = normalize(s, with_sink, **extra, **options)[..., :-1]
        else:
            p = normalize(s, visible, **extra, **options)
        if observe is not None:
            observe(p.detach(), visible, q0=q0, k0=k0, rows=rows, heads=heads)
        if dropout > 0.0:
            p = F.dropout(p, p=dropout, training=True)
        return grouped_matmul(p, vb.float()), p

    def run_block(*args):
        return block(*args)[0]

    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value) if t is not None)
    grad = grad or (sinks is not None and sinks.requires_grad and torch.is_grad_enabled())
    row_step, head_step, q_step = plan(b, hkv, groups, n, m)
    many = row_step < b or head_step < hkv or q_step < n
    weights = query.new_zeros((b, hkv, groups, n, m), dtype=torch.float32) if need_weights else None

    # Without autograd, blocks are written into one preallocated output: small long-lived pieces between the
    # large short-lived score blocks would fragment the heap (glibc then keeps ~1 GB at N = 32k).
    out = None if grad else query.new_empty((b, hkv, groups, n, dv), dtype=torch.float32)
    out_rows = []
    for r0 in range(0, b, row_step):
        rows = slice(r0, r0 + row_step)
        out_heads = []
        for h0 in range(0, hkv, head_step):
            heads = slice(h0, h0 + head_step)
            sink = None if sink_g is None else sink_g[:, heads]
            out_q = []
            for q0 in range(0, n, q_step):
                q1 = min(n, q0 + q_step)
                k0, k1 = vis.key_range(q0, q1)
                qb = qg[rows, heads, :, q0:q1]
                if k1 <= k0:  # nothing visible: zero rows (a sink alone gives no output)
                    o = qb.new_zeros((*qb.shape[:-1], dv), dtype=torch.float32)
                else:
                    kb, vb = kg[rows, heads, :, k0:k1], vg[rows, heads, :, k0:k1]
                    args = (qb, kb, vb, sink, q0, q1, k0, k1, rows, heads)
                    if need_weights or observe is not None:
                        o, p = block(*args)
                        if need_weights:
                            weights[rows, heads, :, q0:q1, k0:k1] = p if grad else p.detach()
                    elif grad and many:
                        o = checkpoint(run_block, *args, use_reentrant=False)
                    else:
                        o = run_block(*args)
                if out is not None:
                    out[rows, heads, :, q0:q1] = o
                else:
                    out_q.append(o)
            if out is None:
                out_heads.append(torch.cat(out_q, dim=3) if len(out_q) > 1 else out_q[0])
        if out is None:
            out_rows.append(torch.cat(out_heads, dim=1) if len(out_heads) > 1 else out_heads[0])
    if out is None:
        out = torch.cat(out_rows, dim=0) if len(out_rows) > 1 else out_rows[0]
    return ungroup_heads(out), (ungroup_heads(weights) if weights is not None else None)
