"""The Triton path of kind ``softmax``: ``kernel`` / ``supports`` for the registry, and the autograd Function.

Forward is ``flash_fwd.flash_forward`` (which routes short queries to the split-KV path); backward is
``flash_bwd.flash_backward`` when that module exists, else a recomputation through the PyTorch reference
``attnswap.kinds.softmax.forward`` under autograd (exact, slower).
"""

from __future__ import annotations

import torch

from .flash_fwd import flash_forward
from .tiles import common_support


class _FlashSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, mask, vis, scaling, softcap):
        o, lse = flash_forward(q, k, v, scaling=scaling, causal=vis.causal, offset=vis.offset, window=vis.window,
                               softcap=softcap, sinks=sinks, mask=mask)
        ctx.save_for_backward(q, k, v, o, lse, sinks, mask)
        ctx.vis, ctx.scaling, ctx.softcap = vis, scaling, softcap
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, sinks, mask = ctx.saved_tensors
        vis, scaling, softcap = ctx.vis, ctx.scaling, ctx.softcap
        try:
            from .flash_bwd import flash_backward
        except ImportError:
            flash_backward = None
        if flash_backward is not None:
            dq, dk, dv, dsinks = flash_backward(do, q, k, v, o, lse, scaling=scaling, causal=vis.causal,
                                                offset=vis.offset, window=vis.window, softcap=softcap,
                                                sinks=sinks, mask=mask)
        else:  # recompute through the PyTorch reference
            from ..kinds.softmax import forward as reference

            with torch.enable_grad():
                inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
                s = sinks.detach().requires_grad_(True) if sinks is not None else None
                out, _ = reference(*inputs, vis, scaling=scaling, softcap=softcap, sinks=s)
                wrt = inputs + ([s] if s is not None else [])
                grads = torch.autograd.grad(out.to(q.dtype), wrt, do, allow_unused=True)
            dq, dk, dv = grads[:3]
            dsinks = grads[3] if s is not None else None
        if sinks is None or not ctx.needs_input_grad[3]:
            dsinks = None
        elif dsinks is not None:
            dsinks = dsinks.to(sinks.dtype)
        return dq, dk, dv, dsinks, None, None, None, None


def kernel(query, key, value, vis, *, scaling, softcap=None, sinks=None, dropout=0.0, need_weights=False,
           **options):
    """Registry kernel of ``softmax``: ``(out (b,Hq,n,d) in query.dtype, None)``."""
    if dropout or need_weights or vis.has_bias:
        raise ValueError("the softmax kernel takes no dropout, weights or float bias (see supports())")
    out = _FlashSoftmax.apply(query, key, value, sinks, vis.flat_mask(), vis, float(scaling),
                              None if softcap is None else float(softcap))
    return out, None


def supports(query, key, value, vis, *, scaling=None, softcap=None, sinks=None, dropout=0.0, need_weights=False,
             **kw) -> tuple[bool, str]:
    """Whether ``kernel`` can run these inputs, and why not."""
    return common_support(query, key, value, vis, dropout=dropout, need_weights=need_weights, sinks=sinks)
