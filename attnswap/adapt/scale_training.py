"""End-to-end training of per-head score scales (the second stage of ``attnswap.calibrate(..., end_to_end=True)``).

The layer-wise search fits each layer's scales to its own output, one layer at a time; errors it leaves compound
through the model. This stage starts from those scales and trains them all at once, through the whole swapped
model, on the distillation loss of ``finetune`` (KL from the model's own next-token distribution, with its own
attention, to the swapped model's): a few hundred parameters (one log-scale per layer and query head), every
model weight frozen, so it is a short run on a CPU. The scales are trained as ``registry.LearnedScale`` options of
the swap and come back as plain numbers.
"""

from __future__ import annotations

import torch

from ..errors import AttnSwapError
from ..registry import SCORE_SCALE, LearnedScale

DEFAULT_STEPS, DEFAULT_LR = 40, 0.02


def train_scales(model, kind: str, windows: torch.Tensor, layer_options: dict, *, layers=None, impl: str = "auto",
                 steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, progress: bool = False,
                 **options) -> tuple[dict, list[float]]:
    """Train the per-head ``score_scale`` of every layer in ``layer_options`` (the starting scales) through the
    whole model swapped to ``kind``, on ``windows`` (w, window) token ids, one window per step in turn (Adam on the
    log-scales, warm-up then linear decay). Returns ({layer: {"score_scale": scales}}, the loss per step); the
    model is left swapped with the trained scales."""
    from ..patches.swap import swap_attention
    from .finetune import DEFAULT_TOP, distill_loss, run_steps, teacher_targets

    if not (isinstance(steps, int) and steps >= 1) or not (isinstance(lr, (int, float)) and lr > 0):
        raise AttnSwapError(f"end-to-end calibration needs steps >= 1 and lr > 0, got steps={steps!r}, lr={lr!r}")
    learned = {layer: LearnedScale(opts[SCORE_SCALE]) for layer, opts in layer_options.items()}
    handle = swap_attention(model, kind, layers=layers, impl=impl,
                            layer_options={layer: {SCORE_SCALE: s} for layer, s in learned.items()}, **options)
    teacher = teacher_targets(model, handle, windows, top=DEFAULT_TOP, progress=progress)
    params = [s.log_scale for s in learned.values()]
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
    trained = {layer: {SCORE_SCALE: s.values()} for layer, s in learned.items()}
    swap_attention(model, kind, layers=layers, impl=impl, layer_options=trained, **options)
    return trained, losses
