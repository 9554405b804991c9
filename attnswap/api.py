"""The public API: swap_attention, restore_attention, swapped, attention, register_kind, available_kinds."""

from __future__ import annotations

import numbers
from typing import Any, Callable

import torch

from . import registry
from .dispatch import IMPLS, run
from .errors import AttnSwapError
from .kinds.chunked import scored_attention
from .kinds.visibility import Visibility, gqa_mask
from .patches import swap as _swap
from .patches.swap import SwapHandle, restore_attention, swapped  # noqa: F401


def swap_attention(model: torch.nn.Module, kind: str, *, layers=None, impl: str = "auto", layer_options=None,
                   calibrate=None, **options) -> SwapHandle:
    """Swap the attention of ``model`` (in place) for ``kind`` with ``options``; returns a handle that undoes it.

    ``layers``: indices of the attention layers to swap (model order); the rest keep the model's own attention.
    ``layer_options``: {layer: {option: value}} for layers that differ from ``options`` (e.g. a per-head
    ``score_scale``). ``calibrate``: token ids (or text, with the model's tokenizer passed as
    ``calibrate=(text, tokenizer)``, or a dict of ``attnswap.calibrate``'s arguments with ``data``) to fit
    per-layer, per-head score scales on (see ``attnswap.calibrate``).
    Swapping a swapped model replaces the earlier swap.
    """
    if calibrate is None:
        return _swap.swap_attention(model, kind, layers=layers, impl=impl, layer_options=layer_options, **options)
    from .adapt.calibrate import calibrate as fit  # the convenience sits above both patches and adapt

    if layer_options:
        raise AttnSwapError("swap_attention takes layer_options or calibrate=, not both: calibration fits the "
                            "per-layer options itself")
    if isinstance(calibrate, dict):  # {"data": ..., "tokenizer": ..., "window": ..., "max_windows": ...}
        settings = dict(calibrate)
        data = settings.pop("data", None)
    else:
        data, tokenizer = calibrate if isinstance(calibrate, tuple) else (calibrate, None)
        settings = {"tokenizer": tokenizer}
    return fit(model, kind, data, layers=layers, impl=impl, **settings, **options)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kind: str = "softmax", *,
              mask: torch.Tensor | None = None, causal: bool = False, scaling: float | None = None,
              window: int | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None,
              dropout: float = 0.0, return_weights: bool = False, impl: str = "auto", **options):
    """Attention of any kind on plain tensors, like ``F.scaled_dot_product_attention``.

    query (b,Hq,n,d); key, value (b,Hkv,m,d|dv) with Hq a multiple of Hkv (GQA, K/V never repeated).
    ``mask``: bool (b|1, Hq|1, n|1, m), True = attend (or a float additive mask). ``causal`` is aligned
    lower-right: query i sees keys j <= i + m - n; ``window`` w keeps j > i + m - n - w. Returns
    out (b,Hq,n,dv) in query's dtype, and the weights (b,Hq,n,m) too with ``return_weights=True``.
    """
    k, opts = registry.resolve(kind, options)
    _check_tensors(query, key, value)
    b, hq, n, _ = query.shape
    hkv, m = key.shape[1], key.shape[2]
    if window is not None and (not isinstance(window, numbers.Integral) or isinstance(window, bool) or window < 1):
        raise AttnSwapError(f"window must be an integer >= 1 or None, got {window!r}")
    if softcap is not None and (not isinstance(softcap, numbers.Real) or softcap <= 0):
        raise AttnSwapError(f"softcap must be a number > 0 or None, got {softcap!r}")
    if scaling is not None and (not isinstance(scaling, numbers.Real) or isinstance(scaling, bool)):
        raise AttnSwapError(f"scaling must be a number or None (default head_dim**-0.5), got {scaling!r}")
    if dropout != 0.0 and not (isinstance(dropout, numbers.Real) and 0.0 <= dropout < 1.0):
        raise AttnSwapError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if impl not in IMPLS:
        raise AttnSwapError(f"impl must be one of {list(IMPLS)}, got {impl!r}")
    vis = Visibility(n=n, m=m, causal=bool(causal), offset=m - n, window=window,
                     mask=gqa_mask(mask, b, hq, hkv, n, m))
    out, weights = run(k, opts, query, key, value, vis, scaling=query.shape[-1] ** -0.5 if scaling is None
                       else float(scaling), softcap=softcap, sinks=sinks, dropout=float(dropout),
                       need_weights=return_weights, impl=impl)
    return (out, weights) if return_weights else out


def _check_tensors(query, key, value):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise AttnSwapError(f"{name} must be a 4D floating tensor (b, heads, seq, head_dim), got "
                                f"{getattr(t, 'shape', type(t).__name__)}")
    (b, hq, _, d), (bk, hkv, m, dk) = query.shape, key.shape
    if key.shape[:3] != value.shape[:3]:
        raise AttnSwapError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree in (b, Hkv, m)")
    if bk != b or dk != d:
        raise AttnSwapError(f"query {tuple(query.shape)} and key {tuple(key.shape)} must agree in batch and head_dim")
    if hkv == 0 or hq % hkv:
        raise AttnSwapError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if not (query.dtype == key.dtype == value.dtype):
        raise AttnSwapError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")


def register_kind(name: str, normalize: Callable | None = None, *, forward: Callable | None = None,
                  options: dict[str, Any] | None = None, doc: str = "", math: str = "",
                  overwrite: bool = False) -> registry.Kind:
    """Add a kind of your own; it becomes usable everywhere (``swap_attention``, ``attention``,
    ``attn_implementation="attnswap_<name>"``).

    Give ``normalize(scores, visible, **options) -> weights``: a row-wise map from fp32 scores (..., keys) to
    weights with exact zeros where ``visible`` (bool, broadcastable, or None = all visible) is False. attnswap
    supplies masks, GQA, softcap, sinks, chunking and autograd. Or give ``forward(query, key, value, vis,
    *, scaling, softcap, sinks, dropout, need_weights, **options) -> (out, weights | None)`` for full control.
    ``options``: name -> default (its type is the default's type).
    """
    if (normalize is None) == (forward is None):
        raise AttnSwapError("register_kind needs exactly one of normalize= or forward=")
    schema = []
    for opt, default in (options or {}).items():
        if isinstance(default, bool) or not isinstance(default, (int, float, str)):
            raise AttnSwapError(f"option {opt!r}: defaults must be int, float or str, got {default!r}")
        schema.append(registry.Option(opt, type(default), default))
    if forward is None:
        def forward(query, key, value, vis, *, _normalize=normalize, **kw):
            opts = {o.name: kw.pop(o.name) for o in schema}
            return scored_attention(query, key, value, vis, normalize=_normalize, options=opts, **kw)
    return registry.add(registry.Kind(name=name, forward=forward, options=tuple(schema), doc=doc, math=math),
                        overwrite=overwrite)


def available_kinds() -> dict[str, dict]:
    """Every kind with its doc, math and options (name -> default)."""
    out = {}
    for name in registry.names():
        k = registry.get(name)
        out[name] = {
            "doc": k.doc,
            "math": k.math,
            "options": {o.name: o.default for o in k.options if o.name not in k.fixed},
            "option_docs": {o.name: o.doc for o in k.options if o.name not in k.fixed},
            "alias_of": k.alias_of and f"{k.alias_of} with {k.fixed}",
            "kernel": registry.get(k.alias_of or name).kernel is not None,
        }
    return out
