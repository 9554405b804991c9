"""``linear``: p_ij = phi(q_i).phi(k_j) / (sum_{j in A_i} phi(q_i).phi(k_j) + eps), phi(x) = elu(x) + 1, or the
Hedgehog map phi(x) = [softmax(x), softmax(-x)] (2d features, meant to be learned: ``attnswap.transfer``).

No scores: scaling, softcap and attention sinks do not apply. Two exact forms: quadratic (short inputs, any
mask) and linear-time (running state; causal, sliding window and key padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import registry
from ..errors import AttnSwapError
from .chunked import grouped_matmul, scored_attention
from .feature_map import FORMS, linear_time_attention, use_linear_time

MIN_KEYS_LINEAR_TIME = 256  # measured on CPU: the linear-time form is faster from n = m = 256 (ELU+1 and Hedgehog)


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def hedgehog(x: torch.Tensor) -> torch.Tensor:
    """Hedgehog's feature map (Zhang et al. 2024) on already projected inputs: [softmax(x), softmax(-x)] over the
    head dimension; its learned projection is the swap's ``feature_proj``."""
    return torch.cat([torch.softmax(x, dim=-1), torch.softmax(-x, dim=-1)], dim=-1)


FEATURE_MAPS = {"elu": elu_plus_one, "hedgehog": hedgehog}


def pair_features(phi):
    """(qb, kb) -> phi(qb).phi(kb)^T: the pair weights of a feature map, in place of scores."""
    return lambda qb, kb: grouped_matmul(phi(qb), phi(kb).transpose(-1, -2))


FEATURE_MAP_OPTION = registry.Option("feature_map", str, "elu", doc="elu (ELU+1) | hedgehog ([softmax(x), "
                                     "softmax(-x)], to learn with attnswap.transfer)", choices=tuple(FEATURE_MAPS))


def make_normalize(eps: float):
    def normalize(a: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
        if visible is not None:
            a = a * visible
        den = a.sum(-1, keepdim=True) + eps
        return a / torch.where(den == 0, torch.ones_like(den), den)

    return normalize


def state_features(scaling: float, options: dict):
    """For the recurrent-state cache: (feature map, eps, weight of a sink logit: none, linear has no scores)."""
    return FEATURE_MAPS[options.get("feature_map", "elu")], options["eps"], None


def forward(query, key, value, vis, *, eps, form, feature_map="elu", scaling=None, softcap=None, sinks=None, dropout=0.0,
            need_weights=False, observe=None):
    if vis.has_bias:
        raise AttnSwapError("kind 'linear' has no scores, so it cannot honor an additive score bias in the mask; "
                            "pass a bool mask, or use a score-based kind (softmax, topk, entmax, taylor)")
    n, m = query.shape[2], key.shape[2]
    phi = FEATURE_MAPS[feature_map]
    if use_linear_time(form, "linear", vis, n=n, m=m, min_keys=MIN_KEYS_LINEAR_TIME, dropout=dropout,
                       need_weights=need_weights or observe is not None):
        return linear_time_attention(query, key, value, vis, feature_map=phi, eps=eps), None
    return scored_attention(query, key, value, vis, normalize=make_normalize(eps), options={}, scaling=1.0,
                            dropout=dropout, need_weights=need_weights, pair_scores=pair_features(phi),
                            observe=observe)


KIND = registry.add(
    registry.Kind(
        name="linear",
        forward=forward,
        options=(
            registry.Option("eps", float, 1e-6, doc="added to the denominator", rule="a number >= 0",
                            check=lambda v: v >= 0),
            registry.Option("form", str, "auto", doc="auto | quadratic | linear_time", choices=FORMS),
            FEATURE_MAP_OPTION,
        ),
        doc="Linear attention with the ELU+1 feature map (Katharopoulos et al.) or Hedgehog's; linear time on long "
            "inputs.",
        math="p_ij = phi(q_i).phi(k_j) / (sum_{j in A_i} phi(q_i).phi(k_j) + eps), phi(x) = elu(x) + 1 | "
             "[softmax(x), softmax(-x)]",
        uses_scores=False,
        builtin=True,
        state_features=state_features,
    )
)
