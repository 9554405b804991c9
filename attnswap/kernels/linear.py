"""The Triton path of kind ``linear`` (ELU+1 feature map): ``kernel`` / ``supports`` for the registry.

Runs the chunked engine ``chunked_linear.chunked_attention`` (forward and backward) for causal (any offset),
non-causal, sliding-window and key-padding visibility; any ``form`` is served (the result is the same math).
No scores: scaling, softcap and sinks do not apply.
"""

from __future__ import annotations

from .chunked_linear import chunked_attention, key_padding, supports_common


def kernel(query, key, value, vis, *, scaling=None, softcap=None, sinks=None, dropout=0.0, need_weights=False,
           eps=1e-6, form="auto", feature_map="elu", **options):
    """Registry kernel of ``linear``: ``(out (b, Hq, n, dv) in query.dtype, None)``."""
    ok, why = supports(query, key, value, vis, dropout=dropout, need_weights=need_weights, feature_map=feature_map)
    if not ok:
        raise ValueError(f"the linear kernel cannot run these inputs: {why}")
    out = chunked_attention(query, key, value, feature="linear", causal=vis.causal, offset=vis.offset,
                            window=vis.window, key_mask=key_padding(vis), eps=float(eps))
    return out, None


def supports(query, key, value, vis, *, scaling=None, softcap=None, sinks=None, dropout=0.0, need_weights=False,
             **options) -> tuple[bool, str]:
    """Whether ``kernel`` can run these inputs, and why not (softcap and sinks are ignored: no scores)."""
    if options.get("feature_map", "elu") != "elu":
        return False, f"the linear kernel has the ELU+1 feature map only, not {options['feature_map']!r}"
    return supports_common("linear", query, key, value, vis, dropout=dropout, need_weights=need_weights)
