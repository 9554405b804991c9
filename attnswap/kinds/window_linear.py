"""``window_linear``: softmax on the few keys that matter most exactly, linear attention on the rest (LoLCATs'
sliding-window + linear hybrid, with StreamingLLM's sink tokens).

For query i with visible keys A_i, the exact keys E_i are the last ``local_window`` keys of A_i and its first
``sink_tokens`` keys (where pretrained models park attention); the other visible keys L_i = A_i \\ E_i are linear:

    w_ij = exp(s_ij - c_i) on E_i (c_i = max_{j in E_i} s_ij),   w_ij = phi(q_i).phi(k_j) on L_i,
    p_ij = w_ij / (sum_{j in A_i} w_ij + eps)

with s_ij the model's scores (scaling, softcap, bias, its attention sinks as exact logits) and phi the Hedgehog map
(or ELU+1) on queries and keys through the swap's learned ``feature_proj``, which this kind applies to its linear
part only: ``attnswap.transfer`` trains it. "Last" and "first" count visible keys, so left padding and decoding
(queries after a cache) place the window and the sink tokens on real tokens.

Two exact forms: quadratic (chunked over queries, any mask) and, for causal attention whose key padding is one run
of real tokens per row (left or right padding), a linear-time form: per query chunk, the sink keys and the band
of window keys exactly, and the older keys from a running feature-map state (``feature_map.linear_time_attention``).
On a GPU the Triton kernel (``attnswap/kernels/window_linear.py``) runs causal attention with no padding or left
padding, forward and backward. Decoding with ``attnswap.StateCache`` keeps, per row, the sink and window keys' K/V and a running state of the rest
(``cached_step``): memory bounded by ``sink_tokens + local_window`` keys, whatever the context.
"""

from __future__ import annotations

import torch

from .. import registry
from ..errors import AttnSwapError
from .chunked import group_heads, grouped_matmul, scored_attention, ungroup_heads
from .feature_map import CHUNK, FORMS, linear_time_attention, prefix_parts, use_linear_time
from .linear import FEATURE_MAPS
from .visibility import Visibility

MIN_KEYS_LINEAR_TIME = 512  # measured on CPU: 2.2x faster forward+backward than the quadratic form at 512


def exact_keys(visible: torch.Tensor, like: torch.Tensor, *, window: int, sink_tokens: int,
               sink_column: bool) -> torch.Tensor:
    """Bool, True on each row's exact keys: its last ``window`` and first ``sink_tokens`` visible keys (and the
    model's sink-logit column, the last, when ``sink_column``)."""
    vis = torch.ones_like(like, dtype=torch.bool) if visible is None else visible.expand_as(like)
    real = vis.clone()
    if sink_column:
        real[..., -1] = False
    rank = torch.cumsum(real.to(torch.int32), dim=-1)  # 1-based rank of each visible key in its row
    after = rank[..., -1:] - rank  # visible keys after this one
    exact = real & ((after < window) | (rank <= sink_tokens))
    if sink_column:
        exact[..., -1] = vis[..., -1]
    return exact


def make_normalize(window: int, sink_tokens: int, eps: float, sink_column: bool):
    def normalize(s, visible, *, pairs):
        exact = exact_keys(visible, s, window=window, sink_tokens=sink_tokens, sink_column=sink_column)
        s_exact = s.masked_fill(~exact, float("-inf"))
        top = s_exact.amax(dim=-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        w_exact = torch.exp(s_exact - top)  # 0 off the exact keys
        linear = pairs if visible is None else pairs * visible
        w = torch.where(exact, w_exact, linear * ~exact)
        den = w.sum(-1, keepdim=True) + eps
        return w / torch.where(den == 0, torch.ones_like(den), den)

    return normalize


def real_runs(vis: Visibility, batch: int):
    """Per batch row, the (start, length) of its real keys when they form one run (no padding, left or right
    padding) shared by all heads; None otherwise (holes, per-head padding)."""
    valid = vis.key_valid()
    if valid is None:
        return [(0, vis.m)] * batch
    if valid.shape[1] != 1 or valid.shape[2] != 1:
        return None
    runs = []
    for row in valid.reshape(valid.shape[0], vis.m).expand(batch, vis.m):
        idx = torch.nonzero(row).flatten()
        if idx.numel() == 0:
            runs.append((0, 0))
        elif int(idx[-1]) - int(idx[0]) + 1 != idx.numel():
            return None
        else:
            runs.append((int(idx[0]), idx.numel()))
    return runs


def _exact_part(qg, kg, vg, counts, *, window, sink_tokens, scaling, softcap, sink_logit, chunk):
    """Numerator and denominator of the exact part, exp(s - c_i) over each query's sink and window keys, for one
    row of compacted keys; ``counts[p]`` = real keys query p sees. qg (1,Hkv,G,n,d), kg/vg (1,Hkv,1,L,d)."""
    n = qg.shape[3]
    nums, dens = [], []
    for q0 in range(0, n, chunk):
        q1 = min(n, q0 + chunk)
        c = counts[q0:q1]  # nondecreasing
        lo, hi = max(sink_tokens, int(c[0]) - window), int(c[-1])
        sink_hi = min(sink_tokens, hi)
        keys = torch.cat([torch.arange(0, sink_hi), torch.arange(min(max(lo, sink_hi), hi), hi)]).to(qg.device)
        qb = qg[..., q0:q1, :].float()
        if keys.numel() == 0:  # no real key yet: nothing to attend (a sink logit alone gives no output)
            nums.append(qb.new_zeros((*qb.shape[:-1], vg.shape[-1])))
            dens.append(qb.new_zeros(qb.shape[:-1]))
            continue
        s = grouped_matmul(qb, kg[..., keys, :].float().transpose(-1, -2)) * scaling
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        j, cc = keys[None, :], c[:, None].to(qg.device)
        ok = (j < cc) & ((j < sink_tokens) | (j >= cc - window))
        s = s.masked_fill(~ok, float("-inf"))
        if sink_logit is not None:
            s = torch.cat([s, sink_logit.expand(*s.shape[:-1], 1)], dim=-1)
        top = s.amax(dim=-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        w = torch.exp(s - top)
        if sink_logit is not None:
            w, w_sink = w[..., :-1], w[..., -1]
        nums.append(grouped_matmul(w, vg[..., keys, :].float()))
        dens.append(w.sum(-1) + (w_sink if sink_logit is not None else 0.0))
    return torch.cat(nums, dim=3), torch.cat(dens, dim=3)


def _features(x, phi, projection):
    """phi of (projected) queries or keys, fp32."""
    return phi(x.float() if projection is None else projection.apply(x))


def cached_step(query, rows, real, state, norm, *, causal, window, sink_tokens, phi, eps, scaling, softcap, sinks,
                projection):
    """Output (b,Hq,q,dv) fp32 of new queries against a bounded cache (``attnswap.StateCache``).

    ``rows[r]`` = (keys, values (1,Hkv,L,d), n_kept): row r's kept keys in order (its first ``sink_tokens`` real
    keys and its most recent ones, ``n_kept`` of them) followed by its real new keys (``real`` (b,q) bool or None:
    which new tokens are not padding). Every key folded out (``state`` (b,Hkv,F,dv), ``norm`` (b,Hkv,F) of the
    projected features, or None) is older than any new query's window and is not a sink, so it is linear for all
    of them. Query p sees the kept keys and the real new keys up to itself (all when not causal)."""
    b, hq, q, _ = query.shape
    hkv = rows[0][0].shape[1]
    sink_logit = None if sinks is None else sinks.float().reshape(1, hkv, hq // hkv, 1, 1)
    outs = []
    for r, (k, v, n_kept) in enumerate(rows):
        mine = torch.ones(q, dtype=torch.bool, device=k.device) if real is None else real[r]
        seen_new = torch.cumsum(mine.to(torch.int64), 0) if causal else mine.sum().expand(q)
        counts = (n_kept + seen_new).cpu()
        qg, kg, vg = group_heads(query[r:r + 1], k, v)
        num, den = _exact_part(qg, kg, vg, counts, window=window, sink_tokens=sink_tokens, scaling=scaling,
                               softcap=softcap, sink_logit=sink_logit, chunk=CHUNK)
        # the linear part: the folded state, then the kept and new keys before each query's window (not sinks)
        older = (counts - window - sink_tokens).clamp(min=0)  # query p: keys [sink_tokens, sink_tokens + older[p])
        initial = None if state is None else (state[r:r + 1, :, None], norm[r:r + 1, :, None])
        nl, dl = prefix_parts(lambda q0, q1: _features(qg[..., q0:q1, :], phi, projection),
                              lambda k0, k1: _features(kg[..., sink_tokens + k0:sink_tokens + k1, :], phi, projection),
                              vg[..., sink_tokens:, :], older, initial=initial, chunk=CHUNK)
        num, den = num + nl, den + dl + eps
        outs.append(ungroup_heads(num / torch.where(den == 0, torch.ones_like(den), den).unsqueeze(-1)))
    return torch.cat(outs, dim=0)


def folded(keys, values, *, phi, projection, chunk: int = 2048):
    """What keys leaving the exact window add to the running state: (sum phi(P k) v^T (1,Hkv,F,dv), sum phi(P k)
    (1,Hkv,F)) for keys/values (1,Hkv,m,d) of one row."""
    state = norm = 0.0
    for k0 in range(0, keys.shape[2], chunk):
        k = keys[:, :, k0:k0 + chunk]
        fk = phi((k.float() if projection is None else projection.apply(k[:, :, None])[:, :, 0]))
        state = state + torch.matmul(fk.transpose(-1, -2), values[:, :, k0:k0 + chunk].float())
        norm = norm + fk.sum(-2)
    return state, norm


def bounded_state(options: dict):
    """For the StateCache: (local_window, sink_tokens, feature map, eps)."""
    return options["local_window"], options["sink_tokens"], FEATURE_MAPS[options["feature_map"]], options["eps"]


def linear_time_forward(query, key, value, vis, runs, *, window, sink_tokens, phi, eps, scaling, softcap, sinks,
                        projection, chunk=None):
    """The linear-time form (causal, one run of real keys per row): out (b,Hq,n,dv) fp32."""
    chunk = chunk or CHUNK
    b, hq, n, _ = query.shape
    hkv = key.shape[1]
    sink_logit = None if sinks is None else sinks.float().reshape(1, hkv, hq // hkv, 1, 1)
    outs = []
    for r, (start, length) in enumerate(runs):
        q, k, v = query[r:r + 1], key[r:r + 1, :, start:start + length], value[r:r + 1, :, start:start + length]
        offset = vis.offset - start  # query p sees the compacted keys [0, p + offset + 1)
        counts = (torch.arange(n) + offset + 1).clamp(0, length)
        qg, kg, vg = group_heads(q, k, v)
        num, den = _exact_part(qg, kg, vg, counts, window=window, sink_tokens=sink_tokens, scaling=scaling,
                               softcap=softcap, sink_logit=sink_logit, chunk=chunk)
        num, den = ungroup_heads(num), ungroup_heads(den)
        older = length - window - sink_tokens  # keys that can be linear: [sink_tokens, length - window)
        if older > 0:
            pq = ungroup_heads(qg.float() if projection is None else projection.apply(qg))
            pk = (kg.float() if projection is None else projection.apply(kg))[:, :, 0, sink_tokens:]
            # queries with p + offset + 1 <= length: the older keys before their own window (causal); the later
            # ones (right padding) all see the run's end
            split = max(0, min(n, length - offset - 1))
            for p0, p1, sub in ((0, split, Visibility(n=split, m=length - sink_tokens, causal=True,
                                                      offset=offset - window - sink_tokens)),
                                (split, n, Visibility(n=n - split, m=older))):
                if p1 <= p0:
                    continue
                nl, dl = linear_time_attention(pq[:, :, p0:p1], pk[:, :, :sub.m], v[:, :, sink_tokens:][:, :, :sub.m],
                                               sub, feature_map=phi, chunk=chunk, parts=True)
                num[:, :, p0:p1] = num[:, :, p0:p1] + nl
                den[:, :, p0:p1] = den[:, :, p0:p1] + dl
        den = den + eps
        outs.append(num / torch.where(den == 0, torch.ones_like(den), den).unsqueeze(-1))
    return torch.cat(outs, dim=0)


def forward(query, key, value, vis, *, local_window, sink_tokens, feature_map, eps, form="auto", scaling,
            softcap=None, sinks=None, dropout=0.0, need_weights=False, observe=None, feature_proj=None):
    phi = FEATURE_MAPS[feature_map]
    n, m = query.shape[2], key.shape[2]
    causal_only = vis.is_structured and vis.causal and vis.window is None
    runs = None  # the real keys' runs are looked at only when the linear-time form is wanted
    if (causal_only or form == "linear_time") and use_linear_time(
            form, "window_linear", vis, n=n, m=m, min_keys=MIN_KEYS_LINEAR_TIME, dropout=dropout,
            need_weights=need_weights or observe is not None):
        runs = real_runs(vis, query.shape[0]) if causal_only else None
        if runs is None and form == "linear_time":
            raise AttnSwapError("kind 'window_linear' with form='linear_time' needs causal attention without a "
                                "sliding window whose real keys form one run per row (no padding, left or right "
                                "padding); use form='quadratic' or 'auto'")
    if runs is not None:
        out = linear_time_forward(query, key, value, vis, runs, window=local_window, sink_tokens=sink_tokens,
                                  phi=phi, eps=eps, scaling=scaling, softcap=softcap, sinks=sinks,
                                  projection=feature_proj)
        return out, None

    def pair_weights(qb, kb, heads):  # the learned map acts on the linear part only
        if feature_proj is not None:
            qb, kb = feature_proj.apply(qb, heads), feature_proj.apply(kb, heads)
        fq, fk = phi(qb), phi(kb)
        return grouped_matmul(fq, fk.transpose(-1, -2))

    normalize = make_normalize(local_window, sink_tokens, eps, sink_column=sinks is not None)
    return scored_attention(query, key, value, vis, normalize=normalize, options={}, scaling=scaling, softcap=softcap,
                            sinks=sinks, dropout=dropout, need_weights=need_weights, observe=observe,
                            pair_weights=pair_weights)


KIND = registry.add(
    registry.Kind(
        name="window_linear",
        forward=forward,
        options=(
            registry.Option("local_window", int, 64, doc="recent visible keys each query attends with exact softmax",
                            rule="an integer >= 1", check=lambda v: v >= 1),
            registry.Option("sink_tokens", int, 4, doc="first visible keys each query attends with exact softmax",
                            rule="an integer >= 0", check=lambda v: v >= 0),
            registry.Option("feature_map", str, "hedgehog", doc="feature map of the linear part: hedgehog | elu",
                            choices=tuple(FEATURE_MAPS)),
            registry.Option("eps", float, 1e-6, doc="added to the denominator", rule="a number >= 0",
                            check=lambda v: v >= 0),
            registry.Option("form", str, "auto", doc="auto | quadratic | linear_time", choices=FORMS),
        ),
        doc="Sliding-window softmax plus sink tokens exactly, linear attention on the rest (LoLCATs-style hybrid); "
            "learn its feature map with attnswap.transfer.",
        math="p_ij ~ exp(s_ij - c_i) on the last `local_window` and first `sink_tokens` visible keys, phi(q_i).phi(k_j) "
             "on the others",
        builtin=True,
        applies_feature_proj=True,
        bounded_state=bounded_state,
    )
)
