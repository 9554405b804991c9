"""The Triton path of kind ``linear``: ``kernel`` / ``supports`` for the registry.

The feature map runs in PyTorch (``kinds.linear.FEATURE_MAPS``: ELU+1, Hedgehog; autograd carries its gradient)
and the chunk-parallel engine ``linear_parallel.parallel_linear_attention`` takes the features, forward and
backward, for causal (any offset), non-causal and sliding-window visibility with key padding shared by the heads.
Any ``form`` is served (the result is the same math). No scores: scaling, softcap and sinks do not apply. A key
mask that differs between heads is declined (the PyTorch reference runs it).
"""

from __future__ import annotations

from ..kinds.linear import FEATURE_MAPS
from .feature_inputs import feature_pair, shared_key_mask, supports_features
from .linear_parallel import parallel_linear_attention


def kernel(query, key, value, vis, *, scaling=None, softcap=None, sinks=None, dropout=0.0, need_weights=False,
           eps=1e-6, form="auto", feature_map="elu", **options):
    """Registry kernel of ``linear``: ``(out (b, Hq, n, dv) in query.dtype, None)``; phi(q), phi(k) in fp32 math,
    stored in the query's dtype."""
    ok, why = supports(query, key, value, vis, dropout=dropout, need_weights=need_weights, feature_map=feature_map)
    if not ok:
        raise ValueError(f"the linear kernel cannot run these inputs: {why}")
    fq, fk = feature_pair(FEATURE_MAPS[feature_map], query, key)
    out = parallel_linear_attention(fq, fk, value, causal=vis.causal, offset=vis.offset, window=vis.window,
                                    key_mask=shared_key_mask(vis)[1], eps=float(eps))
    return out.to(query.dtype), None


def supports(query, key, value, vis, *, scaling=None, softcap=None, sinks=None, dropout=0.0, need_weights=False,
             **options) -> tuple[bool, str]:
    """Whether ``kernel`` can run these inputs, and why not (softcap and sinks are ignored: no scores)."""
    feature_map = options.get("feature_map", "elu")
    if feature_map not in FEATURE_MAPS:
        return False, f"the linear kernel has no feature map {feature_map!r} (valid: {', '.join(FEATURE_MAPS)})"
    return supports_features("linear", query, key, value, vis, dropout=dropout, need_weights=need_weights)
