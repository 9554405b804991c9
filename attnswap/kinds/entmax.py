"""``entmax``: p_ij = [(alpha-1) s_ij - tau_i]_+^(1/(alpha-1)), tau_i such that the row sums to 1.

tau is found by Newton's method from the left: f(tau) = sum_j [(alpha-1)s_j - tau]_+^(1/(alpha-1)) - 1 is
convex and decreasing for alpha in (1, 2], so Newton steps started where f >= 0 (tau = max - 1) rise
monotonically to the root and never overshoot; on long rows it is solved first on the largest scores alone
(``entmax_weights``). The backward pass uses the support only:
grad_s = g * (grad_p - sum(g grad_p) / sum(g)), g = p^(2-alpha) on the support.
"""

from __future__ import annotations

import torch

from .. import registry
from .chunked import fill_hidden_, scored_attention
from .select import top_values

MAX_ITER = 100
# The threshold is first solved on each row's 16 largest scores. SmolLM2-135M under entmax 1.5 (random tokens,
# N = 2048): median support 3 keys, 4.5% of rows above 16 (they go on alone over all their keys), 0.5% above 64;
# whole-model prefill 6.2 s with 16, 6.3 s with 8, 6.7 s with 24, 7.4 s with 32, 9.9 s with 64 (2-core CPU).
SUPPORT_GUESS = 16


def _newton(x: torch.Tensor, t: torch.Tensor, e: float, target: float, empty: torch.Tensor) -> torch.Tensor:
    """Newton steps on f(t) = sum_j [x_j - t]_+^e - target from a t with f(t) >= 0 (or just right of the root)
    until the steps stop moving it (fp32); rows in ``empty`` stay."""
    for _ in range(MAX_ITER):
        u = (x - t).clamp_min(0)
        if e == 1.0:
            f, df = u.sum(-1, keepdim=True) - target, (u > 0).sum(-1, keepdim=True).to(u.dtype)
        elif e == 2.0:
            f, df = (u * u).sum(-1, keepdim=True) - target, 2.0 * u.sum(-1, keepdim=True)
        else:
            ue1 = u.pow(e - 1.0)
            f, df = (ue1 * u).sum(-1, keepdim=True) - target, e * ue1.sum(-1, keepdim=True)
        step = torch.where(empty, 0.0, f / df.clamp_min(1e-30))
        t = t + step
        if float(step.abs().max()) <= 1e-7 * max(1.0, float(t.abs().max())):
            break
    return t


def _sorted_root(z: torch.Tensor, e: float, target: float) -> torch.Tensor:
    """The root of sum_j [z_j - t]_+^e = target for e = 1 (sparsemax) or e = 2 (1.5-entmax), from values sorted in
    decreasing order, the first one 0 (the row's max subtracted, so that the support's values are small): for each
    prefix of j values the t that makes it sum to ``target``; the support is the prefixes whose t lies below their
    last value (Martins & Astudillo 2016; Peters et al. 2019). A start for Newton's polish (its rounding aside, it
    is the root)."""
    j = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    csum = z.cumsum(-1)
    if e == 1.0:
        ts = (csum - target) / j
    else:
        mean = csum / j
        spread = (z * z).cumsum(-1) - j * mean * mean
        ts = mean - ((target - spread) / j).clamp_min(0).sqrt()
    size = ((ts <= z) & (z > float("-inf"))).sum(-1, keepdim=True).clamp_min(1)  # hidden keys are -inf
    return ts.gather(-1, size - 1)


@torch.no_grad()
def solve_threshold(x: torch.Tensor, e: float, target: float) -> torch.Tensor:
    """The root t (..., 1) of sum_j [x_j - t]_+^e = ``target`` for each row of ``x`` (..., m), hidden entries -inf
    (rows with nothing visible get t = 0); ``x`` is left as it is. e = 1 / (alpha - 1).

    t is first found on each row's ``SUPPORT_GUESS`` largest values alone (a small problem: one selection pass,
    see ``attnswap.kinds.select``). When that root lies at or above the smallest of them, every other value is
    below it too, so it is the root of the whole row, exactly. The few rows whose support is wider continue alone on
    all their values from there (a valid start: the partial sum never exceeds the full one, so f >= 0 there)."""
    guess = min(SUPPORT_GUESS, x.shape[-1])
    closed_form = e in (1.0, 2.0)
    top = top_values(x, guess, sorted=closed_form) if guess < x.shape[-1] else x
    xmax = top.amax(dim=-1, keepdim=True)
    empty = torch.isinf(xmax)
    t = torch.where(empty, 0.0, xmax - target ** (1.0 / e))  # no weight exceeds 1: the root is at or above this
    if closed_form and top is not x:  # sparsemax and 1.5-entmax: the sorted formula gives the root at once
        start = _sorted_root(top - xmax, e, target) + xmax
        t = torch.where(empty | ~(start < xmax), t, start)  # the root is below the max
    t = _newton(top, t, e, target, empty)
    if top is not x:
        wider = (top.amin(dim=-1, keepdim=True) > t).flatten().nonzero().squeeze(1)  # supports beyond the guess
        if wider.numel():  # those rows alone continue over all their keys
            rows, t = x.reshape(-1, x.shape[-1]), t.clone()
            flat = t.view(-1, 1)
            flat[wider] = _newton(rows[wider], flat[wider], e, target, empty.reshape(-1, 1)[wider])
    return t


@torch.no_grad()
def entmax_weights(s: torch.Tensor, visible: torch.Tensor | None, alpha: float, *, overwrite: bool = False
                   ) -> torch.Tensor:
    """The entmax weights of score rows ``s`` (..., m) over ``visible`` (bool, broadcastable, or None); with
    ``overwrite`` they are computed in ``s``'s own memory.

    Solved in score units: [(alpha-1)s - tau]_+^e = (alpha-1)^e [s - t]_+^e with t = tau / (alpha-1), and the
    constant factor cancels in the normalization, so t is the root of sum_j [s_j - t]_+^e = (alpha-1)^-e
    (``solve_threshold``)."""
    e = 1.0 / (alpha - 1.0)
    target = (alpha - 1.0) ** -e
    x = s if visible is None else s.masked_fill(~visible, float("-inf"))
    t = solve_threshold(x, e, target)
    p = (x.sub_(t) if overwrite or x is not s else x - t).clamp_min_(0)
    p = p if e == 1.0 else (p.square_() if e == 2.0 else p.pow_(e))
    den = p.sum(-1, keepdim=True)
    return p.div_(torch.where(den == 0, torch.ones_like(den), den))


class _Entmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, visible, alpha, overwrite=False):
        p = entmax_weights(s, visible, alpha, overwrite=overwrite)
        ctx.alpha = alpha
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, grad_p):
        (p,) = ctx.saved_tensors
        g = (p > 0).to(p.dtype) if ctx.alpha == 2.0 else p.pow(2.0 - ctx.alpha)
        gg = g * grad_p
        q = gg.sum(-1, keepdim=True) / g.sum(-1, keepdim=True).clamp_min(1e-30)
        return gg - g * q, None, None, None


def normalize(s: torch.Tensor, visible: torch.Tensor | None, alpha: float) -> torch.Tensor:
    if not s.requires_grad:  # the engine's own block: hide in place (-inf: no weight), the weights in its memory
        return _Entmax.apply(fill_hidden_(s, visible, float("-inf")), None, alpha, True)
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
