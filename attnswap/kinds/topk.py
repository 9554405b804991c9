"""``topk``: softmax over the k largest scores of each row (ties at the k-th score all kept)."""

from __future__ import annotations

import torch

from .. import registry
from . import softmax
from .chunked import masked_fill_min, scored_attention


def normalize(s: torch.Tensor, visible: torch.Tensor | None, k: int) -> torch.Tensor:
    if k < s.shape[-1]:
        with torch.no_grad():
            filled = masked_fill_min(s, visible)
            kth = filled.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
            keep = filled >= kth
        visible = keep if visible is None else visible & keep
    return softmax.normalize(s, visible)


def forward(query, key, value, vis, *, k, **kw):
    return scored_attention(query, key, value, vis, normalize=normalize, options={"k": k}, **kw)


KIND = registry.add(
    registry.Kind(
        name="topk",
        forward=forward,
        options=(
            registry.Option("k", int, 64, doc="keys kept per query", rule="an integer >= 1", check=lambda v: v >= 1),
        ),
        doc="Softmax over each query's k highest-scoring visible keys (all of them when fewer than k).",
        math="p_ij = exp(s_ij) / sum_{l in T_i} exp(s_il) for j in T_i = {j in A_i : s_ij >= k-th largest s_i.}",
        builtin=True,
    )
)
