"""Parsing what users write on the command line: attention specs and layer lists."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import registry
from ..errors import AttnSwapError


@dataclass
class AttnSpec:
    """One attention to evaluate: ``kind`` None is the model's own."""

    kind: str | None
    options: dict = field(default_factory=dict)
    layers: list[int] | None = None

    @property
    def label(self) -> str:
        if self.kind is None:
            return "model's own"
        opts = "".join(f" {k}={v}" for k, v in self.options.items())
        return f"{self.kind}{opts}"


def _number(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_attn(spec: str, layers: list[int] | None = None) -> list[AttnSpec]:
    """``"softmax,topk:k=64,entmax:alpha=1.5"`` -> specs, each validated against the kind's options."""
    out = []
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        name, _, rest = item.partition(":")
        options = {}
        for pair in filter(None, rest.split(":")):
            key, eq, value = pair.partition("=")
            if not eq or not key:
                raise AttnSwapError(f"malformed attention spec {item!r}: write kind or kind:option=value[:option=value], "
                                    "e.g. topk:k=64")
            options[key] = _number(value)
        registry.resolve(name, options)  # unknown kind / option -> a clear error now, not mid-run
        out.append(AttnSpec(name, options, layers))
    if not out:
        raise AttnSwapError(f"empty attention spec {spec!r}; e.g. softmax,topk:k=64,entmax:alpha=1.5")
    return out


def parse_layers(text: str | None) -> list[int] | None:
    """``"4-29"``, ``"0,2,5"``, ``"0-3,8"`` -> sorted layer indices (None: all)."""
    if text is None or text == "" or text == "all":
        return None
    layers = set()
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        try:
            layers.update(range(int(lo), int(hi) + 1) if dash else [int(lo)])
        except ValueError:
            raise AttnSwapError(f"malformed layers {text!r}: write e.g. 4-29 or 0,2,5 or 0-3,8") from None
    return sorted(layers)
