"""Kinds of attention by name: option schemas and validation, reference function, kernel, capabilities."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import AttnSwapError


@dataclass(frozen=True)
class Option:
    """One option of a kind: its type, default and the rule a value must satisfy."""

    name: str
    type: type  # int, float or str
    default: Any
    doc: str = ""
    rule: str = ""  # human wording of the constraint, e.g. "an integer >= 1"
    check: Callable[[Any], bool] | None = None
    choices: tuple | None = None

    def validate(self, kind: str, value: Any) -> Any:
        where = f"option {self.name!r} of attention kind {kind!r}"
        wanted = self.rule or {int: "an integer", float: "a number", str: "a string"}[self.type]
        if self.type is int:
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            value = int(value) if ok else value
        elif self.type is float:
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, self.type)
        if not ok:
            raise AttnSwapError(f"{where} must be {wanted}, got {value!r} ({type(value).__name__})")
        if self.choices is not None and value not in self.choices:
            raise AttnSwapError(f"{where} must be one of {list(self.choices)}, got {value!r}")
        if self.check is not None and not self.check(value):
            raise AttnSwapError(f"{where} must be {wanted}, got {value!r}")
        return value


@dataclass
class Kind:
    """A kind of attention.

    ``forward(q, k, v, visibility, *, scaling, softcap, sinks, dropout, need_weights, **options)`` is the
    memory-bounded PyTorch reference; it returns ``(out (b,Hq,n,dv) fp32-accumulated, weights | None)``.
    ``kernel``/``kernel_supports`` are the Triton path, when one exists.
    """

    name: str
    forward: Callable
    options: tuple[Option, ...] = ()
    doc: str = ""
    math: str = ""
    uses_scores: bool = True  # False: no s_ij = scaling*q.k (softcap, sinks and biases do not apply)
    kernel: Callable | None = None  # an alias uses its base kind's kernel
    kernel_supports: Callable | None = None  # -> (supported: bool, why not: str)
    fixed: dict = field(default_factory=dict)  # options an alias pins (sparsemax: alpha=2)
    alias_of: str | None = None
    builtin: bool = False
    # feature-map kinds: (scaling, options) -> (phi, eps, sink_weight | None), so that decoding can keep the running
    # state sum_j phi(k_j) v_j^T instead of K/V (attnswap.StateCache)
    state_features: Callable | None = None
    # the kind takes a learned ``feature_proj`` as an option and applies it itself, to its feature-map part only
    # (window_linear); otherwise dispatch applies it to every query and key before the kind
    applies_feature_proj: bool = False
    # hybrids that decode with a bounded set of exact keys plus a running state (window_linear): options ->
    # (local_window, sink_tokens, phi, eps)
    bounded_state: Callable | None = None
    # (options, visibility) -> whether the kind computes plain softmax attention on this call (topk with k at least the
    # keys any query sees): then torch's fused SDPA may run it
    reduces_to_softmax: Callable | None = None

    @property
    def decodes_with_state(self) -> bool:
        """``attnswap.StateCache`` can decode it without keeping every key (a running state, maybe a bounded window)."""
        return self.state_features is not None or self.bounded_state is not None

    @property
    def transferable(self) -> bool:
        """Has feature maps that ``attnswap.transfer`` can learn."""
        return self.state_features is not None or self.applies_feature_proj

    def defaults(self) -> dict:
        return {o.name: o.default for o in self.options if o.name not in self.fixed}

    def resolve(self, options: dict) -> dict:
        """Validate user options; return the full option dict (defaults filled in, alias pins applied).

        Score-based kinds also take ``score_scale``: one number, or one per query head, multiplying the scores
        before the kind's map (a temperature; what ``attnswap.calibrate`` fits), and ``length_exponent``: one
        number, or one per query head, ``e``, by which that scale grows with the number ``n`` of keys a query sees,
        ``score_scale * (n / LENGTH_REF) ** e`` (what ``calibrate(..., end_to_end=True)`` trains), and
        ``query_gain``: per query head, one factor per coordinate of its queries, ``(Hq, head_dim)`` numbers (what
        ``calibrate(..., end_to_end=True)`` trains). Every kind takes ``output_gain``: one positive number, or one
        per query head, multiplying the head's attention output (the end-to-end stage trains it too)."""
        # an alias's pinned value (sparsemax: alpha=2) may come back in resolved options: accept it as it is
        options = {k: v for k, v in options.items() if not (k in self.fixed and v == self.fixed[k])}
        scale = options.pop(SCORE_SCALE, None)
        exponent = options.pop(LENGTH_EXPONENT, None)
        gain = options.pop(QUERY_GAIN, None)
        output_gain = options.pop(OUTPUT_GAIN, None)
        projection = options.pop(FEATURE_PROJ, None)
        if projection is not None and not isinstance(projection, FeatureProjection):
            raise AttnSwapError(f"option {FEATURE_PROJ!r} must be an attnswap.registry.FeatureProjection (what "
                                f"attnswap.transfer learns), got {type(projection).__name__}")
        for name, value in ((SCORE_SCALE, scale), (LENGTH_EXPONENT, exponent), (QUERY_GAIN, gain)):
            if value is not None and not self.uses_scores:
                raise AttnSwapError(f"option {name!r} needs scores, and attention kind {self.name!r} has none")
        schema = {o.name: o for o in self.options if o.name not in self.fixed}
        unknown = sorted(set(options) - set(schema))
        if unknown:
            valid = ", ".join(f"{n} (default {o.default!r})" for n, o in schema.items()) or "none"
            raise AttnSwapError(
                f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for attention "
                f"kind {self.name!r}; valid options: {valid}"
            )
        resolved = {n: o.validate(self.name, options.get(n, o.default)) for n, o in schema.items()}
        resolved.update(self.fixed)
        if scale is not None:
            resolved[SCORE_SCALE] = validate_score_scale(self.name, scale)
        if exponent is not None:
            resolved[LENGTH_EXPONENT] = validate_length_exponent(self.name, exponent)
        if gain is not None:
            resolved[QUERY_GAIN] = validate_query_gain(self.name, gain)
        if output_gain is not None:
            resolved[OUTPUT_GAIN] = validate_score_scale(self.name, output_gain, OUTPUT_GAIN)
        if projection is not None:
            resolved[FEATURE_PROJ] = projection
        return resolved


FEATURE_PROJ = "feature_proj"


@dataclass(eq=False)
class FeatureProjection:
    """A learned map applied to queries and keys before a kind (attention transfer): per KV head ``h``,
    ``x -> x @ weight[h].T + bias[h]`` for its keys and for the queries of its GQA group. weight (Hkv, d, d),
    bias (Hkv, d); identity-initialised by ``attnswap.transfer``."""

    weight: Any
    bias: Any

    def apply(self, x, heads=slice(None)):
        """Grouped queries or keys (rows, Hkv-slice, G|1, n, d) through the maps of those KV heads, in fp32."""
        weight = self.weight.to(x.device, torch.float32)[heads]
        bias = self.bias.to(x.device, torch.float32)[heads]
        if weight.shape[0] != x.shape[1] or weight.shape[-1] != x.shape[-1]:
            raise AttnSwapError(f"feature_proj has weight {tuple(self.weight.shape)}, but this attention has "
                                f"{x.shape[1]} KV heads of dim {x.shape[-1]} (needs ({x.shape[1]}, {x.shape[-1]}, "
                                f"{x.shape[-1]}))")
        return torch.matmul(x.float(), weight.transpose(-1, -2)[None, :, None]) + bias[None, :, None, None]

    def __repr__(self):
        return f"FeatureProjection(heads={self.weight.shape[0]}, dim={self.weight.shape[-1]})"


SCORE_SCALE = "score_scale"


class LearnedScale:
    """A per-head score scale (or output gain) being trained (``attnswap.calibrate(..., end_to_end=True)``):
    ``exp(log_scale)``, differentiable, so it stays positive; a ``score_scale`` (``output_gain``) value while it
    trains."""

    def __init__(self, scales):
        self.log_scale = torch.tensor(scales, dtype=torch.float32).log().requires_grad_(True)

    def factor(self, device) -> torch.Tensor:
        return self.log_scale.to(device).exp()

    def values(self) -> tuple:
        """The scales as plain numbers (what the swap keeps once training ends)."""
        return tuple(round(float(x), 6) for x in self.log_scale.detach().exp())

    def __repr__(self):
        return f"LearnedScale({self.log_scale.numel()} heads)"


LENGTH_EXPONENT = "length_exponent"
LENGTH_REF = 256  # the number of visible keys at which a length exponent leaves the score scale as it is


class LearnedExponent:
    """A per-head ``length_exponent`` being trained (``attnswap.calibrate(..., end_to_end=True)``); differentiable."""

    def __init__(self, exponents):
        self.exponent = torch.tensor(exponents, dtype=torch.float32).requires_grad_(True)

    def tensor(self, device) -> torch.Tensor:
        return self.exponent.to(device)

    def values(self) -> tuple:
        return tuple(round(float(x), 6) for x in self.exponent.detach())

    def __repr__(self):
        return f"LearnedExponent({self.exponent.numel()} heads)"


QUERY_GAIN = "query_gain"
OUTPUT_GAIN = "output_gain"  # per head, on the attention output (a LearnedScale while it trains)


class LearnedGain:
    """Per-head query gains being trained (``attnswap.calibrate(..., end_to_end=True)``): one
    log-gain per query head and parameter, ``index`` (head_dim,) saying which parameter each coordinate uses. The two
    coordinates of a rotated pair share one (``adapt.rotary_pairs.gain_index`` reads the model's pairing), so the
    gain commutes with RoPE: the same as scaling the query before it, and the scores stay a function of relative
    position. Without ``index``: rotate-half pairs (``i`` with ``i + head_dim/2``, the transformers convention).
    All 1 at the start; ``exp`` keeps them positive; a ``query_gain`` value while it trains."""

    def __init__(self, heads: int, head_dim: int, index: torch.Tensor | None = None):
        if index is None:
            if head_dim % 2:
                raise AttnSwapError(f"query gains pair the coordinates of a head (rotary pairs), so they need an even "
                                    f"head dim, got {head_dim}")
            index = torch.arange(head_dim // 2).repeat(2)
        if index.shape != (head_dim,):
            raise AttnSwapError(f"a query-gain index has one entry per coordinate ({head_dim}), got "
                                f"{tuple(index.shape)}")
        self.index = index
        self.log_gain = torch.zeros(heads, int(index.max()) + 1, dtype=torch.float32, requires_grad=True)

    def factor(self, device) -> torch.Tensor:
        """(Hq, head_dim): each parameter's gain on the coordinates that use it."""
        return self.log_gain.to(device).exp()[:, self.index.to(device)]

    def values(self) -> tuple:
        """The gains as plain numbers, a tuple per head (what the swap keeps once training ends)."""
        return tuple(tuple(round(float(x), 6) for x in row) for row in self.factor("cpu").detach())

    def __repr__(self):
        return f"LearnedGain({self.log_gain.shape[0]} heads, dim {self.index.numel()}, {self.log_gain.shape[1]} gains)"


def validate_query_gain(kind: str, value):
    """Per query head a sequence of positive numbers, one per coordinate (a nested sequence or a 2D tensor, all
    rows the same length) -> a tuple of tuples; a ``LearnedGain`` as it is."""
    if isinstance(value, LearnedGain):
        return value
    where = f"option {QUERY_GAIN!r} of attention kind {kind!r}"
    if hasattr(value, "tolist"):
        value = value.tolist()
    rows = value if isinstance(value, (list, tuple)) and value else None
    if rows is None or not all(isinstance(r, (list, tuple)) and r for r in rows) or len({len(r) for r in rows}) != 1:
        raise AttnSwapError(f"{where} must hold one row per query head, each one positive number per coordinate of "
                            f"the head (shape (Hq, head_dim)), got {value!r:.200}")
    flat = [v for r in rows for v in r]
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 < v < float("inf") for v in flat):
        raise AttnSwapError(f"{where} must hold finite numbers > 0, got {value!r:.200}")
    return tuple(tuple(float(v) for v in r) for r in rows)


def _per_head_numbers(where: str, value, valid, wanted: str):
    """A number, or a sequence/1D tensor of numbers (one per query head), each ``valid`` -> float or tuple."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        values, single = [float(value)], True
    elif isinstance(value, (list, tuple)) and value and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
        values, single = [float(v) for v in value], False
    else:
        raise AttnSwapError(f"{where} must be a number ({wanted}) or a list of them (one per query head), got "
                            f"{value!r}")
    if not all(valid(v) for v in values):
        raise AttnSwapError(f"{where} must be {wanted}, got {value!r}")
    return values[0] if single else tuple(values)


def validate_score_scale(kind: str, value, name: str = SCORE_SCALE):
    """A positive number, or one per query head -> float or tuple; a ``LearnedScale`` as it is (``score_scale``,
    or ``output_gain`` with ``name``)."""
    if isinstance(value, LearnedScale):
        return value
    return _per_head_numbers(f"option {name!r} of attention kind {kind!r}", value,
                             lambda v: 0 < v < float("inf"), "finite and > 0")


def validate_length_exponent(kind: str, value):
    """A finite number, or one per query head -> float or tuple; a ``LearnedExponent`` as it is."""
    if isinstance(value, LearnedExponent):
        return value
    return _per_head_numbers(f"option {LENGTH_EXPONENT!r} of attention kind {kind!r}", value,
                             lambda v: abs(v) < float("inf"), "finite")


_KINDS: dict[str, Kind] = {}
_listeners: list[Callable[[str], None]] = []


def on_register(fn: Callable[[str], None]) -> None:
    """Call ``fn(name)`` for every kind registered now and later (the transformers integration uses it)."""
    _listeners.append(fn)
    for name in _KINDS:
        fn(name)


def add(kind: Kind, *, overwrite: bool = False) -> Kind:
    if not kind.name or not kind.name.replace("_", "").isalnum():
        raise AttnSwapError(f"kind names are letters, digits and '_', got {kind.name!r}")
    lowered = kind.name.lower()
    for bad in ("flash", "sdpa", "flex_attention", "paged"):
        if bad in lowered:
            raise AttnSwapError(
                f"kind name {kind.name!r} contains {bad!r}, which transformers dispatches on; choose another name"
            )
    existing = _KINDS.get(kind.name)
    if existing is not None and (existing.builtin or not overwrite):
        what = "a built-in kind" if existing.builtin else "already registered (pass overwrite=True to replace it)"
        raise AttnSwapError(f"attention kind {kind.name!r} is {what}")
    _KINDS[kind.name] = kind
    _RESOLVED.clear()
    for fn in _listeners:
        fn(kind.name)
    return kind


def alias(name: str, target: str, doc: str = "", **fixed) -> Kind:
    base = get(target)
    return add(
        Kind(
            name=name,
            forward=base.forward,
            options=base.options,
            doc=doc or base.doc,
            math=base.math,
            uses_scores=base.uses_scores,
            fixed=dict(fixed),
            alias_of=target,
            builtin=base.builtin,
        )
    )


def get(name: str) -> Kind:
    if not isinstance(name, str) or name not in _KINDS:
        raise AttnSwapError(f"unknown attention kind {name!r}; available kinds: {', '.join(sorted(_KINDS))}")
    return _KINDS[name]


def names() -> list[str]:
    return sorted(_KINDS)


_RESOLVED: dict = {}  # (name, options) -> resolved options, for calls that repeat them (the functional API)


def resolve(name: str, options: dict) -> tuple[Kind, dict]:
    """(kind, its resolved options). Remembers what it resolved for hashable options (a few µs a call otherwise);
    registering a kind again forgets it."""
    try:
        key = (name, tuple(options.items()))
        kind, resolved = _RESOLVED[key]
        return kind, dict(resolved)
    except (KeyError, TypeError):  # not seen yet, or an unhashable option value
        pass
    kind = get(name)
    resolved = kind.resolve(options)
    try:
        if len(_RESOLVED) < 4096:
            _RESOLVED[key] = (kind, dict(resolved))
    except TypeError:
        pass
    return kind, resolved
