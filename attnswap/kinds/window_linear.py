"""``window_linear``: softmax on the few keys that matter most exactly, linear attention on the rest (LoLCATs'
sliding-window + linear hybrid, with StreamingLLM's sink tokens).

For query i with visible keys A_i, the exact keys E_i are the last ``local_window`` keys of A_i and its first
``sink_tokens`` keys (where pretrained models park attention); the other visible keys L_i = A_i \\ E_i are linear:

    w_ij = exp(s_ij - c_i) on E_i (c_i = max_{j in E_i} s_ij),   w_ij = phi(q_i).phi(k_j) on L_i,
    p_ij = w_ij / (sum_{j in A_i} w_ij + eps)

with s_ij the model's scores (scaling, softcap, bias, its attention sinks as exact logits) and phi the Hedgehog map
(or ELU+1) on queries and keys through the swap's learned ``feature_proj``, which this kind applies to its linear
part only: ``attnswap.transfer`` trains it. "Last" and "first" count visible keys, so left padding and decoding
(queries after a cache) place the window and the sink tokens on real tokens.

Quadratic form only (chunked over queries, no N x N tensor beyond a block); decoding keeps K/V.
"""

from __future__ import annotations

import torch

from .. import registry
from ..errors import AttnSwapError
from .chunked import scored_attention
from .linear import FEATURE_MAPS


def exact_keys(visible: torch.Tensor, like: torch.Tensor, *, window: int, sink_tokens: int,
               sink_column: bool) -> torch.Tensor:
    """Bool, True on each row's exact keys: its last ``window`` and first ``sink_tokens`` visible keys (and the
    model's sink-logit column, the last, when ``sink_column``)."""
    vis = torch.ones_like(like, dtype=torch.bool) if visible is None else visible.expand_as(like)
    real = vis.clone()
    if sink_column:
        real[..., -1] = False
    rank = torch.cumsum(real.to(torch.int32), dim=-1)  # 1-based rank of each visible key in its row
    after = rank[..., -1:] - rank  # visible keys after this one
    exact = real & ((after < window) | (rank <= sink_tokens))
    if sink_column:
        exact[..., -1] = vis[..., -1]
    return exact


def make_normalize(window: int, sink_tokens: int, eps: float, sink_column: bool):
    def normalize(s, visible, *, pairs):
        exact = exact_keys(visible, s, window=window, sink_tokens=sink_tokens, sink_column=sink_column)
        s_exact = s.masked_fill(~exact, float("-inf"))
        top = s_exact.amax(dim=-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        w_exact = torch.exp(s_exact - top)  # 0 off the exact keys
        linear = pairs if visible is None else pairs * visible
        w = torch.where(exact, w_exact, linear * ~exact)
        den = w.sum(-1, keepdim=True) + eps
        return w / torch.where(den == 0, torch.ones_like(den), den)

    return normalize


def project_block(x: torch.Tensor, projection, heads) -> torch.Tensor:
    """A grouped block (rows, Hkv-slice, G|1, c, d) through the learned per-KV-head map of those heads (fp32)."""
    if projection is None:
        return x
    weight = projection.weight.to(x.device, torch.float32)[heads]
    bias = projection.bias.to(x.device, torch.float32)[heads]
    if weight.shape[-1] != x.shape[-1] or weight.shape[0] != x.shape[1]:
        raise AttnSwapError(f"feature_proj has weight {tuple(projection.weight.shape)}, which does not fit this "
                            f"attention's KV heads of dim {x.shape[-1]}")
    return torch.matmul(x, weight.transpose(-1, -2)[None, :, None]) + bias[None, :, None, None]


def forward(query, key, value, vis, *, local_window, sink_tokens, feature_map, eps, scaling, softcap=None, sinks=None,
            dropout=0.0, need_weights=False, observe=None, **learned):
    projection = learned.pop(registry.FEATURE_PROJ, None)
    if learned:
        raise AttnSwapError(f"unexpected options for kind 'window_linear': {sorted(learned)}")
    phi = FEATURE_MAPS[feature_map]

    def pair_weights(qb, kb, heads):
        fq, fk = phi(project_block(qb, projection, heads)), phi(project_block(kb, projection, heads))
        return torch.matmul(fq, fk.transpose(-1, -2))

    normalize = make_normalize(local_window, sink_tokens, eps, sink_column=sinks is not None)
    return scored_attention(query, key, value, vis, normalize=normalize, options={}, scaling=scaling, softcap=softcap,
                            sinks=sinks, dropout=dropout, need_weights=need_weights, observe=observe,
                            pair_weights=pair_weights)


KIND = registry.add(
    registry.Kind(
        name="window_linear",
        forward=forward,
        options=(
            registry.Option("local_window", int, 64, doc="recent visible keys each query attends with exact softmax",
                            rule="an integer >= 1", check=lambda v: v >= 1),
            registry.Option("sink_tokens", int, 4, doc="first visible keys each query attends with exact softmax",
                            rule="an integer >= 0", check=lambda v: v >= 0),
            registry.Option("feature_map", str, "hedgehog", doc="feature map of the linear part: hedgehog | elu",
                            choices=tuple(FEATURE_MAPS)),
            registry.Option("eps", float, 1e-6, doc="added to the denominator", rule="a number >= 0",
                            check=lambda v: v >= 0),
        ),
        doc="Sliding-window softmax plus sink tokens exactly, linear attention on the rest (LoLCATs-style hybrid); "
            "learn its feature map with attnswap.transfer.",
        math="p_ij ~ exp(s_ij - c_i) on the last `local_window` and first `sink_tokens` visible keys, phi(q_i).phi(k_j) "
             "on the others",
        builtin=True,
        applies_feature_proj=True,
    )
)
