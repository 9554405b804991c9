"""The Triton path of kind ``linear`` (ELU+1 feature map): ``kernel`` / ``supports`` for the registry.

Two engines, forward and backward, the same math: the feature map runs in PyTorch (``kinds.linear.FEATURE_MAPS``,
so autograd carries its gradient) and the chunk-parallel engine ``linear_parallel.parallel_linear_attention``
takes the features, for causal (any offset), non-causal and sliding-window visibility with key padding shared by
the heads; the sequential engine ``chunked_linear.chunked_attention`` (ELU+1 inside the kernel) keeps key padding
that differs between query heads (the parallel engine's states are per KV head). Any ``form`` is served (the
result is the same math). No scores: scaling, softcap and sinks do not apply.
"""

from __future__ import annotations

from ..kinds.linear import FEATURE_MAPS
from .chunked_linear import chunked_attention, key_padding, supports_common
from .linear_parallel import parallel_linear_attention


def parallel_key_mask(vis):
    """(whether the chunk-parallel engine takes ``vis``, its bool (b|1, m) key mask or None): key padding (if any)
    the same for every head."""
    mask = key_padding(vis)
    if mask is None:
        return True, None
    if mask.shape[1] != 1:
        return False, None
    return True, mask[:, 0, 0]


def parallel_kernel(query, key, value, vis, *, eps, feature_map, mask):
    """The chunk-parallel path: features phi(q), phi(k) (fp32 math, stored in the query's dtype), then the engine;
    ``mask`` is ``parallel_key_mask``'s key mask."""
    phi = FEATURE_MAPS[feature_map]
    fq = phi(query.float()).to(query.dtype)
    fk = phi(key.float()).to(key.dtype)
    return parallel_linear_attention(fq, fk, value, causal=vis.causal, offset=vis.offset, window=vis.window,
                                     key_mask=mask, eps=float(eps)).to(query.dtype)


def kernel(query, key, value, vis, *, scaling=None, softcap=None, sinks=None, dropout=0.0, need_weights=False,
           eps=1e-6, form="auto", feature_map="elu", **options):
    """Registry kernel of ``linear``: ``(out (b, Hq, n, dv) in query.dtype, None)``."""
    ok, why = supports(query, key, value, vis, dropout=dropout, need_weights=need_weights, feature_map=feature_map)
    if not ok:
        raise ValueError(f"the linear kernel cannot run these inputs: {why}")
    parallel, mask = parallel_key_mask(vis)
    if parallel:
        return parallel_kernel(query, key, value, vis, eps=eps, feature_map=feature_map, mask=mask), None
    out = chunked_attention(query, key, value, feature="linear", causal=vis.causal, offset=vis.offset,
                            window=vis.window, key_mask=key_padding(vis), eps=float(eps))
    return out, None


def supports(query, key, value, vis, *, scaling=None, softcap=None, sinks=None, dropout=0.0, need_weights=False,
             **options) -> tuple[bool, str]:
    """Whether ``kernel`` can run these inputs, and why not (softcap and sinks are ignored: no scores)."""
    feature_map = options.get("feature_map", "elu")
    if feature_map not in FEATURE_MAPS:
        return False, f"the linear kernel has no feature map {feature_map!r} (valid: {', '.join(FEATURE_MAPS)})"
    ok, why = supports_common("linear", query, key, value, vis, dropout=dropout, need_weights=need_weights)
    if ok and feature_map != "elu" and not parallel_key_mask(vis)[0]:
        return False, (f"the {feature_map!r} feature map runs on the chunk-parallel engine, which takes key padding "
                       "shared by all heads, not a per-head key mask (the ELU+1 map has the sequential engine)")
    return ok, why
