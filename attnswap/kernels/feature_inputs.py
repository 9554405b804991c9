"""What the chunk-parallel engine (``linear_parallel``) takes of a call's visibility, for the kernels of the
feature-map kinds (``linear``, ``taylor``'s feature form): the shared checks and the key mask."""

from __future__ import annotations

import torch

from .tiles import common_support

MAX_HEAD_DIM = 256


def key_padding(vis) -> torch.Tensor | None:
    """``vis.mask`` (b|1, Hkv|1, G|1, 1, m) bool key padding -> (b|1, Hq|1, 1, m) bool, or None."""
    mask = vis.mask
    if mask is None:
        return None
    mb, mkv, mg, mn, mm = mask.shape
    if mkv == 1 and mg == 1:
        return mask[:, :, 0]
    return mask.reshape(mb, mkv * mg, mn, mm)


def shared_key_mask(vis) -> tuple[bool, torch.Tensor | None]:
    """(whether the engine takes ``vis``'s key padding, its bool (b|1, m) key mask or None): the engine's states
    are per KV head, so key padding must be the same for every head."""
    mask = key_padding(vis)
    if mask is None:
        return True, None
    if mask.shape[1] != 1:
        return False, None
    return True, mask[:, 0, 0]


def feature_pair(phi, query, key):
    """phi(q), phi(k) computed in fp32 and stored in the inputs' dtypes (what the engine takes; autograd carries the
    map's gradient)."""
    return phi(query.float()).to(query.dtype), phi(key.float()).to(key.dtype)


def decode_shape(query, key) -> str:
    """Why a few queries against a long cache are not the engine's (empty when they are not that): it would build the
    state of every key per call, O(m F dv), where the PyTorch forms or the StateCache cost O(m F) or less."""
    if query.shape[2] * 64 < key.shape[2]:
        return ("a few queries against a long cache (decoding over K/V) run the PyTorch form: the kernel would "
                "rebuild the state of every key per call (decode with attnswap.StateCache instead)")
    return ""


def supports_features(kind: str, query, key, value, vis, *, dropout=0.0, need_weights=False) -> tuple[bool, str]:
    """Whether the engine can run ``kind`` on these inputs, and why not: ``tiles.common_support`` (query and key head
    dims equal, head dims 1..MAX_HEAD_DIM), then causal / sliding-window visibility with key padding shared by the
    heads."""
    ok, why = common_support(query, key, value, vis, dropout=dropout, need_weights=need_weights, name=kind,
                             max_head_dim=MAX_HEAD_DIM)
    if not ok:
        return ok, why
    if not vis.is_structured:
        return False, (f"the {kind} kernel's linear-time form takes causal, sliding-window and key-padding masks "
                       "(b|1, 1, 1, m) only; a dense mask runs the quadratic form")
    why = decode_shape(query, key)
    if why:
        return False, why
    if not shared_key_mask(vis)[0]:
        return False, (f"the {kind} kernel's linear-time form takes key padding shared by all heads, not a "
                       "per-head key mask (its states are per KV head)")
    return True, ""
