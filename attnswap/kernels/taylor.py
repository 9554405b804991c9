"""The Triton path of kind ``taylor`` (w = 1 + s + s^2/2, s = scaling q.k): ``kernel`` / ``supports``.

Two exact forms of the same weights, chosen per call:
  * the score form: the flash kernels with Taylor weights in place of exp (``flash_fwd`` / ``flash_bwd`` with
    ``taylor=True``: tiles of scores, no feature expansion), O(n m d): any bool mask, softcap, sinks;
  * the feature form: phi(q), phi(k) with the symmetric Taylor map (``kinds.taylor.make_feature_map``: 1 + d +
    d(d+1)/2 features, half the full d^2 map) through the chunk-parallel engine ``linear_parallel``, O((n + m) F dv):
    causal, sliding window, key padding shared by the heads, sinks (their Taylor weight joins each denominator);
    no softcap.
``form="quadratic"`` / ``"linear_time"`` force one; ``"auto"`` takes the feature form from ``FEATURE_FORM_FROM``
keys (and 256 queries, as the reference), else the score form (and whichever form alone can run the inputs).
"""

from __future__ import annotations

import functools

from ..kinds.feature_map import CHUNK
from ..kinds.taylor import make_feature_map, taylor_weight
from .feature_inputs import MAX_HEAD_DIM, feature_pair, shared_key_mask, supports_features
from .linear_parallel import parallel_linear_attention
from .softmax import FlashAttention
from .tiles import common_support

# Keys from which ``auto`` takes the feature form on a GPU. Not yet measured on one: the score form costs ~n m d
# (half of it under a causal mask), the feature form ~(n + m) F dv with F = 2081 at d = 64, so the crossover
# is expected at a few thousand keys; `benchmarks/linear_attention.py --modes engines` times both forms.
FEATURE_FORM_FROM = 8192


@functools.lru_cache(maxsize=16)
def _feature_map(scaling: float):
    return make_feature_map(scaling)


def _score_support(query, key, value, vis, *, sinks, dropout, need_weights) -> tuple[bool, str]:
    """The flash kernels' checks, any head dim up to MAX_HEAD_DIM (padded to a power of two in registers) with the
    value head dim equal to the query's."""
    ok, why = common_support(query, key, value, vis, dropout=dropout, need_weights=need_weights, sinks=sinks,
                             name="taylor", max_head_dim=MAX_HEAD_DIM)
    if ok and value.shape[-1] != query.shape[-1]:
        return False, (f"the taylor kernel's score form needs the value head dim equal to the query's, got "
                       f"{value.shape[-1]} and {query.shape[-1]}")
    return ok, why


def _feature_support(query, key, value, vis, *, softcap, sinks, dropout, need_weights) -> tuple[bool, str]:
    if softcap is not None:
        return False, "the taylor kernel's linear-time form has no softcap (softcapped scores have no feature map)"
    if sinks is not None and (sinks.shape != (query.shape[1],) or sinks.device != query.device):
        return False, f"sinks must have shape (Hq,) = ({query.shape[1]},) on the query's device"
    return supports_features("taylor", query, key, value, vis, dropout=dropout, need_weights=need_weights)


def choose_form(query, key, value, vis, *, form="auto", softcap=None, sinks=None, dropout=0.0,
                need_weights=False) -> tuple[str | None, str]:
    """("scores" | "features", "") for the form the kernel runs, or (None, why neither can)."""
    kw = dict(sinks=sinks, dropout=dropout, need_weights=need_weights)
    scores, why_s = _score_support(query, key, value, vis, **kw)
    features, why_f = _feature_support(query, key, value, vis, softcap=softcap, **kw)
    if form == "quadratic":
        return ("scores", "") if scores else (None, why_s)
    if form == "linear_time":
        return ("features", "") if features else (None, why_f)
    n, m = query.shape[2], key.shape[2]
    long = n >= 2 * CHUNK and m >= FEATURE_FORM_FROM
    if features and (long or not scores):
        return "features", ""
    if scores:
        return "scores", ""
    return None, f"{why_s}; and {why_f}"


def _feature_form(query, key, value, vis, *, scaling, sinks):
    fq, fk = feature_pair(_feature_map(float(scaling)), query, key)
    extra = 0.0 if sinks is None else taylor_weight(sinks.float())
    return parallel_linear_attention(fq, fk, value, causal=vis.causal, offset=vis.offset, window=vis.window,
                                     key_mask=shared_key_mask(vis)[1], eps=extra)


def kernel(query, key, value, vis, *, scaling, softcap=None, sinks=None, dropout=0.0, need_weights=False,
           form="auto", **options):
    """Registry kernel of ``taylor``: ``(out (b, Hq, n, dv) in query.dtype, None)``."""
    chosen, why = choose_form(query, key, value, vis, form=form, softcap=softcap, sinks=sinks, dropout=dropout,
                              need_weights=need_weights)
    if chosen is None:
        raise ValueError(f"the taylor kernel cannot run these inputs: {why}")
    if chosen == "features":
        out = _feature_form(query, key, value, vis, scaling=scaling, sinks=sinks)
    else:
        out = FlashAttention.apply(query, key, value, sinks, vis.flat_mask(), vis, float(scaling),
                                  None if softcap is None else float(softcap), True)
    return out.to(query.dtype), None


def supports(query, key, value, vis, *, scaling=None, softcap=None, sinks=None, dropout=0.0, need_weights=False,
             **options) -> tuple[bool, str]:
    """Whether ``kernel`` can run these inputs (in the form ``options["form"]`` asks for), and why not."""
    chosen, why = choose_form(query, key, value, vis, form=options.get("form", "auto"), softcap=softcap, sinks=sinks,
                              dropout=dropout, need_weights=need_weights)
    return chosen is not None, why
