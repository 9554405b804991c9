"""Attention transfer for the feature-map kinds (``linear`` with either map, ``taylor``, ``window_linear``), as in
Hedgehog / LoLCATs: a learnable per-KV-head map on queries and keys, ``x -> W_h x + b_h`` (identity-initialised),
applied before the kind's feature map (``window_linear``: before the feature map of its linear part only) and
trained, layer by layer with everything else frozen, so that the kind's attention output matches the model's own
softmax attention output on the same inputs.

The inputs of every swapped layer are recorded once under the model's own attention (one forward per window, no
gradient through the model); each layer's map is then fitted alone with Adam on those inputs (relative squared
output error), so the cost is that of one attention call per step and layer. The learned maps become the swap's
per-layer option ``feature_proj`` (a ``FeatureProjection``), which every path applies (reference, Triton kernels,
the ``StateCache``); ``save_swap`` keeps them beside the model.
"""

from __future__ import annotations

import math

import torch

from .. import registry
from ..dispatch import run
from ..errors import AttnSwapError
from ..registry import FEATURE_PROJ, FeatureProjection
from .calibrate import _mean, calibration_windows, fit_layers, record_attention_inputs, softmax_targets, summary

DEFAULT_WINDOW, DEFAULT_WINDOWS, DEFAULT_STEPS, DEFAULT_LR = 512, 8, 150, 3e-3


def _relative_error(out, target) -> torch.Tensor:
    return ((out.float() - target) ** 2).sum() / (target ** 2).sum().clamp_min(1e-30)


def fit_projection(kind, options, calls, targets, *, steps: int, lr: float, impl: str = "auto"):
    """Learn one layer's FeatureProjection; returns (projection, error before, error after) over all calls."""
    k0 = calls[0][1]
    hkv, d = k0.shape[1], k0.shape[-1]
    weight = torch.eye(d, device=k0.device).repeat(hkv, 1, 1).requires_grad_(True)
    bias = torch.zeros(hkv, d, device=k0.device, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)

    def error(index: int) -> torch.Tensor:
        q, k, v, vis, scaling, softcap, sinks = calls[index]
        opts = {**options, FEATURE_PROJ: FeatureProjection(weight, bias)}
        out, _ = run(kind, opts, q, k, v, vis, scaling=scaling, softcap=softcap, sinks=sinks, impl=impl)
        return _relative_error(out, targets[index])

    with torch.no_grad():
        before = _mean(error(i).item() for i in range(len(calls)))
    for step in range(steps):
        loss = error(step % len(calls))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = _mean(error(i).item() for i in range(len(calls)))
    return FeatureProjection(weight.detach().clone(), bias.detach().clone()), before, after


def transfer(model, kind: str, data, *, tokenizer=None, window: int = DEFAULT_WINDOW,
             max_windows: int = DEFAULT_WINDOWS, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, layers=None,
             impl: str = "auto", progress: bool = False, **options):
    """Swap ``model`` to the feature-map kind ``kind`` with learned per-layer query/key maps; returns the handle.

    ``data``: token ids or text (with ``tokenizer``), cut into at most ``max_windows`` windows of ``window`` tokens
    (the token budget is ``window * max_windows``); ``steps`` Adam steps per layer at learning rate ``lr``.
    ``handle.transfer`` reports the relative output error per layer before and after.
    """
    from ..patches.swap import swap_attention

    kind_obj, resolved = registry.resolve(kind, options)
    if not kind_obj.transferable:
        with_maps = ", ".join(n for n in registry.names() if registry.get(n).transferable)
        raise AttnSwapError(f"attention transfer learns feature maps, and kind {kind!r} has none (kinds with feature "
                            f"maps: {with_maps}); score-based kinds are calibrated with attnswap.calibrate")
    if FEATURE_PROJ in options:
        raise AttnSwapError("transfer learns feature_proj itself; do not pass it")
    if not (isinstance(steps, int) and steps >= 1) or not (isinstance(lr, (int, float)) and 0 < lr < math.inf):
        raise AttnSwapError(f"transfer needs steps >= 1 and lr > 0, got steps={steps!r}, lr={lr!r}")
    ids = calibration_windows(data, tokenizer, window=window, max_windows=max_windows)
    modules, recorder = record_attention_inputs(model, ids, layers=layers, impl=impl, fraction=1.0)
    def fit(calls):
        projection, before, after = fit_projection(kind_obj, resolved, calls, softmax_targets(calls), steps=steps,
                                                   lr=lr, impl=impl)
        return {FEATURE_PROJ: projection}, {"error_before": before, "error_after": after}

    with torch.enable_grad():
        layer_options, report = fit_layers(modules, recorder, fit, f"transferring {kind}", progress)
    handle = swap_attention(model, kind, layers=layers, impl=impl, layer_options=layer_options, **options)
    handle.transfer = summary("per-KV-head affine map on queries and keys before the feature map, Adam on the "
                              "relative squared attention-output error against the model's own attention, layer "
                              "by layer", ids, report, steps=steps, lr=lr)
    return handle
