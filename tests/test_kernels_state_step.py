"""The fused decode step of the StateCache (``attnswap/kernels/state_step.py``) against its math, and generation
through it equal to generation with K/V. Without CUDA the kernel runs in the Triton interpreter."""

import pytest
import torch

pytest.importorskip("triton")

from kernel_env import DEV  # noqa: E402  (the interpreter is chosen in conftest.py)

import attnswap  # noqa: E402
from attnswap.kernels import state_step as step_module  # noqa: E402
from attnswap.patches import state_cache  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402
from test_state_cache import dynamic, generate  # noqa: E402
from tiny_models import left_padded_batch, tiny_model  # noqa: E402


def reference_step(fq, fk, v, state, norm, extra, real):
    """float64: fold the (real) new key in, then o = fq . S / (fq . z + extra) per query head."""
    r = torch.ones(fq.shape[0], dtype=torch.float64) if real is None else real.double()
    fk = fk.double() * r[:, None, None]
    s = state.double() + fk[..., :, None] * v.double()[..., None, :]
    z = norm.double() + fk
    num = torch.einsum("bhgf,bhfv->bhgv", fq.double(), s)
    den = torch.einsum("bhgf,bhf->bhg", fq.double(), z) + extra.double().reshape(1, *fq.shape[1:3])
    den = torch.where(den == 0, torch.ones_like(den), den)
    return (num / den[..., None]).reshape(fq.shape[0], -1, 1, v.shape[-1]), s, z


@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 3), hkv=st.integers(1, 2), groups=st.sampled_from((1, 2, 3, 9)), f=st.integers(1, 40),
       dv=st.integers(1, 24), padded=st.booleans(), seed=st.integers(0, 2**16))
def test_step_equals_its_math(b, hkv, groups, f, dv, padded, seed):
    """Output, state and norm after one step, with GQA groups, odd F and dv (tiles partly outside), padded rows."""
    g = torch.Generator().manual_seed(seed)
    fq, state = torch.rand(b, hkv, groups, f, generator=g), torch.rand(b, hkv, f, dv, generator=g)
    fk, norm, v = torch.rand(b, hkv, f, generator=g), torch.rand(b, hkv, f, generator=g), torch.randn(b, hkv, dv,
                                                                                                        generator=g)
    extra = torch.rand(hkv * groups, generator=g)
    real = (torch.arange(b) % 2 == 0).float() if padded else None
    want, s_want, z_want = reference_step(fq, fk, v, state, norm, extra, real)
    state_t, norm_t = state.to(DEV), norm.to(DEV)
    got = step_module.state_step(fq.to(DEV), fk.to(DEV), v.to(DEV), state_t, norm_t, extra.to(DEV),
                                 real=None if real is None else real.to(DEV))
    torch.testing.assert_close(got.double().cpu(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state_t.double().cpu(), s_want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm_t.double().cpu(), z_want, atol=1e-5, rtol=1e-5)


def test_bad_state_is_a_clear_error():
    fq, fk, v = torch.rand(1, 1, 2, 8), torch.rand(1, 1, 8), torch.rand(1, 1, 4)
    with pytest.raises(ValueError, match="fp32 contiguous"):
        step_module.state_step(fq, fk, v, torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 8), torch.zeros(2))


@pytest.mark.parametrize("kind", ["linear", "taylor"])
@pytest.mark.parametrize("family", ["llama", "gpt_oss"])
def test_generate_through_the_fused_step(monkeypatch, family, kind):
    """Greedy generation of a left-padded batch with the fused step (every decode step takes it: spied) gives the
    sequences K/V recomputation gives; gpt-oss brings sinks (taylor: their weight joins each denominator)."""
    monkeypatch.setattr(state_cache, "FUSED_STEP", "always")
    calls = []
    real_step = step_module.state_step

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(step_module, "state_step", spy)
    model = tiny_model(family).to(DEV)
    ids, mask = (t.to(DEV) for t in left_padded_batch(model.config.vocab_size))
    attnswap.swap_attention(model, kind)
    ref = generate(model, ids, mask, cache=dynamic(model))
    out = generate(model, ids, mask)
    assert calls, "the fused step never ran"
    assert torch.equal(out.sequences, ref.sequences)
