"""``softmax``: p_ij = exp(s_ij) / sum_{j in A_i} exp(s_ij), plus the sink logit in the denominator."""

from __future__ import annotations

import torch

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


def forward(query, key, value, vis, **kw):
    return scored_attention(query, key, value, vis, normalize=normalize, options={}, **kw)


KIND = registry.add(
    registry.Kind(
        name="softmax",
        forward=forward,
        doc="Standard softmax attention (the model's own math), memory-bounded.",
        math="p_ij = exp(s_ij) / sum_{j in A_i} exp(s_ij)",
        builtin=True,
    )
)
