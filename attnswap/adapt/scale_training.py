"""End-to-end training of per-head score scales (the second stage of ``attnswap.calibrate(..., end_to_end=True)``).

The layer-wise search fits each layer's scales to its own output, one layer at a time; errors it leaves compound
through the model. This stage starts from those scales and trains them all at once, through the whole swapped
model, on the distillation loss of ``finetune`` (KL from the model's own next-token distribution, with its own
attention, to the swapped model's): a few hundred parameters (one log-scale per layer and query head), every
model weight frozen, so it is a short run on a CPU. The scales are trained as ``registry.LearnedScale`` options of
the swap and come back as plain numbers.

With ``length_exponent`` each head also trains an exponent ``e`` by which its scale grows with the number ``n`` of
keys a query sees, ``scale * (n / 256) ** e`` (starting at 0: the layer-wise scale at every length). Softmax
spreads its weight over more keys as the context grows while a sparse map at a fixed temperature keeps about the
same support. Measured (README, "On text the fit never saw"): it helps SmolLM2 (calibrated ``entmax`` 1.5 1.194x
-> 1.146x of the model's own perplexity, ``sparsemax`` 1.727x -> 1.658x) and hurts Gemma 3 (``sparsemax`` 1.525x
-> 1.621x; ``entmax``'s end-to-end stage no longer beat the layer-wise one on the held-back windows), so it is
off by default.
"""

from __future__ import annotations

import torch

from ..errors import AttnSwapError
from ..registry import LENGTH_EXPONENT, SCORE_SCALE, LearnedExponent, LearnedScale

DEFAULT_STEPS, DEFAULT_LR = 40, 0.02


def train_scales(model, kind: str, windows: torch.Tensor, layer_options: dict, *, layers=None, impl: str = "auto",
                 steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, length_exponent: bool = False,
                 progress: bool = False, **options) -> tuple[dict, list[float]]:
    """Train the per-head ``score_scale`` of every layer in ``layer_options`` (the starting scales) and, with
    ``length_exponent``, its per-head ``length_exponent`` (from 0) through the whole model swapped to ``kind``, on
    ``windows`` (w, window) token ids, one window per step in turn (Adam on the log-scales and exponents, warm-up
    then linear decay). Returns ({layer: {"score_scale": scales[, "length_exponent": exponents]}}, the loss per
    step); the model is left swapped with what was trained."""
    from ..patches.swap import swap_attention
    from .finetune import DEFAULT_TOP, distill_loss, run_steps, teacher_targets

    if not (isinstance(steps, int) and steps >= 1) or not (isinstance(lr, (int, float)) and lr > 0):
        raise AttnSwapError(f"end-to-end calibration needs steps >= 1 and lr > 0, got steps={steps!r}, lr={lr!r}")
    learned = {}
    for layer, opts in layer_options.items():
        scales = opts[SCORE_SCALE] if isinstance(opts[SCORE_SCALE], tuple) else (opts[SCORE_SCALE],)
        learned[layer] = {SCORE_SCALE: LearnedScale(scales)}
        if length_exponent:
            learned[layer][LENGTH_EXPONENT] = LearnedExponent([0.0] * len(scales))
    handle = swap_attention(model, kind, layers=layers, impl=impl, layer_options=learned, **options)
    teacher = teacher_targets(model, handle, windows, top=DEFAULT_TOP, progress=progress)
    params = [value.log_scale if isinstance(value, LearnedScale) else value.exponent
              for opts in learned.values() for value in opts.values()]
    frozen = {p: p.requires_grad for p in model.parameters()}
    device = next(model.parameters()).device

    def step_loss(step):
        slot = step % windows.shape[0]
        return distill_loss(model(input_ids=windows[slot][None].to(device), use_cache=False).logits, teacher[slot])

    try:
        for p in frozen:
            p.requires_grad_(False)
        losses = run_steps(step_loss, params, torch.optim.Adam(params, lr=lr), steps, "end-to-end scales", progress)
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    trained = {layer: {name: value.values() for name, value in opts.items()} for layer, opts in learned.items()}
    swap_attention(model, kind, layers=layers, impl=impl, layer_options=trained, **options)
    return trained, losses
