"""Backward Triton kernel of ``softmax`` (``attnswap/kernels/flash_bwd.py``) against float64 PyTorch autograd.

The reference is an explicit masked softmax (causal with any offset, sliding window, dense bool mask, softcap,
sink column) built here; ``flash_backward`` gets the reference's ``o`` and ``lse`` and must return its dq, dk,
dv and dsinks. Without CUDA the kernels run in the Triton interpreter on small shapes; on a GPU the same tests
run larger shapes.
"""

import pytest
import torch

pytest.importorskip("triton")

from kernel_env import CUDA, DEV, S  # noqa: E402  (the interpreter is chosen in conftest.py)

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from attnswap.kernels.flash_bwd import flash_backward  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 3e-2}


def visible(b, hq, n, m, causal, offset, window, mask):
    i = torch.arange(n)[:, None] + offset
    j = torch.arange(m)[None]
    vis = torch.ones(n, m, dtype=torch.bool)
    if causal:
        vis &= j <= i
    if window is not None:
        vis &= j > i - window
    vis = vis.to(DEV).expand(b, hq, n, m)
    if mask is not None:
        vis = vis & mask.expand(b, hq, n, m)
    return vis


def reference(q, k, v, do, *, scaling, causal=False, offset=0, window=None, softcap=None, sinks=None, mask=None):
    """float64 autograd: returns o, lse (as the forward saves them) and (dq, dk, dv, dsinks)."""
    b, hq, n, d = q.shape
    hkv, m = k.shape[1], k.shape[2]
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    sd = sinks.detach().double().requires_grad_(True) if sinks is not None else None
    kk = kd.repeat_interleave(hq // hkv, 1)
    vv = vd.repeat_interleave(hq // hkv, 1)
    s = (qd @ kk.transpose(-1, -2)) * scaling
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    vis = visible(b, hq, n, m, causal, offset, window, mask)
    any_vis = vis.any(-1, keepdim=True)
    s = s.masked_fill(~vis, float("-inf"))
    if sd is not None:
        s = torch.cat([s, sd[None, :, None, None].expand(b, hq, n, 1)], dim=-1)
    s = torch.where(any_vis, s, torch.zeros((), dtype=s.dtype, device=s.device))  # empty rows: no -inf row
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.where(any_vis, torch.exp(s - lse), torch.zeros((), dtype=s.dtype, device=s.device))[..., :m]
    o = p @ vv
    wrt = [qd, kd, vd] + ([sd] if sd is not None else [])
    grads = torch.autograd.grad(o, wrt, do.double())
    lse = torch.where(any_vis, lse, float("-inf"))[..., 0]
    return o, lse, grads


def make(b, hq, hkv, n, m, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, do = torch.randn(b, hq, n, d, generator=g), torch.randn(b, hq, n, d, generator=g)
    k, v = torch.randn(b, hkv, m, d, generator=g), torch.randn(b, hkv, m, d, generator=g)
    return [t.to(DEV, dtype) for t in (q, k, v, do)]


def check(b=1, hq=2, hkv=1, n=17, m=17, d=32, dtype=torch.float32, seed=0, **kw):
    q, k, v, do = make(b, hq, hkv, n, m, d, dtype, seed)
    kw.setdefault("scaling", d ** -0.5)
    o, lse, grads = reference(q, k, v, do, **kw)
    dq, dk, dv, dsinks = flash_backward(do, q, k, v, o.to(dtype), lse.float(), **kw)
    tol = TOL[dtype]
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), grads):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert not torch.isnan(got).any(), name
        # low precision: relative to the gradient's scale (entries near 0 carry absolute error)
        atol = tol if dtype == torch.float32 else tol * float(want.abs().max().clamp_min(1e-3))
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=tol, msg=lambda s: f"{name}: {s}")
    if kw.get("sinks") is None:
        assert dsinks is None
    else:
        assert dsinks.dtype == torch.float32 and dsinks.shape == (hq,)
        atol = tol if dtype == torch.float32 else tol * float(grads[3].abs().max().clamp_min(1e-3))
        torch.testing.assert_close(dsinks.double(), grads[3], atol=atol, rtol=tol)
    return dq, dk, dv, dsinks


@pytest.mark.parametrize("n,m", [(7 * S, 33 * S), (33 * S, 33 * S), (65 * S, 33 * S), (1, 7), (7, 1)])
def test_causal_alignments(n, m):
    check(n=n, m=m, causal=True, offset=m - n)


@pytest.mark.parametrize("offset", [0, -5, 9])
def test_causal_offsets(offset):
    check(n=20 * S, m=24 * S, causal=True, offset=offset)


@pytest.mark.parametrize("causal,window", [(True, 5), (True, 16), (False, 7)])
def test_window(causal, window):
    check(n=33 * S, m=40 * S, causal=causal, offset=7 * S, window=window)


def test_dense_mask_with_empty_rows():
    b, hq, n, m = 2, 2, 19 * S, 23 * S
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(b, hq, n, m, generator=g) > 0.5
    mask[0, 1, 4] = False  # fully masked rows
    mask[1, :, -1] = False
    dq, *_ = check(b=b, hq=hq, n=n, m=m, mask=mask.to(DEV))
    assert (dq[0, 1, 4] == 0).all() and (dq[1, :, -1] == 0).all()


def test_key_padding_causal_sinks():
    b, n, m = 2, 21 * S, 21 * S
    mask = torch.ones(b, 1, 1, m, dtype=torch.bool)
    mask[1, ..., :6] = False  # left padding: the first rows of batch 1 see nothing
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], device=DEV)
    dq, *_ = check(b=b, hq=4, hkv=2, n=n, m=m, causal=True, mask=mask.to(DEV), sinks=sinks)
    assert (dq[1, :, :6] == 0).all()


def test_softcap_and_sinks():
    sinks = torch.tensor([1.0, -0.5, 0.25], device=DEV)
    check(hq=3, hkv=1, n=13 * S, m=29 * S, causal=True, offset=16 * S, softcap=2.0, scaling=0.3, sinks=sinks)


@pytest.mark.parametrize("d", [32, 64, 80, 96, 128, 256])
def test_head_dims(d):
    check(n=9 * S, m=18 * S, d=d, causal=True, offset=9 * S)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    sinks = torch.tensor([0.3, -0.2], device=DEV)
    check(hq=2, hkv=1, n=24 * S, m=33 * S, d=64, dtype=dtype, causal=True, offset=9 * S, window=20 * S,
          softcap=5.0, sinks=sinks)


@settings(max_examples=15 if not CUDA else 40, deadline=None, suppress_health_check=list(HealthCheck))
@given(groups=st.sampled_from([1, 2, 3]), hkv=st.integers(1, 2), n=st.sampled_from([1, 7, 33, 65]),
       m=st.sampled_from([1, 7, 33, 65]), d=st.sampled_from([32, 80]), causal=st.booleans(),
       window=st.one_of(st.none(), st.integers(1, 40)), softcap=st.one_of(st.none(), st.just(3.0)),
       use_sinks=st.booleans(), pad=st.booleans(), seed=st.integers(0, 99))
def test_random(groups, hkv, n, m, d, causal, window, softcap, use_sinks, pad, seed):
    hq = groups * hkv
    mask = None
    if pad:
        g = torch.Generator().manual_seed(seed)
        mask = (torch.rand(2, 1, 1, m, generator=g) > 0.3).to(DEV)
    sinks = torch.randn(hq, generator=torch.Generator().manual_seed(seed)).to(DEV) if use_sinks else None
    check(b=2, hq=hq, hkv=hkv, n=n, m=m, d=d, seed=seed, causal=causal, offset=m - n, window=window,
          softcap=softcap, sinks=sinks, mask=mask)


def _end_to_end(dtype=torch.float32, **kw):
    attnswap = pytest.importorskip("attnswap")
    pytest.importorskip("attnswap.kernels.softmax")
    b, hq, hkv, n, m, d = 2, 4, 2, 19 * S, 27 * S, 64
    q, k, v, do = make(b, hq, hkv, n, m, d, dtype, seed=5)
    sinks = kw.pop("sinks", None)
    grads = {}
    for impl in ("triton", "torch"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        s = sinks.detach().clone().requires_grad_(True) if sinks is not None else None
        if impl == "torch":  # the reference in fp32 on the same values
            leaves = [t.detach().float().requires_grad_(True) for t in leaves]
        out = attnswap.attention(*leaves, "softmax", impl=impl, sinks=s, **kw)
        wrt = leaves + ([s] if s is not None else [])
        grads[impl] = torch.autograd.grad(out, wrt, do.to(out.dtype))
    tol = TOL[dtype]
    for got, want in zip(grads["triton"], grads["torch"]):
        assert got.dtype == (dtype if got.dim() == 4 else want.dtype) and not torch.isnan(got).any()
        atol = tol if dtype == torch.float32 else tol * float(want.abs().max().clamp_min(1e-3))
        torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_end_to_end_causal(dtype):
    _end_to_end(dtype, causal=True)


def test_end_to_end_mask_window_softcap_sinks():
    mask = torch.ones(2, 1, 1, 27 * S, dtype=torch.bool, device=DEV)
    mask[0, ..., :10] = False
    _end_to_end(causal=True, window=9, softcap=4.0, mask=mask, sinks=torch.tensor([0.1, -0.3, 0.7, 1.2], device=DEV))
