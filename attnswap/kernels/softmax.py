"""The Triton path of kind ``softmax``: ``kernel`` / ``supports`` for the registry, and the autograd Function.

Forward is ``flash_fwd.flash_forward`` (which routes short queries to the split-KV path); backward is
``flash_bwd.flash_backward``. The same autograd Function serves kind ``taylor``'s score form.
"""

from __future__ import annotations

import torch

from .flash_bwd import flash_backward
from .flash_fwd import flash_forward
from .tiles import common_support


class FlashAttention(torch.autograd.Function):
    """Flash attention forward and backward; ``taylor``: the weights 1 + s + s^2/2 of kind ``taylor``'s score
    form instead of exp(s) (``kernels/taylor.py``)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, mask, vis, scaling, softcap, taylor=False):
        o, lse = flash_forward(q, k, v, scaling=scaling, causal=vis.causal, offset=vis.offset, window=vis.window,
                               softcap=softcap, sinks=sinks, mask=mask, taylor=taylor)
        ctx.save_for_backward(q, k, v, o, lse, sinks, mask)
        ctx.vis, ctx.scaling, ctx.softcap, ctx.taylor = vis, scaling, softcap, taylor
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, sinks, mask = ctx.saved_tensors
        vis = ctx.vis
        dq, dk, dv, dsinks = flash_backward(do, q, k, v, o, lse, scaling=ctx.scaling, causal=vis.causal,
                                            offset=vis.offset, window=vis.window, softcap=ctx.softcap, sinks=sinks,
                                            mask=mask, taylor=ctx.taylor)
        if sinks is None or not ctx.needs_input_grad[3]:
            dsinks = None
        else:
            dsinks = dsinks.to(sinks.dtype)
        return dq, dk, dv, dsinks, None, None, None, None, None


def kernel(query, key, value, vis, *, scaling, softcap=None, sinks=None, dropout=0.0, need_weights=False,
           **options):
    """Registry kernel of ``softmax``: ``(out (b,Hq,n,d) in query.dtype, None)``."""
    if dropout or need_weights or vis.has_bias:
        raise ValueError("the softmax kernel takes no dropout, weights or float bias (see supports())")
    out = FlashAttention.apply(query, key, value, sinks, vis.flat_mask(), vis, float(scaling),
                              None if softcap is None else float(softcap))
    return out, None


def supports(query, key, value, vis, *, scaling=None, softcap=None, sinks=None, dropout=0.0, need_weights=False,
             **kw) -> tuple[bool, str]:
    """Whether ``kernel`` can run these inputs, and why not."""
    return common_support(query, key, value, vis, dropout=dropout, need_weights=need_weights, sinks=sinks)
