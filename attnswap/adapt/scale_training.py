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

``calibrate`` turns on the two gains below whenever it runs this stage (``query_gain=False`` /
``output_gain=False`` leave them out): together they are the one setting measured to bring every model and kind
within the fidelity targets (README, "On text the fit never saw").

With ``query_gain`` each head also trains a gain per rotary frequency of its queries (``registry.LearnedGain``:
both coordinates of a rotated pair share one, as ``rotary_pairs`` reads the model's RoPE: ``head_dim / 2`` numbers
per head for full RoPE, all 1 at the start, at their own learning rate ``gain_lr``), so the per-head scale becomes
the special case of equal gains: a head can weigh its position-like, slow frequencies against its content ones,
which one temperature cannot.

With ``output_gain`` each head also trains a gain on its attention output (``output_gain``, a ``LearnedScale`` from
1, at ``gain_lr``): a sparse map averages fewer value vectors than softmax, so its output is larger, and one
temperature has to trade how wide a head's support is against how large its output comes out; the gain frees it
of the second.
"""

from __future__ import annotations

import torch

from ..errors import AttnSwapError
from ..registry import (LENGTH_EXPONENT, OUTPUT_GAIN, QUERY_GAIN, SCORE_SCALE, LearnedExponent, LearnedGain,
                        LearnedScale)
from .rotary_pairs import gain_index

DEFAULT_STEPS, DEFAULT_LR = 40, 0.02
DEFAULT_GAIN_LR = 0.05  # the query gains' (measured against 0.02 on SmolLM2 entmax 1.5: 1.137x vs 1.160x)


def train_scales(model, kind: str, windows: torch.Tensor, layer_options: dict, *, layers=None, impl: str = "auto",
                 steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, length_exponent: bool = False,
                 query_gain: bool = False, output_gain: bool = False, gain_lr: float = DEFAULT_GAIN_LR,
                 progress: bool = False, **options) -> tuple[dict, list[float]]:
    """Train the per-head ``score_scale`` of every layer in ``layer_options`` (the starting scales) and, with
    ``length_exponent``, its per-head ``length_exponent`` (from 0), with ``query_gain`` its per-head ``query_gain``
    and with ``output_gain`` its per-head ``output_gain`` (both from 1; at ``gain_lr``) through the whole model
    swapped to ``kind``, on ``windows`` (w, window) token ids, one window per step in turn (Adam on the log-scales,
    exponents and log-gains, warm-up then linear decay). Returns ({layer: {"score_scale": scales[, the others]}},
    the loss per step); the model is left swapped with what was trained."""
    from ..patches.swap import swap_attention
    from .finetune import DEFAULT_TOP, distill_loss, run_steps, teacher_targets

    rates_ok = all(isinstance(x, (int, float)) and x > 0 for x in (lr, gain_lr))
    if not (isinstance(steps, int) and steps >= 1) or not rates_ok:
        raise AttnSwapError(f"end-to-end calibration needs steps >= 1 and learning rates > 0, got steps={steps!r}, "
                            f"lr={lr!r}, gain_lr={gain_lr!r}")
    heads, head_dim = _query_shape(model) if query_gain or output_gain else (None, None)
    index = gain_index(model, head_dim) if query_gain else None
    learned = {}
    for layer, opts in layer_options.items():
        scales = opts[SCORE_SCALE] if isinstance(opts[SCORE_SCALE], tuple) else (opts[SCORE_SCALE],)
        learned[layer] = {SCORE_SCALE: LearnedScale(scales)}
        if length_exponent:
            learned[layer][LENGTH_EXPONENT] = LearnedExponent([0.0] * len(scales))
        if query_gain:
            learned[layer][QUERY_GAIN] = LearnedGain(heads, head_dim, index)
        if output_gain:
            learned[layer][OUTPUT_GAIN] = LearnedScale([1.0] * heads)
    handle = swap_attention(model, kind, layers=layers, impl=impl, layer_options=learned, **options)
    teacher = teacher_targets(model, handle, windows, top=DEFAULT_TOP, progress=progress)
    params = [opts[SCORE_SCALE].log_scale for opts in learned.values()]
    params += [opts[LENGTH_EXPONENT].exponent for opts in learned.values() if LENGTH_EXPONENT in opts]
    gains = [opts[QUERY_GAIN].log_gain for opts in learned.values() if QUERY_GAIN in opts]
    gains += [opts[OUTPUT_GAIN].log_scale for opts in learned.values() if OUTPUT_GAIN in opts]
    frozen = {p: p.requires_grad for p in model.parameters()}
    device = next(model.parameters()).device

    def step_loss(step):
        slot = step % windows.shape[0]
        return distill_loss(model(input_ids=windows[slot][None].to(device), use_cache=False).logits, teacher[slot])

    try:
        for p in frozen:
            p.requires_grad_(False)
        groups = [{"params": params, "lr": lr}] + ([{"params": gains, "lr": gain_lr}] if gains else [])
        optimizer = torch.optim.Adam(groups)
        losses = run_steps(step_loss, params + gains, optimizer, steps, "end-to-end scales", progress)
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    trained = {layer: {name: value.values() for name, value in opts.items()} for layer, opts in learned.items()}
    swap_attention(model, kind, layers=layers, impl=impl, layer_options=trained, **options)
    return trained, losses


def _query_shape(model) -> tuple[int, int]:
    """(query heads, head dim) from the model's config (what the gains are shaped by)."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (getattr(config, "hidden_size", 0) // heads if heads else None)
    if not heads or not head_dim:
        raise AttnSwapError("query and output gains need the model's number of attention heads and head dim, and "
                            "its config names neither (num_attention_heads, head_dim / hidden_size)")
    return heads, head_dim
