"""Training-free calibration of a score-based kind (``entmax``, ``sparsemax``, ``topk``, ``taylor``, user kinds):
one score scale (an inverse temperature) per layer and query head, fitted so that the kind's attention output
matches the model's own softmax attention on a few calibration windows.

Why the output and not the weights: the next layer only sees the output, and KL(softmax || kind) is infinite for
the sparse kinds (they give exact zeros where softmax does not). The fit is a search, not a gradient: for each layer
the attention inputs (q, k, v, mask) are recorded once under the model's own attention, then every candidate scale
reruns just that layer's attention (chunked, no N x N tensor beyond a block) on the last half of each window's
queries and keeps, per head, the scale with the least squared output error (a coarse grid of 15 scales from 1/16 to
8, then three rounds of finer steps around each head's best). Nothing flows through the whole model, so it takes seconds to a minute on a CPU.

A fit can match the windows it saw and still hurt elsewhere, so part of the data is held back (``holdout``, half
the windows by default) and checked twice: per layer and head, a fitted scale is kept only if it lowers that head's
output error on the held-back windows (else the head keeps scale 1); then, for the whole model, each stage (no
scales, the layer-wise scales and, with ``end_to_end``, the scales trained through the whole model by
``scale_training``) is scored by its next-token loss on the held-back windows and the lowest stays: a
calibration that does not help is dropped. The report says which heads and which stage were kept.

The scales become the swap's per-layer option ``score_scale`` (``handle.options_of(layer)``), and the end-to-end
stage's growth of each scale with the number of keys a query sees its ``length_exponent``, its per-frequency
query gains its ``query_gain`` (applied by every path - reference, Triton kernels, ``StateCache`` decoding - on the
queries) and its per-head output gains its ``output_gain`` (on each head's output).
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
COARSE = tuple(x / 2 for x in range(-8, 7))  # scales 1/16 .. 8
FINE = (-0.25, 0.25, -0.125, 0.125, -0.0625, 0.0625)  # each step re-centred on the best so far
DEFAULT_WINDOW, DEFAULT_WINDOWS = 512, 4
HOLDOUT = 0.5  # the fraction of the windows held back to check the fit on
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


def split_windows(ids: torch.Tensor, holdout: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(windows to fit on, windows held back to check the fit on, or None when ``holdout`` is 0): the last
    ``holdout`` of the windows (at least one) are held back."""
    if not 0.0 <= holdout < 1.0:
        raise AttnSwapError(f"holdout (the fraction of the windows held back to check the fit) must be in [0, 1), "
                            f"got {holdout!r}")
    if holdout == 0.0:
        return ids, None
    if ids.shape[0] < 2:
        raise AttnSwapError(f"calibration with a held-back check needs at least two windows of {ids.shape[1]} "
                            f"tokens (one to fit, one to check), got {ids.shape[0]}: give more text, a smaller "
                            "window, or holdout=0 to skip the check")
    held = min(ids.shape[0] - 1, max(1, int(round(ids.shape[0] * holdout))))
    return ids[:-held], ids[-held:]


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
def fit_layer(kind, options, calls, held=None) -> tuple[tuple, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-head scales, relative error per head at scale 1, at the scales, which heads kept their fitted scale)
    for one layer's recorded calls. With ``held`` (calls of held-back windows) a head keeps its fitted scale only
    if that lowers its error there (else scale 1), and the errors are the held-back ones."""
    scales, base, best_err = _search(kind, options, calls)
    kept = torch.ones(len(scales), dtype=torch.bool)
    if held:
        targets = softmax_targets(held)
        base = _errors(_outputs(kind, options, held, 1.0), targets)
        fitted = _errors(_outputs(kind, options, held, scales), targets)
        kept = fitted < base
        best_err = torch.where(kept, fitted, base)
        scales = tuple(x if keep else 1.0 for x, keep in zip(scales, kept.tolist()))
    return scales, base, best_err, kept


def _search(kind, options, calls) -> tuple[tuple, torch.Tensor, torch.Tensor]:
    """The scale search on ``calls``: (per-head scales, relative error per head at scale 1, at the scales)."""
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
              max_windows: int = DEFAULT_WINDOWS, holdout: float = HOLDOUT, end_to_end: bool = False,
              end_to_end_steps: int | None = None, end_to_end_lr: float | None = None, length_exponent: bool = False,
              query_gain: bool | None = None, output_gain: bool | None = None, layers=None, impl: str = "auto",
              progress: bool = False, **options):
    """Swap ``model`` to ``kind`` with a score scale per layer and query head fitted on ``data``; returns the handle.

    ``data``: token ids or text (with ``tokenizer``); ``window`` tokens per calibration sequence, at most
    ``max_windows`` of them, of which the last ``holdout`` (a fraction, at least one window; 0: none) are held back
    to check the fit on (see the module docstring). ``end_to_end``: then train the scales through the whole model
    on the fit windows (``scale_training.train_scales``; ``end_to_end_steps``, ``end_to_end_lr``), with
    ``length_exponent`` also a per-head growth of each scale with the number of keys a query sees, with
    ``query_gain`` also a gain per rotary frequency of each head's queries, with ``output_gain`` a gain on each
    head's output (``scale_training``). The two gains are trained whenever ``end_to_end`` is (their default None
    means "with end_to_end"; ``False`` leaves one out): they are what brings every measured model and kind within
    the fidelity targets (README, "On text the fit never saw").
    ``handle.calibration`` holds the scales, which heads kept a fitted scale, the relative output error per layer
    before and after (on the held-back windows when there are any) and, with held-back windows, the next-token
    loss there of each stage (``"uncalibrated"``, ``"layer-wise"``, ``"end-to-end"``) and the one kept (``kept``:
    the lowest; without held-back windows the last stage).
    """
    from ..patches.swap import swap_attention
    from .scale_training import DEFAULT_LR, DEFAULT_STEPS, train_scales

    kind_obj, resolved = registry.resolve(kind, options)
    if not kind_obj.uses_scores:
        calibrated = ", ".join(n for n in registry.names() if registry.get(n).uses_scores and n != "softmax")
        raise AttnSwapError(f"kind {kind!r} has no scores, so there is no temperature to calibrate (calibrated kinds: "
                            f"{calibrated}); for linear attention use attnswap.transfer")
    if registry.SCORE_SCALE in options:
        raise AttnSwapError("calibrate fits score_scale itself; do not pass it")
    extras = {registry.LENGTH_EXPONENT: length_exponent, registry.QUERY_GAIN: query_gain,
              registry.OUTPUT_GAIN: output_gain}
    for name, wanted in extras.items():
        if wanted is not None and not isinstance(wanted, bool):  # a value: a swap takes given values
            raise AttnSwapError(f"calibrate's {name} is True or False (whether the end-to-end stage trains it; None: "
                                f"the default), got {wanted!r:.80}; to use values of your own, "
                                f"swap_attention(model, kind, {name}=...)")
        if wanted and not end_to_end:
            raise AttnSwapError(f"{name} is trained by the end-to-end stage: pass end_to_end=True with it")
    for name in (registry.QUERY_GAIN, registry.OUTPUT_GAIN):  # on by default with the end-to-end stage
        extras[name] = bool(end_to_end) if extras[name] is None else extras[name]
    ids = calibration_windows(data, tokenizer, window=window, max_windows=max_windows)
    fit_ids, check_ids = split_windows(ids, holdout)
    modules, recorder = record_attention_inputs(model, fit_ids, layers=layers, impl=impl, fraction=QUERY_FRACTION)
    held = None
    if check_ids is not None:
        held = record_attention_inputs(model, check_ids, layers=layers, impl=impl, fraction=QUERY_FRACTION)[1]

    def fit(calls, held_calls=None):
        scales, before, after, kept = fit_layer(kind_obj, resolved, calls, held_calls)
        return ({registry.SCORE_SCALE: scales},
                {"score_scale": list(scales), "heads_kept": int(kept.sum()), "error_before": before.mean().item(),
                 "error_after": after.mean().item()})

    layer_options, report = fit_layers(modules, recorder, fit, f"calibrating {kind}", progress, held=held)
    stages = {"uncalibrated": {}, "layer-wise": layer_options}
    extra = {}
    if end_to_end:
        steps = DEFAULT_STEPS if end_to_end_steps is None else end_to_end_steps
        lr = DEFAULT_LR if end_to_end_lr is None else end_to_end_lr
        stages["end-to-end"], losses = train_scales(model, kind, fit_ids, layer_options, layers=layers, impl=impl,
                                                    steps=steps, lr=lr, progress=progress, **extras, **options)
        extra["end_to_end"] = {"steps": steps, "lr": lr, **extras, "loss_first": losses[0], "loss_last": losses[-1]}
        for index, opts in stages["end-to-end"].items():
            report[index]["end_to_end_scale"] = list(opts[registry.SCORE_SCALE])
            if registry.LENGTH_EXPONENT in opts:
                report[index]["length_exponent"] = list(opts[registry.LENGTH_EXPONENT])
            if registry.OUTPUT_GAIN in opts:
                report[index]["output_gain"] = list(opts[registry.OUTPUT_GAIN])
            if registry.QUERY_GAIN in opts:  # the spread of each head's gains (the gains are in the options)
                report[index]["query_gain_spread"] = [round(float(torch.tensor(row).std()), 4)
                                                      for row in opts[registry.QUERY_GAIN]]
    chosen = list(stages)[-1]
    if check_ids is not None:  # the whole model on the held-back windows: the stage with the lowest loss stays
        losses = {}
        for name, stage_options in stages.items():
            swap_attention(model, kind, layers=layers, impl=impl, layer_options=stage_options, **options)
            losses[name] = next_token_loss(model, check_ids)
        chosen = min(losses, key=losses.get)  # the first of equals: never a fitted stage that does not help
        extra.update(held_out_tokens=int(check_ids.numel()), held_out_loss=losses)
    handle = swap_attention(model, kind, layers=layers, impl=impl, layer_options=stages[chosen], **options)
    handle.calibration = summary("per-head score scale minimizing the relative squared attention-output error "
                                 "against the model's own softmax attention"
                                 + (", then trained end to end on the model's next-token distribution"
                                    if end_to_end else ""), fit_ids, report, kept=chosen, **extra)
    return handle


@torch.no_grad()
def next_token_loss(model, ids: torch.Tensor) -> float:
    """The model's mean next-token loss (nats per token) over the windows ``ids`` (w, window), as it is swapped."""
    device = next(model.parameters()).device
    total = 0.0
    for row in ids:
        row = row[None].to(device)
        total += float(model(input_ids=row, labels=row, use_cache=False).loss)
    return total / ids.shape[0]


def summary(method: str, ids, report: dict, **extra) -> dict:
    """What a fit reports: its method, token budget, per-layer errors and their means."""
    return {"method": method, "tokens": int(ids.numel()), "window": ids.shape[1], **extra, "layers": report,
            "mean_error_before": _mean(r["error_before"] for r in report.values()),
            "mean_error_after": _mean(r["error_after"] for r in report.values())}


def fit_layers(modules, recorder, fit, desc: str, progress: bool, held=None):
    """``fit(calls) -> (layer options, report)`` for each recorded layer, freeing its inputs as it goes; with
    ``held`` (a recorder of held-back windows) ``fit(calls, held calls)``."""
    layer_options, report = {}, {}
    bar = progress_bar(len(modules), desc, progress)
    for index, module in modules:
        calls = recorder.calls[id(module)]
        if calls:
            layer_options[index], report[index] = (fit(calls) if held is None else
                                                   fit(calls, held.calls[id(module)]))
        recorder.calls[id(module)] = []
        if held is not None:
            held.calls[id(module)] = []
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return layer_options, report


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan
