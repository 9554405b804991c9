"""Triton kernel of kind ``entmax`` / ``sparsemax`` (``attnswap/kernels/entmax.py``) against the PyTorch reference
(``attnswap/kinds/entmax.py``): forward, gradients of q, k, v (and sinks), the threshold tau, the block-skip stats.

Without CUDA the kernels run in the Triton interpreter on small shapes; on a GPU the same tests run larger ones.
"""

import pytest
import torch

pytest.importorskip("triton")

from kernel_env import CUDA, DEV, S  # noqa: E402  (the interpreter is chosen in conftest.py)

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import attnswap  # noqa: E402
from attnswap.kernels import entmax as kernels  # noqa: E402
from attnswap.kinds.entmax import entmax_weights  # noqa: E402
from attnswap.kinds.visibility import Visibility  # noqa: E402

FWD_TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
BWD_TOL = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 3e-2}


def make(b, hq, hkv, n, m, d, dtype=torch.float32, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    q, do = torch.randn(b, hq, n, d, generator=g) * spread, torch.randn(b, hq, n, d, generator=g)
    k, v = torch.randn(b, hkv, m, d, generator=g), torch.randn(b, hkv, m, d, generator=g)
    return [t.to(DEV, dtype) for t in (q, k, v, do)]


def close(got, want, tol, name):
    assert got.shape == want.shape and not torch.isnan(got).any(), name
    atol = tol * float(want.detach().abs().max().clamp_min(1.0))
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=tol, msg=lambda s: f"{name}: {s}")


def check(kind="entmax", b=1, hq=2, hkv=1, n=17, m=17, d=32, dtype=torch.float32, seed=0, sinks=None, spread=1.0,
          grad=True, **kw):
    """Triton vs the fp32 reference through ``attnswap.attention``: output, then dq, dk, dv (and dsinks)."""
    q, k, v, do = make(b, hq, hkv, n, m, d, dtype, seed, spread)
    results = {}
    for impl in ("triton", "torch"):
        leaves = [t.detach().clone() for t in (q, k, v)]
        if impl == "torch":
            leaves = [t.float() for t in leaves]
        leaves = [t.requires_grad_(grad) for t in leaves]
        s = sinks.detach().clone().requires_grad_(grad) if sinks is not None else None
        out = attnswap.attention(*leaves, kind, impl=impl, sinks=s, **kw)
        grads = ()
        if grad:
            wrt = leaves + ([s] if s is not None else [])
            grads = torch.autograd.grad(out, wrt, do.to(out.dtype))
        results[impl] = (out, grads)
    (out, grads), (ref, ref_grads) = results["triton"], results["torch"]
    assert out.dtype == dtype
    close(out, ref, FWD_TOL[dtype], "out")
    for name, got, want in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads):
        close(got, want, BWD_TOL[dtype], name)
    return out, grads


@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
@pytest.mark.parametrize("n,m", [(17 * S, 17 * S), (7 * S, 33 * S)])
def test_alphas_causal(alpha, n, m):
    check(alpha=alpha, n=n, m=m, causal=True)


@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
def test_alphas_non_causal_gqa3_odd(alpha):
    check(alpha=alpha, hq=3, hkv=1, n=21 * S, m=29 * S, spread=2.0)


def test_sparsemax_kind():
    out, _ = check(kind="sparsemax", hq=4, hkv=2, n=19 * S, m=19 * S, causal=True, spread=3.0)
    assert out.abs().sum() > 0


def test_sparsemax_alpha_is_pinned():
    """The alias runs alpha = 2: its output equals entmax with alpha=2 and differs from the default 1.5."""
    q, k, v, _ = make(1, 2, 2, 9, 9, 32, spread=2.0)
    sp = attnswap.attention(q, k, v, "sparsemax", impl="triton")
    torch.testing.assert_close(sp, attnswap.attention(q, k, v, "entmax", impl="triton", alpha=2.0))
    assert (sp - attnswap.attention(q, k, v, "entmax", impl="triton")).abs().max() > 1e-3


@pytest.mark.parametrize("causal,window", [(True, 5), (True, 16), (False, 7)])
def test_window(causal, window):
    check(alpha=1.5, n=25 * S, m=33 * S, causal=causal, window=window)


def test_key_padding_and_fully_masked_rows():
    b, n, m = 2, 21 * S, 21 * S
    mask = torch.ones(b, 1, 1, m, dtype=torch.bool)
    mask[1, ..., :6] = False  # left padding: the first 6 queries of batch row 1 see nothing under causal
    out, (dq, dk, dv) = check(alpha=1.5, b=b, hq=2, hkv=2, n=n, m=m, causal=True, mask=mask.to(DEV))
    assert (out[1, :, :6] == 0).all() and (dq[1, :, :6] == 0).all()
    assert (dk[1, :, :6] == 0).all() and (dv[1, :, :6] == 0).all()


@pytest.mark.parametrize("alpha", [1.25, 2.0])
def test_dense_mask(alpha):
    b, hq, n, m = 2, 2, 19 * S, 23 * S
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(b, hq, n, m, generator=g) > 0.5
    mask[0, 1, 4] = False
    mask[1, :, -1] = False
    out, (dq, _, _) = check(alpha=alpha, b=b, hq=hq, n=n, m=m, mask=mask.to(DEV))
    assert (out[0, 1, 4] == 0).all() and (dq[1, :, -1] == 0).all()


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_gqa(groups):
    check(alpha=1.5, hq=2 * groups, hkv=2, n=18 * S, m=18 * S, causal=True)


@pytest.mark.parametrize("alpha", [1.25, 2.0])
def test_softcap(alpha):
    check(alpha=alpha, n=13 * S, m=29 * S, causal=True, softcap=2.0, scaling=0.7)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_sinks(alpha):
    sinks = torch.tensor([1.0, -0.5, 3.0], device=DEV)  # 3.0: that head's sink takes most of the weight
    check(alpha=alpha, hq=3, hkv=1, n=13 * S, m=20 * S, causal=True, sinks=sinks, spread=2.0)


def test_sinks_with_empty_rows():
    mask = torch.ones(1, 1, 1, 17 * S, dtype=torch.bool)
    mask[..., :5] = False
    out, _ = check(alpha=1.5, hq=2, hkv=2, n=17 * S, m=17 * S, causal=True, mask=mask.to(DEV),
                   sinks=torch.tensor([0.3, -1.0], device=DEV))
    assert (out[:, :, :5] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    check(alpha=1.5, hq=2, hkv=1, n=24 * S, m=33 * S, d=64, dtype=dtype, causal=True, window=20 * S, softcap=5.0)


@pytest.mark.parametrize("d", [64, 80])
def test_head_dims(d):
    check(alpha=1.25, n=9 * S, m=18 * S, d=d, causal=True)


def test_uniform_row():
    """All visible scores equal (q = 0): weights 1/|A_i|, so the output is the mean of the visible values."""
    n, m, d = 9 * S, 9 * S, 32
    _, k, v, _ = make(1, 1, 1, n, m, d)
    q = torch.zeros(1, 1, n, d, device=DEV)
    for alpha in (1.25, 2.0):
        out = attnswap.attention(q, k, v, "entmax", impl="triton", causal=True, alpha=alpha)
        want = v[0, 0].cumsum(0) / torch.arange(1, m + 1, device=DEV)[:, None]
        torch.testing.assert_close(out[0, 0], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
def test_tau_matches_reference(alpha):
    b, hq, hkv, n, m, d = 1, 2, 1, 19 * S, 26 * S, 32
    q, k, v, _ = make(b, hq, hkv, n, m, d, spread=2.0)
    scaling = d ** -0.5
    _, saved = kernels.entmax_forward(q, k, v, alpha=alpha, scaling=scaling, causal=True, offset=m - n)
    s = (q @ k.repeat_interleave(hq // hkv, 1).transpose(-1, -2)) * scaling
    visible = torch.arange(m, device=DEV)[None] <= torch.arange(n, device=DEV)[:, None] + (m - n)
    p = entmax_weights(s, visible, alpha)
    z = s * (alpha - 1)
    support = p > 0
    # on the support p = (z - tau)^(1/(alpha-1)), so tau = z - p^(alpha-1)
    tau_ref = torch.where(support, z - p.pow(alpha - 1), 0.0).sum(-1) / support.sum(-1)
    torch.testing.assert_close(saved["tau"], tau_ref, atol=2e-5, rtol=1e-5)
    assert saved["passes"].max() >= 1


def test_stats_skip_blocks_on_peaked_scores():
    """Each query's matching key scores far above the rest: sparsemax keeps one key, most key blocks are
    skipped, and the output equals that key's value."""
    m = 48 * S
    d = 32
    g = torch.Generator().manual_seed(1)
    k = torch.randn(1, 1, m, d, generator=g).to(DEV)
    v = torch.randn(1, 1, m, d, generator=g).to(DEV)
    q = 20.0 * k.clone()
    out, stats = kernels.entmax_attention(q, k, v, alpha=2.0, scaling=d ** -0.5, return_stats=True)
    torch.testing.assert_close(out, v, atol=1e-5, rtol=1e-5)
    assert 0.5 < stats["skipped_block_fraction"] <= 1.0
    assert stats["zero_weight_fraction"] > 0.9
    assert 1 <= stats["threshold_passes"] <= stats["threshold_passes_max"] <= 3
    ref = attnswap.attention(q, k, v, "sparsemax", impl="torch")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_stats_dense_scores_skip_nothing():
    q, k, v, _ = make(1, 1, 1, 32, 32, 32, spread=0.01)  # near-uniform scores: every key has weight
    _, stats = kernels.entmax_attention(q, k, v, alpha=1.5, scaling=32 ** -0.5, return_stats=True)
    assert stats["skipped_block_fraction"] == 0.0 and stats["zero_weight_fraction"] < 0.05


def test_supports_declines():
    q, k, v, _ = make(1, 2, 1, 8, 8, 32)
    vis = Visibility(n=8, m=8)
    assert kernels.supports(q, k, v, vis) == (True, "")
    ok, why = kernels.supports(q[..., :16], k[..., :16], v[..., :16], vis)
    assert not ok and "valid head dims" in why and "32" in why
    assert not kernels.supports(q, k, v, vis, dropout=0.1)[0]
    assert not kernels.supports(q, k, v, vis, need_weights=True)[0]
    bias = Visibility(n=8, m=8, mask=torch.randn(1, 1, 1, 8, 8, device=DEV))
    ok, why = kernels.supports(q, k, v, bias)
    assert not ok and "bias" in why


def test_bad_alpha():
    q, k, v, _ = make(1, 1, 1, 8, 8, 32)
    with pytest.raises(ValueError, match=r"\(1, 2\]"):
        kernels.entmax_attention(q, k, v, alpha=1.0, scaling=1.0)


@settings(max_examples=8 if not CUDA else 30, deadline=None, suppress_health_check=list(HealthCheck))
@given(alpha=st.sampled_from([1.25, 1.5, 1.75, 2.0]), groups=st.sampled_from([1, 2, 3]),
       n=st.sampled_from([1, 7, 33]), m=st.sampled_from([1, 7, 33]), causal=st.booleans(),
       window=st.one_of(st.none(), st.integers(1, 40)), softcap=st.one_of(st.none(), st.just(3.0)),
       use_sinks=st.booleans(), pad=st.booleans(), seed=st.integers(0, 99))
def test_random(alpha, groups, n, m, causal, window, softcap, use_sinks, pad, seed):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(2, 1, 1, m, generator=g) > 0.3).to(DEV) if pad else None
    sinks = torch.randn(groups, generator=g).to(DEV) if use_sinks else None
    check(alpha=alpha, b=2, hq=groups, hkv=1, n=n, m=m, seed=seed, causal=causal, window=window, softcap=softcap,
          sinks=sinks, mask=mask, spread=2.0)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_peaked_rows_take_three_passes(alpha):
    """Scores with a clear top (q scaled up): the histogram brackets each row's root, the gathering pass solves it
    (max/count, histogram, gather: three passes over the keys), and the output equals the reference."""
    out, _ = check("entmax", n=40 * S, m=40 * S, d=32, spread=4.0, alpha=alpha, causal=True)
    q, k, v, _ = make(1, 2, 1, 40 * S, 40 * S, 32, spread=4.0)
    _, stats = kernels.entmax_attention(q, k, v, alpha=alpha, scaling=32 ** -0.5, causal=True, return_stats=True)
    assert stats["threshold_passes"] == 3 and stats["threshold_passes_max"] == 3


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_flat_rows_past_the_scratch_take_newton(alpha):
    """Equal scores on more keys than the gathering pass can hold (CAP): the bracket's scores do not fit, Newton
    passes finish the root, and every key gets weight 1 / m (the output is the mean of v)."""
    m = kernels.CAP + 32
    q, k, v, _ = make(1, 1, 1, 4, m, 32)
    q = torch.zeros_like(q)
    out, stats = kernels.entmax_attention(q, k, v, alpha=alpha, scaling=32 ** -0.5, return_stats=True)
    torch.testing.assert_close(out, v.mean(2, keepdim=True).expand_as(out), atol=1e-5, rtol=1e-5)
    assert stats["threshold_passes_max"] > 3 and stats["zero_weight_fraction"] == 0.0


def _tau_reference(s, visible, alpha):
    p = entmax_weights(s, visible, alpha)
    support = p > 0
    z = s * (alpha - 1)
    return torch.where(support, z - p.pow(alpha - 1), 0.0).sum(-1) / support.sum(-1).clamp_min(1)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(alpha=st.sampled_from([1.3, 1.5, 2.0]), m=st.integers(2, 90), spread=st.sampled_from([0.0, 0.5, 2.0, 8.0]),
       integer=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_tau_on_any_row(alpha, m, spread, integer, seed):
    """tau of the few-pass search equals the reference's on rows of every shape: flat (spread 0: one bracket
    holding every key), peaked, integer-valued scores (ties at the bracket's edges and inside it), up to 90 keys
    (past the 64 a gathering pass holds)."""
    g = torch.Generator().manual_seed(seed)
    n, d = 3, 32
    q = torch.randn(1, 1, n, d, generator=g) * spread
    k = torch.randn(1, 1, m, d, generator=g)
    if integer:  # integer scores: q one-hot, k rounded (scaling 1)
        q = torch.zeros(1, 1, n, d)
        q[..., 0] = 1.0
        k = (k * spread).round()
    q, k = q.to(DEV), k.to(DEV)
    v = torch.randn(1, 1, m, d, generator=g).to(DEV)
    scaling = 1.0 if integer else d ** -0.5
    _, saved = kernels.entmax_forward(q, k, v, alpha=alpha, scaling=scaling)
    s = (q @ k.transpose(-1, -2)) * scaling
    visible = torch.ones(n, m, dtype=torch.bool, device=DEV)
    torch.testing.assert_close(saved["tau"], _tau_reference(s, visible, alpha), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("alpha,n", [(1.5, 1), (2.0, 4), (1.25, 2)])
def test_decode_shapes(alpha, n):
    """Generation's shapes: a few queries (the newest positions) against a long cache, GQA 3, with a sink."""
    check(alpha=alpha, hq=3, hkv=1, n=n, m=150 * S, causal=True, sinks=torch.tensor([0.5, -1.0, 2.0], device=DEV),
          spread=2.0)
