"""Per layer x query head statistics of the attention a swapped kind computes, without N x N memory.

``attention_stats(model, input_ids, attention_mask, kind="topk", k=8)`` runs the model once (no grad) with its
attention swapped to ``kind`` under ``attnswap.observe.observing``: every weight block the engine computes
(complete rows over the keys a block of queries may see, bounded in size) is reduced to per-row statistics on
the spot and summed per (layer, query head), so no N x N tensor ever exists. Over every query row that is not
padding (``attention_mask`` 1) and sees at least one key (``A_i``, the visible keys):

- ``entropy``            mean ``H = -sum_j p_ij log p_ij`` in nats (``0 log 0 = 0``)
- ``normalized_entropy`` mean ``H / log|A_i|`` over the rows with ``|A_i| >= 2`` (in [0, 1])
- ``gini``               mean Gini coefficient of the row's weights over ``A_i`` (0 uniform, (|A_i|-1)/|A_i| one-hot)
- ``max_weight``         mean ``max_j p_ij``
- ``effective_tokens``   mean ``1 / sum_j p_ij^2`` (0 for a row whose weights are all 0)
- ``sparsity``           fraction of visible keys with ``p_ij == 0`` exactly, pooled over the rows
- ``rows``               how many rows were counted

The weights are the kind's own, as the model uses them: with attention sinks (gpt-oss) the sink's share is not
a key, so rows sum to less than 1 (and for ``|A_i| = 2`` the normalized entropy can then slightly exceed 1);
``linear`` rows sum to 1 - O(eps). Observed weights are taken before attention dropout.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from ..errors import AttnSwapError
from ..observe import observing
from ..patches.swap import current_swap, find_attention, swapped

METRICS = ("entropy", "normalized_entropy", "gini", "max_weight", "effective_tokens", "sparsity")

# The observer reduces a weight block in pieces of at most this many elements, so its temporaries (a sort with
# int64 indices among them) stay small next to the engine's own block (chunked.BLOCK_ELEMENTS).
PIECE_ELEMENTS = 1 << 20


@dataclass
class AttentionStats:
    """Per (layer, query head) means; every metric a float64 tensor of shape (layers, heads).

    Layers that were not swapped (``layers=``) hold NaN everywhere and 0 in ``rows``; so do the padding columns
    of a layer with fewer heads than the widest one. ``layers`` lists the swapped (observed) layer indices.
    """

    kind: str
    options: dict
    layers: list[int]
    entropy: torch.Tensor
    normalized_entropy: torch.Tensor
    gini: torch.Tensor
    max_weight: torch.Tensor
    effective_tokens: torch.Tensor
    sparsity: torch.Tensor
    rows: torch.Tensor  # int64 (layers, heads): rows counted per cell
    num_layers: int = field(init=False)
    num_heads: int = field(init=False)

    def __post_init__(self):
        self.num_layers, self.num_heads = self.entropy.shape

    def metric(self, name: str) -> torch.Tensor:
        if name not in METRICS:
            raise AttnSwapError(f"unknown metric {name!r}; metrics: {', '.join(METRICS)}")
        return getattr(self, name)

    def layer_means(self, name: str) -> list[float | None]:
        """Mean over the heads of each layer (None for a layer without observations)."""
        t = self.metric(name)
        return [_float(_nanmean(t[i])) for i in range(self.num_layers)]

    def mean(self, name: str) -> float | None:
        """Mean over every observed (layer, head) cell: each holds the same rows, so this is the row mean."""
        return _float(_nanmean(self.metric(name).flatten()))

    def summary(self) -> dict[str, float | None]:
        """One table row: the overall mean of each metric."""
        return {name: self.mean(name) for name in METRICS}

    def to_dict(self) -> dict:
        """JSON-ready: kind, options, layers, and per metric the (layers x heads) values (None for NaN), the
        per-layer means and the overall mean."""
        out = {
            "kind": self.kind,
            "options": {k: _jsonable(v) for k, v in self.options.items()},
            "layers": list(self.layers),
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "rows": self.rows.tolist(),
            "metrics": {},
        }
        for name in METRICS:
            t = self.metric(name)
            out["metrics"][name] = {
                "per_head": [[_float(v) for v in row] for row in t.tolist()],
                "per_layer": self.layer_means(name),
                "mean": self.mean(name),
            }
        return out

    def __repr__(self):
        parts = ", ".join(f"{k}={'nan' if v is None else f'{v:.4g}'}" for k, v in self.summary().items())
        return f"AttentionStats(kind={self.kind!r}, options={self.options}, layers={self.layers}, {parts})"


def _nanmean(t: torch.Tensor) -> torch.Tensor:
    ok = ~torch.isnan(t)
    return t[ok].mean() if bool(ok.any()) else t.new_tensor(float("nan"))


def _float(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


def _jsonable(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return repr(v)


# sums per layer, one float64 vector per quantity, indexed by query head; grown as heads are seen
_SUMS = ("rows", "entropy", "norm_rows", "normalized_entropy", "gini", "max_weight", "effective_tokens", "zeros",
         "visible")


class _Accumulator:
    """The observer: reduces each weight block to per-row statistics and sums them per (layer, query head)."""

    def __init__(self, layer_of: dict[int, int], attention_mask: torch.Tensor | None, seq_len: int):
        self.layer_of = layer_of
        self.attention_mask = attention_mask  # (b, N) bool for the current chunk of rows, or None
        self.seq_len = seq_len
        self.sums: dict[int, dict[str, torch.Tensor]] = {}

    def block(self, module, p, visible, *, q0, k0, rows, heads, n, m):
        layer = self.layer_of.get(id(module))
        if layer is None:
            return  # an attention module of some other model (or not found by find_attention): not ours
        b, hkv, groups, qc, kc = p.shape
        h0 = heads.start or 0
        r0 = rows.start or 0
        query_ok = None
        if self.attention_mask is not None:
            if n != self.seq_len:
                raise AttnSwapError(f"attention_stats: an attention call has {n} queries but input_ids has "
                                    f"{self.seq_len} tokens, so padded queries cannot be located")
            query_ok = self.attention_mask[r0:r0 + b, q0:q0 + qc].to(p.device)[:, None, None, :]
        sums = self._sums(layer, (h0 + hkv) * groups, p.device)
        step = max(1, PIECE_ELEMENTS // max(1, b * hkv * groups * kc))
        for i0 in range(0, qc, step):
            i1 = min(qc, i0 + step)
            vis = None
            if visible is not None:
                vis = visible[..., i0:i1, :] if visible.shape[-2] > 1 else visible
            ok = None if query_ok is None else query_ok[..., i0:i1]
            piece = _row_stats(p[..., i0:i1, :], vis, ok)
            lo, hi = h0 * groups, (h0 + hkv) * groups
            for name, value in piece.items():
                sums[name][lo:hi] += value.reshape(-1)

    def _sums(self, layer: int, heads: int, device) -> dict[str, torch.Tensor]:
        sums = self.sums.get(layer)
        if sums is None:
            sums = self.sums[layer] = {k: torch.zeros(heads, dtype=torch.float64, device=device) for k in _SUMS}
        elif sums["rows"].numel() < heads:
            for k, v in sums.items():
                sums[k] = torch.cat([v, v.new_zeros(heads - v.numel())])
        return sums


def _row_stats(p: torch.Tensor, visible: torch.Tensor | None, query_ok: torch.Tensor | None) -> dict:
    """Sums over batch rows and queries of the per-row statistics of ``p`` (b, Hkv, G, q, k): float64 (Hkv, G)."""
    b, hkv, groups, qc, kc = p.shape
    if visible is not None:
        p = torch.where(visible, p, p.new_zeros(()))  # weights are 0 off A_i by contract; make sure
        count = visible.sum(-1, dtype=torch.int64).expand(b, hkv, groups, qc)
    else:
        count = torch.full((b, hkv, groups, qc), kc, dtype=torch.int64, device=p.device)
    zeros = count - torch.count_nonzero(p, dim=-1)  # p is 0 off A_i
    valid = count >= 1
    if query_ok is not None:
        valid = valid & query_ok.bool()
    a = count.to(torch.float32)

    entropy = -torch.special.xlogy(p, p).sum(-1)
    total = p.sum(-1)
    max_weight = p.amax(-1)
    square = torch.linalg.vecdot(p, p)
    effective = torch.where(square > 0, 1.0 / square.clamp_min(1e-30), torch.zeros_like(square))
    # Gini over A_i: sorted ascending, the |A_i| visible weights take the last |A_i| places (invisible ones are
    # 0 and come first; zeros add nothing wherever they sit). With rank r = pos - (kc - |A_i|) in 1..|A_i|:
    # G = sum_r (2r - |A_i| - 1) x_r / (|A_i| sum x) = (2 sum (pos - kc) x + (|A_i| - 1) sum x) / (|A_i| sum x).
    # (pos - kc) is small exactly where x is nonzero, so fp32 keeps this accurate at any kc.
    ordered = torch.sort(p, dim=-1).values
    shift = torch.arange(1 - kc, 1, dtype=p.dtype, device=p.device)
    numer = 2.0 * torch.matmul(ordered, shift) + (a - 1.0) * total
    gini = torch.where(total > 0, numer / (a * total).clamp_min(1e-30), torch.zeros_like(total))
    del ordered
    normal = valid & (count >= 2)
    normalized = entropy / torch.log(a.clamp_min(2.0))

    def put(x, where):
        return torch.where(where, x.double(), x.new_zeros((), dtype=torch.float64)).sum(dim=(0, 3))

    return {
        "rows": valid.sum(dim=(0, 3)).double(),
        "entropy": put(entropy, valid),
        "norm_rows": normal.sum(dim=(0, 3)).double(),
        "normalized_entropy": put(normalized, normal),
        "gini": put(gini, valid),
        "max_weight": put(max_weight, valid),
        "effective_tokens": put(effective, valid),
        "zeros": put(zeros, valid),
        "visible": put(count, valid),
    }


def _finish(sums: dict[int, dict[str, torch.Tensor]], num_layers: int, kind: str, options: dict,
            layers: list[int]) -> AttentionStats:
    heads = max([s["rows"].numel() for s in sums.values()], default=0)
    nan = float("nan")
    out = {name: torch.full((num_layers, heads), nan, dtype=torch.float64) for name in METRICS}
    rows = torch.zeros((num_layers, heads), dtype=torch.int64)
    for layer, s in sums.items():
        s = {k: v.detach().cpu() for k, v in s.items()}
        h = s["rows"].numel()
        n, nn = s["rows"], s["norm_rows"]

        def ratio(num, den):
            return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, nan))

        for name in ("entropy", "gini", "max_weight", "effective_tokens"):
            out[name][layer, :h] = ratio(s[name], n)
        out["normalized_entropy"][layer, :h] = ratio(s["normalized_entropy"], nn)
        out["sparsity"][layer, :h] = ratio(s["zeros"], s["visible"])
        rows[layer, :h] = n.round().to(torch.int64)
    return AttentionStats(kind=kind, options=dict(options), layers=sorted(layers), rows=rows, **out)


def attention_stats(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                    kind: str | None = "softmax", layers=None, batch_size: int | None = None,
                    **options) -> AttentionStats:
    """Per (layer, query head) statistics of ``kind``'s attention on ``input_ids`` (b, N); see the module doc.

    The model runs once per ``batch_size`` rows (all at once by default), without grad and without a KV cache,
    with its attention swapped to ``kind`` with ``options`` on ``layers`` (default all; the earlier swap, if
    any, comes back afterwards). ``kind=None`` uses the model's current swap as it is (its layers, options).
    Memory stays that of the engine's bounded blocks: no N x N tensor is built (the model's own mask aside).
    Layers not swapped are NaN in the result (``rows`` 0); ``result.layers`` lists the swapped ones.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise AttnSwapError(f"input_ids must be a (batch, seq) tensor, got {getattr(input_ids, 'shape', input_ids)!r}")
    b, seq_len = input_ids.shape
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (b, seq_len):
            raise AttnSwapError(f"attention_mask must be a tensor of shape {(b, seq_len)} like input_ids, got "
                                f"{getattr(attention_mask, 'shape', attention_mask)!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise AttnSwapError(f"batch_size must be an integer >= 1 or None, got {batch_size!r}")
    targets = find_attention(model)
    layer_of = {id(module): i for i, (_, module, _) in enumerate(targets)}

    if kind is None:
        handle = current_swap(model)
        if handle is None:
            raise AttnSwapError("attention_stats(kind=None) uses the model's current swap, but the model is not "
                                "swapped; pass a kind (e.g. kind='softmax')")
        if layers is not None or options:
            raise AttnSwapError("attention_stats(kind=None) uses the current swap as it is: layers= and options "
                                "cannot be given with it")
        if handle.options.get("form") == "linear_time":
            # Observing needs the weights; the quadratic form gives the same ones (the two forms are exact).
            opts = {k: v for k, v in handle.options.items() if k not in handle.kind.fixed}
            opts["form"] = "quadratic"
            context = swapped(model, handle.kind.name, layers=handle.layers, impl=handle.impl, **opts)
        else:
            context = contextlib.nullcontext(handle)
    else:
        if options.get("form") == "linear_time":
            options = {**options, "form": "quadratic"}  # same weights; the linear-time form has none to observe
        context = swapped(model, kind, layers=layers, **options)

    device = next(iter(model.parameters()), torch.empty(0)).device
    runner = getattr(model, "base_model", None) or model  # no LM head: (b, N, vocab) logits are not needed
    kwargs = {"output_attentions": False}
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        kwargs["use_cache"] = False
    step = batch_size or b
    with context as handle, torch.no_grad():
        kind_name = handle.kind.name
        resolved = dict(handle.options)
        swapped_layers = list(handle.layers)
        acc = _Accumulator(layer_of, None, seq_len)
        with observing(acc):
            for r0 in range(0, b, step):
                ids = input_ids[r0:r0 + step].to(device)
                am = None if attention_mask is None else attention_mask[r0:r0 + step].to(device)
                acc.attention_mask = None if am is None else am.bool()
                runner(input_ids=ids, attention_mask=am, **kwargs)
    return _finish(acc.sums, len(targets), kind_name, resolved, swapped_layers)
