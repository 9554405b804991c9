"""Swapping attention in a model in place, per layer, reversibly and exactly.

Layers that route through transformers' AttentionInterface get a private shallow copy of their config whose
``_attn_implementation`` names the attnswap backend; the model's own config, and so its masks and every layer
left alone, are untouched. Legacy families get an instance-level method patch. Restoring puts back the exact
objects, so the restored model is bit-identical to the untouched one.
"""

from __future__ import annotations

import contextlib
import copy
import numbers
from dataclasses import dataclass

import torch

from .. import registry
from ..dispatch import IMPLS
from ..errors import AttnSwapError, UnsupportedModelError
from ..registry import Kind
from . import legacy, state_cache
from .interface import ASKED, implementation_name, routes_through_interface, watch_output_attentions


@dataclass
class Spec:
    kind: Kind
    options: dict
    native: str | None  # the implementation the layer had (its mask convention)
    impl: str = "auto"


def find_attention(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str]]:
    """Every swappable attention module, in model order: (qualified name, module, "interface" | "legacy")."""
    if not isinstance(model, torch.nn.Module):
        raise AttnSwapError(f"swap_attention needs a torch.nn.Module (a transformers model), got {type(model).__name__}")
    found, unsupported = [], []
    covered: set[int] = set()
    for name, module in model.named_modules():
        if legacy.patch_for(module) is not None:
            found.append((name, module, "legacy"))
        elif routes_through_interface(type(module)) and hasattr(module, "config"):
            found.append((name, module, "interface"))
        else:
            continue
        covered.add(id(module))
    for name, module in model.named_modules():
        if "Attention" in type(module).__name__ and id(module) not in covered:
            if not any(id(sub) in covered for sub in module.modules()):
                unsupported.append((name, module))
    family = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    if unsupported:
        classes = sorted({type(m).__name__ for _, m in unsupported})
        raise UnsupportedModelError(
            f"attnswap cannot swap the attention of model family {family!r} ({', '.join(classes)}): it neither "
            "routes through transformers' AttentionInterface nor has an attnswap class patch (patched legacy "
            f"families: {', '.join(legacy.FAMILIES)}; flash-attention variants of them are not patched)"
        )
    if not found:
        raise UnsupportedModelError(f"model {family!r} has no attention layers attnswap can swap")
    return found


def _layer_types(model) -> list | None:
    """The config's ``layer_types`` (e.g. ``sliding_attention`` / ``full_attention``), from the text config."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "layer_types", None)


def _select_layers(layers, count: int, layer_types=None) -> list[int]:
    if layers is None:
        return list(range(count))
    if isinstance(layers, str):  # a layer type named by the config, e.g. "full_attention"
        if not layer_types or len(layer_types) != count:
            raise AttnSwapError(f"layers={layers!r} names a layer type, but this model's config gives no layer_types "
                                f"for its {count} attention layers; pass layer indices")
        chosen = [i for i, name in enumerate(layer_types) if name == layers]
        if not chosen:
            raise AttnSwapError(f"no attention layer has type {layers!r}; this model's layer types: "
                                f"{', '.join(sorted(set(layer_types)))} (or pass layer indices)")
        return chosen
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        layers = [layers]
    try:
        chosen = list(layers)
    except TypeError:
        raise AttnSwapError(f"layers must be None or an iterable of layer indices, got {layers!r}") from None
    for i in chosen:
        if not isinstance(i, numbers.Integral) or isinstance(i, bool):
            raise AttnSwapError(f"layer indices must be integers, got {i!r} ({type(i).__name__})")
        if not 0 <= i < count:
            raise AttnSwapError(f"layer index {i!r} is out of range: this model has {count} attention layers, "
                                f"valid indices are 0..{count - 1}")
    return sorted(set(int(i) for i in chosen))


class SwapHandle:
    """What ``swap_attention`` did to a model; ``restore()`` (or leaving a ``with`` block) undoes it."""

    def __init__(self, model, kind: Kind, options: dict, layers: list[int], impl: str, targets: list,
                 layer_options: dict | None = None):
        self.model, self.kind, self.options, self.layers, self.impl = model, kind, options, layers, impl
        self.layer_options = dict(layer_options or {})  # layer -> resolved options where they differ (calibration)
        self._targets = [targets[i] for i in layers]
        self._entries = []  # (module, route, saved, hook) while active
        self._generation_cache = None  # what install_generation_cache saved
        self.adapters = None  # LoRA adapters trained for this swap (attnswap.finetune): in the model while active
        self.active = False

    @property
    def kind_name(self) -> str:
        return self.kind.name

    def _activate(self) -> None:
        restore_attention(self.model)
        for index, (_, module, route) in zip(self.layers, self._targets):
            native = getattr(getattr(module, "config", None), "_attn_implementation", None)
            hook = None
            if route == "interface":
                saved = module.config
                private = copy.copy(saved)
                private.__dict__["_attn_implementation_internal"] = implementation_name(self.kind.name)
                module.config = private
                hook = watch_output_attentions(module)
            else:
                saved, fn = legacy.patch_for(module)
                legacy.apply(module, saved, fn)
            options = self.layer_options.get(index, self.options)
            module._attnswap_spec = Spec(kind=self.kind, options=options, native=native, impl=self.impl)
            self._entries.append((module, route, saved, hook))
        if self.kind.decodes_with_state:  # generate() keeps a running state instead of K/V
            self._generation_cache = state_cache.install_generation_cache(self.model)
        if self.adapters is not None:
            self.adapters.attach()
        self.active = True
        self.model._attnswap_handle = self

    def restore(self) -> None:
        if not self.active:
            return
        for module, route, saved, hook in self._entries:
            if route == "interface":
                module.config = saved
            else:
                legacy.remove(module, saved)
            if hook is not None:
                hook.remove()
            module.__dict__.pop("_attnswap_spec", None)
            module.__dict__.pop(ASKED, None)
        self._entries = []
        if self.adapters is not None:  # kept on the handle: activating it again puts them back
            self.adapters.remove()
        state_cache.remove_generation_cache(self.model, self._generation_cache)
        self._generation_cache = None
        self.active = False
        if getattr(self.model, "_attnswap_handle", None) is self:
            del self.model._attnswap_handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()

    def options_of(self, layer: int) -> dict:
        """The resolved options layer ``layer`` runs with (calibrated ones included)."""
        if layer not in self.layers:
            raise AttnSwapError(f"layer {layer} is not swapped; swapped layers: {self.layers}")
        return dict(self.layer_options.get(layer, self.options))

    def __repr__(self):
        state = "active" if self.active else "restored"
        tuned = f", {len(self.layer_options)} layers with their own options" if self.layer_options else ""
        return f"SwapHandle(kind={self.kind.name!r}, options={self.options}, layers={self.layers}{tuned}, {state})"


def swap_attention(model: torch.nn.Module, kind: str, *, layers=None, impl: str = "auto", layer_options=None,
                   **options) -> SwapHandle:
    """Swap the attention of ``model`` (in place) for ``kind`` with ``options``; returns a handle that undoes it.

    ``layers``: indices of the attention layers to swap (model order), or a layer type the config's
    ``layer_types`` names (``"full_attention"``: only Gemma's / Mistral's global layers); the rest keep the model's
    own attention. ``layer_options``: {layer: {option: value}} for layers that differ from ``options`` (e.g. a per-head
    ``score_scale``). Swapping a swapped model replaces the earlier swap. (The public ``attnswap.swap_attention``
    adds ``calibrate=``, which lives above this layer, in ``attnswap.adapt``.)
    """
    kind_obj, resolved = registry.resolve(kind, options)
    if impl not in IMPLS:
        raise AttnSwapError(f"impl must be one of {list(IMPLS)}, got {impl!r}")
    targets = find_attention(model)
    chosen = _select_layers(layers, len(targets), _layer_types(model))
    per_layer = {}
    for index, extra in (layer_options or {}).items():
        if index not in chosen:
            raise AttnSwapError(f"layer_options names layer {index!r}, which is not swapped; swapped layers: {chosen}")
        per_layer[int(index)] = kind_obj.resolve({**options, **extra})
    handle = SwapHandle(model, kind_obj, resolved, chosen, impl, targets, per_layer)
    handle._activate()
    return handle


def restore_attention(model: torch.nn.Module) -> None:
    """Undo the current swap of ``model`` (no-op when it is not swapped); logits are then bit-identical."""
    handle = getattr(model, "_attnswap_handle", None)
    if handle is not None:
        handle.restore()


def current_swap(model: torch.nn.Module) -> SwapHandle | None:
    return getattr(model, "_attnswap_handle", None)


@contextlib.contextmanager
def swapped(model: torch.nn.Module, kind: str, *, layers=None, impl: str = "auto", **options):
    """``with swapped(model, "linear"): ...`` swaps for the block, then puts back the swap that was there before
    (the same handle, which stays usable), or the model's own attention."""
    previous = current_swap(model)
    handle = swap_attention(model, kind, layers=layers, impl=impl, **options)
    try:
        yield handle
    finally:
        handle.restore()
        if previous is not None:
            previous._activate()
