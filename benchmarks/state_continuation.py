"""What a ``StateCache`` continuation costs: SmolLM2-135M, CPU, the first N tokens prefilled at once against the
first N/2 prefilled and the other N/2 continued from the running state (what the retrieval eval does when a
haystack's depths share their prefix), for the kinds that decode with a state. Same last logits, to fp32 rounding.

    python benchmarks/state_continuation.py [--tokens 8192] [--kinds linear,window_linear]
"""

from __future__ import annotations

import argparse
import time

import torch

import attnswap
from attnswap.default_model import load_default_model
from attnswap.evals.corpus import default_text
from attnswap.patches.state_cache import cache_argument, new_cache


def timed(model, ids, cache) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    logits = model(ids, **{cache_argument(model): cache}, logits_to_keep=1).logits[0, -1]
    return logits, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--kinds", default="linear,window_linear")
    args = ap.parse_args()
    model, tok = load_default_model()
    model.eval()
    ids = tok(default_text(), return_tensors="pt").input_ids[:, : args.tokens]
    half = ids.shape[1] // 2
    for kind in args.kinds.split(","):
        with attnswap.swapped(model, kind), torch.no_grad():
            whole, t_whole = timed(model, ids, new_cache(model))
            cache = new_cache(model)
            _, t_first = timed(model, ids[:, :half], cache)
            part, t_rest = timed(model, ids[:, half:], cache)
        print(f"{kind}: {ids.shape[1]} tokens at once {t_whole:.1f} s; {half} then {ids.shape[1] - half} more "
              f"{t_first:.1f} + {t_rest:.1f} s; last logits max |diff| {float((whole - part).abs().max()):.1e}",
              flush=True)


if __name__ == "__main__":
    main()
