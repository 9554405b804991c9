"""Training-free calibration of a score-based kind (``entmax``, ``sparsemax``, ``topk``, ``taylor``, user kinds):
one score scale (an inverse temperature) per layer and query head, fitted so that the kind's attention output
matches the model's own softmax attention on a few calibration windows.

Why the output and not the weights: the next layer only sees the output, and KL(softmax || kind) is infinite for
the sparse kinds (they give exact zeros where softmax does not). The fit is a search, not a gradient: for each layer
the attention inputs (q, k, v, mask) are recorded once under the model's own attention, then every candidate scale
reruns just that layer's attention (chunked, no N x N tensor beyond a block) on the last half of each window's
queries and keeps, per head, the scale with the least squared output error (a coarse grid of 11 scales from 0.25 to
8, then three rounds of finer steps around each head's best). Nothing flows through the whole model, so it takes seconds to a minute on a CPU.

The scales become the swap's per-layer option ``score_scale`` (``handle.options_of(layer)``), applied by every path
(reference and Triton kernels) as a scale on the queries.
"""

from __future__ import annotations

import math

import torch

from .. import registry
from ..dispatch import run
from ..errors import AttnSwapError
from ..kinds.visibility import Visibility
from ..observe import tapping
from ..progress import progress_bar

# coarse search (log2 of the scale), then finer steps around each head's best
COARSE = tuple(x / 2 for x in range(-4, 7))  # scales 0.25 .. 8
FINE = (-0.25, 0.25, -0.125, 0.125, -0.0625, 0.0625)  # each step re-centred on the best so far
DEFAULT_WINDOW, DEFAULT_WINDOWS = 512, 2
QUERY_FRACTION = 0.5  # the fit scores the last half of each window's queries (they see the longest contexts)


def calibration_windows(data, tokenizer=None, *, window: int = DEFAULT_WINDOW, max_windows: int = DEFAULT_WINDOWS):
    """Token ids (1D/2D tensor or list) or text (with ``tokenizer``) -> (w, window) LongTensor of whole windows."""
    if isinstance(data, str):
        if tokenizer is None:
            raise AttnSwapError("calibration text needs the model's tokenizer: pass calibrate=(text, tokenizer) or "
                                "tokenizer=")
        data = tokenizer(data, return_tensors="pt").input_ids
    ids = torch.as_tensor(data)
    if ids.dtype not in (torch.int64, torch.int32):
        raise AttnSwapError(f"calibration data must be token ids (integers) or text, got dtype {ids.dtype}")
    ids = ids.reshape(-1).long()
    if window < 16:
        raise AttnSwapError(f"the calibration window must be at least 16 tokens, got {window}")
    count = min(max_windows, ids.numel() // window)
    if count < 1:
        raise AttnSwapError(f"calibration data has {ids.numel()} tokens, shorter than one window of {window}; give "
                            "more text or a smaller window")
    return ids[: count * window].reshape(count, window)


class _Recorder:
    """Keeps the inputs of each swapped attention call, per module, while the model runs its own attention."""

    def __init__(self, modules, fraction: float = QUERY_FRACTION):
        self.calls = {id(m): [] for m in modules}
        self.fraction = fraction

    def __call__(self, module, query, key, value, vis, *, scaling, softcap, sinks):
        if id(module) in self.calls:
            query, vis = last_queries(query.detach(), vis, self.fraction)
            self.calls[id(module)].append((query, key.detach(), value.detach(), vis, scaling, softcap,
                                           None if sinks is None else sinks.detach()))


def last_queries(query, vis, fraction: float):
    """The last ``fraction`` of the queries and their visibility (each query's output depends only on its row)."""
    n = query.shape[2]
    keep = max(1, int(round(n * fraction)))
    start = n - keep
    if start == 0:
        return query, vis
    mask = vis.mask
    if mask is not None and mask.shape[-2] > 1:
        mask = mask[..., start:, :]
    return query[:, :, start:], Visibility(n=keep, m=vis.m, causal=vis.causal, offset=vis.offset + start,
                                           window=vis.window, mask=mask)


def record_attention_inputs(model, ids, *, layers=None, impl="auto", fraction: float = 1.0):
    """Run the model's own attention (our ``softmax``, equal to it) over each window of ``ids`` and keep every
    swapped layer's attention inputs. Returns ([(layer index, module)], recorder with ``calls[id(module)]``)."""
    from ..patches.swap import swap_attention

    device = next(model.parameters()).device
    recording = swap_attention(model, "softmax", layers=layers, impl=impl)
    modules = [(index, module) for index, (_, module, _) in zip(recording.layers, recording._targets)]
    recorder = _Recorder([m for _, m in modules], fraction)
    try:
        with torch.no_grad(), tapping(recorder):
            for row in ids:
                model(input_ids=row[None].to(device), use_cache=False)
    finally:
        recording.restore()
    return modules, recorder


def softmax_targets(calls) -> list:
    """The model's own attention outputs for recorded calls (fp32)."""
    return _outputs(registry.get("softmax"), {}, calls, 1.0)


def _outputs(kind, options, calls, scale):
    opts = dict(options)
    opts[registry.SCORE_SCALE] = scale
    outs = []
    for q, k, v, vis, scaling, softcap, sinks in calls:
        out, _ = run(kind, opts, q, k, v, vis, scaling=scaling, softcap=softcap, sinks=sinks, impl="auto")
        outs.append(out.float())
    return outs


def _errors(outs, targets) -> torch.Tensor:
    """Squared output error per query head, summed over calls, relative to the targets' energy."""
    err = sum(((o - t) ** 2).sum(dim=(0, 2, 3)) for o, t in zip(outs, targets))
    energy = sum((t ** 2).sum(dim=(0, 2, 3)) for t in targets)
    return err / energy.clamp_min(1e-30)


@torch.no_grad()
def fit_layer(kind, options, calls) -> tuple[tuple, torch.Tensor, torch.Tensor]:
    """(per-head scales, relative error per head at scale 1, at the fitted scales) for one layer's recorded calls."""
    targets = softmax_targets(calls)
    heads = calls[0][0].shape[1]
    base = _errors(_outputs(kind, options, calls, 1.0), targets)
    best_err, best = base.clone(), torch.ones(heads)
    for log2 in COARSE:
        if log2 == 0:
            continue
        err = _errors(_outputs(kind, options, calls, 2.0 ** log2), targets)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, torch.full_like(best, 2.0 ** log2),
                                                                          best)
    for pair in range(0, len(FINE), 2):
        center = best.clone()
        for log2 in FINE[pair:pair + 2]:
            scale = center * 2.0 ** log2
            err = _errors(_outputs(kind, options, calls, tuple(scale.tolist())), targets)
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, scale, best)
    return tuple(round(float(x), 6) for x in best), base, best_err


def calibrate(model, kind: str, data, *, tokenizer=None, window: int = DEFAULT_WINDOW,
              max_windows: int = DEFAULT_WINDOWS, layers=None, impl: str = "auto", progress: bool = False,
              **options):
    """Swap ``model`` to ``kind`` with a score scale per layer and query head fitted on ``data``; returns the handle.

    ``data``: token ids or text (with ``tokenizer``); ``window`` tokens per calibration sequence, at most
    ``max_windows`` of them. ``handle.calibration`` holds the fitted scales and the relative output error per layer
    before and after.
    """
    from ..patches.swap import swap_attention

    kind_obj, resolved = registry.resolve(kind, options)
    if not kind_obj.uses_scores:
        calibrated = ", ".join(n for n in registry.names() if registry.get(n).uses_scores and n != "softmax")
        raise AttnSwapError(f"kind {kind!r} has no scores, so there is no temperature to calibrate (calibrated kinds: "
                            f"{calibrated}); for linear attention use attnswap.transfer")
    if registry.SCORE_SCALE in options:
        raise AttnSwapError("calibrate fits score_scale itself; do not pass it")
    ids = calibration_windows(data, tokenizer, window=window, max_windows=max_windows)
    modules, recorder = record_attention_inputs(model, ids, layers=layers, impl=impl, fraction=QUERY_FRACTION)

    def fit(calls):
        scales, before, after = fit_layer(kind_obj, resolved, calls)
        return ({registry.SCORE_SCALE: scales},
                {"score_scale": list(scales), "error_before": before.mean().item(), "error_after": after.mean().item()})

    layer_options, report = fit_layers(modules, recorder, fit, f"calibrating {kind}", progress)
    handle = swap_attention(model, kind, layers=layers, impl=impl, layer_options=layer_options, **options)
    handle.calibration = summary("per-head score scale minimizing the relative squared attention-output error "
                                 "against the model's own softmax attention", ids, report)
    return handle


def summary(method: str, ids, report: dict, **extra) -> dict:
    """What a fit reports: its method, token budget, per-layer errors and their means."""
    return {"method": method, "tokens": int(ids.numel()), "window": ids.shape[1], **extra, "layers": report,
            "mean_error_before": _mean(r["error_before"] for r in report.values()),
            "mean_error_after": _mean(r["error_after"] for r in report.values())}


def fit_layers(modules, recorder, fit, desc: str, progress: bool):
    """``fit(calls) -> (layer options, report)`` for each recorded layer, freeing its inputs as it goes."""
    layer_options, report = {}, {}
    bar = progress_bar(len(modules), desc, progress)
    for index, module in modules:
        calls = recorder.calls[id(module)]
        if calls:
            layer_options[index], report[index] = fit(calls)
        recorder.calls[id(module)] = []
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return layer_options, report


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan
