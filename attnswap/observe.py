"""Looking at attention weights as they are computed, block by block, without keeping them.

``with observing(observer): model(...)`` makes every swapped attention call hand its weight blocks to
``observer.block(module, p, visible, q0=, k0=, rows=, heads=, n=, m=)``: ``p`` is fp32
(b', Hkv', G, q1-q0, k1-k0), rows complete over the visible keys (sink column removed), ``visible`` bool
broadcastable to it or None (all visible). Feature-map kinds use their quadratic form while observed; the
Triton kernels step aside for the reference.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

_observer: ContextVar = ContextVar("attnswap_observer", default=None)


def current_observer():
    return _observer.get()


@contextlib.contextmanager
def observing(observer):
    token = _observer.set(observer)
    try:
        yield observer
    finally:
        _observer.reset(token)


_tap: ContextVar = ContextVar("attnswap_tap", default=None)


def current_tap():
    return _tap.get()


@contextlib.contextmanager
def tapping(fn):
    """``fn(module, query, key, value, vis, *, scaling, softcap, sinks)`` sees the inputs of every swapped attention
    call (after the score scale) before it runs: calibration records them this way."""
    token = _tap.set(fn)
    try:
        yield fn
    finally:
        _tap.reset(token)
