"""Triton paths of the feature-map kinds against their PyTorch references: ``attnswap.attention(...,
impl="triton")`` vs ``impl="torch"`` (computed in float64), forward and backward (q, k, v, and sinks for taylor).
``linear`` runs the chunk-parallel engine (``kernels/linear_parallel.py``); ``taylor`` both of its forms
(``kernels/taylor.py``): "taylor" below forces the feature form (the symmetric map through the same engine),
"taylor_scores" the score form (the flash kernels with Taylor weights). Without CUDA the kernels run in the Triton
interpreter with chunk 16 on small shapes (so a 64-long input crosses several chunks, prefix states and window
differences included); on a GPU the same tests run larger shapes.
"""

import pytest
import torch

pytest.importorskip("triton")

from kernel_env import DEV, S, make_qkv as make  # noqa: E402  (the interpreter is chosen in conftest.py)

import attnswap  # noqa: E402
import attnswap.kernels  # noqa: E402,F401  (registers the kernels)
from attnswap.errors import AttnSwapError  # noqa: E402
from attnswap.kernels import linear as linear_kernel, taylor as taylor_kernel  # noqa: E402
from attnswap.kinds.visibility import Visibility  # noqa: E402

from hypothesis import given, settings, strategies as st  # noqa: E402

# fp32 forward: linear sums positive terms, 1e-5 holds; taylor's state sums (q.k)^2-weighted terms and removes
# window keys by subtraction, so its rounding is a few ulps of the largest state entry: 1e-4.
FWD_TOL = {("linear", torch.float32): 1e-5, ("taylor", torch.float32): 1e-4, ("taylor_scores", torch.float32): 1e-5}
# test name -> (kind, options that pick the path)
VARIANTS = {"linear": ("linear", {}), "taylor": ("taylor", {"form": "linear_time"}),
            "taylor_scores": ("taylor", {"form": "quadratic"})}
LOW_TOL = 2e-2
GRAD_TOL = 1e-4


def close(got, want, tol, what=""):
    """|got - want| <= tol * (1 + |want|) elementwise ("relative-ish"), with a message naming the worst error."""
    err = ((got.double() - want.double()).abs() / (1.0 + want.double().abs())).max().item()
    assert err <= tol, f"{what}: max relative-ish error {err:.3g} > {tol}"


def forward_both(name, q, k, v, **kw):
    kind, form = VARIANTS[name]
    out = attnswap.attention(q, k, v, kind, impl="triton", **form, **kw)
    kw64 = dict(kw)
    if kw64.get("sinks") is not None:
        kw64["sinks"] = kw64["sinks"].double()
    ref = attnswap.attention(q.double(), k.double(), v.double(), kind, impl="torch", form="quadratic", **kw64)
    assert out.dtype == q.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    return out, ref


def check_forward(kind, q, k, v, **kw):
    out, ref = forward_both(kind, q, k, v, **kw)
    close(out, ref, FWD_TOL.get((kind, q.dtype), LOW_TOL), f"{kind} forward")
    return out, ref


def check_backward(name, q, k, v, sinks=None, tol=GRAD_TOL, **kw):
    """Gradients of sum(out * do) wrt q, k, v (and sinks) against float64 autograd through the reference."""
    do = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=torch.Generator().manual_seed(1)).to(DEV)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    s_leaf = sinks.detach().clone().requires_grad_(True) if sinks is not None else None
    extra = {} if s_leaf is None else {"sinks": s_leaf}
    kind, form = VARIANTS[name]
    out = attnswap.attention(*leaves, kind, impl="triton", **form, **kw, **extra)
    wrt = leaves + ([s_leaf] if s_leaf is not None else [])
    got = torch.autograd.grad(out, wrt, do.to(out.dtype))
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    s_ref = sinks.detach().double().requires_grad_(True) if sinks is not None else None
    extra = {} if s_ref is None else {"sinks": s_ref}
    ref = attnswap.attention(*ref_leaves, kind, impl="torch", form="quadratic", **kw, **extra)
    want = torch.autograd.grad(ref, ref_leaves + ([s_ref] if s_ref is not None else []), do.double())
    for what, a, b in zip(("dq", "dk", "dv", "dsinks"), got, want):
        assert torch.isfinite(a).all(), what
        close(a, b, tol, f"{name} {what}")


def opts(kind, d):
    return {"scaling": d ** -0.5} if kind.startswith("taylor") else {}


KINDS = tuple(VARIANTS)
# (b, hq, hkv, n, m, d, causal, window)
CASES = [
    (1, 2, 2, 64 * S, 64 * S, 16, True, None),  # n == m, several chunks
    (2, 2, 1, 7, 45 * S, 16, True, None),  # n < m: a prefix every query sees (offset)
    (1, 3, 1, 33, 50 * S, 16, False, None),  # non-causal (encoder), GQA 3, odd lengths
    (1, 2, 1, 64 * S, 64 * S, 16, True, 40),  # window wider than 2 chunks: keys leave the state by subtraction
    (1, 1, 1, 37, 37, 32, True, 5),  # window narrower than a chunk: the state is rebuilt
    (1, 2, 2, 30, 51, 16, False, 9),  # window without causal
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES)
def test_forward_and_backward(kind, case):
    b, hq, hkv, n, m, d, causal, window = case
    q, k, v = make(b, hq, hkv, n, m, d)
    check_forward(kind, q, k, v, causal=causal, window=window, **opts(kind, d))
    check_backward(kind, q, k, v, causal=causal, window=window, **opts(kind, d))


@pytest.mark.parametrize("kind", KINDS)
def test_odd_head_dims(kind):
    """d = 24 and dv = 40 (not powers of two): padded feature columns stay out, and the value columns split
    into tiles (16 wide in the interpreter, the last one partial) whose dq/dk partials are summed. (The score form
    takes dv = d only: 24 for both, padded to 32 in registers.)"""
    q, k, v = make(1, 2, 1, 20, 27, 24, dv=24 if kind == "taylor_scores" else 40, seed=9)
    check_forward(kind, q, k, v, causal=True, **opts(kind, 24))
    check_backward(kind, q, k, v, causal=True, **opts(kind, 24))


@pytest.mark.parametrize("kind", KINDS)
def test_key_padding_and_empty_rows(kind):
    """A (b, m) key-padding mask; batch row 1 fully padded: its output is exactly 0 and its gradients too."""
    b, hq, hkv, n, m, d = 2, 2, 1, 21, 40, 16
    q, k, v = make(b, hq, hkv, n, m, d, seed=3)
    mask = torch.ones(b, m, dtype=torch.bool, device=DEV)
    mask[0, 5:11] = False
    mask[0, 30:] = False
    mask[1] = False
    for causal in (True, False):
        out, _ = check_forward(kind, q, k, v, mask=mask, causal=causal, **opts(kind, d))
        assert out[1].abs().max().item() == 0.0
        check_backward(kind, q, k, v, mask=mask, causal=causal, **opts(kind, d))


@pytest.mark.parametrize("kind", KINDS)
def test_key_padding_per_head(kind):
    """A (1, Hq, 1, m) key mask that differs between the query heads of one KV head (GQA 2): the score form takes
    it (dk/dv masked per query head before the group sum); the engine's states are per KV head, so the feature
    forms decline it with a reason (``impl="triton"`` is then an error; dispatch's default runs the reference)."""
    q, k, v = make(1, 2, 1, 19, 30, 16, seed=12)
    mask = torch.ones(1, 2, 1, 30, dtype=torch.bool, device=DEV)
    mask[0, 0, 0, :9] = False
    mask[0, 1, 0, 20:] = False
    if kind != "taylor_scores":
        with pytest.raises(AttnSwapError, match="shared by all heads"):
            check_forward(kind, q, k, v, mask=mask, causal=True, **opts(kind, 16))
        return
    check_forward(kind, q, k, v, mask=mask, causal=True, **opts(kind, 16))
    check_backward(kind, q, k, v, mask=mask, causal=True, **opts(kind, 16))


@pytest.mark.parametrize("kind", KINDS)
def test_causal_rows_with_nothing_visible(kind):
    """n > m causal: the first queries see no key: 0, not NaN."""
    q, k, v = make(1, 2, 1, 40, 20, 16, seed=4)
    out, _ = check_forward(kind, q, k, v, causal=True, **opts(kind, 16))
    assert out[:, :, :20].abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision(kind, dtype):
    q, k, v = make(1, 2, 1, 40, 40, 32, dtype=dtype, seed=5)
    check_forward(kind, q, k, v, causal=True, **opts(kind, 32))
    check_forward(kind, q, k, v, causal=True, window=20, **opts(kind, 32))
    if dtype == torch.bfloat16:
        check_backward(kind, q, k, v, causal=True, tol=LOW_TOL, **opts(kind, 32))


@pytest.mark.parametrize("name", ("taylor", "taylor_scores"))
@pytest.mark.parametrize("window", (None, 12))
def test_taylor_sinks(name, window):
    """A sink's Taylor weight joins every denominator; its gradient too (both forms)."""
    q, k, v = make(1, 3, 1, 33, 33, 16, seed=6)
    sinks = torch.tensor([0.5, -1.0, 2.0], device=DEV)
    check_forward(name, q, k, v, causal=True, window=window, sinks=sinks)
    check_backward(name, q, k, v, sinks=sinks, causal=True, window=window)


def test_taylor_score_form_takes_softcap_and_dense_masks():
    """What has no linear-time form runs the score form: a softcap, a dense bool mask (forward and backward)."""
    q, k, v = make(1, 2, 1, 30, 30, 32, seed=14)
    dense = torch.rand(1, 1, 30, 30, generator=torch.Generator().manual_seed(2)).to(DEV) > 0.3
    check_forward("taylor_scores", q, k, v, causal=True, softcap=2.0, scaling=32 ** -0.5)
    check_backward("taylor_scores", q, k, v, causal=True, softcap=2.0, scaling=32 ** -0.5)
    check_forward("taylor_scores", q, k, v, mask=dense, scaling=32 ** -0.5)
    check_backward("taylor_scores", q, k, v, mask=dense, scaling=32 ** -0.5)


def test_taylor_auto_form(monkeypatch):
    """``form="auto"``: the feature form from FEATURE_FORM_FROM keys (and 2 x 128 queries), the score form below it
    and whenever only it can run the inputs (softcap, dense mask); the feature form when only it can (dv != d)."""
    q, k, v = make(1, 2, 1, 256, 256, 16, seed=15)
    vis = Visibility(n=256, m=256, causal=True)
    assert taylor_kernel.choose_form(q, k, v, vis)[0] == "scores"
    monkeypatch.setattr(taylor_kernel, "FEATURE_FORM_FROM", 256)
    assert taylor_kernel.choose_form(q, k, v, vis)[0] == "features"
    assert taylor_kernel.choose_form(q[:, :, :255], k, v, vis)[0] == "scores"
    assert taylor_kernel.choose_form(q, k, v, vis, softcap=5.0)[0] == "scores"
    dense = Visibility(n=256, m=256, mask=torch.ones(1, 1, 1, 256, 256, dtype=torch.bool, device=DEV))
    assert taylor_kernel.choose_form(q, k, v, dense)[0] == "scores"
    monkeypatch.setattr(taylor_kernel, "FEATURE_FORM_FROM", 8192)
    wide_v = torch.zeros(1, 1, 256, 24, device=DEV)
    assert taylor_kernel.choose_form(q, k, wide_v, vis)[0] == "features"
    chosen, why = taylor_kernel.choose_form(q, k, v, vis, form="linear_time", softcap=5.0)
    assert chosen is None and "softcap" in why


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_in_chunks_equals_full_forward(kind):
    """The second half of a prompt with the first half's keys as past (n < m, causal offset) gives the full
    forward's second half."""
    n, half = 48, 23
    q, k, v = make(1, 2, 1, n, n, 16, seed=7)
    name, (kind, form) = kind, VARIANTS[kind]
    kw = dict(impl="triton", causal=True, **form, **opts(name, 16))
    full = attnswap.attention(q, k, v, kind, **kw)
    first = attnswap.attention(q[:, :, :half], k[:, :, :half], v[:, :, :half], kind, **kw)
    second = attnswap.attention(q[:, :, half:], k, v, kind, **kw)
    close(torch.cat([first, second], dim=2), full, 1e-5, "prefill in chunks")


def test_linear_eps():
    """eps joins the denominator: a large eps visibly shrinks the output, as in the reference."""
    q, k, v = make(1, 1, 1, 20, 20, 16, seed=8)
    small, _ = check_forward("linear", q, k, v, causal=True)
    big, _ = check_forward("linear", q, k, v, causal=True, eps=10.0)
    assert (big.abs().sum() < small.abs().sum()).item()


def test_supports_declines():
    """Dense masks (linear, taylor's feature form), softcap (taylor's feature form), head dims above 256, an unknown
    feature map and per-head key padding (linear) are declined with a reason."""
    q, k, v = make(1, 2, 1, 8, 8, 16)
    dense = Visibility(n=8, m=8, mask=torch.ones(1, 1, 1, 8, 8, dtype=torch.bool, device=DEV))
    padding = Visibility(n=8, m=8, mask=torch.ones(1, 1, 1, 1, 8, dtype=torch.bool, device=DEV))
    for module, form in ((linear_kernel, "auto"), (taylor_kernel, "linear_time")):
        ok, why = module.supports(q, k, v, dense, scaling=0.25, form=form)
        assert not ok and "dense mask" in why
        assert module.supports(q, k, v, padding, scaling=0.25, form=form)[0]
        wide = torch.zeros(1, 1, 8, 512, device=DEV)
        ok, why = module.supports(wide, wide, wide, padding, scaling=0.25, form=form)
        assert not ok and "256" in why
    assert taylor_kernel.supports(q, k, v, dense, scaling=0.25)[0]  # auto: the score form
    ok, why = taylor_kernel.supports(q, k, v, padding, scaling=0.25, softcap=5.0, form="linear_time")
    assert not ok and "softcap" in why
    with pytest.raises(AttnSwapError, match="softcap"):
        attnswap.attention(q, k, v, "taylor", impl="triton", softcap=5.0, form="linear_time")
    with pytest.raises(AttnSwapError, match="dense mask"):
        attnswap.attention(q, k, v, "linear", impl="triton", mask=torch.ones(1, 1, 8, 8, dtype=torch.bool))
    assert linear_kernel.supports(q, k, v, padding, feature_map="hedgehog")[0]
    ok, why = linear_kernel.supports(q, k, v, padding, feature_map="cosine")
    assert not ok and "cosine" in why and "hedgehog" in why
    per_head = Visibility(n=8, m=8, mask=torch.ones(1, 1, 2, 1, 8, dtype=torch.bool, device=DEV))
    for feature_map in ("elu", "hedgehog"):
        ok, why = linear_kernel.supports(q, k, v, per_head, feature_map=feature_map)
        assert not ok and "shared by all heads" in why
    # a few queries against a long cache: the engine would rebuild every key's state per call
    long_k = torch.zeros(1, 1, 1024, 16, device=DEV)
    decode = Visibility(n=1, m=1024, causal=True, offset=1023)
    ok, why = linear_kernel.supports(q[:, :, :1], long_k, long_k, decode)
    assert not ok and "StateCache" in why
    assert taylor_kernel.choose_form(q[:, :, :1], long_k, long_k, decode)[0] == "scores"


def test_hedgehog_through_the_kernel():
    """The hedgehog map (F = 2d) runs on the chunk-parallel engine through dispatch: equal to the reference, with
    the gradients of q, k, v (the learned projection before it gets them through autograd)."""
    q, k, v = (t.requires_grad_() for t in make(1, 4, 2, 21, 21, 16))
    got = attnswap.attention(q, k, v, "linear", impl="triton", feature_map="hedgehog", causal=True)
    want = attnswap.attention(q, k, v, "linear", impl="torch", feature_map="hedgehog", causal=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g_got = torch.autograd.grad(got.square().sum(), (q, k, v))
    g_want = torch.autograd.grad(want.square().sum(), (q, k, v))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@settings(max_examples=8, deadline=None)
@given(kind=st.sampled_from(KINDS), n=st.integers(1, 40), extra=st.integers(0, 24), groups=st.sampled_from((1, 2, 3)),
       causal=st.booleans(), window=st.sampled_from((None, 3, 17, 33)))
def test_random_shapes(kind, n, extra, groups, causal, window):
    q, k, v = make(1, groups, 1, n, n + extra, 16, seed=n + extra)
    check_forward(kind, q, k, v, causal=causal, window=window, **opts(kind, 16))
