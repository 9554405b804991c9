"""Rewinding a decoding cache to an earlier point, so several continuations can be scored from one prefill.

    mark = CacheMark(cache)      # after the prefix
    model(candidate_a, cache=cache); mark.rewind()
    model(candidate_b, cache=cache); mark.rewind()

Works for the caches ``attnswap.patches.state_cache.new_cache`` builds: a transformers ``DynamicCache`` (its layers
replace their K/V tensors on ``update`` (``torch.cat``), so keeping references is enough and costs nothing) and a
``StateCache`` (its running states are updated in place, so they are cloned: a constant size, small next to K/V).
"""

from __future__ import annotations

import torch

from ..patches.state_cache import StateLayer


class CacheMark:
    """A snapshot of every layer of ``cache`` as it is now; ``rewind()`` puts them back (any number of times)."""

    def __init__(self, cache):
        self.cache = cache
        self._layers = [(layer, self._snapshot(layer)) for layer in getattr(cache, "layers", [])]

    @staticmethod
    def _snapshot(layer) -> dict:
        in_place = isinstance(layer, StateLayer)  # running states grow with += ; K/V layers get new tensors
        return {name: (value.clone() if in_place and isinstance(value, torch.Tensor) else value)
                for name, value in vars(layer).items()}

    def rewind(self) -> None:
        for layer, saved in self._layers:
            state = vars(layer)
            state.clear()
            state.update({name: (value.clone() if isinstance(layer, StateLayer) and isinstance(value, torch.Tensor)
                                 else value) for name, value in saved.items()})
