"""Strided sliding-window perplexity over one token stream (the standard transformers recipe): windows of
``max_length`` tokens every ``stride`` tokens, each scoring only the tokens no earlier window scored.

Data-parallel under ``accelerate launch`` (or any initialized torch.distributed group): each process scores
every world_size-th window and the sums are all-reduced, so the result equals one process's.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from ..errors import AttnSwapError


@dataclass
class Perplexity:
    ppl: float
    nll_per_token: float
    tokens: int
    seconds: float
    processes: int = 1  # data-parallel processes that shared the windows

    def to_dict(self) -> dict:
        return asdict(self)


def windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, target_len) of every window over ``n`` tokens."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n:
            break
    return out


def _world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def perplexity(model, input_ids: torch.Tensor, *, max_length: int = 512, stride: int | None = None,
               progress=None) -> Perplexity:
    """``input_ids`` (1, N). Returns perplexity, mean NLL per scored token, tokens scored and wall time."""
    stride = stride or max_length
    if max_length < 2:
        raise AttnSwapError(f"max_length must be at least 2, got {max_length}")
    if not 0 < stride <= max_length:
        raise AttnSwapError(f"stride must be in (0, max_length={max_length}], got {stride}")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise AttnSwapError(f"input_ids must have shape (1, N), got {tuple(input_ids.shape)}")
    n = input_ids.shape[1]
    if n < max_length:
        raise AttnSwapError(f"the text has {n} tokens, shorter than one window (max_length={max_length}); "
                            "give more text or a smaller max_length")
    rank, world = _world()
    device = next(model.parameters()).device
    totals = torch.zeros(2, dtype=torch.float64)  # nll sum, tokens
    start_time = time.perf_counter()
    with torch.no_grad():
        for index, (begin, end, target_len) in enumerate(windows(n, max_length, stride)):
            if index % world != rank:
                continue
            ids = input_ids[:, begin:end].to(device)
            labels = ids.clone()
            labels[:, :-target_len] = -100
            loss = model(input_ids=ids, labels=labels).loss
            count = int((labels[:, 1:] != -100).sum())
            totals += torch.tensor([loss.double().item() * count, count], dtype=torch.float64)
            if progress is not None:
                progress(1)
    if world > 1:
        reduced = totals.to(device) if torch.distributed.get_backend() == "nccl" else totals
        torch.distributed.all_reduce(reduced)
        totals = reduced.cpu()
    nll = float(totals[0] / totals[1])
    return Perplexity(ppl=math.exp(nll), nll_per_token=nll, tokens=int(totals[1]),
                      seconds=time.perf_counter() - start_time, processes=world)
