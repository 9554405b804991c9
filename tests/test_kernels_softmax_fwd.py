"""Forward Triton kernel of ``softmax`` (``attnswap/kernels/flash_fwd.py``, ``flash_decode.py``) against the
PyTorch reference: ``attnswap.attention(..., impl="triton")`` vs ``impl="torch"``, and ``lse`` vs
``torch.logsumexp``. Without CUDA the kernels run in the Triton interpreter on small shapes; on a GPU the
same tests run larger shapes.
"""

import pytest
import torch

pytest.importorskip("triton")

from kernel_env import CUDA, DEV, S, make_qkv as make  # noqa: E402  (the interpreter is chosen in conftest.py)

import attnswap  # noqa: E402
import attnswap.kernels  # noqa: E402,F401  (registers the kernel)
from attnswap.kernels.flash_decode import flash_decode  # noqa: E402
from attnswap.kernels.flash_fwd import flash_forward, use_split_kv  # noqa: E402

from hypothesis import given, settings, strategies as st  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def check(q, k, v, **kw):
    out = attnswap.attention(q, k, v, "softmax", impl="triton", **kw)
    # the reference on the same values in fp32 (low-precision inputs are upcast exactly)
    kw32 = dict(kw)
    if kw32.get("sinks") is not None:
        kw32["sinks"] = kw32["sinks"].float()
    ref = attnswap.attention(q.float(), k.float(), v.float(), "softmax", impl="torch", **kw32)
    assert out.dtype == q.dtype and out.shape == ref.shape
    assert not torch.isnan(out).any()
    tol = TOL[q.dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    return out, ref


def ref_lse(q, k, v, scaling, causal=False, window=None, softcap=None, sinks=None, mask=None):
    b, hq, n, d = q.shape
    hkv, m = k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(hq // hkv, 1)
    s = q.double() @ kk.transpose(-1, -2) * scaling
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(n, device=q.device)[:, None] + (m - n)
    j = torch.arange(m, device=q.device)[None]
    vis = torch.ones(n, m, dtype=torch.bool, device=q.device)
    if causal:
        vis &= j <= i
    if window is not None:
        vis &= j > i - window
    vis = vis.expand(b, hq, n, m)
    if mask is not None:
        vis = vis & mask
    s = s.masked_fill(~vis, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double().view(1, hq, 1, 1).expand(b, hq, n, 1)], -1)
    lse = torch.logsumexp(s, -1)
    return torch.where(vis.any(-1), lse, torch.full_like(lse, float("-inf")))


# (b, hq, hkv, n, m, d, causal, window)
CASES = [
    (1, 2, 2, 33 * S, 33 * S, 64, True, None),  # n == m
    (2, 2, 1, 7, 65 * S, 32, True, None),  # n < m
    (1, 3, 1, 65 * S, 20, 64, True, None),  # n > m: the first queries see nothing
    (1, 3, 1, 1, 1, 32, False, None),
    (2, 4, 2, 17, 40 * S, 80, False, None),
    (1, 2, 1, 40 * S, 40 * S, 96, True, 7),  # sliding window
    (1, 2, 2, 33, 50, 128, False, 5),  # window without causal
    (1, 1, 1, 20, 33, 256, True, None),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_h{}-{}_n{}_m{}_d{}_c{}_w{}".format(*c))
def test_fp32_matches_reference(case):
    b, hq, hkv, n, m, d, causal, window = case
    q, k, v = make(b, hq, hkv, n, m, d)
    check(q, k, v, causal=causal, window=window)


@pytest.mark.parametrize("d", [32, 64, 80, 96, 128, 256])
def test_head_dims(d):
    q, k, v = make(1, 2, 1, 19, 37, d, seed=d)
    check(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision(dtype, causal):
    q, k, v = make(2, 4, 2, 33 * S, 47 * S, 64, dtype=dtype)
    check(q, k, v, causal=causal)


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_gqa(groups):
    q, k, v = make(2, 2 * groups, 2, 24, 31, 32, seed=groups)
    check(q, k, v, causal=True)


def test_bool_mask_with_fully_masked_rows():
    b, hq, n, m = 2, 4, 21, 35
    q, k, v = make(b, hq, 2, n, m, 64)
    mask = torch.rand(b, hq, n, m, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[0, 1, 3] = False
    mask[1, :, 7] = False
    mask = mask.to(DEV)
    out, _ = check(q, k, v, mask=mask)
    assert out[0, 1, 3].eq(0).all() and out[1, :, 7].eq(0).all()
    check(q, k, v, mask=mask, causal=True, window=9)


def test_key_padding_and_broadcast_masks():
    b, hq, n, m = 3, 2, 9, 30
    q, k, v = make(b, hq, 1, n, m, 32)
    pad = torch.ones(b, 1, 1, m, dtype=torch.bool)
    pad[0, ..., :5] = False  # left padding
    pad[1, ..., 20:] = False  # right padding
    pad[2] = False  # a fully padded sequence
    out, _ = check(q, k, v, mask=pad.to(DEV), causal=True)
    assert out[2].eq(0).all()
    shared = (torch.rand(1, 1, n, m, generator=torch.Generator().manual_seed(3)) > 0.5).to(DEV)
    check(q, k, v, mask=shared)


@pytest.mark.parametrize("causal", [False, True])
def test_softcap_and_sinks(causal):
    q, k, v = make(2, 4, 2, 19, 26 * S, 64, seed=5)
    q = q * 3
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(2)).to(DEV)
    check(q, k, v, causal=causal, softcap=5.0)
    check(q, k, v, causal=causal, sinks=sinks)
    check(q, k, v, causal=causal, sinks=sinks, softcap=5.0, window=6)


def test_sinks_on_fully_masked_rows_give_zero():
    q, k, v = make(1, 2, 1, 8, 12, 32)
    mask = torch.ones(1, 1, 8, 12, dtype=torch.bool)
    mask[..., 2, :] = False
    out, _ = check(q, k, v, mask=mask.to(DEV), sinks=torch.randn(2).to(DEV))
    assert out[:, :, 2].eq(0).all()


@pytest.mark.parametrize("split_kv", [False, True])
def test_lse_matches_logsumexp(split_kv):
    b, hq, hkv, n, m, d = 2, 4, 2, 13, 45, 64
    q, k, v = make(b, hq, hkv, n, m, d, seed=9)
    mask = torch.rand(b, 1, n, m, generator=torch.Generator().manual_seed(4)) > 0.3
    mask[1, 0, 4] = False
    mask = mask.to(DEV)
    sinks = torch.randn(hq).to(DEV)
    for kw in (dict(causal=True), dict(mask=mask, window=10, causal=True), dict(sinks=sinks, softcap=4.0),
               dict(mask=mask, sinks=sinks)):
        o, lse = flash_forward(q, k, v, scaling=d ** -0.5, offset=m - n, split_kv=split_kv, **kw)
        want = ref_lse(q, k, v, d ** -0.5, **kw)
        assert lse.dtype == torch.float32 and lse.shape == (b, hq, n)
        assert torch.equal(torch.isinf(lse), torch.isinf(want))
        fin = torch.isfinite(want)
        torch.testing.assert_close(lse[fin].double(), want[fin], atol=1e-5, rtol=1e-5)
        if "mask" in kw:
            assert torch.isneginf(lse[1, :, 4]).all() and o[1, :, 4].eq(0).all()


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_decode_path(n):
    m = 300 if not CUDA else 3000
    q, k, v = make(2, 6, 2, n, m, 64, seed=n)
    kw = dict(scaling=0.125, causal=True, offset=m - n)
    o, lse = flash_decode(q, k, v, **kw)
    o2, lse2 = flash_forward(q, k, v, split_kv=False, **kw)
    torch.testing.assert_close(o, o2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse2, atol=1e-5, rtol=1e-5)
    mask = torch.rand(2, 1, n, m, generator=torch.Generator().manual_seed(n)) > 0.5
    mask[0, ..., :] = False  # a fully padded sequence
    kw.update(window=100, softcap=3.0, sinks=torch.randn(6).to(DEV), mask=mask.to(DEV))
    o, lse = flash_decode(q, k, v, splits=3, **kw)
    o2, lse2 = flash_forward(q, k, v, split_kv=False, **kw)
    assert o[0].eq(0).all() and torch.isneginf(lse[0]).all()
    torch.testing.assert_close(o, o2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse2, atol=1e-5, rtol=1e-5)


def test_decode_routing_through_attention():
    m = 520 if not CUDA else 8192
    assert use_split_kv(1, m) and not use_split_kv(17, m) and not use_split_kv(1, 100)
    q, k, v = make(1, 4, 1, 1, m, 32, seed=3)
    check(q, k, v, causal=True)
    qh, kh, vh = (t.half() for t in (q, k, v))
    check(qh, kh, vh, causal=True, window=200)


def test_unsupported_is_refused():
    q, k, v = make(1, 2, 1, 4, 4, 48)
    with pytest.raises(attnswap.AttnSwapError, match="head dims"):
        attnswap.attention(q, k, v, "softmax", impl="triton")
    q, k, v = make(1, 2, 1, 4, 4, 32)
    with pytest.raises(attnswap.AttnSwapError, match="bias"):
        attnswap.attention(q, k, v, "softmax", impl="triton", mask=torch.randn(1, 1, 4, 4).to(DEV))


def test_autograd_through_kernel():
    q, k, v = make(1, 2, 1, 9, 14, 32, seed=7)
    sinks = torch.randn(2).to(DEV)
    grads = []
    for impl in ("triton", "torch"):
        ins = [t.clone().requires_grad_(True) for t in (q, k, v, sinks)]
        out = attnswap.attention(*ins[:3], "softmax", impl=impl, causal=True, sinks=ins[3])
        out.square().sum().backward()
        grads.append([t.grad for t in ins])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@settings(max_examples=6 if not CUDA else 30, deadline=None)
@given(b=st.integers(1, 2), hkv=st.integers(1, 2), groups=st.integers(1, 3), n=st.integers(1, 40),
       m=st.integers(1, 40), d=st.sampled_from([32, 64]), causal=st.booleans(),
       window=st.one_of(st.none(), st.integers(1, 12)), softcap=st.one_of(st.none(), st.just(4.0)),
       sinks=st.booleans(), masked=st.booleans(), seed=st.integers(0, 100))
def test_random_shapes(b, hkv, groups, n, m, d, causal, window, softcap, sinks, masked, seed):
    q, k, v = make(b, hkv * groups, hkv, n, m, d, seed=seed)
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(hkv * groups, generator=g).to(DEV) if sinks else None
    mask = (torch.rand(b, 1, n, m, generator=g) > 0.3).to(DEV) if masked else None
    check(q, k, v, causal=causal, window=window, softcap=softcap, sinks=s, mask=mask)
