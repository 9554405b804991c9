"""transformers' AttentionInterface backend: one function per kind, registered as ``attnswap_<kind>`` in both
AttentionInterface and AttentionMaskInterface (without a mask function padding would be silently lost)."""

from __future__ import annotations

import functools
import inspect

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .. import registry
from ..dispatch import run
from .masks import model_visibility
from .state_cache import claim, state_attention

PREFIX = "attnswap_"


def implementation_name(kind: str) -> str:
    return PREFIX + kind


@functools.lru_cache(maxsize=None)
def routes_through_interface(cls) -> bool:
    """Whether an attention class's forward calls the backend transformers' AttentionInterface names."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


def spec_of(module, kind_name: str | None):
    """The swap a module carries (kind, options, native impl, impl), or the kind's defaults."""
    spec = getattr(module, "_attnswap_spec", None)
    if spec is not None:
        return spec
    kind, options = registry.resolve(kind_name, {})
    from .swap import Spec

    return Spec(kind=kind, options=options, native=None, impl="auto")


try:  # transformers' output capture (``output_attentions`` through the model's hooks)
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # older transformers
    _active_collector = None


@functools.lru_cache(maxsize=None)
def takes_output_attentions(cls) -> bool:
    """Whether an attention class's forward takes ``output_attentions`` by name, and so keeps it from the backend
    it calls (Falcon from transformers 5.25: its eager backend always returns the weights, ours only on request)."""
    try:
        return "output_attentions" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


ASKED = "_attnswap_output_attentions"  # what the module's last call was asked, where the backend cannot see it


def _note_output_attentions(module, args, kwargs):
    module.__dict__[ASKED] = bool(kwargs.get("output_attentions"))


def watch_output_attentions(module):
    """A hook that notes a module's ``output_attentions`` argument for the backend, where the module keeps it
    to itself; None where it does not (its ``remove()`` undoes it)."""
    if not takes_output_attentions(type(module)):
        return None
    return module.register_forward_pre_hook(_note_output_attentions, with_kwargs=True)


def wants_weights(module, kwargs) -> bool:
    """Whether the caller asked for attention weights: the kwarg (or the module's own ``output_attentions``
    argument), the config, or transformers' output capture. (The config's flags are read from its ``__dict__``:
    transformers' attribute hooks cost ~10 µs a call.)"""
    if kwargs.get("output_attentions") or module.__dict__.get(ASKED):
        return True
    config = getattr(module, "config", None)
    flags = object.__getattribute__(config, "__dict__") if config is not None else {}
    if flags.get("_output_attentions") or flags.get("output_attentions"):
        return True
    collecting = _active_collector.get() if _active_collector is not None else None
    return isinstance(collecting, dict) and "attentions" in collecting


def make_attention_function(kind_name: str):
    def attnswap_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        spec = spec_of(module, kind_name)
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        softcap, sinks, need_weights = kwargs.get("softcap"), kwargs.get("s_aux"), wants_weights(module, kwargs)
        layer = claim(key)  # a StateCache layer that keeps a running state instead of K/V
        if layer is not None:
            common = dict(scaling=scaling, softcap=softcap, sinks=sinks, need_weights=need_weights)
            out = state_attention(
                layer, spec, query, key, value, attention_mask, is_causal=is_causal, **common,
                run_attention=lambda vis: run(spec.kind, spec.options, query, key, value, vis, **common,
                                              dropout=dropout or 0.0, impl=spec.impl, module=module)[0])
            return out.to(query.dtype).transpose(1, 2).contiguous(), None
        vis = model_visibility(attention_mask, query, key, is_causal=is_causal, native=spec.native)
        out, weights = run(spec.kind, spec.options, query, key, value, vis, scaling=scaling, softcap=softcap,
                           sinks=sinks, need_weights=need_weights, dropout=dropout or 0.0, impl=spec.impl,
                           module=module)
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
