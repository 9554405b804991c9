"""Inference latency of a (swapped) causal LM: prefill time, greedy decode throughput and peak memory, per
batch size and context length, on random token ids.

    records = measure_latency(model, context_lengths=(512, 1024), new_tokens=32, on_record=print)

Each configuration runs ``warmup`` untimed rounds, then ``repeats`` timed rounds of: one forward over the
context with ``use_cache=True`` (prefill; only the last position's logits are computed where the model
supports ``logits_to_keep``), then ``new_tokens`` greedy steps of one token each through the cache (decode).
Times are medians over the timed rounds, with the spread (max − min) and the min and max beside them. On CUDA
they come from CUDA events with a synchronize; elsewhere from ``time.perf_counter`` (after a synchronize on
devices that have one). Several attentions compared in one run (``arms=``: the model's own and its swaps) take
their timed rounds in turn within each configuration, so that a shared machine's slow spells fall on all of them.

The cache is the one ``generate`` would build: a ``StateCache`` (constant-size running state) on models swapped to
``linear`` or ``taylor``, else a ``DynamicCache``; ``cache_mb`` is what it holds at the end of decoding.

Peak memory (``peak_mem_mb``) covers the warm-up and timed rounds of the configuration:
- CUDA: growth of ``torch.cuda.max_memory_allocated`` over the memory allocated before the configuration
  (peak statistics reset first), so the model's weights are not counted;
- CPU: growth of the process's peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) over its value before
  the configuration. ``ru_maxrss`` is a high-water mark for the whole process: the growth is what this
  configuration added to the highest RSS the process had reached, so it is 0 when an earlier (larger)
  configuration or anything else in the process already went higher. Run configurations from small to large
  (as the defaults do), or one per process, for meaningful numbers. ``peak_mem_method`` in each record says
  which measure was used.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable

import torch

from ..errors import AttnSwapError
from ..patches.state_cache import cache_argument, cache_nbytes, new_cache

__all__ = ["measure_latency"]

_RSS_METHOD = (
    "cpu_ru_maxrss_growth: growth of the process's peak RSS (a high-water mark) over its value before this "
    "configuration; 0 when the process had already been higher"
)
_CUDA_METHOD = "cuda_max_memory_allocated_growth: peak allocated CUDA memory minus the memory allocated before"


def measure_latency(model, *, context_lengths: Iterable[int] = (512, 1024, 2048), batch_sizes: Iterable[int] = (1,),
                    new_tokens: int = 32, warmup: int = 1, repeats: int = 3, vocab_size: int | None = None,
                    progress: Callable[[int], object] | None = None,
                    on_record: Callable[[dict], object] | None = None, seed: int = 0,
                    arms: dict[str, Callable[[], contextlib.AbstractContextManager]] | None = None):
    """One record per (batch size, context length), in that nesting order (batch outer). See the module doc.

    Record keys: ``context``, ``batch``, ``new_tokens``, ``prefill_ms`` (median), ``prefill_ms_spread``
    (max − min), ``prefill_ms_min``, ``prefill_ms_max``, ``decode_tok_s`` (median of batch·new_tokens / decode
    time), ``decode_tok_s_spread``, ``decode_tok_s_min``, ``decode_tok_s_max``, ``decode_ms_per_step``
    (median), ``peak_mem_mb``, ``peak_mem_method``, ``device``, ``dtype``, ``warmup``, ``repeats``. A
    configuration that fails (out of memory, a context longer than the model takes, ...) gives a record with
    the same keys, the metrics ``None``, and ``error`` (``"ExceptionType: message"``); the run goes on.

    ``vocab_size`` bounds the random ids (default: the model config's). ``progress(1)`` is called after each
    configuration (total ``len(batch_sizes) * len(context_lengths)``); ``on_record(record)`` as each record is
    done. ``new_tokens=0`` skips decode (its metrics are ``None``).

    ``arms``: {label: () -> context manager} (the model's own attention and swaps, say) to compare in one run:
    each configuration's timed rounds alternate between them (each arm's warm-up first; round r starts with arm
    r mod the number of arms, so no arm always follows the same one), so that every arm sees the same state of a
    shared machine; then the result is {label: records} and each record has ``attention`` (its label). Without
    ``arms``, the model is measured as it is and the result is the list of records.
    """
    context_lengths = [int(n) for n in context_lengths]
    batch_sizes = [int(b) for b in batch_sizes]
    if not context_lengths or any(n < 1 for n in context_lengths):
        raise AttnSwapError(f"context_lengths must be positive integers, got {context_lengths}")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise AttnSwapError(f"batch_sizes must be positive integers, got {batch_sizes}")
    if new_tokens < 0 or warmup < 0 or repeats < 1:
        raise AttnSwapError(f"need new_tokens >= 0, warmup >= 0, repeats >= 1; got new_tokens={new_tokens}, "
                            f"warmup={warmup}, repeats={repeats}")
    if arms is not None and not arms:
        raise AttnSwapError("arms must name at least one arm to measure")
    vocab_size = vocab_size or _vocab_size(model)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    run_arms = arms if arms is not None else {None: contextlib.nullcontext}

    records = {label: [] for label in run_arms}
    was_training = model.training
    model.eval()
    try:
        for batch in batch_sizes:
            for context in context_lengths:
                measured = _measure_config(model, run_arms, batch, context, new_tokens, warmup, repeats, vocab_size,
                                           device, extra, seed)
                for label, record in measured.items():
                    record = {"context": context, "batch": batch, "new_tokens": new_tokens, **record}
                    if label is not None:
                        record = {"attention": label, **record}
                    record.update({"device": str(device), "dtype": str(dtype).removeprefix("torch."),
                                   "warmup": warmup, "repeats": repeats})
                    records[label].append(record)
                    if on_record is not None:
                        on_record(record)
                if progress is not None:
                    progress(1)
    finally:
        model.train(was_training)
    return records if arms is not None else records[None]


_METRIC_KEYS = ("prefill_ms", "prefill_ms_spread", "prefill_ms_min", "prefill_ms_max", "decode_tok_s",
                "decode_tok_s_spread", "decode_tok_s_min", "decode_tok_s_max", "decode_ms_per_step", "peak_mem_mb",
                "cache_mb")


def _measure_config(model, arms, batch, context, new_tokens, warmup, repeats, vocab_size, device, extra,
                    seed) -> dict:
    """{label: metrics or error} of one configuration, the arms' timed rounds interleaved."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + batch * 65_537 + context)
    ids = torch.randint(0, vocab_size, (batch, context), generator=generator).to(device)
    _free(device)
    times = {label: ([], [], [0]) for label in arms}  # prefill ms, decode ms, cache bytes
    peaks, errors = {label: None for label in arms}, {}
    order = list(arms.items())
    with torch.inference_mode():
        for round_ in range(-warmup, repeats):
            turn = round_ % len(order) if round_ >= 0 else 0  # each timed round starts with the next arm
            for label, arm in order[turn:] + order[:turn]:
                if label in errors:
                    continue
                mem = _PeakMemory(device)
                try:
                    with arm():
                        p_ms, d_ms, cache_bytes = _one_round(model, ids, new_tokens, device, extra)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as exc:  # noqa: BLE001 (one failing configuration must not end the run)
                    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    errors[label] = f"{type(exc).__name__}: {message[:500]}"
                    continue
                grown = mem.growth_mb()
                peaks[label] = grown if peaks[label] is None or grown is None else max(peaks[label], grown)
                if round_ >= 0:
                    prefill_ms, decode_ms, cache = times[label]
                    prefill_ms.append(p_ms)
                    decode_ms.append(d_ms)
                    cache[0] = cache_bytes
    if errors:  # outside the handler, so the traceback's tensors can go
        _free(device)
    method = _CUDA_METHOD if device.type == "cuda" else _RSS_METHOD
    out = {}
    for label in arms:
        if label in errors:
            out[label] = {**{k: None for k in _METRIC_KEYS}, "peak_mem_method": method, "error": errors[label]}
            continue
        prefill_ms, decode_ms, (cache_bytes,) = times[label]
        row = {**_summary("prefill_ms", prefill_ms), "peak_mem_mb": peaks[label], "peak_mem_method": method,
               "cache_mb": cache_bytes / 2**20}
        if new_tokens:
            tok_s = [batch * new_tokens / (ms / 1e3) if ms > 0 else math.inf for ms in decode_ms]
            row.update(_summary("decode_tok_s", tok_s))
            row["decode_ms_per_step"] = statistics.median(decode_ms) / new_tokens
        else:
            row.update({k: None for k in _METRIC_KEYS if k.startswith("decode")})
        out[label] = row
    return out


def _one_round(model, ids, new_tokens, device, extra) -> tuple[float, float, int]:
    """Prefill then greedy decode with the cache generate would use (a StateCache for linear/taylor swaps).
    Returns (prefill ms, decode ms, bytes the cache holds at the end)."""
    cache = new_cache(model)
    with_cache = {cache_argument(model): cache}
    timer = _Timer(device)
    timer.start()
    out = model(input_ids=ids, use_cache=True, **with_cache, **extra)
    prefill_ms = timer.stop()
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    del out
    decode_ms = 0.0
    if new_tokens:
        timer.start()
        for _ in range(new_tokens):
            out = model(input_ids=token, use_cache=True, **with_cache, **extra)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        decode_ms = timer.stop()
    return prefill_ms, decode_ms, cache_nbytes(cache)


def _summary(name, values) -> dict:
    lo, hi = min(values), max(values)
    return {name: statistics.median(values), f"{name}_spread": hi - lo, f"{name}_min": lo, f"{name}_max": hi}


class _Timer:
    """CUDA events on CUDA, ``perf_counter`` (after a synchronize where the device has one) elsewhere."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
        elif self.device.type != "cpu":
            module = getattr(torch, self.device.type, None)
            if module is not None and hasattr(module, "synchronize"):
                module.synchronize()

    def start(self):
        self._sync()
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        """Milliseconds since ``start``."""
        if self.cuda:
            self._end.record()
            torch.cuda.synchronize(self.device)
            return float(self._start.elapsed_time(self._end))
        self._sync()
        return (time.perf_counter() - self._t0) * 1e3


class _PeakMemory:
    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.method = _CUDA_METHOD
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.before = torch.cuda.memory_allocated(device)
        else:
            self.method = _RSS_METHOD
            self.before = _max_rss_bytes()

    def growth_mb(self) -> float | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return max(0, torch.cuda.max_memory_allocated(self.device) - self.before) / 2**20
        after = _max_rss_bytes()
        if after is None or self.before is None:
            return None
        return max(0, after - self.before) / 2**20


def _max_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def _free(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _vocab_size(model) -> int:
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "get_text_config", lambda: None)()):
        size = getattr(cfg, "vocab_size", None)
        if size:
            return int(size)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and hasattr(embeddings, "num_embeddings"):
        return int(embeddings.num_embeddings)
    raise AttnSwapError("cannot tell the model's vocabulary size; pass vocab_size=")


def _accepts(model, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params
