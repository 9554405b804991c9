"""The Triton path of kind ``taylor`` (w = 1 + s + s^2/2, s = scaling q.k): ``kernel`` / ``supports``.

Runs the chunked engine ``chunked_linear.chunked_attention`` (forward and backward, sinks included) for causal
(any offset), non-causal, sliding-window and key-padding visibility. A softcap has no linear-time form:
``supports`` declines it and the reference runs.
"""

from __future__ import annotations

from .chunked_linear import chunked_attention, key_padding, supports_common


def kernel(query, key, value, vis, *, scaling, softcap=None, sinks=None, dropout=0.0, need_weights=False,
           form="auto", **options):
    """Registry kernel of ``taylor``: ``(out (b, Hq, n, dv) in query.dtype, None)``."""
    ok, why = supports(query, key, value, vis, scaling=scaling, softcap=softcap, sinks=sinks, dropout=dropout,
                       need_weights=need_weights)
    if not ok:
        raise ValueError(f"the taylor kernel cannot run these inputs: {why}")
    out = chunked_attention(query, key, value, feature="taylor", scaling=float(scaling), causal=vis.causal,
                            offset=vis.offset, window=vis.window, key_mask=key_padding(vis), sinks=sinks)
    return out, None


def supports(query, key, value, vis, *, scaling=None, softcap=None, sinks=None, dropout=0.0, need_weights=False,
             **options) -> tuple[bool, str]:
    """Whether ``kernel`` can run these inputs, and why not."""
    if softcap is not None:
        return False, "the taylor kernel has no softcap (softcapped scores have no linear-time form)"
    if sinks is not None and (sinks.shape != (query.shape[1],) or sinks.device != query.device):
        return False, f"sinks must have shape (Hq,) = ({query.shape[1]},) on the query's device"
    return supports_common("taylor", query, key, value, vis, dropout=dropout, need_weights=need_weights)
