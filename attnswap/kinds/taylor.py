"""``taylor``: the 2nd-order Taylor expansion of exp (Based): w_ij = 1 + s_ij + s_ij^2 / 2 > 0, p = w / sum w.

Equals phi(q).phi(k) with phi(x) = [1, x sqrt(scaling), vec(x x^T) scaling / sqrt(2)], so it has a
linear-time form (1 + d + d^2 features) for causal, sliding-window and key-padding masks without softcap.
"""

from __future__ import annotations

import math

import torch

from .. import registry
from .chunked import scored_attention
from .feature_map import FORMS, linear_time_attention, use_linear_time

MIN_KEYS_LINEAR_TIME = 4096


def taylor_weight(s: torch.Tensor) -> torch.Tensor:
    return 1.0 + s + 0.5 * s * s


def normalize(s: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    w = taylor_weight(s)
    if visible is not None:
        w = w * visible
    den = w.sum(-1, keepdim=True)
    return w / torch.where(den == 0, torch.ones_like(den), den)


def make_feature_map(scaling: float):
    """phi(x) = [1, x sqrt(scaling), x_a x_b w_ab for a <= b] with w_aa = scaling / sqrt(2), w_ab = scaling (a < b):
    the symmetric form of vec(x x^T) scaling / sqrt(2), 1 + d + d(d+1)/2 features, phi(q).phi(k) = 1 + s + s^2/2."""
    root, half = math.sqrt(scaling), scaling / math.sqrt(2.0)
    pairs: dict = {}

    def feature_map(x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        key = (d, x.device)
        if key not in pairs:
            rows, cols = torch.triu_indices(d, d, device=x.device)
            weight = torch.where(rows == cols, half, float(scaling)).to(torch.float32)
            pairs[key] = rows, cols, weight
        rows, cols, weight = pairs[key]
        outer = x[..., rows] * x[..., cols] * weight.to(x.dtype)
        return torch.cat([torch.ones_like(x[..., :1]), x * root, outer], dim=-1)

    return feature_map


def state_features(scaling: float, options: dict):
    """For the recurrent-state cache: (feature map, eps, weight of a sink logit in the denominator)."""
    return make_feature_map(scaling), 0.0, taylor_weight


def forward(query, key, value, vis, *, form, scaling, softcap=None, sinks=None, dropout=0.0, need_weights=False,
            observe=None):
    n, m = query.shape[2], key.shape[2]
    if use_linear_time(form, "taylor", vis, n=n, m=m, min_keys=MIN_KEYS_LINEAR_TIME, softcap=softcap,
                       dropout=dropout, need_weights=need_weights or observe is not None):
        extra = None if sinks is None else taylor_weight(sinks.float())
        out = linear_time_attention(query, key, value, vis, feature_map=make_feature_map(scaling), extra_den=extra)
        return out, None
    return scored_attention(query, key, value, vis, normalize=normalize, options={}, scaling=scaling,
                            softcap=softcap, sinks=sinks, dropout=dropout, need_weights=need_weights,
                            observe=observe)


KIND = registry.add(
    registry.Kind(
        name="taylor",
        forward=forward,
        options=(registry.Option("form", str, "auto", doc="auto | quadratic | linear_time", choices=FORMS),),
        doc="Based-style 2nd-order Taylor attention; linear time on long inputs (1 + d + d^2 features).",
        math="p_ij = (1 + s_ij + s_ij^2/2) / sum_{j in A_i} (1 + s_ij + s_ij^2/2)",
        builtin=True,
        state_features=state_features,
    )
)
