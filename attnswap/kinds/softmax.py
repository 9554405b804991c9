"""``softmax``: p_ij = exp(s_ij) / sum_{j in A_i} exp(s_ij), plus the sink logit in the denominator."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import registry
from .chunked import fill_hidden_, scored_attention


def normalize(s: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    """Row softmax over the visible entries; exact zeros elsewhere and on rows with nothing visible."""
    if visible is None:
        return torch.softmax(s, dim=-1)
    return softmax_of_filled(fill_hidden_(s, visible), visible)


def softmax_of_filled(filled: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """``torch.softmax`` (one fused pass, forward and backward) of scores whose hidden entries are ``finfo.min``:
    those come out as exact zeros, but for rows with nothing ``visible`` (bool, broadcastable), set to 0 here.
    (Written out, ``exp`` of such very negative shifted scores takes a CPU's slow path: ~70x a normal ``exp``.)"""
    p = torch.softmax(filled, dim=-1)
    rows = visible.any(dim=-1, keepdim=True)  # as small as the mask's broadcast shape
    if p.device.type == "cpu" and bool(rows.all()):  # (no host sync on an accelerator)
        return p
    rows = rows.to(p.dtype)
    return p.mul_(rows) if not p.requires_grad else p * rows


def make_sdpa_block(scaling: float):
    """A block through ``F.scaled_dot_product_attention`` (fused kernels, GQA without repeating K/V)."""

    def sdpa_block(qb, kb, vb, visible, dropout):
        b, hkv, groups, n, d = qb.shape
        q = qb.reshape(b, hkv * groups, n, d)
        mask = visible
        if mask is not None and mask.dim() == 5:  # (b|1, Hkv|1, G|1, n, m) -> (b|1, Hq|1, n, m)
            if mask.shape[1] == 1 and mask.shape[2] == 1:
                mask = mask[:, :, 0]
            else:
                mask = mask.expand(mask.shape[0], hkv, groups, *mask.shape[3:]).reshape(mask.shape[0], -1,
                                                                                        *mask.shape[3:])
        out = F.scaled_dot_product_attention(q, kb[:, :, 0], vb[:, :, 0], attn_mask=mask, dropout_p=dropout,
                                             scale=scaling, enable_gqa=groups > 1)
        if mask is not None:  # rows with nothing visible are 0 (on every torch version)
            out = out * mask.any(dim=-1, keepdim=True)
        return out.reshape(b, hkv, groups, n, -1)

    return sdpa_block


SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa=


@functools.lru_cache(maxsize=None)
def sdpa_zeroes_empty_rows(device_type: str) -> bool:
    """Whether SDPA gives 0 (not NaN) on a query whose mask hides every key, on this torch and device type."""
    one = torch.ones(1, 1, 1, 8, device=device_type)
    out = F.scaled_dot_product_attention(one, one, one, attn_mask=torch.zeros(1, 1, 1, 1, dtype=torch.bool,
                                                                              device=device_type))
    return bool((out == 0).all())


def sdpa_attention(query, key, value, vis, *, scaling: float, dropout: float = 0.0) -> torch.Tensor | None:
    """The whole call through ``F.scaled_dot_product_attention`` (torch's fused kernels, memory-bounded), when SDPA
    expresses ``vis`` as given: no mask, or the caller's bool mask without causality; causal only as SDPA aligns it
    (n == m) or when every query sees every key (one query at the end: decoding); no window that hides a key.
    Returns out (b, Hq, n, dv) in query's dtype, or None when SDPA cannot express the call.

    GQA without repeating K/V: one query per head (decoding) runs as the G queries of each KV head's group, which
    is faster than ``enable_gqa`` and needs no mask per head; otherwise ``enable_gqa=True``."""
    n, m, offset = vis.n, vis.m, vis.offset
    if n == 0 or m == 0 or (vis.window is not None and n - 1 + offset - vis.window >= 0):
        return None
    causal = vis.causal and offset < m - 1  # a causal query that sees every key is not restricted
    mask = vis.flat_mask()
    if mask is not None and (mask.dtype != torch.bool or causal):
        return None
    if causal and (n != m or offset != 0):
        return None
    if mask is not None and not sdpa_zeroes_empty_rows(query.device.type):
        return None
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    groups = hq // hkv
    if groups > 1 and n == 1 and (mask is None or mask.shape[1] == 1):
        out = F.scaled_dot_product_attention(query.reshape(b, hkv, groups, d), key, value, attn_mask=mask,
                                             dropout_p=dropout, scale=scaling)
        return out.reshape(b, hq, 1, -1)
    if groups > 1 and not SDPA_GQA:
        return None
    kw = {"enable_gqa": True} if groups > 1 else {}
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                          scale=scaling, **kw)


def forward(query, key, value, vis, *, scaling, **kw):
    return scored_attention(query, key, value, vis, normalize=normalize, options={}, scaling=scaling,
                            fused=make_sdpa_block(scaling), **kw)


KIND = registry.add(
    registry.Kind(
        name="softmax",
        forward=forward,
        doc="Standard softmax attention (the model's own math), memory-bounded.",
        math="p_ij = exp(s_ij) / sum_{j in A_i} exp(s_ij)",
        builtin=True,
        reduces_to_softmax=lambda options, vis: True,
    )
)
