"""Split-KV decode path of the ``entmax`` Triton kernel (``attnswap/kernels/entmax_decode.py``) against the float64
reference (``tests/naive.py``): generation shapes (a few queries at the end of a long cache), inference only.

``entmax_attention`` routes here for n <= 16 queries, no gradient wanted and a key band of at least
``DECODE_MIN_BLOCKS`` key blocks (128 keys in the interpreter, 512 on a GPU); a spy on ``decode_forward`` checks
that the tests really take that path, with more than one split.
"""

import pytest
import torch

pytest.importorskip("triton")

from kernel_env import CUDA, DEV, S  # noqa: E402  (the interpreter is chosen in conftest.py)
from naive import naive_attention  # noqa: E402

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import attnswap  # noqa: E402
from attnswap.kernels import entmax as kernels  # noqa: E402
from attnswap.kernels import entmax_decode as decode  # noqa: E402

FWD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
BWD_TOL = 1e-4
D = 32


@pytest.fixture
def spy(monkeypatch):
    """Records the ``saved`` of every decode forward that ``entmax_attention`` runs."""
    calls = []

    def recording(*args, **kwargs):
        o, saved = decode.decode_forward(*args, **kwargs)
        calls.append(saved)
        return o, saved

    monkeypatch.setattr(kernels, "decode_forward", recording)
    return calls


def make(b, hq, hkv, n, m, dtype=torch.float32, seed=0, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, D, generator=g) * spread
    k, v = torch.randn(b, hkv, m, D, generator=g), torch.randn(b, hkv, m, D, generator=g)
    return [t.to(DEV, dtype) for t in (q, k, v)]


def close(got, want, tol, name="out"):
    assert got.shape == want.shape and not torch.isnan(got).any(), name
    atol = tol * float(want.detach().abs().max().clamp_min(1.0))
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=tol, msg=lambda s: f"{name}: {s}")


def reference(q, k, v, *, alpha, causal=False, window=None, softcap=None, sinks=None, mask=None, scaling=None):
    """float64 output of the naive reference (queries at the end of the cache: offset m - n)."""
    on_cpu = [t.detach().cpu() if t is not None else None for t in (q, k, v, sinks, mask)]
    q, k, v, sinks, mask = on_cpu
    return naive_attention(q, k, v, "entmax", alpha=alpha, causal=causal, window=window, softcap=softcap,
                           sinks=sinks, mask=mask, scaling=scaling).out


def run(q, k, v, *, alpha, causal=False, window=None, softcap=None, sinks=None, mask=None, stats=False):
    n, m = q.shape[2], k.shape[2]
    return kernels.entmax_attention(q, k, v, alpha=alpha, scaling=D ** -0.5, causal=causal, offset=m - n,
                                    window=window, softcap=softcap, sinks=sinks, mask=mask, return_stats=stats)


def check_decode(spy, *, alpha, b=2, hq=4, hkv=2, n=1, m=150 * S, dtype=torch.float32, seed=0, spread=2.0, **kw):
    """The routed decode path equals the float64 reference; it ran once, with more than one split."""
    q, k, v = make(b, hq, hkv, n, m, dtype, seed, spread)
    before = len(spy)
    out = run(q, k, v, alpha=alpha, **kw)
    assert len(spy) == before + 1 and spy[-1]["splits"] > 1
    assert out.dtype == dtype
    close(out, reference(q, k, v, alpha=alpha, scaling=D ** -0.5, **kw), FWD_TOL[dtype])
    return out


@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.3])
def test_gqa_causal_sinks_padding(spy, alpha):
    """GQA 2, the last n = 3 positions of the cache, sinks (one large), left padding of batch row 1 and a batch row 2
    that sees no key at all (its rows hold only the sink: o = 0)."""
    b, m = 3, 150 * S
    mask = torch.ones(b, 1, 1, m, dtype=torch.bool)
    mask[1, ..., :40 * S] = False
    mask[2] = False
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], device=DEV)
    out = check_decode(spy, alpha=alpha, b=b, n=3, m=m, causal=True, sinks=sinks, mask=mask.to(DEV))
    assert (out[2] == 0).all() and out[0].abs().sum() > 0


@pytest.mark.parametrize("alpha", [1.5, 1.3])
def test_window_softcap(spy, alpha):
    check_decode(spy, alpha=alpha, n=4, m=250 * S, causal=True, window=140 * S, softcap=2.0)


def test_non_causal_window_and_dense_mask_with_empty_rows(spy):
    """A per-(batch row, head, query) mask, one row fully masked and no sink: that row gives exactly 0."""
    b, hq, n, m = 1, 2, 2, 160 * S
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(b, hq, n, m, generator=g) > 0.5
    mask[0, 1, 0] = False
    out = check_decode(spy, alpha=2.0, b=b, hq=hq, hkv=1, n=n, m=m, window=150 * S, mask=mask.to(DEV))
    assert (out[0, 1, 0] == 0).all()


def test_bf16(spy):
    check_decode(spy, alpha=1.5, n=2, m=140 * S, dtype=torch.bfloat16, causal=True, softcap=5.0)


@settings(max_examples=4 if not CUDA else 20, deadline=None, suppress_health_check=list(HealthCheck))
@given(alpha=st.sampled_from([1.3, 1.5, 2.0]), groups=st.sampled_from([1, 3]), n=st.sampled_from([1, 5, 16]),
       m=st.integers(130 * S, 220 * S), causal=st.booleans(), use_sinks=st.booleans(), pad=st.booleans(),
       seed=st.integers(0, 99))
def test_random(spy, alpha, groups, n, m, causal, use_sinks, pad, seed):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(1, 1, 1, m, generator=g) > 0.3).to(DEV) if pad else None
    sinks = torch.randn(groups, generator=g).to(DEV) if use_sinks else None
    check_decode(spy, alpha=alpha, b=1, hq=groups, hkv=1, n=n, m=m, seed=seed, causal=causal, sinks=sinks,
                 mask=mask)


def test_tau_and_stats_match_the_prefill_kernel():
    """Same inputs through both paths: tau equal to the prefill kernel's (the exact fp32 root, both in z units),
    the same zero-weight fraction and (blocks aligned at key 0 in both) the same skipped-block fraction; one
    streamed pass over the keys before the output pass."""
    n, m = 4, 150 * S
    q, k, v = make(1, 2, 1, n, m, spread=3.0)
    opts = dict(alpha=1.5, scaling=D ** -0.5, causal=True, offset=m - n)
    o_dec, saved = decode.decode_forward(q, k, v, **opts)
    o_pre, saved_pre = kernels.entmax_forward(q, k, v, **opts)
    torch.testing.assert_close(saved["tau"], saved_pre["tau"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(o_dec, o_pre, atol=1e-5, rtol=1e-5)
    stats, stats_pre = decode.decode_stats(saved), kernels.forward_stats(saved_pre)
    assert stats["zero_weight_fraction"] == pytest.approx(stats_pre["zero_weight_fraction"])
    if saved["block_n"] == saved_pre["plan"].block_n:
        assert stats["skipped_block_fraction"] == pytest.approx(stats_pre["skipped_block_fraction"])
    assert 0.0 < stats["skipped_block_fraction"] < 1.0
    assert stats["threshold_passes"] == 1 and stats["threshold_passes_max"] == 1


def test_return_stats_on_the_decode_path(spy):
    q, k, v = make(1, 2, 1, 1, 150 * S, spread=3.0)
    out, stats = run(q, k, v, alpha=2.0, causal=True, stats=True)
    assert len(spy) == 1
    assert set(stats) == {"skipped_block_fraction", "zero_weight_fraction", "threshold_passes",
                          "threshold_passes_max"}
    assert stats["threshold_passes"] == 1 and 0.5 < stats["zero_weight_fraction"] < 1.0


def test_registry_route_takes_the_decode_path(spy):
    """``attnswap.attention(..., impl="triton")`` (causal: offset m - n from the model's conventions) decodes too."""
    q, k, v = make(1, 2, 2, 2, 150 * S)
    out = attnswap.attention(q, k, v, "sparsemax", impl="triton", causal=True)
    assert len(spy) == 1
    close(out, reference(q, k, v, alpha=2.0, causal=True), FWD_TOL[torch.float32])


def test_grad_inputs_take_the_prefill_path(spy):
    """Inputs that require grad keep the differentiable kernel (no decode call) and get correct gradients; under
    ``torch.no_grad`` the same inputs decode."""
    q, k, v = make(1, 2, 1, 2, 150 * S)
    sinks = torch.tensor([0.3, -0.7], device=DEV)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    out = run(*leaves[:3], alpha=1.5, causal=True, sinks=leaves[3])
    assert spy == []
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEV)
    grads = torch.autograd.grad(out, leaves, do)
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v, sinks)]
    ref = naive_attention(*ref_leaves[:3], "entmax", alpha=1.5, causal=True, sinks=ref_leaves[3],
                          scaling=D ** -0.5).out
    close(out, ref, FWD_TOL[torch.float32])
    ref_grads = torch.autograd.grad(ref, ref_leaves, do.cpu().double())
    for name, got, want in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads):
        close(got, want, BWD_TOL, name)
    with torch.no_grad():
        run(*leaves[:3], alpha=1.5, causal=True, sinks=leaves[3])
    assert len(spy) == 1


def test_short_caches_and_long_query_blocks_keep_the_prefill_path():
    q, k, v = make(1, 2, 1, 2, 150 * S)
    assert decode.use_decode(q, k, v, causal=True, offset=150 * S - 2)
    assert not decode.use_decode(q, k[:, :, :100 * S], v[:, :, :100 * S])  # a band under DECODE_MIN_BLOCKS
    q17 = make(1, 2, 1, decode.DECODE_MAX_QUERIES + 1, 8)[0]
    assert not decode.use_decode(q17, k, v)
    # a sliding window narrows the band the splits cover
    assert not decode.use_decode(q, k, v, causal=True, offset=150 * S - 2, window=16)


def test_forced_splits_agree():
    """The number of splits changes only how the partials add up: 1, 3 and 5 splits give the same output."""
    q, k, v = make(1, 1, 1, 2, 150 * S)
    opts = dict(alpha=1.3, scaling=D ** -0.5, causal=True, offset=150 * S - 2)
    outs = [decode.decode_forward(q, k, v, splits=s, **opts) for s in (1, 3, 5)]
    assert [saved["splits"] for _, saved in outs] == [1, 3, 5]
    for o, _ in outs[1:]:
        torch.testing.assert_close(o, outs[0][0], atol=1e-6, rtol=1e-5)


def test_errors():
    q, k, v = make(1, 1, 1, decode.DECODE_MAX_QUERIES + 1, 8)
    with pytest.raises(ValueError, match="at most 16 queries"):
        decode.decode_forward(q, k, v, alpha=1.5, scaling=1.0)
    with pytest.raises(ValueError, match=r"\(1, 2\]"):
        decode.decode_forward(q[:, :, :1], k, v, alpha=2.5, scaling=1.0)
