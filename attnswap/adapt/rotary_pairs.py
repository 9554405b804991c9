"""Which coordinates of a query head the model's rotary position embedding turns together (for the query gains).

A gain on the queries after RoPE is the same gain before it, so the scores stay a function of relative position,
only when both coordinates of every rotated pair share one gain. Which coordinates pair depends on the model:
rotate-half RoPE (llama and most of transformers) turns ``i`` with ``i + r/2``, interleaved RoPE (GPT-J, Cohere,
GLM) ``2i`` with ``2i + 1``, and partial rotary (GPT-NeoX, Phi, StableLM) rotates only the first ``r`` of the
``head_dim`` coordinates, leaving the rest free. The pairing is read off the model's own rotation function
(``rotate_half`` / ``rotate_every_two`` of its modeling module) applied to ``0..r-1``; the rotary width from its
config. A model without either (learned or no position embedding: GPT-2, BERT) has every coordinate free.
"""

from __future__ import annotations

import sys

import torch

from ..errors import AttnSwapError

ROTATION_FUNCTIONS = ("rotate_half", "rotate_every_two")  # what transformers' modeling modules name it


def gain_index(model, head_dim: int) -> torch.Tensor:
    """(head_dim,) long: for each coordinate of a query head, which of the head's query-gain parameters it uses;
    the two coordinates of a rotated pair use the same one. Parameters are numbered 0.. in coordinate order."""
    rotate = _rotation_function(model)
    config = _text_config(model)
    width = rotary_width(config, head_dim) if rotate is not None or _has_rope(config) else 0
    partner = list(range(head_dim))
    if width:
        partner[:width] = _pairs(rotate, width) if rotate is not None else _half_pairs(width)
    index, seen = [], {}
    for i, j in enumerate(partner):
        key = min(i, j)
        index.append(seen.setdefault(key, len(seen)))
    return torch.tensor(index, dtype=torch.long)


def rotary_width(config, head_dim: int) -> int:
    """How many leading coordinates of a head RoPE rotates: ``head_dim`` unless the config says a fraction
    (``partial_rotary_factor``, in ``rope_parameters`` or on the config; ``rotary_pct``) or a width
    (``rotary_dim``)."""
    width = getattr(config, "rotary_dim", None)
    if width is None:
        factor = _partial_factor(getattr(config, "rope_parameters", None))
        if factor is None:
            factor = getattr(config, "partial_rotary_factor", None) or getattr(config, "rotary_pct", None)
        width = int(head_dim * factor) if factor is not None else head_dim
    if not 0 < width <= head_dim or width % 2:
        raise AttnSwapError(f"the model's rotary width {width} does not fit its head dim {head_dim} (it must be "
                            f"even and at most the head dim): query gains cannot pair its rotated coordinates")
    return width


def _partial_factor(params):
    """``partial_rotary_factor`` of a ``rope_parameters`` dict, or of its per-layer-type dicts (all the same)."""
    if not isinstance(params, dict):
        return None
    if "partial_rotary_factor" in params:
        return params["partial_rotary_factor"]
    found = {p.get("partial_rotary_factor") for p in params.values() if isinstance(p, dict)}
    if len(found) > 1:
        raise AttnSwapError(f"the model's layer types rotate different fractions of a head ({sorted(found, key=str)}); "
                            f"query gains take one pairing for every layer")
    return found.pop() if found else None


def _pairs(rotate, width: int) -> list[int]:
    """The partner of each of the first ``width`` coordinates, read off ``rotate`` applied to 1..width."""
    out = rotate(torch.arange(1.0, width + 1).view(1, 1, 1, width)).reshape(-1)
    partner = [int(abs(x)) - 1 for x in out.tolist()]
    pairing = sorted(partner) == list(range(width)) and all(partner[partner[i]] == i != partner[i]
                                                            for i in range(width))
    if not pairing:
        raise AttnSwapError(f"the model's rotation function {rotate.__name__} does not turn the coordinates of a "
                            f"head in pairs ({partner[:16]}...): query gains cannot commute with it")
    return partner


def _half_pairs(width: int) -> list[int]:
    """Rotate-half pairing (``i`` with ``i + width/2``), for a model with RoPE but no rotation function to read."""
    half = width // 2
    return [i + half if i < half else i - half for i in range(width)]


def _rotation_function(model):
    """The model's ``rotate_half`` / ``rotate_every_two``: from the first module of the model (itself, then its
    submodules, so a wrapper's model is found too) whose class's Python module defines one; None if none does."""
    names = dict.fromkeys(type(m).__module__ for m in (model.modules() if hasattr(model, "modules") else [model]))
    for module in filter(None, map(sys.modules.get, names)):
        for name in ROTATION_FUNCTIONS:
            fn = getattr(module, name, None)
            if callable(fn):
                return fn
    return None


def _has_rope(config) -> bool:
    return bool(getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None))


def _text_config(model):
    config = getattr(model, "config", None)
    return getattr(config, "get_text_config", lambda: config)()
