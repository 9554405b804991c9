"""Parsing what users write on the command line: attention specs and layer lists."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .. import registry
from ..errors import AttnSwapError


@dataclass
class AttnSpec:
    """One attention to evaluate: ``kind`` None is the model's own."""

    kind: str | None
    options: dict = field(default_factory=dict)
    layers: list[int] | str | None = None
    calibrated: bool = False  # fit per-head score scales first (attnswap.calibrate) on ``calibration_ids``
    transferred: bool = False  # learn query/key maps first (attnswap.transfer) on ``calibration_ids``
    end_to_end: bool = False  # calibrated: then train the scales through the whole model
    length_exponent: bool = False  # end to end: also each head's growth of its scale with the context
    query_gain: bool = False  # end to end: also a gain per rotary frequency of each head's queries
    output_gain: bool = False  # end to end: also a gain on each head's output
    swap_dir: str | None = None  # a swap saved with attnswap.save_swap
    calibration_ids: Any = None
    fit_settings: dict = field(default_factory=dict)  # window, max_windows (and steps) for calibrate / transfer
    fitted: Any = None  # the calibrated per-layer options, once fitted (reused by later evaluations)

    @property
    def label(self) -> str:
        if self.swap_dir is not None:
            return f"saved {self.swap_dir}"
        if self.kind is None:
            return "model's own"
        opts = "".join(f" {k}={v}" for k, v in self.options.items())
        flags = ("calibrated", "end_to_end") + END_TO_END_EXTRAS + ("transferred",)
        return f"{self.kind}{opts}" + "".join(f" {f.replace('_', '-')}" for f in flags if getattr(self, f))


END_TO_END_EXTRAS = ("length_exponent", "query_gain", "output_gain")  # what the end-to-end stage may also train
GAINS = ("query_gain", "output_gain")  # trained by default with end_to_end
OPT_OUTS = tuple(f"no_{gain}" for gain in GAINS)
FLAGS = ("calibrated", "transferred", "end_to_end") + END_TO_END_EXTRAS + OPT_OUTS

_LAYER_ITEM = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def _number(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_attn(spec: str, layers: list[int] | str | None = None) -> list[AttnSpec]:
    """``"softmax,topk:k=64,entmax:alpha=1.5"`` -> specs, each validated against the kind's options.

    ``kind:...:calibrated`` fits per-head score scales first (``attnswap.calibrate``; ``:calibrated:end_to_end``
    then trains them through the whole model together with a gain per rotary frequency of each head's queries and
    a gain on each head's output, ``:no_query_gain`` / ``:no_output_gain`` leave those out,
    ``:length_exponent`` adds a per-head growth of each scale with the context), ``kind:...:transferred`` learns
    query/key maps first (``attnswap.transfer``); ``saved:DIR`` loads a swap saved with ``attnswap.save_swap`` (or
    ``attnswap calibrate --out DIR``)."""
    out = []
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        name, _, rest = item.partition(":")
        if name == "saved":  # saved:DIR, a swap written by attnswap.save_swap / attnswap calibrate
            if not rest:
                raise AttnSwapError(f"malformed attention spec {item!r}: write saved:DIR")
            out.append(AttnSpec(None, {}, layers, swap_dir=rest))
            continue
        options, flags = {}, set()
        for pair in filter(None, rest.split(":")):
            if pair in FLAGS:
                flags.add(pair)
                continue
            key, eq, value = pair.partition("=")
            if not eq or not key:
                raise AttnSwapError(f"malformed attention spec {item!r}: write kind or kind:option=value[:option=value], "
                                    "e.g. topk:k=64")
            options[key] = _number(value)
        calibrated, transferred, end_to_end = ("calibrated" in flags, "transferred" in flags, "end_to_end" in flags)
        kind, _ = registry.resolve(name, options)  # unknown kind / option -> a clear error now, not mid-run
        if calibrated and not kind.uses_scores:
            raise AttnSwapError(f"attention spec {item!r}: kind {name!r} has no scores to calibrate")
        if transferred and not kind.transferable:
            raise AttnSwapError(f"attention spec {item!r}: kind {name!r} has no feature map to transfer to")
        if calibrated and transferred:
            raise AttnSwapError(f"attention spec {item!r}: choose calibrated or transferred, not both")
        for extra in sorted(flags & set(END_TO_END_EXTRAS + OPT_OUTS)):
            if not end_to_end:
                raise AttnSwapError(f"attention spec {item!r}: {extra} goes with end_to_end "
                                    f"(kind:...:calibrated:end_to_end:{extra})")
        for gain in GAINS:
            if {gain, f"no_{gain}"} <= flags:
                raise AttnSwapError(f"attention spec {item!r}: {gain} and no_{gain} contradict each other")
            if end_to_end and f"no_{gain}" not in flags:
                flags.add(gain)
        if end_to_end and not calibrated:
            raise AttnSwapError(f"attention spec {item!r}: end_to_end goes with calibrated "
                                "(kind:...:calibrated:end_to_end)")
        out.append(AttnSpec(name, options, layers, calibrated=calibrated, transferred=transferred,
                            end_to_end=end_to_end, **{extra: extra in flags for extra in END_TO_END_EXTRAS}))
    if not out:
        raise AttnSwapError(f"empty attention spec {spec!r}; e.g. softmax,topk:k=64,entmax:alpha=1.5")
    return out


def parse_layers(spec: Any) -> list[int] | str | None:
    """``"4-29"``, ``"0;5;7"``, ``"0-3,8"`` (inclusive ranges; ``;`` survives lm-eval's comma-separated model_args),
    an int or a list -> layer indices (None: all); a name (``full_attention``) is a layer type, kept as is."""
    if spec is None:
        return None
    if isinstance(spec, bool):
        raise AttnSwapError(f"layers must be indices and ranges like 0-3;7, got {spec!r}")
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, float) and spec.is_integer():
        return [int(spec)]
    if isinstance(spec, (list, tuple, range)):
        return [int(i) for i in spec]
    if not isinstance(spec, str):
        raise AttnSwapError(f"layers must be indices and ranges like 0-3;7, got {spec!r}")
    if spec.strip().lower() in ("", "all", "none"):
        return None
    if re.fullmatch(r"[A-Za-z_]+", spec.strip()):  # a layer type of the config (checked when swapping)
        return spec.strip()
    out: list[int] = []
    for part in re.split(r"[;,\s]+", spec.strip()):
        m = _LAYER_ITEM.match(part)
        if not m:
            raise AttnSwapError(
                f"bad layers spec {spec!r}: use indices and inclusive ranges joined by ';', e.g. "
                "layers=0-3, layers=0;5;7 or layers=0-3;8-11 (',' separates model_args)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise AttnSwapError(f"bad layers range {part!r} in {spec!r}: the end is below the start")
        out.extend(range(lo, hi + 1))
    return out
