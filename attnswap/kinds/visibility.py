"""Which keys each query may see: causal (any alignment), sliding window, and a dense bool/float mask.

Shared by every kind. The structured parts (causal, window, key padding) are kept as numbers so that long
paths can work on blocks of queries and keys without ever building an N x N mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import AttnSwapError


COUNT_BLOCK = 1 << 22  # query-key pairs per block when counting a mask's visible keys


@dataclass
class Visibility:
    """Keys visible to each query.

    Query ``i`` sits at key position ``i + offset``. With ``causal`` it sees keys ``j <= i + offset``; with
    ``window=w`` also only ``j > i + offset - w``. ``mask`` (bool: True = visible; float: additive, entries at or
    below ``finfo.min / 2`` are invisible and other values are a bias on the scores) has shape
    ``(b|1, Hkv|1, G|1, n|1, m)``: the query heads split into KV heads and their groups.
    """

    n: int
    m: int
    causal: bool = False
    offset: int = 0
    window: int | None = None
    mask: torch.Tensor | None = None

    def __post_init__(self):
        if self.mask is not None and self.mask.dtype != torch.bool:
            visible = self.mask > torch.finfo(self.mask.dtype).min / 2
            if not bool((visible & (self.mask != 0)).any()):
                self.mask = visible  # a plain 0 / -inf mask: keep it as bool

    @property
    def is_structured(self) -> bool:
        """No dense mask beyond key padding: the linear-time forms can use it."""
        return self.mask is None or (self.mask.dtype == torch.bool and self.mask.shape[-2] == 1)

    @property
    def has_bias(self) -> bool:
        """The mask carries additive score biases (e.g. ALiBi), not just visibility."""
        return self.mask is not None and self.mask.dtype != torch.bool

    def flat_mask(self) -> torch.Tensor | None:
        """The mask as ``(b|1, Hq|1, n|1, m)`` (a view when it can be), the layout SDPA and the kernels take."""
        mask = self.mask
        if mask is None or mask.dim() == 4:
            return mask
        mb, mkv, mg, mn, mm = mask.shape
        if mkv == 1 and mg == 1:
            return mask[:, :, 0]
        return mask.reshape(mb, mkv * mg, mn, mm)

    def most_visible(self) -> int:
        """An upper bound on the keys any query sees, from causal/window alone."""
        return self.m if self.window is None else min(self.m, self.window)

    def key_counts(self, device=None) -> torch.Tensor:
        """(b|1, Hkv|1, G|1, n) fp32: how many keys each query sees (causal, window and mask; at least 1, so that a
        query that sees nothing gets a finite count)."""
        if self.mask is None:
            pos = torch.arange(self.n, device=device) + self.offset
            hi = (pos + 1).clamp(max=self.m) if self.causal else torch.full_like(pos, self.m)
            lo = (pos - self.window + 1).clamp(min=0) if self.window is not None else torch.zeros_like(pos)
            counts = (hi - lo).clamp(min=0)[None, None, None]
        else:  # the mask's visible keys inside the causal/window band, a chunk of queries at a time
            step = max(1, COUNT_BLOCK // max(self.m, 1))
            parts = []
            for q0 in range(0, self.n, step):
                q1 = min(self.n, q0 + step)
                visible, _ = self.block(q0, q1, 0, self.m, device=device)  # with a mask, never None
                parts.append(visible.sum(-1).expand(*visible.shape[:3], q1 - q0))
            counts = torch.cat(parts, dim=-1)
        return counts.float().clamp(min=1)

    def key_valid(self) -> torch.Tensor | None:
        """(b|1, Hkv|1, G|1, 1, m) bool key-padding mask when ``is_structured``."""
        return self.mask

    def key_range(self, q0: int, q1: int) -> tuple[int, int]:
        """Keys [k0, k1) that any of the queries [q0, q1) may see (from causal/window only)."""
        k0, k1 = 0, self.m
        if self.causal:
            k1 = max(0, min(self.m, q1 - 1 + self.offset + 1))
        if self.window is not None:
            k0 = min(self.m, max(0, q0 + self.offset - self.window + 1))
        return k0, max(k0, k1)

    def full_range(self, q0: int, q1: int) -> tuple[int, int]:
        """Keys [a, b) that every query of [q0, q1) sees (from causal/window only)."""
        a, b = 0, self.m
        if self.causal:
            b = max(0, min(self.m, q0 + self.offset + 1))
        if self.window is not None:
            a = min(self.m, max(0, q1 - 1 + self.offset - self.window + 1))
        return a, max(a, b)

    def structural_block(self, q0: int, q1: int, k0: int, k1: int, device) -> torch.Tensor | None:
        """(q1-q0, k1-k0) bool from causal/window, or None when every pair is visible."""
        if not self.causal and self.window is None:
            return None
        qpos = torch.arange(q0, q1, device=device)[:, None] + self.offset
        kpos = torch.arange(k0, k1, device=device)[None, :]
        ok = torch.ones((q1 - q0, k1 - k0), dtype=torch.bool, device=device)
        if self.causal:
            ok = ok & (kpos <= qpos)
        if self.window is not None:
            ok = ok & (kpos > qpos - self.window)
        if bool(ok.all()):
            return None
        return ok

    def block(self, q0: int, q1: int, k0: int, k1: int, rows=slice(None), heads=slice(None), device=None):
        """Visible keys and score bias for a block of queries and keys.

        Returns ``(visible, bias)``: ``visible`` is bool broadcastable to (b, Hkv, G, q1-q0, k1-k0) or None when
        all are visible; ``bias`` is fp32 of the same broadcast shape or None.
        """
        visible = self.structural_block(q0, q1, k0, k1, device)
        bias = None
        if self.mask is not None:
            mb = self.mask[rows if self.mask.shape[0] > 1 else slice(None)]
            mb = mb[:, heads] if mb.shape[1] > 1 else mb
            mb = mb[..., q0:q1, k0:k1] if mb.shape[-2] > 1 else mb[..., k0:k1]
            if mb.dtype == torch.bool:
                dense = mb
            else:
                dense = mb > torch.finfo(mb.dtype).min / 2
                b = torch.where(dense, mb, torch.zeros((), dtype=mb.dtype, device=mb.device)).float()
                if bool(b.ne(0).any()):
                    bias = b
            visible = dense if visible is None else dense & visible
        return visible, bias


def gqa_mask(mask: torch.Tensor | None, b: int, hq: int, hkv: int, n: int, m: int) -> torch.Tensor | None:
    """Check a user mask of shape (b|1, Hq|1, n|1, m) and view it as (b|1, Hkv|1, G|1, n|1, m)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise AttnSwapError(f"mask must be a torch.Tensor (bool, True = attend; or float additive), got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise AttnSwapError(f"mask must be bool (True = attend) or a float additive mask, got dtype {mask.dtype}")
    want = f"(b|1, Hq|1, n|1, m) = ({b}|1, {hq}|1, {n}|1, {m})"
    if mask.dim() == 2 and mask.shape == (b, m):  # a 2D key-padding mask
        mask = mask[:, None, None, :]
    if mask.dim() != 4:
        raise AttnSwapError(f"mask must have 4 dimensions {want}, got shape {tuple(mask.shape)}")
    mb, mh, mn, mm = mask.shape
    if mb not in (1, b) or mh not in (1, hq) or mn not in (1, n) or mm != m:
        raise AttnSwapError(f"mask shape {tuple(mask.shape)} does not fit {want}")
    groups = hq // hkv
    if mh == 1:
        return mask[:, :, None]
    return mask.reshape(mb, hkv, groups, mn, mm)
