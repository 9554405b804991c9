"""The ``window_linear`` kernel (``attnswap/kernels/window_linear.py``) against its PyTorch reference in float64,
forward and backward (q, k, v, the model's sink logits, a learned projection's weight). Without CUDA it runs in
the Triton interpreter with chunks of 16, so the window band, the sink block and the linear prefix states all
cross chunk edges."""

import pytest
import torch

pytest.importorskip("triton")

from kernel_env import DEV, make_qkv as make  # noqa: E402  (the interpreter is chosen in conftest.py)

import attnswap  # noqa: E402
import attnswap.kernels  # noqa: E402,F401  (registers the kernels)
from attnswap.errors import AttnSwapError  # noqa: E402
from attnswap.kernels import window_linear as wl_kernel  # noqa: E402
from attnswap.kinds.visibility import Visibility  # noqa: E402
from attnswap.registry import FeatureProjection  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

TOL = 1e-5


def close(got, want, tol, what):
    err = ((got.double() - want.double()).abs() / (1.0 + want.double().abs())).max().item()
    assert err <= tol, f"{what}: max relative-ish error {err:.3g} > {tol}"


def both(q, k, v, *, sinks=None, proj=None, grads=True, tol=TOL, **kw):
    """Kernel vs float64 reference: outputs, and the gradients of sum(out * do) wrt q, k, v (sinks, the projection's
    weight)."""
    kw = dict(causal=True, scaling=q.shape[-1] ** -0.5, **kw)
    leaves = [t.detach().clone().requires_grad_(grads) for t in (q, k, v)]
    extra = [] if sinks is None else [sinks.detach().clone().requires_grad_(grads)]
    weight = None if proj is None else proj.detach().clone().requires_grad_(grads)

    def run(tensors, impl, dtype):
        t = [x.to(dtype) for x in tensors]
        opts = dict(kw)
        if sinks is not None:
            opts["sinks"] = t[3]
        if weight is not None:
            opts["feature_proj"] = FeatureProjection(weight.to(dtype), torch.zeros(weight.shape[:2], dtype=dtype,
                                                                                   device=weight.device))
        if impl == "torch":
            opts["form"] = "quadratic"
        return attnswap.attention(t[0], t[1], t[2], "window_linear", impl=impl, **opts)

    out = run(leaves + extra, "triton", q.dtype)
    ref = run(leaves + extra, "torch", torch.float64)
    assert out.dtype == q.dtype and torch.isfinite(out).all()
    close(out, ref, tol, "forward")
    if not grads:
        return out
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEV)
    wrt = leaves + extra + ([weight] if weight is not None else [])
    got = torch.autograd.grad(out, wrt, do.to(out.dtype))
    want = torch.autograd.grad(ref, wrt, do.double())
    for name, a, b in zip(("dq", "dk", "dv", "dsinks" if sinks is not None else "dproj", "dproj"), got, want):
        assert torch.isfinite(a).all(), name
        close(a, b, tol * 10, name)
    return out


# (b, hq, hkv, n, m, d, local_window, sink_tokens)
CASES = [
    (1, 2, 1, 40, 40, 16, 5, 2),  # window and sinks inside one chunk edge, GQA 2
    (2, 3, 1, 37, 50, 16, 20, 4),  # n < m (a prefix seen by all), window wider than a chunk, GQA 3
    (1, 2, 2, 64, 64, 32, 16, 0),  # no sink tokens, window = a chunk
    (1, 1, 1, 30, 30, 16, 64, 4),  # window wider than the input: no linear key at all
    (1, 2, 1, 45, 45, 24, 3, 17),  # more sink tokens than a chunk, odd head dim (padded)
]


@pytest.mark.parametrize("case", CASES)
def test_forward_and_backward(case):
    b, hq, hkv, n, m, d, window, sinks = case
    q, k, v = make(b, hq, hkv, n, m, d, seed=n + m)
    both(q, k, v, local_window=window, sink_tokens=sinks)


def test_left_padding_and_empty_rows():
    """Left padding per row (one row padded by 13, one not, one fully padded): ranks count real keys, padded queries
    and a fully padded row give exactly 0."""
    q, k, v = make(3, 2, 1, 30, 30, 16, seed=5)
    mask = torch.ones(3, 30, dtype=torch.bool, device=DEV)
    mask[0, :13] = False
    mask[2] = False
    out = both(q, k, v, mask=mask, local_window=6, sink_tokens=3)
    assert out[0, :, :13].abs().max().item() == 0.0 and out[2].abs().max().item() == 0.0


def test_model_sinks_and_softcap():
    """gpt-oss's sink logits (one of them the maximum of most rows) and a softcap, with their gradients."""
    q, k, v = make(1, 3, 1, 36, 36, 16, seed=6)
    sinks = torch.tensor([0.5, 4.0, -2.0], device=DEV)
    both(q, k, v, sinks=sinks, local_window=7, sink_tokens=2)
    both(q * 3, k, v, softcap=2.0, local_window=7, sink_tokens=2)


def test_learned_projection_gets_its_gradient():
    """The transfer's learned projection acts on the linear part only; its weight's gradient flows through the
    features."""
    q, k, v = make(1, 2, 1, 40, 40, 16, seed=7)
    weight = torch.eye(16, device=DEV).repeat(1, 1, 1) + 0.1 * torch.randn(1, 16, 16, generator=torch.Generator()
                                                                              .manual_seed(8)).to(DEV)
    both(q, k, v, proj=weight, local_window=5, sink_tokens=2, feature_map="hedgehog")
    both(q, k, v, local_window=5, sink_tokens=2, feature_map="elu")


def test_bfloat16():
    q, k, v = make(1, 2, 1, 40, 40, 32, dtype=torch.bfloat16, seed=9)
    both(q, k, v, local_window=8, sink_tokens=4, tol=2e-2)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 40), extra=st.integers(0, 20), groups=st.sampled_from((1, 2, 3)),
       window=st.integers(1, 40), sink_tokens=st.integers(0, 6))
def test_random_shapes(n, extra, groups, window, sink_tokens):
    q, k, v = make(1, groups, 1, n, n + extra, 16, seed=n + extra)
    both(q, k, v, local_window=window, sink_tokens=sink_tokens, grads=False)


def test_declines_what_it_cannot_run():
    """Right padding, holes, a sliding window, non-causal and dense masks are declined with a reason (the PyTorch
    forms run them under impl="auto"); impl="triton" then says why."""
    q, k, v = make(2, 2, 1, 8, 8, 16)
    right = torch.ones(2, 1, 1, 1, 8, dtype=torch.bool, device=DEV)
    right[0, ..., 6:] = False
    for vis in (Visibility(n=8, m=8, causal=True, mask=right), Visibility(n=8, m=8, causal=True, window=4),
                Visibility(n=8, m=8, causal=False)):
        ok, why = wl_kernel.supports(q, k, v, vis, scaling=0.25)
        assert not ok and why
    ok, why = wl_kernel.supports(q, k, v, Visibility(n=8, m=8, causal=True, mask=right), scaling=0.25)
    assert "left padding" in why
    long_k = torch.zeros(2, 1, 1024, 16, device=DEV)
    ok, why = wl_kernel.supports(q[:, :, :1], long_k, long_k, Visibility(n=1, m=1024, causal=True, offset=1023),
                                 scaling=0.25)
    assert not ok and "StateCache" in why
    with pytest.raises(AttnSwapError, match="sliding window"):
        attnswap.attention(q, k, v, "window_linear", impl="triton", causal=True, window=4)


def test_chunk_size_does_not_change_the_result():
    """Chunks of 32 (the exact part's blocks, the engine's chunks and prefix states) give chunk 16's output and
    gradients (the GPU runs 64, and 32 for the exact part's backward at head dim 128)."""
    from attnswap.kinds.linear import hedgehog

    q, k, v = (t.requires_grad_() for t in make(1, 2, 1, 70, 70, 16, seed=11))
    results = []
    for chunk in (16, 32):
        out = wl_kernel.window_linear_attention(q, k, v, hedgehog(q), hedgehog(k), local_window=9, sink_tokens=3,
                                                scaling=0.25, chunk=chunk)
        results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        close(a, b, 1e-5, name)


def test_grid_has_a_program_per_head_and_chunk():
    """b = 1, Hq 9, Hkv 3, N = 16k, d 64, Hedgehog: every stage has a program per chunk and head (query heads for the
    query-side stages, KV heads for the key-side ones)."""
    g = wl_kernel.grid(1, 9, 3, 16384, 16384, 128, 64, chunk=64)
    assert g["forward"] == (256, 9) and g["dq"] == (256, 9) and g["dkdv"] == (256, 3)
    assert g["key_states"][:2] == (256, 3) and g["linear_dq"][:2] == (256, 9)
