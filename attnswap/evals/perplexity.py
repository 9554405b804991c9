"""Strided sliding-window perplexity over one token stream (the standard transformers recipe): windows of
``max_length`` tokens every ``stride`` tokens, each scoring only the tokens no earlier window scored."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..errors import AttnSwapError


@dataclass
class Perplexity:
    ppl: float
    nll_per_token: float
    tokens: int
    seconds: float


def perplexity(model, input_ids: torch.Tensor, *, max_length: int = 512, stride: int | None = None,
               progress=None) -> Perplexity:
    """``input_ids`` (1, N). Returns perplexity, mean NLL per scored token, tokens scored and wall time."""
    stride = stride or max_length
    if not 0 < stride <= max_length:
        raise AttnSwapError(f"stride must be in (0, max_length={max_length}], got {stride}")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise AttnSwapError(f"input_ids must have shape (1, N), got {tuple(input_ids.shape)}")
    n = input_ids.shape[1]
    if n < max_length:
        raise AttnSwapError(f"the text has {n} tokens, shorter than one window (max_length={max_length})")
    device = next(model.parameters()).device
    nll_sum, scored, prev_end = 0.0, 0, 0
    start_time = time.perf_counter()
    starts = list(range(0, n, stride))
    with torch.no_grad():
        for begin in starts:
            end = min(begin + max_length, n)
            target_len = end - prev_end
            ids = input_ids[:, begin:end].to(device)
            labels = ids.clone()
            labels[:, :-target_len] = -100
            loss = model(input_ids=ids, labels=labels).loss
            count = int((labels[:, 1:] != -100).sum())
            nll_sum += loss.item() * count
            scored += count
            prev_end = end
            if progress is not None:
                progress(1)
            if end == n:
                break
    nll = nll_sum / scored
    return Perplexity(ppl=math.exp(nll), nll_per_token=nll, tokens=scored, seconds=time.perf_counter() - start_time)
