"""``entmax``: p_ij = [(alpha-1) s_ij - tau_i]_+^(1/(alpha-1)), tau_i such that the row sums to 1.

tau is found by Newton's method from the left: f(tau) = sum_j [(alpha-1)s_j - tau]_+^(1/(alpha-1)) - 1 is
convex and decreasing for alpha in (1, 2], so Newton steps started where f >= 0 (tau = max - 1) rise
monotonically to the root and never overshoot. The backward pass uses the support only:
grad_s = g * (grad_p - sum(g grad_p) / sum(g)), g = p^(2-alpha) on the support.
"""

from __future__ import annotations

import torch

from .. import registry
from .chunked import scored_attention

MAX_ITER = 100


@torch.no_grad()
def entmax_weights(s: torch.Tensor, visible: torch.Tensor | None, alpha: float) -> torch.Tensor:
    x = s * (alpha - 1.0)
    if visible is not None:
        x = x.masked_fill(~visible, float("-inf"))
    xmax = x.amax(dim=-1, keepdim=True)
    empty = torch.isinf(xmax)
    xmax = torch.where(empty, torch.zeros_like(xmax), xmax)
    e = 1.0 / (alpha - 1.0)
    tau = xmax - 1.0
    for _ in range(MAX_ITER):
        u = (x - tau).clamp_min(0)
        if e == 1.0:
            f, df = u.sum(-1, keepdim=True) - 1.0, (u > 0).sum(-1, keepdim=True).to(u.dtype)
        elif e == 2.0:
            f, df = (u * u).sum(-1, keepdim=True) - 1.0, 2.0 * u.sum(-1, keepdim=True)
        else:
            ue1 = u.pow(e - 1.0)
            f, df = (ue1 * u).sum(-1, keepdim=True) - 1.0, e * ue1.sum(-1, keepdim=True)
        step = f / df.clamp_min(1e-30)
        step = torch.where(empty, torch.zeros_like(step), step)
        tau = tau + step
        if float(step.abs().max()) <= 1e-7 * max(1.0, float(tau.abs().max())):
            break
    p = (x - tau).clamp_min(0)
    p = p if e == 1.0 else (p * p if e == 2.0 else p.pow(e))
    den = p.sum(-1, keepdim=True)
    return p / torch.where(den == 0, torch.ones_like(den), den)


class _Entmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, visible, alpha):
        p = entmax_weights(s, visible, alpha)
        ctx.alpha = alpha
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, grad_p):
        (p,) = ctx.saved_tensors
        g = (p > 0).to(p.dtype) if ctx.alpha == 2.0 else p.pow(2.0 - ctx.alpha)
        gg = g * grad_p
        q = gg.sum(-1, keepdim=True) / g.sum(-1, keepdim=True).clamp_min(1e-30)
        return gg - g * q, None, None


def normalize(s: torch.Tensor, visible: torch.Tensor | None, alpha: float) -> torch.Tensor:
    return _Entmax.apply(s, visible, alpha)


def forward(query, key, value, vis, *, alpha, **kw):
    return scored_attention(query, key, value, vis, normalize=normalize, options={"alpha": alpha}, **kw)


KIND = registry.add(
    registry.Kind(
        name="entmax",
        forward=forward,
        options=(
            registry.Option(
                "alpha", float, 1.5, doc="1 < alpha <= 2; 2 is sparsemax", rule="a number in (1, 2]",
                check=lambda a: 1.0 < a <= 2.0,
            ),
        ),
        doc="alpha-entmax: sparse attention whose support adapts per query (alpha -> 1 is softmax, 2 sparsemax).",
        math="p_ij = [(alpha-1) s_ij - tau_i]_+^(1/(alpha-1)), sum_j p_ij = 1",
        builtin=True,
    )
)
SPARSEMAX = registry.alias(
    "sparsemax", "entmax", doc="sparsemax: entmax with alpha = 2 (Euclidean projection onto the simplex).", alpha=2.0
)
