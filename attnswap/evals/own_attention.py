"""Attention statistics of the model's own attention (no swap), memory-bounded: the reference row of a focus sweep.

``own_attention_stats(model, input_ids)`` gives the same ``AttentionStats`` as ``attention_stats`` (the same
reduction code: ``entropy._Accumulator`` / ``_finish``), but from the weights the model's own code computes: each
attention layer's call goes to its modeling module's ``eager_attention_forward`` (transformers' reference math,
with the model's softcap, sinks, GQA repeat and mask), one block of queries at a time, so the weights held at once
are (b, H, queries per block, N) with at most ``BLOCK_ELEMENTS`` scores, never N x N (the model's own mask aside).
Only layers that route through transformers' AttentionInterface can be observed this way.
"""

from __future__ import annotations

import contextlib
import copy
import sys

import torch

from ..errors import AttnSwapError
from ..patches.masks import model_visibility
from ..patches.swap import current_swap, find_attention
from .entropy import AttentionStats, _Accumulator, _finish

IMPLEMENTATION = "attnswap_observed_own"  # avoids the substrings transformers dispatches on
BLOCK_ELEMENTS = 1 << 22  # scores per query block (16 MB in fp32)
_ACCUMULATOR: list = [None]  # the accumulator of the call in progress


def _eager_of(module):
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise AttnSwapError(f"{type(module).__name__} has no eager_attention_forward in its modeling module: its own "
                            "attention weights cannot be observed")
    return fn


def _as5(t: torch.Tensor | None) -> torch.Tensor | None:
    """A block mask as (b|1, Hkv|1, G|1, q, m): the structural one comes as (q, m)."""
    return t[None, None, None] if t is not None and t.dim() == 2 else t


def _additive(visible, bias, dtype, hkv: int, groups: int) -> torch.Tensor | None:
    """The (b|1, Hq|1, q, m) additive mask eager attention takes, from a block's visibility and bias."""
    visible, bias = _as5(visible), _as5(bias)
    if visible is None and bias is None:
        return None
    zero = torch.zeros((), dtype=dtype, device=(visible if visible is not None else bias).device)
    add = zero if bias is None else bias.to(dtype)
    if visible is not None:
        add = torch.where(visible, add, torch.full((), torch.finfo(dtype).min, dtype=dtype, device=zero.device))
    mb, mkv, mg, q, m = add.shape
    if mkv == 1 and mg == 1:
        return add[:, :, 0]
    return add.expand(mb, hkv, groups, q, m).reshape(mb, hkv * groups, q, m)


def _observed_own_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """An AttentionInterface function: the module's eager attention on blocks of queries, weights to the observer."""
    acc = _ACCUMULATOR[0]
    eager = _eager_of(module)
    native = getattr(module, "_attnswap_own_native", None)
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    b, hq, n, _ = query.shape
    hkv, m = key.shape[1], key.shape[2]
    groups = hq // hkv
    vis = model_visibility(attention_mask, query, key, is_causal=is_causal, native=native)
    step = max(1, BLOCK_ELEMENTS // max(1, b * hq * m))
    outs = []
    for q0 in range(0, n, step):
        q1 = min(n, q0 + step)
        visible, bias = vis.block(q0, q1, 0, m, device=query.device)
        mask = _additive(visible, bias, query.dtype, hkv, groups)
        out, weights = eager(module, query[:, :, q0:q1], key, value, mask, scaling=scaling, dropout=0.0, **kwargs)
        outs.append(out)
        if acc is not None:
            p = weights.detach().float().reshape(b, hkv, groups, q1 - q0, m)
            acc.block(module, p, _as5(visible), q0=q0, k0=0, rows=slice(0, b), heads=slice(0, hkv), n=n, m=m)
    return torch.cat(outs, dim=1), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, _observed_own_attention)


@contextlib.contextmanager
def _observing_own(model, targets):
    _register()
    saved = []
    try:
        for _, module, route in targets:
            config = module.config
            private = copy.copy(config)
            private.__dict__["_attn_implementation_internal"] = IMPLEMENTATION
            module._attnswap_own_native = getattr(config, "_attn_implementation", None)
            module.config = private
            saved.append((module, config))
        yield
    finally:
        for module, config in saved:
            module.config = config
            module.__dict__.pop("_attnswap_own_native", None)


def unobservable(model) -> str | None:
    """Why the model's own attention cannot be observed (a layer that does not route through transformers'
    AttentionInterface), or None when it can."""
    legacy = sorted({type(module).__name__ for _, module, route in find_attention(model) if route != "interface"})
    if legacy:
        return (f"the own attention of {', '.join(legacy)} does not route through transformers' AttentionInterface, "
                "so it cannot be observed; compare swapped kinds only")
    return None


def own_attention_stats(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> AttentionStats:
    """Per (layer, query head) statistics of the model's own attention on ``input_ids`` (b, N): see the module doc
    and ``attnswap.evals.entropy``. The model must not be swapped (restore it first)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise AttnSwapError(f"input_ids must be a (batch, seq) tensor, got {getattr(input_ids, 'shape', input_ids)!r}")
    if current_swap(model) is not None:
        raise AttnSwapError("own_attention_stats observes the model's own attention: restore its swap first")
    reason = unobservable(model)
    if reason:
        raise AttnSwapError(reason)
    targets = find_attention(model)
    layer_of = {id(module): i for i, (_, module, _) in enumerate(targets)}
    device = next(iter(model.parameters())).device
    runner = getattr(model, "base_model", None) or model
    kwargs = {"output_attentions": False}
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        kwargs["use_cache"] = False
    acc = _Accumulator(layer_of, None if attention_mask is None else attention_mask.to(device).bool(),
                       input_ids.shape[1])
    _ACCUMULATOR[0] = acc
    try:
        with _observing_own(model, targets), torch.no_grad():
            runner(input_ids=input_ids.to(device),
                   attention_mask=None if attention_mask is None else attention_mask.to(device), **kwargs)
    finally:
        _ACCUMULATOR[0] = None
    return _finish(acc.sums, len(targets), "own", {}, list(range(len(targets))))
