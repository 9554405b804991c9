"""Attention focus versus context length: the attention statistics of ``attnswap.evals.entropy`` over a sweep of
context lengths, per attention and layer.

    rows = focus_sweep(model, ids, contexts=(512, 2048, 8192), stats={"softmax": lambda ids: attention_stats(...)})

For each context length N the first N tokens of the text are run once per attention; each row holds, for one
(attention, N), the overall mean of every statistic (entropy, normalized entropy, Gini, max weight, effective
tokens, sparsity) and its per-layer means. The model's own attention comes from ``own_attention_stats`` (the
model's eager math, observed block by block), the kinds from ``attention_stats``: both reduce weight blocks as they
are computed, so no N x N tensor is held (the model's own mask aside). It answers whether an attention disperses as
N grows (entropy up with log N, max weight and effective tokens following) or stays focused.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

import torch

from ..errors import AttnSwapError
from .entropy import METRICS, AttentionStats
from .retrieval import check_grid, max_positions

__all__ = ["DEFAULT_CONTEXTS", "PLOTTED", "default_contexts", "focus_row", "focus_sweep"]

DEFAULT_CONTEXTS = (512, 2048, 8192)
PLOTTED = ("entropy", "normalized_entropy", "effective_tokens", "max_weight", "sparsity")


def default_contexts(model) -> list[int]:
    """``DEFAULT_CONTEXTS`` up to the model's maximum (that maximum alone when every default is above it)."""
    limit = max_positions(model)
    return [n for n in DEFAULT_CONTEXTS if limit is None or n <= limit] or [limit]


def focus_row(label: str, context: int, stats: AttentionStats, seconds: float | None = None) -> dict:
    """One JSON row: the overall means at the top level, per-layer means under ``per_layer``."""
    return {"attention": label, "context": context, "kind": stats.kind, "options": stats.options,
            "layers": stats.layers, **stats.summary(),
            "per_layer": {name: stats.layer_means(name) for name in METRICS}, "seconds": seconds}


def focus_sweep(model, input_ids: torch.Tensor, *, contexts: Iterable[int] | None = None,
                stats: Mapping[str, Callable[[torch.Tensor], AttentionStats]],
                on_record: Callable[[dict], object] | None = None,
                progress: Callable[[int], object] | None = None) -> list[dict]:
    """One row per (context, attention), contexts ascending: ``stats[label](ids[:, :N])`` for each label.

    ``input_ids`` (1, T) the text's tokens (T at least the largest context); ``contexts`` default
    ``default_contexts(model)``, given ones above the model's maximum are an error. ``on_record(row)`` as each row is
    measured, ``progress(1)`` after each (context, attention)."""
    if contexts is None:
        contexts = default_contexts(model)
    contexts, _ = check_grid(contexts, [0], 1, limit=max_positions(model), what="focus")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise AttnSwapError(f"focus: input_ids must have shape (1, T), got {getattr(input_ids, 'shape', input_ids)!r}")
    if max(contexts) > input_ids.shape[1]:
        raise AttnSwapError(f"focus: the text has {input_ids.shape[1]} tokens, fewer than the longest context "
                            f"{max(contexts)}; give a longer text or shorter contexts")
    if not stats:
        raise AttnSwapError("focus: nothing to measure: give at least one attention")
    rows = []
    for context in sorted(contexts):
        ids = input_ids[:, :context]
        for label, measure in stats.items():
            start = time.perf_counter()
            result = measure(ids)
            row = focus_row(label, context, result, time.perf_counter() - start)
            rows.append(row)
            if on_record is not None:
                on_record(row)
            if progress is not None:
                progress(1)
    return rows
