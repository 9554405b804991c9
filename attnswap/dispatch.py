"""One entry for every caller (the functional API, the transformers adapter, the class patches): pick the path for a
call (torch's SDPA, a Triton kernel or the PyTorch reference), and return the output in the input's dtype."""

from __future__ import annotations

import functools
import warnings

import torch

from .errors import AttnSwapError
from .kinds.softmax import sdpa_attention
from .kinds.visibility import Visibility
from .observe import current_observer, current_tap
from . import registry
from .registry import Kind

IMPLS = ("auto", "torch", "triton")
_warned: set = set()
_broken: set = set()  # kinds whose kernel failed on this machine


def warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=4)  # the caller of run (run -> run_kind -> warn_once)


def run(kind: Kind, options: dict, query, key, value, vis: Visibility, **kw):
    """Attention of ``kind``: returns ``(out (b,Hq,n,dv) in query.dtype, weights (b,Hq,n,m) | None)``; the path
    (``run_kind``), then an ``output_gain`` on each head's output."""
    if registry.OUTPUT_GAIN not in options:
        return run_kind(kind, options, query, key, value, vis, **kw)
    options = dict(options)
    gain = options.pop(registry.OUTPUT_GAIN)
    out, weights = run_kind(kind, options, query, key, value, vis, **kw)
    return gain_outputs(out, gain), weights


def gain_outputs(out: torch.Tensor, gain) -> torch.Tensor:
    """out (b, Hq, n, dv) times an ``output_gain`` (None: as it is): one number, one per query head, or a
    ``LearnedScale`` (computed in fp32; differentiable in a learned gain)."""
    return scale_heads(out, gain, registry.OUTPUT_GAIN)


def run_kind(kind: Kind, options: dict, query, key, value, vis: Visibility, *, scaling: float, softcap=None,
             sinks=None, dropout: float = 0.0, need_weights: bool = False, impl: str = "auto", module=None):
    """Attention of ``kind`` (options without an output gain) on the path for this call.

    The path: (1) torch's fused SDPA, one call, when the kind is plain softmax on this call and SDPA expresses it as
    given (``sdpa_attention``) and is the faster path here (``prefer_sdpa``); else (2) the kind's Triton kernel on
    CUDA (``impl="auto"``) or anywhere (``"triton"``), where it supports the call; else (3) the PyTorch reference.
    ``module``: the model's attention module making the call, for an active ``attnswap.observe`` observer.
    """
    if impl not in IMPLS:
        raise AttnSwapError(f"impl must be one of {list(IMPLS)}, got {impl!r}")
    if not kind.uses_scores and softcap is not None:
        warn_once((kind.name, "softcap"), f"kind {kind.name!r} has no scores: the model's softcap does not apply")
    if not kind.uses_scores and sinks is not None:
        warn_once((kind.name, "sinks"), f"kind {kind.name!r} has no scores: the model's attention sinks do not apply")
    if kind.uses_scores and sinks is not None and sinks.shape != (query.shape[1],):
        raise AttnSwapError(f"sinks must have shape (Hq,) = ({query.shape[1]},), got {tuple(sinks.shape)}")
    if any(name in options for name in INPUT_OPTIONS):  # learned/fitted, on every path
        query, key, options = prepare_qk(options, query, key, keep_projection=kind.applies_feature_proj,
                                         counts=lambda: vis.key_counts(query.device))
    tap = current_tap()
    if tap is not None:
        tap(module, query, key, value, vis, scaling=scaling, softcap=softcap, sinks=sinks)
    observer = current_observer()
    base = registry.get(kind.alias_of) if kind.alias_of else kind  # aliases share their base's kernel
    # 1. plain softmax attention that torch's fused SDPA computes as given, where it is the faster path
    if (impl != "triton" and softcap is None and sinks is None and not need_weights and observer is None
            and base.reduces_to_softmax is not None and base.reduces_to_softmax(options, vis)
            and sdpa_is_faster(query, key, vis, impl)):
        out = sdpa_attention(query, key, value, vis, scaling=scaling, dropout=dropout)
        if out is not None:
            return out, None
    kw = dict(scaling=scaling, softcap=softcap, sinks=sinks, dropout=dropout, need_weights=need_weights)
    if observer is not None:
        n, m = query.shape[2], key.shape[2]
        kw["observe"] = functools.partial(observer.block, module, n=n, m=m)
        if impl == "triton":
            raise AttnSwapError("impl='triton' cannot be observed block by block; use impl='auto' or 'torch'")
        impl = "torch"
    # 2. the kind's Triton kernel, 3. its PyTorch reference
    # "auto" takes a kernel for CUDA tensors only; "triton" also runs it on CPU tensors under TRITON_INTERPRET=1
    if impl == "triton" or (impl == "auto" and base.kernel is not None and query.is_cuda):
        supported, why = _kernel_supports(base, query, key, value, vis, {**kw, **options})
        if supported and impl != "triton" and base.name in _broken:
            supported, why = False, "its Triton kernel failed earlier in this process"
        if supported:
            try:
                out, weights = base.kernel(query, key, value, vis, **kw, **options)
                return out.to(query.dtype), (weights.to(query.dtype) if weights is not None else None)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as err:  # a kernel that fails to build or launch here: the reference from now on
                if impl == "triton":
                    raise
                _broken.add(base.name)
                why = f"its Triton kernel failed ({type(err).__name__}: {err})"
                supported = False
        if impl == "triton":
            raise AttnSwapError(f"impl='triton' cannot run kind {kind.name!r} here: {why}")
        if query.is_cuda:
            warn_once((kind.name, why), f"attnswap: kind {kind.name!r} falls back to the PyTorch reference: {why}")
    out, weights = kind.forward(query, key, value, vis, **kw, **options)
    return out.to(query.dtype), (weights.to(query.dtype) if weights is not None else None)


# On a GPU, SDPA's flash kernel against our Triton softmax kernel, both called through ``attnswap.attention`` (NVIDIA
# H200, bf16, causal; benchmarks/results/NVIDIA-H200.jsonl, commit 0d556b1/5b0a922): b 1, Hq 9, Hkv 3, d 64 (SmolLM2)
# at N = 1k / 4k / 16k: SDPA 0.067 / 0.156 / 1.272 ms, ours 0.253 / 0.328 / 1.102 ms; b 16, Hq 32, d 64, N = 1k:
# SDPA 0.319, ours 0.242; b 32, Hq 16, d 128, N = 1k: SDPA 0.528, ours 0.463. SDPA wins below about 2**28 query-key
# pairs (b·Hq·n·m; 1.5e8 at SmolLM2's 4k), ours above (5.4e8). Those runs still paid our per-call host cost; the
# crossover is to be measured again now that it is gone.
CUDA_SDPA_MAX_PAIRS = 1 << 28


def sdpa_is_faster(query, key, vis, impl: str) -> bool:
    """Whether torch's fused SDPA is the path to take for plain softmax attention on these inputs (``prefer_sdpa``)."""
    if query.is_cpu:
        return True
    b, hq, n, d = query.shape
    return prefer_sdpa(device_type=query.device.type, dtype=query.dtype, pairs=b * hq * n * key.shape[2], head_dim=d,
                       masked=vis.mask is not None, impl=impl)


def prefer_sdpa(*, device_type: str, dtype, pairs: int, head_dim: int, masked: bool, impl: str) -> bool:
    """On a CPU, SDPA always (there is no kernel of ours there); on CUDA only where its flash kernel runs (half
    precision, head dim <= 256, no mask: GQA or a mask would send SDPA to its O(N^2)-memory math kernel) and below the
    crossover with our kernel (``CUDA_SDPA_MAX_PAIRS`` query-key pairs, b·Hq·n·m), or with ``impl="torch"``; on other
    devices the PyTorch reference."""
    if device_type != "cuda":
        return device_type == "cpu"
    flash = dtype in (torch.float16, torch.bfloat16) and head_dim <= 256 and not masked
    return flash and (impl == "torch" or pairs < CUDA_SDPA_MAX_PAIRS)


INPUT_OPTIONS = (registry.SCORE_SCALE, registry.LENGTH_EXPONENT, registry.QUERY_GAIN,
                 registry.FEATURE_PROJ)


def prepare_qk(options: dict, query: torch.Tensor, key: torch.Tensor, keep_projection: bool = False, counts=None):
    """Apply the options that act on the inputs rather than on the kind: a learned ``feature_proj`` on queries and
    keys (unless the kind applies it itself: ``keep_projection``), then a ``score_scale`` (and its
    ``length_exponent``) and a ``query_gain`` on the queries. ``counts``: a function giving the number of keys each
    query sees, as ``Visibility.key_counts`` does (needed only with a length exponent). Returns (query, key, the
    remaining options)."""
    options = dict(options)
    projection = None if keep_projection else options.pop(registry.FEATURE_PROJ, None)
    if projection is not None:
        query, key = project(projection, query, key)
    scale = options.pop(registry.SCORE_SCALE, None)
    if scale is not None:
        query = scale_queries(query, scale)
    exponent = options.pop(registry.LENGTH_EXPONENT, None)
    if exponent is not None:
        if counts is None:
            raise AttnSwapError("a length_exponent needs the number of keys each query sees, and this path has none")
        query = grow_with_length(query, exponent, counts(), key.shape[1])
    gain = options.pop(registry.QUERY_GAIN, None)
    if gain is not None:
        query = gain_queries(query, gain)
    return query, key, options


def project(projection, query: torch.Tensor, key: torch.Tensor):
    """query (b, Hq, n, d), key (b, Hkv, m, d) -> both through the per-KV-head map (in fp32, back to their dtype)."""
    b, hq, n, d = query.shape
    hkv = key.shape[1]
    q2 = projection.apply(query.reshape(b, hkv, hq // hkv, n, d)).reshape(b, hq, n, d)
    k2 = projection.apply(key[:, :, None])[:, :, 0]
    return q2.to(query.dtype), k2.to(key.dtype)


def per_head(value, name: str, heads: int, device):
    """A per-head option's value as a float (one number) or an fp32 (heads,) tensor (a tuple, or a ``LearnedScale``
    / ``LearnedExponent`` being trained, differentiable)."""
    if isinstance(value, registry.LearnedScale):
        values = value.factor(device)
    elif isinstance(value, registry.LearnedExponent):
        values = value.tensor(device)
    elif isinstance(value, tuple):
        values = torch.tensor(value, dtype=torch.float32, device=device)
    else:
        return float(value)
    if values.numel() != heads:
        raise AttnSwapError(f"{name} has {values.numel()} values but the attention has {heads} query heads; give one "
                            "number or one per query head")
    return values


def scale_queries(query: torch.Tensor, scale) -> torch.Tensor:
    """query (b, Hq, n, d) times a score scale: one number, one per query head, or a ``LearnedScale`` (computed in
    fp32; differentiable in the learned scale)."""
    return scale_heads(query, scale, registry.SCORE_SCALE)


def scale_heads(x: torch.Tensor, value, name: str) -> torch.Tensor:
    """x (b, H, n, d) times a per-head option ``name``'s value (one number, one per head, or a ``LearnedScale``),
    in fp32; None leaves x as it is."""
    if value is None:
        return x
    factor = per_head(value, name, x.shape[1], x.device)
    if isinstance(factor, float):
        if factor == 1.0:
            return x
    else:
        factor = factor.view(1, -1, 1, 1)
    return (x.float() * factor).to(x.dtype)


_CONSTANTS: dict = {}  # (id(value), device) -> (value, its fp32 tensor)


def constant_tensor(value: tuple, device) -> torch.Tensor:
    """A (nested) tuple of numbers from the options as an fp32 tensor on ``device``, made once per option value
    (the value is kept with it, so its id is not reused): building it anew costs ~0.1 ms a call for a few hundred
    numbers, once per layer and call."""
    key = (id(value), str(device))
    hit = _CONSTANTS.get(key)
    if hit is not None and hit[0] is value:
        return hit[1]
    if len(_CONSTANTS) >= 4096:
        _CONSTANTS.clear()
    tensor = torch.tensor(value, dtype=torch.float32, device=device)
    _CONSTANTS[key] = (value, tensor)
    return tensor


def gain_queries(query: torch.Tensor, gain) -> torch.Tensor:
    """query (b, Hq, n, d) times a ``query_gain``: (Hq, d) numbers or a ``LearnedGain`` (computed in fp32;
    differentiable in a learned gain)."""
    factor = (gain.factor(query.device) if isinstance(gain, registry.LearnedGain)
              else constant_tensor(gain, query.device))
    if factor.shape != (query.shape[1], query.shape[3]):
        raise AttnSwapError(f"{registry.QUERY_GAIN} has shape {tuple(factor.shape)} but the attention has "
                            f"{query.shape[1]} query heads of dim {query.shape[3]}: give one row of {query.shape[3]} "
                            "numbers per query head")
    return (query.float() * factor[None, :, None, :]).to(query.dtype)


def grow_with_length(query: torch.Tensor, exponent, counts: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """query (b, Hq, n, d) times ``(counts / LENGTH_REF) ** exponent``: ``exponent`` one number, one per query head,
    or a ``LearnedExponent``; ``counts`` (b|1, Hkv|1, G|1, n), the keys each query sees (computed in fp32;
    differentiable in a learned exponent)."""
    b, hq, n, d = query.shape
    power = per_head(exponent, registry.LENGTH_EXPONENT, hq, query.device)
    if isinstance(power, float):
        if power == 0.0:
            return query
    else:
        power = power.view(1, kv_heads, hq // kv_heads, 1)
    factor = torch.exp(power * torch.log(counts.to(query.device, torch.float32) / registry.LENGTH_REF))
    grouped = query.float().reshape(b, kv_heads, hq // kv_heads, n, d) * factor[..., None]
    return grouped.reshape(b, hq, n, d).to(query.dtype)


def _kernel_supports(kind: Kind, query, key, value, vis, kw) -> tuple[bool, str]:
    if kind.kernel is None:
        return False, f"there is no Triton kernel for kind {kind.name!r} yet"
    if kind.kernel_supports is None:
        return True, ""
    return kind.kernel_supports(query, key, value, vis, **kw)
