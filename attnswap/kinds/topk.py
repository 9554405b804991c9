"""``topk``: softmax over the k largest scores of each row (ties at the k-th score all kept)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import registry
from . import softmax
from .chunked import fill_hidden_, scored_attention
from .select import top_values


# F.threshold keeps x > THRESHOLD: with it, d = s - kth >= 0 (ties with the k-th score included) survives; the only
# differences d in (-THRESHOLD, 0) come from two distinct scores both below 2e-31 in magnitude, whose weights fp32
# cannot tell apart anyway. A normal number, so a flush-denormals mode does not turn it into -0.
_KEEP_AT_OR_ABOVE = -torch.finfo(torch.float32).tiny


def normalize(s: torch.Tensor, visible: torch.Tensor | None, k: int) -> torch.Tensor:
    """Softmax over each row's scores >= its k-th largest visible score.

    In float arithmetic only (comparisons into bool tensors and ``where`` cost a CPU 2-4x as much): the scores
    minus the row's threshold, everything below 0 sent to ``finfo.min`` by one in-place ``F.threshold``, then
    ``torch.softmax`` (invariant to the shift). The threshold is the k-th largest visible score, or on rows with
    fewer than k visible keys the smallest of them (all are kept)."""
    if k >= s.shape[-1]:
        return softmax.normalize(s, visible)
    low = torch.finfo(s.dtype).min
    filled = fill_hidden_(s, visible)
    with torch.no_grad():
        top = top_values(filled, k)
        kth = torch.where(top > low, top, float("inf")).amin(dim=-1, keepdim=True)  # +inf: nothing visible
    if s.requires_grad:
        shifted = F.threshold(filled - kth, _KEEP_AT_OR_ABOVE, low)
    else:  # the engine's block, overwritten
        shifted = F.threshold_(filled.sub_(kth), _KEEP_AT_OR_ABOVE, low)
    if visible is None:
        return torch.softmax(shifted, dim=-1)
    return softmax.softmax_of_filled(shifted, visible)  # a row is empty when nothing is visible


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
        reduces_to_softmax=lambda options, vis: options["k"] >= vis.most_visible(),
    )
)
