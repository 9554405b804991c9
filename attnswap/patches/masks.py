"""Turn the attention mask a transformers model hands its attention into a ``Visibility``.

Formats: None (causality from ``is_causal``), a 4D bool mask (True = attend), a 4D float additive mask
(0 / finfo.min, other values are a score bias, e.g. ALiBi), a 2D key-padding mask (flash-attention
models). A flex ``BlockMask`` cannot be honored and is an error.
"""

from __future__ import annotations

import torch

from ..errors import AttnSwapError
from ..kinds.visibility import Visibility, gqa_mask

FLASH_PREFIXES = ("flash_attention",)


def model_visibility(attention_mask, query: torch.Tensor, key: torch.Tensor, *, is_causal: bool,
                     native: str | None = None) -> Visibility:
    b, hq, n, _ = query.shape
    hkv, m = key.shape[1], key.shape[2]
    lower_right = native is not None and native.startswith(FLASH_PREFIXES)
    if attention_mask is None:
        # transformers' convention (sdpa): no mask + is_causal means causal aligned upper-left when q > 1 (equal to
        # lower-right when q == kv; a static cache's empty tail is then never seen) and full when q == 1.
        # flash-attention models align lower-right.
        causal = bool(is_causal) and (n > 1 or lower_right)
        return Visibility(n=n, m=m, causal=causal, offset=(m - n) if lower_right else 0)
    if not isinstance(attention_mask, torch.Tensor):
        raise AttnSwapError(
            f"attnswap cannot honor an attention mask of type {type(attention_mask).__name__} (e.g. a flex "
            "BlockMask); load the model with attn_implementation='sdpa' or 'eager' before swapping"
        )
    if attention_mask.dim() == 2:  # key padding (b, kv) from flash-attention mask functions
        pad = attention_mask[:, -m:].bool()[:, None, None, :]
        return Visibility(n=n, m=m, causal=bool(is_causal), offset=m - n, mask=gqa_mask(pad, b, hq, hkv, n, m))
    if attention_mask.dim() == 4 and attention_mask.shape[-1] > m:
        attention_mask = attention_mask[..., :m]
    return Visibility(n=n, m=m, mask=gqa_mask(attention_mask, b, hq, hkv, n, m))
