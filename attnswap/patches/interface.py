"""transformers' AttentionInterface backend: one function per kind, registered as ``attnswap_<kind>`` in both
AttentionInterface and AttentionMaskInterface (without a mask function padding would be silently lost)."""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .. import registry
from ..dispatch import run
from .masks import model_visibility
from .state_cache import claim, state_attention

PREFIX = "attnswap_"


def implementation_name(kind: str) -> str:
    return PREFIX + kind


def spec_of(module, kind_name: str | None):
    """The swap a module carries (kind, options, native impl, impl), or the kind's defaults."""
    spec = getattr(module, "_attnswap_spec", None)
    if spec is not None:
        return spec
    kind, options = registry.resolve(kind_name, {})
    from .swap import Spec

    return Spec(kind=kind, options=options, native=None, impl="auto")


def wants_weights(module, kwargs) -> bool:
    """Whether the caller asked for attention weights: the kwarg, the config, or transformers' output capture."""
    if kwargs.get("output_attentions"):
        return True
    config = getattr(module, "config", None)
    if getattr(config, "_output_attentions", False) or getattr(config, "output_attentions", False):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector

        collecting = _active_collector.get()
    except (ImportError, LookupError):
        return False
    return isinstance(collecting, dict) and "attentions" in collecting


def make_attention_function(kind_name: str):
    def attnswap_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        spec = spec_of(module, kind_name)
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        common = dict(scaling=query.shape[-1] ** -0.5 if scaling is None else scaling, softcap=kwargs.get("softcap"),
                      sinks=kwargs.get("s_aux"), need_weights=wants_weights(module, kwargs))
        layer = claim(key)  # a StateCache layer that keeps a running state instead of K/V
        if layer is not None:
            out = state_attention(
                layer, spec, query, key, value, attention_mask, is_causal=is_causal, **common,
                run_attention=lambda vis: run(spec.kind, spec.options, query, key, value, vis, **common,
                                              dropout=dropout or 0.0, impl=spec.impl, module=module)[0])
            return out.to(query.dtype).transpose(1, 2).contiguous(), None
        vis = model_visibility(attention_mask, query, key, is_causal=is_causal, native=spec.native)
        out, weights = run(spec.kind, spec.options, query, key, value, vis, **common, dropout=dropout or 0.0,
                           impl=spec.impl, module=module)
        return out.transpose(1, 2).contiguous(), weights

    attnswap_attention_forward.__name__ = f"attnswap_{kind_name}_attention_forward"
    return attnswap_attention_forward


def attnswap_mask(*args, **kwargs):
    """The mask our backend expects: sdpa's (bool, True = attend; None when plainly causal)."""
    return sdpa_mask(*args, **kwargs)


def _register(kind_name: str) -> None:
    name = implementation_name(kind_name)
    AttentionInterface.register(name, make_attention_function(kind_name))
    AttentionMaskInterface.register(name, attnswap_mask)


def register_all() -> None:
    from .legacy import register_loadable

    registry.on_register(_register)
    registry.on_register(register_loadable)
