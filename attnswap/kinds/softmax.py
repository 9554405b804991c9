"""``softmax``: p_ij = exp(s_ij) / sum_{j in A_i} exp(s_ij), plus the sink logit in the denominator."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import registry
from .chunked import masked_fill_min, scored_attention


def normalize(s: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    """Row softmax over the visible entries; exact zeros elsewhere and on rows with nothing visible."""
    s = masked_fill_min(s, visible)
    e = torch.exp(s - s.amax(dim=-1, keepdim=True).detach())
    if visible is not None:
        e = e * visible
    den = e.sum(dim=-1, keepdim=True)
    return e / torch.where(den == 0, torch.ones_like(den), den)


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
    )
)
