"""Constant-memory decoding for the feature-map kinds (``linear``, ``taylor``): a transformers ``Cache`` whose
swapped layers keep the running state ``S = sum_j phi(k_j) v_j^T`` and ``z = sum_j phi(k_j)`` (fp32, per KV head)
instead of K/V; for ``window_linear`` (``WindowStateLayer``) also the K/V of each row's sink and window keys, so
its memory is bounded too.

How it fits transformers: the model calls ``cache.update(k, v, layer_idx)`` and then its attention function with
what ``update`` returned. A ``StateLayer`` returns the new keys/values unchanged and marks itself pending; the
attnswap attention function claims it (``claim``: the same key tensor), computes the new queries' output from the
state plus the new keys (``state_attention``), then folds the new keys into the state. ``get_mask_sizes`` reports
the real length (past + new), so a mask shared with ordinary KV layers of the same model stays right; the past
columns of that mask must show exactly the keys the state holds (padding excluded), anything else cannot be
honored by a state and is an error.

Layers left on softmax (``layers=``), sliding-window layers (their KV cache is bounded already) and kinds without
a state keep the layer transformers would give them. ``generate`` on a model swapped to a feature-map kind builds
a ``StateCache`` by itself unless a cache is passed (see ``install_generation_cache``).
"""

from __future__ import annotations

from contextvars import ContextVar

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer

from ..dispatch import gain_outputs, prepare_qk, project
from ..errors import AttnSwapError
from ..kinds.chunked import grouped_matmul
from ..kinds.feature_map import prefix_parts
from ..registry import FEATURE_PROJ, OUTPUT_GAIN
from .masks import model_visibility

_PENDING: ContextVar = ContextVar("attnswap_state_layer", default=None)
KEY_CHUNK = 2048  # keys folded into the state per step (bounds phi(k) to KEY_CHUNK x features)
QUERY_CHUNK = 256  # new queries per step when several new tokens meet a non-empty state


class StateLayer(CacheLayerMixin):
    """One layer's running state: ``state`` (b, Hkv, F, dv), ``norm`` (b, Hkv, F) fp32, ``valid`` (b,) int64 (how many
    past tokens of each row entered the state: padding does not) and ``seen`` (past length, padding included)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, layer_idx: int, owner: "StateCache"):
        super().__init__()
        self.layer_idx, self.owner = layer_idx, owner
        self.state = self.norm = self.valid = None
        self.seen = 0
        self._pending = None

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        self.owner.check_active()
        if self._pending is not None:
            raise AttnSwapError(
                f"StateCache layer {self.layer_idx}: the previous step's keys never reached an attnswap feature-map "
                "attention (was the swap restored or changed?); build a new cache for the current swap"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._pending = key_states
        _PENDING.set(self)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state = self.norm = self.valid = None
        self.seen = 0
        self._pending = None

    def _batch_map(self, fn) -> None:
        if self.state is not None:
            self.state, self.norm = fn(self.state), fn(self.norm)
        if self.valid is not None:
            self.valid = fn(self.valid)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch_map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch_map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._batch_map(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise AttnSwapError("a StateCache cannot be cropped (a running state cannot forget its last tokens); "
                            "use a DynamicCache for assisted or speculative decoding")

    def offload(self):
        self._batch_map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.state is not None and self.state.device != self.device:
            self._batch_map(lambda t: t.to(self.device, non_blocking=True))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.state, self.norm, self.valid) if t is not None)


class WindowStateLayer(StateLayer):
    """``window_linear``'s bounded state: per row the K/V of its first ``sink_tokens`` and last ``local_window``
    real keys (``keys``/``values`` (b, Hkv, C, d), left-aligned, ``kept`` (b,) of them, in order) and the running
    state of the keys in between (``state``/``norm``, their projected features)."""

    def __init__(self, layer_idx: int, owner: "StateCache"):
        super().__init__(layer_idx, owner)
        self.keys = self.values = self.kept = None

    def reset(self) -> None:
        super().reset()
        self.keys = self.values = self.kept = None

    def _batch_map(self, fn) -> None:
        super()._batch_map(fn)
        if self.keys is not None:
            self.keys, self.values, self.kept = fn(self.keys), fn(self.values), fn(self.kept)

    def nbytes(self) -> int:
        return super().nbytes() + sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.kept)
                                      if t is not None)

    def rows(self, key, value, real) -> list:
        """Per row (keys, values (1,Hkv,L,d), n_kept): its kept keys followed by its real new keys."""
        out = []
        for r in range(key.shape[0]):
            mine = slice(None) if real is None else real[r]
            n_kept = int(self.kept[r]) if self.kept is not None else 0
            k, v = key[r:r + 1][:, :, mine], value[r:r + 1][:, :, mine]
            if n_kept:
                k = torch.cat([self.keys[r:r + 1, :, :n_kept], k], dim=2)
                v = torch.cat([self.values[r:r + 1, :, :n_kept], v], dim=2)
            out.append((k, v, n_kept))
        return out

    @torch.no_grad()
    def absorb(self, rows, real, q: int, *, window: int, sink_tokens: int, phi, projection) -> None:
        """Keep each row's (``rows``) sinks and window, fold the keys leaving the window into the state."""
        from ..kinds.window_linear import folded

        b, hkv = len(rows), rows[0][0].shape[1]
        rows_k, rows_v, kept, states, norms = [], [], [], [], []
        for k, v, _ in rows:
            total = k.shape[2]
            if total > sink_tokens + window:
                out = slice(sink_tokens, total - window)
                ds, dz = folded(k[:, :, out], v[:, :, out], phi=phi, projection=projection)
                states.append(ds)
                norms.append(dz)
                keep = torch.cat([torch.arange(sink_tokens), torch.arange(total - window, total)]).to(k.device)
                k, v = k[:, :, keep], v[:, :, keep]
            else:
                states.append(None)
                norms.append(None)
            rows_k.append(k)
            rows_v.append(v)
            kept.append(k.shape[2])
        size = max(kept)
        pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, size - t.shape[2]))  # noqa: E731
        self.keys, self.values = torch.cat([pad(t) for t in rows_k]), torch.cat([pad(t) for t in rows_v])
        device = self.keys.device
        self.kept = torch.tensor(kept, dtype=torch.int64, device=device)
        if any(s is not None for s in states):
            if self.state is None:
                f, dv = next(s for s in states if s is not None).shape[-2:]
                self.state = torch.zeros((b, hkv, f, dv), dtype=torch.float32, device=device)
                self.norm = torch.zeros((b, hkv, f), dtype=torch.float32, device=device)
            for r, (ds, dz) in enumerate(zip(states, norms)):
                if ds is not None:
                    self.state[r:r + 1] += ds
                    self.norm[r:r + 1] += dz
        count = real.sum(-1) if real is not None else torch.full((b,), q, dtype=torch.int64, device=device)
        self.valid = count if self.valid is None else self.valid + count
        self.seen += q


class StateCache(Cache):
    """A transformers ``Cache`` for a model swapped to a feature-map kind: constant-size state on those layers.

    ``model.generate(...)`` builds one by itself; pass ``StateCache(model)`` explicitly (as ``cache=`` or
    ``past_key_values=``, whichever your transformers takes) to reuse it across calls. It belongs to the swap
    active when it was built: using it after that swap was restored or replaced is an error.
    """

    def __init__(self, model):
        from .swap import current_swap

        handle = current_swap(model)
        if handle is None:
            raise AttnSwapError("StateCache needs a model swapped to a feature-map kind (linear, taylor, "
                                "window_linear); this model is not swapped")
        config = model.config.get_text_config(decoder=True) if hasattr(model, "config") else None
        base = DynamicCache(config=config) if config is not None else None
        layers = list(base.layers) if base is not None and base.layers else []
        self.handle = handle
        state_layers = []
        for _, module, route in handle._targets:
            idx = getattr(module, "layer_idx", None)
            if not handle.kind.decodes_with_state or route != "interface" or idx is None:
                continue
            if idx >= len(layers) or type(layers[idx]) is not DynamicLayer:
                continue  # sliding windows, shared or special layers keep what transformers gives them
            windowed = handle.kind.bounded_state is not None
            if handle.kind.uses_scores and not windowed and _softcapped(module):
                continue  # softcapped scores have no feature map: this layer keeps K/V
            if _alibi(module):
                continue  # a position bias added to the scores (in the mask) has no running state: K/V
            layers[idx] = (WindowStateLayer if windowed else StateLayer)(idx, self)
            state_layers.append(idx)
        if not state_layers:
            raise AttnSwapError(
                f"StateCache: no layer of this model keeps a recurrent state under kind {handle.kind.name!r} "
                "(linear, taylor and window_linear have one, on full-attention layers that route through "
                "AttentionInterface)"
            )
        self.state_layers = state_layers
        super().__init__(layers=layers)

    def check_active(self) -> None:
        if not self.handle.active:
            raise AttnSwapError("this StateCache was built for a swap that is no longer active; build a new one")

    def nbytes(self) -> int:
        """Bytes held: the states (and padding flags) of state layers plus the K/V of the other layers."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, StateLayer):
                total += layer.nbytes()
            else:
                total += sum(t.numel() * t.element_size() for t in (getattr(layer, "keys", None),
                                                                     getattr(layer, "values", None))
                             if isinstance(t, torch.Tensor))
        return total


def _softcapped(module) -> bool:
    for where in (module, getattr(module, "config", None)):
        for name in ("attn_logit_softcapping", "softcap"):
            if getattr(where, name, None) is not None:
                return True
    return False


def _alibi(module) -> bool:
    """Whether the model adds ALiBi to the scores through its mask (Falcon's ``alibi``, MPT's, Bloom's)."""
    config = getattr(module, "config", None)
    attn_config = getattr(config, "attn_config", None)
    return bool(getattr(config, "alibi", False) or getattr(attn_config, "alibi", False)
                or getattr(config, "model_type", None) == "bloom")


def claim(key: torch.Tensor) -> StateLayer | None:
    """The state layer whose ``update`` just returned ``key``, if any (consumed by this call)."""
    layer = _PENDING.get()
    if layer is None or layer._pending is not key:
        return None
    _PENDING.set(None)
    layer._pending = None
    return layer


def _bool_mask(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask
    visible = mask > torch.finfo(mask.dtype).min / 2
    if bool((visible & (mask != 0)).any()):
        raise AttnSwapError("a StateCache cannot honor an additive score bias in the attention mask")
    return visible


def _split_mask(attention_mask, layer: StateLayer, b: int, q: int):
    """-> (mask over the new keys (b|1, 1|H, q|1, q) bool or None, (b, q) bool of new keys that are real)."""
    past = layer.seen
    if attention_mask is None:
        return None, None
    if not isinstance(attention_mask, torch.Tensor):
        raise AttnSwapError(f"a StateCache cannot honor an attention mask of type {type(attention_mask).__name__}")
    mask = _bool_mask(attention_mask)
    if mask.dim() == 2:  # key padding (b, past + q)
        mask = mask[:, None, None, :]
    if mask.dim() != 4 or mask.shape[-1] not in (q, past + q):
        raise AttnSwapError(f"StateCache layer {layer.layer_idx}: an attention mask of shape "
                            f"{tuple(attention_mask.shape)} does not fit {past} past + {q} new keys")
    new = mask[..., -q:]
    if mask.shape[-1] == past + q and past:
        old = mask[..., :past]
        rows = new.any(-1) | old.any(-1)  # query rows that see something (padded queries see nothing)
        shown = old.sum(-1)  # past keys each query sees
        expected = layer.valid[:, None, None] if layer.valid is not None else torch.full_like(shown, past)
        if bool(((shown != expected) & rows).any()):
            raise AttnSwapError(
                f"StateCache layer {layer.layer_idx}: the mask hides past keys from some queries, which a running "
                "state cannot honor (it only knows how many past tokens of each row were real); use a DynamicCache"
            )
    real = new.expand(b, -1, -1, -1).any(dim=1).any(dim=1)  # (b, q): some query sees it
    return new, real


def state_attention(layer: StateLayer, spec, query, key, value, attention_mask, *, scaling, is_causal, softcap=None,
                    sinks=None, need_weights=False, run_attention=None):
    """Output (b, Hq, q, dv) of the new queries against the state plus the new keys; then fold the new keys in."""
    kind = spec.kind
    if isinstance(layer, WindowStateLayer):
        return _window_attention(layer, spec, query, key, value, attention_mask, scaling=scaling,
                                 is_causal=is_causal, softcap=softcap, sinks=sinks, need_weights=need_weights,
                                 run_attention=run_attention)
    if kind.state_features is None:
        raise AttnSwapError(f"StateCache layer {layer.layer_idx} runs kind {kind.name!r}, which has no recurrent "
                            "state; use a DynamicCache")
    if softcap is not None and kind.uses_scores:  # (kinds without scores ignore a softcap, as dispatch.run does)
        raise AttnSwapError(f"kind {kind.name!r} with the model's softcap has no recurrent form; use a DynamicCache")
    if need_weights:
        raise AttnSwapError("a StateCache returns no attention weights; use a DynamicCache with output_attentions")
    b, hq, q, _ = query.shape
    groups = hq // key.shape[1]
    phi, eps, sink_weight = kind.state_features(scaling, spec.options)
    new_mask, real = _split_mask(attention_mask, layer, b, q)
    if layer.state is None and layer.seen == 0:
        # first call (prefill): ordinary attention over the new tokens (Triton kernel on GPU), then the state
        vis_mask = attention_mask if attention_mask is None or attention_mask.shape[-1] == q else new_mask
        vis = model_visibility(vis_mask, query, key, is_causal=is_causal, native=spec.native)
        out = run_attention(vis)
        if FEATURE_PROJ in spec.options:  # the state holds keys after the learned projection
            key = project(spec.options[FEATURE_PROJ], query, key)[1]
    else:  # queries and keys as dispatch.run would see them (learned projection, score scale)
        query, key, _ = prepare_qk(spec.options, query, key,
                                   counts=lambda: _key_counts(layer, real, b, q, is_causal, query.device))
        if _fused_step_applies(query, key, value, layer, new_mask):
            out = _fused_step(layer, phi, eps, sink_weight, sinks, query, key, value, real)
            _count(layer, real, q, b, key.device)
            return gain_outputs(out, spec.options.get(OUTPUT_GAIN))
        out = _with_state(layer, phi, eps, sink_weight, sinks, query, key, value, new_mask, is_causal, groups)
        out = gain_outputs(out, spec.options.get(OUTPUT_GAIN))  # (the prefill's run_attention applied it)
    _fold(layer, phi, key, value, real)
    return out


def _window_attention(layer: WindowStateLayer, spec, query, key, value, attention_mask, *, scaling, is_causal,
                      softcap, sinks, need_weights, run_attention):
    from ..kinds.window_linear import cached_step

    if spec.kind.bounded_state is None:
        raise AttnSwapError(f"StateCache layer {layer.layer_idx} keeps a window for window_linear but runs kind "
                            f"{spec.kind.name!r}; build a new cache for the current swap")
    if need_weights:
        raise AttnSwapError("a StateCache returns no attention weights; use a DynamicCache with output_attentions")
    b, _, q, _ = query.shape
    window, sink_tokens, phi, eps = spec.kind.bounded_state(spec.options)
    projection = spec.options.get(FEATURE_PROJ)
    new_mask, real = _split_mask(attention_mask, layer, b, q)
    if layer.seen == 0:  # prefill: the kind's own forward (linear-time form for long inputs), then the cache
        vis_mask = attention_mask if attention_mask is None or attention_mask.shape[-1] == q else new_mask
        out = run_attention(model_visibility(vis_mask, query, key, is_causal=is_causal, native=spec.native))
    else:
        _check_new_keys(layer, new_mask, real, is_causal, q)
        query, key, _ = prepare_qk(spec.options, query, key, keep_projection=True,  # score_scale, as dispatch does
                                   counts=lambda: _key_counts(layer, real, b, q, is_causal, query.device))
    rows = layer.rows(key, value, real)  # per row: kept keys, then the real new ones (decode step and cache update)
    if layer.seen:
        out = cached_step(query, rows, real, layer.state, layer.norm, causal=is_causal, window=window,
                          sink_tokens=sink_tokens, phi=phi, eps=eps, scaling=scaling, softcap=softcap, sinks=sinks,
                          projection=projection)
        out = gain_outputs(out, spec.options.get(OUTPUT_GAIN))
    layer.absorb(rows, real, q, window=window, sink_tokens=sink_tokens, phi=phi, projection=projection)
    return out


def _check_new_keys(layer, new_mask, real, is_causal: bool, q: int) -> None:
    """The mask over the new keys must be what the window ranks assume: each real new key visible to the queries
    at or after it (all of them when not causal)."""
    if new_mask is None:
        return
    b = new_mask.shape[0]
    seen = real if real is not None else torch.ones(b, q, dtype=torch.bool, device=new_mask.device)
    expected = seen[:, None, None, :].expand(-1, 1, q, -1)
    if is_causal:
        expected = expected & torch.ones(q, q, dtype=torch.bool, device=new_mask.device).tril()
    rows = new_mask.any(-1, keepdim=True)  # padded queries see nothing: their rows do not matter
    if bool(((new_mask != expected) & rows).any()):
        raise AttnSwapError(f"StateCache layer {layer.layer_idx}: the mask over the new keys is not causal key "
                            "padding, which window_linear's bounded cache cannot honor; use a DynamicCache")


FUSED_STEP = "auto"  # "auto": the fused Triton step on CUDA tensors; "always" (the interpreter: tests); "never"


def _fused_step_applies(query, key, value, layer: StateLayer, new_mask) -> bool:
    """One new token per row against a state, its mask (if any) shared by the heads: then the new key is visible to
    its own query exactly when it is real, which is what ``kernels.state_step`` computes."""
    if query.shape[2] != 1 or layer.state is None or FUSED_STEP == "never":
        return False
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return False  # the kernel has no backward: a step that trains keeps the PyTorch path
    if new_mask is not None and new_mask.shape[1] != 1:
        return False
    return query.is_cuda or FUSED_STEP == "always"


def _fused_step(layer, phi, eps, sink_weight, sinks, query, key, value, real):
    """``_with_state`` then ``_fold`` for one new token per row, as one kernel launch (``kernels.state_step``)."""
    from ..kernels.state_step import state_step

    b, hq = query.shape[:2]
    hkv = key.shape[1]
    fq = phi(query.float()).reshape(b, hkv, hq // hkv, -1)
    fk = phi(key.float())[:, :, 0]
    extra = torch.full((hq,), float(eps), device=query.device, dtype=torch.float32)
    if sink_weight is not None and sinks is not None:
        extra = extra + sink_weight(sinks.float()).reshape(hq)
    if not (layer.state.is_contiguous() and layer.norm.is_contiguous()):
        layer.state, layer.norm = layer.state.contiguous(), layer.norm.contiguous()
    return state_step(fq, fk, value[:, :, 0], layer.state, layer.norm, extra,
                      real=None if real is None else real[:, 0])


def _with_state(layer, phi, eps, sink_weight, sinks, query, key, value, new_mask, is_causal, groups):
    """New queries against the running state plus the new keys their mask shows them: in linear time when that
    mask is causal (or full) key padding, exactly by blocks of queries for any other mask."""
    b, hq, q, d = query.shape
    hkv, dv = key.shape[1], value.shape[-1]
    qg = query.float().reshape(b, hkv, groups, q, d)
    initial = None if layer.state is None else (layer.state[:, :, None], layer.norm[:, :, None])
    padding = _key_padding(new_mask, is_causal, q)
    if padding is not False:
        def key_features(k0, k1):
            fk = phi(key[:, :, None, k0:k1].float())
            return fk if padding is None else fk * padding[:, None, None, k0:k1, None].to(fk.dtype)

        ends = torch.arange(1, q + 1) if is_causal else torch.full((q,), q)
        num, den = prefix_parts(lambda q0, q1: phi(qg[..., q0:q1, :]), key_features, value[:, :, None], ends,
                                initial=initial, chunk=QUERY_CHUNK)
    else:
        num, den = _masked_parts(phi, qg, key, value, new_mask, initial, groups)
    if sink_weight is not None and sinks is not None:
        den = den + sink_weight(sinks.float()).reshape(1, hkv, groups, 1)
    den = den + eps
    out = num / torch.where(den == 0, torch.ones_like(den), den).unsqueeze(-1)
    return out.reshape(b, hq, q, dv)


def _key_padding(new_mask, is_causal: bool, q: int):
    """The new keys' mask as key padding: None (no mask), a (b, q) bool of the keys that are real, or False when the
    mask is something else (per-head, or hiding keys from some queries but not others)."""
    if new_mask is None:
        return None
    if new_mask.shape[1] != 1:
        return False
    real = new_mask[:, 0].any(dim=-2)  # (b, q): keys some query sees
    expected = real[:, None, :].expand(-1, q, -1)
    if is_causal:
        expected = expected & torch.ones(q, q, dtype=torch.bool, device=new_mask.device).tril()
    return real if bool((new_mask[:, 0] == expected).all()) else False


def _masked_parts(phi, qg, key, value, new_mask, initial, groups):
    """Numerator and denominator under an arbitrary bool mask over the new keys, by blocks of queries."""
    b, hkv, _, q, _ = qg.shape
    fk = phi(key.float())  # (b, Hkv, q, F)
    vf = value.float()
    mb, mh = new_mask.shape[:2]
    grouped = new_mask[:, :, None] if mh == 1 else new_mask.reshape(mb, hkv, groups, *new_mask.shape[2:])
    nums, dens = [], []
    for q0 in range(0, q, QUERY_CHUNK):
        q1 = min(q, q0 + QUERY_CHUNK)
        fq = phi(qg[..., q0:q1, :])  # (b, Hkv, G, c, F)
        num = grouped_matmul(fq, initial[0]) if initial is not None else 0.0
        den = (fq * initial[1].unsqueeze(-2)).sum(-1) if initial is not None else 0.0
        a = grouped_matmul(fq, fk[:, :, None].transpose(-1, -2))  # (b, Hkv, G, c, q)
        a = a * grouped[..., q0:q1, :] if grouped.shape[-2] > 1 else a * grouped
        nums.append(num + grouped_matmul(a, vf[:, :, None]))
        dens.append(den + a.sum(-1))
    return torch.cat(nums, dim=3), torch.cat(dens, dim=3)


@torch.no_grad()
def _fold(layer: StateLayer, phi, key, value, real) -> None:
    """state += phi(k)^T v, norm += sum phi(k) over the real new keys (in chunks of KEY_CHUNK); count them."""
    b, hkv, q, _ = key.shape
    for k0 in range(0, q, KEY_CHUNK):
        k1 = min(q, k0 + KEY_CHUNK)
        fk = phi(key[:, :, k0:k1].float())
        if real is not None:
            fk = fk * real[:, None, k0:k1, None].to(fk.dtype)
        ds = torch.matmul(fk.transpose(-1, -2), value[:, :, k0:k1].float())
        dz = fk.sum(-2)
        if layer.state is None:
            layer.state, layer.norm = ds, dz
        else:
            layer.state += ds
            layer.norm += dz
    _count(layer, real, q, b, key.device)


def _key_counts(layer: StateLayer, real, b: int, q: int, is_causal: bool, device) -> torch.Tensor:
    """(b, 1, 1, q) fp32: how many keys each new query sees (the row's real past tokens, then its real new ones up
    to itself, or all of them when not causal), as ``Visibility.key_counts`` counts them for a length exponent."""
    past = (layer.valid.to(device) if layer.valid is not None
            else torch.full((b,), layer.seen, dtype=torch.int64, device=device))
    new = real.long().to(device) if real is not None else torch.ones((b, q), dtype=torch.int64, device=device)
    new = new.cumsum(1) if is_causal else new.sum(1, keepdim=True).expand(b, q)
    return (past[:, None] + new).float().clamp(min=1)[:, None, None]


def _count(layer: StateLayer, real, q: int, b: int, device) -> None:
    """Record ``q`` more past tokens, of which each row's real ones (``real`` (b, q) or None: all) entered the state."""
    count = real.sum(-1) if real is not None else torch.full((b,), q, dtype=torch.int64, device=device)
    layer.valid = count if layer.valid is None else layer.valid + count
    layer.seen += q


CACHE_KWARGS = ("cache", "past_key_values")


def install_generation_cache(model) -> object:
    """Make ``model.generate`` build a ``StateCache`` when the caller passes no cache; returns what to restore."""
    cls_method = type(model)._prepare_cache_for_generation if hasattr(type(model), "_prepare_cache_for_generation") \
        else None
    if cls_method is None:
        return None
    had_own = "_prepare_cache_for_generation" in model.__dict__
    previous = model.__dict__.get("_prepare_cache_for_generation")
    original = cls_method.__get__(model)

    def prepare_cache_for_generation(*args, **kwargs):
        model_kwargs = kwargs.get("model_kwargs", args[1] if len(args) > 1 else None)
        given = isinstance(model_kwargs, dict) and any(model_kwargs.get(k) is not None for k in CACHE_KWARGS)
        result = original(*args, **kwargs)
        if isinstance(model_kwargs, dict) and not given:
            for name in CACHE_KWARGS:
                if type(model_kwargs.get(name)) is DynamicCache:
                    try:
                        model_kwargs[name] = StateCache(model)
                    except AttnSwapError:  # no layer of this model can keep a state: K/V as usual
                        pass
        return result

    model.__dict__["_prepare_cache_for_generation"] = prepare_cache_for_generation
    return (had_own, previous)


def remove_generation_cache(model, saved) -> None:
    if saved is None:
        return
    had_own, previous = saved
    if had_own:
        model.__dict__["_prepare_cache_for_generation"] = previous
    else:
        model.__dict__.pop("_prepare_cache_for_generation", None)


def cache_argument(model) -> str:
    """The name this transformers version's model forward takes a cache under (``cache`` from 5.24 on)."""
    import inspect

    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model) -> Cache:
    """The cache ``generate`` would use for this model now: a ``StateCache`` when its swap keeps a running state,
    else a ``DynamicCache``."""
    from .swap import current_swap

    handle = current_swap(model)
    if handle is not None and handle.active and handle.kind.decodes_with_state:
        try:
            return StateCache(model)
        except AttnSwapError:
            pass
    config = getattr(model, "config", None)
    return DynamicCache(config=config.get_text_config(decoder=True)) if config is not None else DynamicCache()


def cache_nbytes(cache) -> int:
    """Bytes a cache holds (K/V, or running states)."""
    if isinstance(cache, StateCache):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in getattr(cache, "layers", [])
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor))
