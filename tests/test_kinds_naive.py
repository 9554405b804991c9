"""Every attention kind of ``attnswap.attention(impl="torch")`` against the independent float64 reference in
``tests/naive.py``, on random shapes, masks, causal/window layouts, softcap, sinks and GQA."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))
from naive import naive_attention  # noqa: E402

import attnswap  # noqa: E402

ATOL, RTOL = 1e-5, 1e-4
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False)

KINDS_OPTS = [
    ("softmax", {}),
    ("topk", {"k": 5}),
    ("entmax", {"alpha": 1.25}),
    ("entmax", {"alpha": 1.5}),
    ("entmax", {"alpha": 2.0}),
    ("sparsemax", {}),
    ("linear", {}),
    ("linear", {"feature_map": "hedgehog"}),
    ("taylor", {}),
    ("window_linear", {"local_window": 3, "sink_tokens": 2}),
    ("window_linear", {"local_window": 5, "sink_tokens": 0, "feature_map": "elu"}),
]
KIND_IDS = [k + "".join(f"-{n}{v}" for n, v in o.items()) for k, o in KINDS_OPTS]


# ----------------------------------------------------------------------------------------------------------------
# random cases


@st.composite
def cases(draw, *, scores=True, sinks=True, max_len=40):
    """A random attention problem. ``scores=False`` (linear): no softcap, no sinks, no float bias."""
    c = dict(
        b=draw(st.integers(1, 2)),
        hkv=draw(st.integers(1, 2)),
        g=draw(st.integers(1, 3)),
        n=draw(st.integers(1, max_len)),
        m=draw(st.integers(1, max_len)),
        d=draw(st.integers(4, 16)),
        seed=draw(st.integers(0, 2**31 - 1)),
        temp=draw(st.sampled_from([0.5, 1.0, 3.0])),
    )
    c["dv"] = draw(st.sampled_from([c["d"], 3, 8]))
    c["causal"] = draw(st.booleans())
    c["window"] = draw(st.none() | st.integers(1, c["m"] + 2))  # without causal: only the lower bound
    mask_kinds = ["none", "full", "full_empty_rows", "padding", "bcast_head", "bcast_query", "float"]
    if scores:
        mask_kinds.append("float_bias")
    c["mask"] = draw(st.sampled_from(mask_kinds))
    c["keep"] = draw(st.sampled_from([0.2, 0.6, 0.95]))
    c["scaling"] = draw(st.sampled_from([None, None, 0.1, 1.0])) if scores else None
    c["softcap"] = draw(st.sampled_from([None, None, 1.0, 5.0])) if scores else None
    c["sinks"] = draw(st.booleans()) if (scores and sinks) else False
    return c


def build(c, dtype=torch.float32):
    """Tensors and keyword arguments for one case (the same for the package and the reference)."""
    gen = torch.Generator().manual_seed(c["seed"])
    b, hkv, g, n, m, d, dv = (c[x] for x in ("b", "hkv", "g", "n", "m", "d", "dv"))
    hq = hkv * g
    q = torch.randn(b, hq, n, d, generator=gen) * c["temp"]
    k = torch.randn(b, hkv, m, d, generator=gen)
    v = torch.randn(b, hkv, m, dv, generator=gen)
    keep = c["keep"]
    mask = None
    mk = c["mask"]
    if mk in ("full", "full_empty_rows", "float", "float_bias"):
        mask = torch.rand(b, hq, n, m, generator=gen) < keep
        if mk == "full_empty_rows":
            mask &= torch.rand(b, hq, n, 1, generator=gen) < 0.6  # some rows see nothing
    elif mk == "padding":
        lens = torch.randint(0, m + 1, (b,), generator=gen)
        left = bool(torch.randint(0, 2, (1,), generator=gen))
        j = torch.arange(m)
        mask = (j >= (m - lens).view(b, 1)) if left else (j < lens.view(b, 1))
        mask = mask.view(b, 1, 1, m)
    elif mk == "bcast_head":
        mask = torch.rand(b, 1, n, m, generator=gen) < keep
    elif mk == "bcast_query":
        mask = torch.rand(1, hq, 1, m, generator=gen) < keep
    if mk in ("float", "float_bias"):
        bias = torch.randn(b, hq, n, m, generator=gen) if mk == "float_bias" else torch.zeros(b, hq, n, m)
        mask = torch.where(mask, bias.to(dtype), torch.full((), torch.finfo(dtype).min, dtype=dtype))
    kw = dict(mask=mask, causal=c["causal"], window=c["window"], scaling=c["scaling"], softcap=c["softcap"])
    if c["sinks"]:
        kw["sinks"] = torch.randn(hq, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype), kw


def check_against_naive(q, k, v, kw, kind, options, *, atol=ATOL, rtol=RTOL, weights=False):
    got = attnswap.attention(q, k, v, kind, impl="torch", return_weights=weights, **kw, **options)
    ref = naive_attention(q, k, v, kind, **kw, **options)
    out, w = got if weights else (got, None)
    assert out.shape == ref.out.shape
    assert out.dtype == q.dtype
    assert torch.isfinite(out).all(), "non-finite output"
    rows = ~ref.ambiguous  # topk rows whose selection hangs on a ~1e-5 score gap are not compared
    torch.testing.assert_close(out.double()[rows], ref.out[rows], atol=atol, rtol=rtol)
    empty = ~ref.visible.any(-1)  # rows with an empty A_i: exactly 0
    if empty.any():
        assert (out[empty] == 0).all(), "rows with no visible key must be exactly 0"
    return out, w, ref


# ----------------------------------------------------------------------------------------------------------------
# kinds vs naive


@settings(max_examples=60, **SETTINGS)
@given(c=cases())
def test_softmax(c):
    check_against_naive(*build(c), "softmax", {})


@settings(max_examples=60, **SETTINGS)
@given(c=cases(), k=st.integers(1, 45))
def test_topk(c, k):
    check_against_naive(*build(c), "topk", {"k": k})


@settings(max_examples=15, **SETTINGS)
@given(c=cases())
def test_topk_default_k(c):
    """k defaults to 64: with <= 40 keys topk is softmax over A_i."""
    q, k, v, kw = build(c)
    got = attnswap.attention(q, k, v, "topk", impl="torch", **kw)
    torch.testing.assert_close(got.double(), naive_attention(q, k, v, "softmax", **kw).out, atol=ATOL, rtol=RTOL)


@settings(max_examples=40, **SETTINGS)
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 2),
    g=st.integers(1, 2),
    n=st.integers(1, 20),
    m=st.integers(1, 30),
    k=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    causal=st.booleans(),
    sinks=st.booleans(),
)
def test_topk_ties_integer_scores(b, hkv, g, n, m, k, seed, causal, sinks):
    """Integer-valued scores (exact in fp32): every score equal to the k-th largest is kept."""
    gen = torch.Generator().manual_seed(seed)
    hq = hkv * g
    q = torch.randint(-1, 2, (b, hq, n, 4), generator=gen).float()
    kk = torch.randint(-1, 2, (b, hkv, m, 4), generator=gen).float()
    v = torch.randn(b, hkv, m, 6, generator=gen)
    kw = dict(causal=causal, scaling=1.0)
    if sinks:
        kw["sinks"] = torch.randint(-2, 3, (hq,), generator=gen).float()
    out, w, ref = check_against_naive(q, kk, v, kw, "topk", {"k": k}, weights=True)
    torch.testing.assert_close(w.double(), ref.weights, atol=ATOL, rtol=RTOL)
    # tie-inclusive: at least min(k, |A_i|) keys get weight (sink aside)
    nsel = (ref.weights > 0).sum(-1)
    assert ((w > 0).sum(-1) == nsel).all()


def test_topk_tie_explicit():
    """Scores [3, 2, 2, 2, 1] with k=2: the three 2s tie at the threshold and are all kept."""
    q = torch.ones(1, 1, 1, 1)
    k = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0]).view(1, 1, 5, 1)
    v = torch.eye(5).view(1, 1, 5, 5)
    out, w = attnswap.attention(q, k, v, "topk", k=2, scaling=1.0, impl="torch", return_weights=True)
    e = torch.exp(torch.tensor([3.0, 2.0, 2.0, 2.0]))
    want = torch.cat([e / e.sum(), torch.zeros(1)])
    torch.testing.assert_close(w.view(5), want)
    torch.testing.assert_close(out.view(5), want)
    assert w.view(5)[4] == 0


@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
@settings(max_examples=35, **SETTINGS)
@given(c=cases())
def test_entmax(alpha, c):
    check_against_naive(*build(c), "entmax", {"alpha": alpha})


@settings(max_examples=40, **SETTINGS)
@given(c=cases())
def test_sparsemax(c):
    q, k, v, kw = build(c)
    out, _, _ = check_against_naive(q, k, v, kw, "sparsemax", {})
    torch.testing.assert_close(out, attnswap.attention(q, k, v, "entmax", alpha=2.0, impl="torch", **kw))


@settings(max_examples=20, **SETTINGS)
@given(c=cases())
def test_entmax_default_alpha_is_1_5(c):
    q, k, v, kw = build(c)
    torch.testing.assert_close(
        attnswap.attention(q, k, v, "entmax", impl="torch", **kw),
        attnswap.attention(q, k, v, "entmax", alpha=1.5, impl="torch", **kw),
    )


@settings(max_examples=50, **SETTINGS)
@given(c=cases(scores=False), form=st.sampled_from(["auto", "quadratic", "linear_time"]), eps=st.sampled_from([None, 1e-3]),
       feature_map=st.sampled_from(["elu", "hedgehog"]))
def test_linear(c, form, eps, feature_map):
    opts = {"form": form, "feature_map": feature_map} if eps is None else {"form": form, "eps": eps,
                                                                           "feature_map": feature_map}
    q, k, v, kw = build(c)
    if form == "linear_time" and c["mask"] not in ("none", "padding"):
        return  # the running-state form is only required for causal/window/key-padding layouts
    check_against_naive(q, k, v, kw, "linear", opts, atol=1e-5, rtol=2e-4)


@settings(max_examples=50, **SETTINGS)
@given(c=cases(), form=st.sampled_from(["auto", "quadratic", "linear_time"]))
def test_taylor(c, form):
    q, k, v, kw = build(c)
    if form == "linear_time" and (c["mask"] not in ("none", "padding") or c["softcap"] is not None):
        return  # the running-state form cannot express arbitrary masks, biases or softcap
    check_against_naive(q, k, v, kw, "taylor", {"form": form}, atol=1e-5, rtol=2e-4)


@settings(max_examples=60, **SETTINGS)
@given(c=cases(), local_window=st.integers(1, 12), sink_tokens=st.integers(0, 4),
       feature_map=st.sampled_from(["hedgehog", "elu"]))
def test_window_linear(c, local_window, sink_tokens, feature_map):
    q, k, v, kw = build(c)
    check_against_naive(q, k, v, kw, "window_linear",
                        {"local_window": local_window, "sink_tokens": sink_tokens, "feature_map": feature_map})


@settings(max_examples=25, **SETTINGS)
@given(c=cases())
def test_window_linear_with_every_key_exact_is_softmax(c):
    q, k, v, kw = build(c)
    got = attnswap.attention(q, k, v, "window_linear", local_window=c["m"], sink_tokens=0, eps=0.0, **kw)
    torch.testing.assert_close(got, attnswap.attention(q, k, v, "softmax", **kw), atol=1e-5, rtol=1e-4)


@settings(max_examples=40, **SETTINGS)
@given(b=st.integers(1, 2), hkv=st.integers(1, 2), g=st.integers(1, 3), n=st.integers(1, 70), extra=st.integers(0, 40),
       local_window=st.integers(1, 40), sink_tokens=st.integers(0, 5), padding=st.sampled_from(["none", "left", "right"]),
       softcap=st.sampled_from([None, 5.0]), sinks=st.booleans(), projected=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_window_linear_forms_agree(b, hkv, g, n, extra, local_window, sink_tokens, padding, softcap, sinks, projected,
                                   seed):
    """The linear-time form (sink and window keys exact per query chunk, older keys from a running state) equals the
    quadratic form, with chunks of 16 so that several chunks, window bands and state updates are crossed."""
    from unittest import mock

    from attnswap.kinds import feature_map, window_linear
    from attnswap.registry import FeatureProjection

    gen = torch.Generator().manual_seed(seed)
    m, d = n + extra, 8
    q, k, v = (torch.randn(b, hkv * g, n, d, generator=gen), torch.randn(b, hkv, m, d, generator=gen),
               torch.randn(b, hkv, m, 5, generator=gen))
    cut = torch.randint(0, m + 1, (b,), generator=gen)
    j = torch.arange(m)[None]
    mask = {"none": None, "left": j >= cut[:, None], "right": j < cut[:, None]}[padding]
    kw = dict(causal=True, mask=None if mask is None else mask[:, None, None], softcap=softcap,
              sinks=torch.randn(hkv * g, generator=gen) if sinks else None)
    opts = dict(local_window=local_window, sink_tokens=sink_tokens)
    if projected:
        opts["feature_proj"] = FeatureProjection(torch.eye(d) + 0.3 * torch.randn(hkv, d, d, generator=gen),
                                                 0.3 * torch.randn(hkv, d, generator=gen))
    with mock.patch.object(window_linear, "CHUNK", 16), mock.patch.object(feature_map, "CHUNK", 16):
        fast = attnswap.attention(q, k, v, "window_linear", form="linear_time", **kw, **opts)
    slow = attnswap.attention(q, k, v, "window_linear", form="quadratic", **kw, **opts)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)


def test_window_linear_linear_time_needs_one_run_of_real_keys():
    q = torch.randn(1, 2, 8, 4)
    holes = torch.tensor([True, False, True, True, True, True, True, True]).view(1, 1, 1, 8)
    for bad in (dict(causal=True, mask=holes), dict(causal=False), dict(causal=True, window=4)):
        with pytest.raises(attnswap.AttnSwapError, match="one run per row"):
            attnswap.attention(q, q, q, "window_linear", form="linear_time", **bad)
        attnswap.attention(q, q, q, "window_linear", **bad)  # auto: the quadratic form


# ----------------------------------------------------------------------------------------------------------------
# linear / taylor: quadratic vs linear-time form on longer sequences


LONG_LAYOUTS = [
    dict(n=300, m=300, causal=True),
    dict(n=300, m=300, causal=False, padding=True),
    dict(n=300, m=300, causal=True, padding=True),
    dict(n=300, m=300, causal=True, window=37),
    dict(n=300, m=300, causal=True, window=64, padding=True),
    dict(n=120, m=300, causal=True, window=50),
    dict(n=1, m=300, causal=True, padding=True),
]


@pytest.mark.parametrize("kind", ["linear", "taylor"])
@pytest.mark.parametrize("layout", LONG_LAYOUTS, ids=lambda l: "-".join(f"{k}{v}" for k, v in l.items()))
def test_forms_agree_long(kind, layout):
    gen = torch.Generator().manual_seed(7)
    b, hkv, g, d = 2, 2, 2, 16
    n, m = layout["n"], layout["m"]
    q = torch.randn(b, hkv * g, n, d, generator=gen)
    k = torch.randn(b, hkv, m, d, generator=gen)
    v = torch.randn(b, hkv, m, d, generator=gen)
    mask = None
    if layout.get("padding"):
        lens = torch.tensor([m, m - 57])
        mask = (torch.arange(m) >= (m - lens).view(b, 1)).view(b, 1, 1, m)  # left padding
    kw = dict(mask=mask, causal=layout["causal"], window=layout.get("window"))
    quad = attnswap.attention(q, k, v, kind, form="quadratic", impl="torch", **kw)
    lin = attnswap.attention(q, k, v, kind, form="linear_time", impl="torch", **kw)
    ref = naive_attention(q, k, v, kind, **kw).out
    torch.testing.assert_close(lin, quad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(quad.double(), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lin.double(), ref, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(lin).all()


def test_taylor_forms_agree_with_sinks():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 300, 16, generator=gen)
    k = torch.randn(1, 2, 300, 16, generator=gen)
    v = torch.randn(1, 2, 300, 16, generator=gen)
    kw = dict(causal=True, sinks=torch.randn(4, generator=gen))
    quad = attnswap.attention(q, k, v, "taylor", form="quadratic", impl="torch", **kw)
    lin = attnswap.attention(q, k, v, "taylor", form="linear_time", impl="torch", **kw)
    torch.testing.assert_close(lin, quad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(quad.double(), naive_attention(q, k, v, "taylor", **kw).out, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# return_weights


@pytest.mark.parametrize("kind,opts", KINDS_OPTS, ids=KIND_IDS)
@settings(max_examples=20, **SETTINGS)
@given(c=cases(sinks=True))
def test_return_weights(kind, opts, c):
    if kind == "linear":
        c = dict(c, softcap=None, sinks=False, scaling=None, mask="none" if c["mask"] == "float_bias" else c["mask"])
    q, k, v, kw = build(c)
    out, w, ref = check_against_naive(q, k, v, kw, kind, opts, weights=True)
    assert w.shape == ref.weights.shape
    rows = ~ref.ambiguous
    torch.testing.assert_close(w.double()[rows], ref.weights[rows], atol=ATOL, rtol=RTOL)
    assert (w[~ref.visible] == 0).all(), "masked keys must get exactly zero weight"
    outside = ref.outside & rows.unsqueeze(-1)
    assert (w[outside] == 0).all(), "keys outside the support must get exactly zero weight"
    plain = attnswap.attention(q, k, v, kind, impl="torch", **kw, **opts)
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind,opts", [x for x in KINDS_OPTS if x[0] in ("topk", "entmax", "sparsemax")],
                         ids=[i for i, x in zip(KIND_IDS, KINDS_OPTS) if x[0] in ("topk", "entmax", "sparsemax")])
def test_sparse_kinds_are_sparse(kind, opts):
    """Peaked scores: topk / entmax weights have many exact zeros on visible keys."""
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(1, 2, 30, 16, generator=gen) * 4
    k = torch.randn(1, 2, 30, 16, generator=gen)
    v = torch.randn(1, 2, 30, 8, generator=gen)
    out, w = attnswap.attention(q, k, v, kind, impl="torch", return_weights=True, **opts)
    ref = naive_attention(q, k, v, kind, **opts)
    assert ref.outside.sum() > 100
    assert (w[ref.outside] == 0).all()
    torch.testing.assert_close(w.double(), ref.weights, atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------------------------------------------
# gradients


GRAD_CASES = [
    dict(causal=True, window=5, mask="full_empty_rows", n=9, m=12, sinks=False, softcap=None),
    dict(causal=True, mask="padding", n=12, m=7, sinks=True, softcap=5.0),
    dict(causal=False, mask="float_bias", n=6, m=10, sinks=True, softcap=None),
]


@pytest.mark.parametrize("kind,opts", KINDS_OPTS + [("linear", {"form": "linear_time"}), ("taylor", {"form": "linear_time"})],
                         ids=KIND_IDS + ["linear-linear_time", "taylor-linear_time"])
@pytest.mark.parametrize("gi", range(len(GRAD_CASES)))
def test_gradients(kind, opts, gi):
    spec = GRAD_CASES[gi]
    if kind == "linear":
        spec = dict(spec, sinks=False, softcap=None, mask="full_empty_rows" if spec["mask"] == "float_bias" else spec["mask"])
    if opts.get("form") == "linear_time":
        spec = dict(spec, mask="padding", softcap=None)
    c = dict(b=2, hkv=2, g=2, d=8, dv=5, seed=100 + gi, temp=1.0, window=None, keep=0.6, scaling=None)
    c.update(spec)
    q, k, v, kw = build(c)
    cot = torch.randn(2, 4, c["n"], 5, generator=torch.Generator().manual_seed(5))
    leaves = [q.clone().requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_()]
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    kw64 = dict(kw)
    if "sinks" in kw:
        kw["sinks"] = kw["sinks"].clone().requires_grad_()
        kw64["sinks"] = kw["sinks"].detach().double().requires_grad_()
    out = attnswap.attention(*leaves, kind, impl="torch", **kw, **opts)
    (out * cot).sum().backward()
    ref = naive_attention(*leaves64, kind, **kw64, **opts)
    assert not ref.ambiguous.any()
    (ref.out * cot.double()).sum().backward()
    for name, x, x64 in zip("qkv", leaves, leaves64):
        assert x.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(x.grad).all(), f"non-finite gradient for {name}"
        torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-4, rtol=1e-3, msg=lambda s: f"d{name}: {s}")
    if "sinks" in kw and kw["sinks"].grad is not None:
        torch.testing.assert_close(kw["sinks"].grad.double(), kw64["sinks"].grad, atol=1e-4, rtol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# low precision


@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float16, 5e-3, 1e-2), (torch.bfloat16, 3e-2, 3e-2)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind,opts", KINDS_OPTS, ids=KIND_IDS)
def test_low_precision(kind, opts, dtype, atol, rtol):
    for seed, mask in enumerate(["padding", "float" if kind == "linear" else "float_bias", "full_empty_rows"]):
        c = dict(b=2, hkv=2, g=2, n=24, m=31, d=16, dv=16, seed=seed, temp=1.0, causal=True, window=None,
                 mask=mask, keep=0.6, scaling=None, softcap=None, sinks=kind != "linear")
        q, k, v, kw = build(c, dtype)
        if "sinks" in kw:
            kw["sinks"] = kw["sinks"].to(dtype)
        out = attnswap.attention(q, k, v, kind, impl="torch", **kw, **opts)
        assert out.dtype == dtype
        assert torch.isfinite(out).all()
        kw32 = {n: (x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x) for n, x in kw.items()}
        if kw["mask"].is_floating_point():  # keep "masked" masked: finfo(dtype).min -> finfo(float32).min
            kw32["mask"] = kw32["mask"].masked_fill(kw["mask"] == torch.finfo(dtype).min, torch.finfo(torch.float32).min)
        ref32 = attnswap.attention(q.float(), k.float(), v.float(), kind, impl="torch", **kw32, **opts)
        ref = naive_attention(q, k, v, kind, ambiguity_tol=2e-2, **kw, **opts)
        rows = ~ref.ambiguous
        torch.testing.assert_close(out.float()[rows], ref32[rows], atol=atol, rtol=rtol)
        torch.testing.assert_close(out.double()[rows], ref.out[rows], atol=atol, rtol=rtol)


@pytest.mark.parametrize("kind,opts", KINDS_OPTS, ids=KIND_IDS)
def test_float_mask_minus_inf_is_masked(kind, opts):
    """-inf in a float mask is not a finite bias: it masks the key like finfo.min does."""
    c = dict(b=2, hkv=1, g=2, n=10, m=13, d=8, dv=8, seed=1, temp=1.0, causal=False, window=None,
             mask="float", keep=0.6, scaling=None, softcap=None, sinks=False)
    q, k, v, kw = build(c)
    want = attnswap.attention(q, k, v, kind, impl="torch", **kw, **opts)
    kw["mask"] = kw["mask"].masked_fill(kw["mask"] == torch.finfo(torch.float32).min, float("-inf"))
    got = attnswap.attention(q, k, v, kind, impl="torch", **kw, **opts)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
