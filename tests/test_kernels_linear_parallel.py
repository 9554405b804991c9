"""The chunk-parallel linear-attention engine (``attnswap/kernels/linear_parallel.py``) against a float64 O(N^2)
reference written here, forward and backward (d fq, d fk, d v, and the gradient into a learned feature map's
weight), for ELU+1 (F = d), Hedgehog (F = 2d) and a learned projection; GQA 1/2/3, causal with offsets (n < m and
n > m), sliding windows, non-causal, key padding with a fully padded batch row, lengths that are no multiple of the chunk, fp32 and
bf16. Without CUDA the kernels run in the Triton interpreter (tests/conftest.py) with 16-row chunks and 16-wide
feature/value tiles, so the small shapes here cross several chunks and tiles. Also: the launch grids have a
program per (head, chunk), the ``linear`` kind routes here, and bad inputs get clear errors.
"""

import copy

import pytest
import torch

pytest.importorskip("triton")

from kernel_env import DEV  # noqa: E402  (the interpreter is chosen in conftest.py)

import attnswap  # noqa: E402
import attnswap.kernels  # noqa: E402,F401  (registers the kernels)
from attnswap.kernels import linear as linear_kernel  # noqa: E402
from attnswap.errors import AttnSwapError  # noqa: E402
from attnswap.kernels import linear_parallel as lp  # noqa: E402
from attnswap.kinds.linear import elu_plus_one, hedgehog  # noqa: E402

from hypothesis import example, given, settings, strategies as st  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def close(got, want, tol, what=""):
    """|got - want| <= tol * (1 + |want|) elementwise, with a message naming the worst error."""
    err = ((got.double() - want.double()).abs() / (1.0 + want.double().abs())).max().item()
    assert err <= tol, f"{what}: max relative-ish error {err:.3g} > {tol}"


def reference(fq, fk, v, *, causal=False, offset=0, window=None, key_mask=None, eps=1e-6):
    """o_i = sum_j w_ij v_j / (sum_j w_ij + eps), w_ij = fq_i . fk_j on visible pairs; a 0 denominator reads 1.
    Dense (n x m) weights: test sizes only."""
    b, hq, n, _ = fq.shape
    hkv, m = fk.shape[1], fk.shape[2]
    fk = fk.repeat_interleave(hq // hkv, 1)
    v = v.repeat_interleave(hq // hkv, 1)
    w = fq @ fk.transpose(-1, -2)
    ok = torch.ones(n, m, dtype=torch.bool, device=fq.device)
    pos = torch.arange(n, device=fq.device)[:, None] + offset  # query i's key position
    key = torch.arange(m, device=fq.device)[None, :]
    if causal:
        ok = ok & (key <= pos)
    if window is not None:
        ok = ok & (key > pos - window)
    ok = ok.expand(b, 1, n, m)
    if key_mask is not None:
        ok = ok & key_mask.expand(b, m)[:, None, None, :]
    w = w * ok
    den = w.sum(-1, keepdim=True) + eps
    return (w @ v) / torch.where(den == 0, torch.ones_like(den), den)


def qkv(b, hq, hkv, n, m, d, dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=g)
    k = torch.randn(b, hkv, m, d, generator=g)
    v = torch.randn(b, hkv, m, dv or d, generator=g)
    return [t.to(DEV, dtype) for t in (q, k, v)]


class Projected(torch.nn.Module):
    """A learned feature map: hedgehog(x W^T), F = 2 * out features (as ``attnswap.transfer`` learns)."""

    def __init__(self, d, out, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter((torch.randn(out, d, generator=g) * d ** -0.5).to(DEV))

    def forward(self, x):
        return hedgehog(x @ self.weight.to(x.dtype).t())


MAPS = {"elu": elu_plus_one, "hedgehog": hedgehog}


def check(q, k, v, phi, *, causal=False, offset=0, window=None, key_mask=None, eps=1e-6, chunk=None, grads=True, proj=None):
    """Forward and (with ``grads``) the gradients wrt q, k, v of sum(o * do), the features made by ``phi`` (fp32
    math, stored in the inputs' dtype), against float64 autograd through ``reference``. ``proj``: a learned map
    (``phi`` is then ignored) whose weight gradient is checked too."""
    dtype = q.dtype
    leaves = [t.detach().clone().requires_grad_(grads) for t in (q, k, v)]
    ref_leaves = [t.detach().double().requires_grad_(grads) for t in (q, k, v)]
    params, ref_params, ref_phi = [], [], phi
    if proj is not None:
        phi, ref_phi = proj, copy.deepcopy(proj).double()
        params, ref_params = [proj.weight], [ref_phi.weight]
    fq, fk = (phi(t.float()).to(dtype) for t in leaves[:2])
    out = lp.parallel_linear_attention(fq, fk, leaves[2], causal=causal, offset=offset, window=window,
                                       key_mask=key_mask, eps=eps, chunk=chunk)
    # the reference sees the features rounded to the inputs' dtype, as the engine does
    rq, rk = (ref_phi(t).to(dtype).double() if dtype != torch.float32 else ref_phi(t) for t in ref_leaves[:2])
    ref = reference(rq, rk, ref_leaves[2], causal=causal, offset=offset, window=window, key_mask=key_mask, eps=eps)
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    close(out, ref, TOL[dtype], "forward")
    if not grads:
        return out
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEV)
    want = torch.autograd.grad(ref, ref_leaves + ref_params, do.double())
    got = torch.autograd.grad(out, leaves + params, do.to(dtype))
    for name, a, b in zip(("dq", "dk", "dv", "dweight"), got, want):
        assert torch.isfinite(a).all(), name
        close(a, b, GRAD_TOL[dtype], name)
    return out


# (b, hq, hkv, n, m, d, dv, causal, offset, window)
CASES = [
    (1, 2, 2, 45, 45, 16, 16, True, 0, None),  # n == m, several chunks, a partial last chunk
    (2, 2, 1, 13, 50, 16, 24, True, 37, None),  # n < m: a prefix of keys every query sees (prefill after a past)
    (1, 3, 1, 33, 27, 24, 40, False, 0, None),  # non-causal, GQA 3, dims no power of two (tiles partial)
    (1, 2, 1, 40, 21, 16, 16, True, -19, None),  # n > m: the first queries see nothing (0, not NaN)
    (1, 2, 2, 30, 30, 16, 16, True, 5, None),  # an offset that is no multiple of the chunk
    (1, 2, 1, 70, 70, 16, 16, True, 0, 40),  # a window over 2 chunks: states as prefix differences + edges
    (1, 1, 1, 37, 45, 16, 16, True, 8, 5),  # a window narrower than a chunk: edges only
    (1, 2, 2, 30, 51, 16, 16, False, 21, 9),  # a window without causal
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("feature", ("elu", "hedgehog"))
def test_forward_and_backward(case, feature):
    b, hq, hkv, n, m, d, dv, causal, offset, window = case
    q, k, v = qkv(b, hq, hkv, n, m, d, dv, seed=n + m)
    out = check(q, k, v, MAPS[feature], causal=causal, offset=offset, window=window)
    if causal and offset < 0:
        assert out[:, :, :-offset].abs().max().item() == 0.0


@pytest.mark.parametrize("causal", (True, False))
def test_learned_projection_gets_its_gradient(causal):
    """Features from a learned projection (F = 2 * 24 = 48 with d = 16: F is not the head dim); the gradient of
    its weight through the engine equals float64 autograd."""
    proj = Projected(16, 24, seed=2)
    q, k, v = qkv(1, 2, 1, 35, 35, 16, seed=3)
    check(q, k, v, None, causal=causal, proj=proj)


def test_key_padding_and_fully_padded_row():
    """A (b, m) key mask with holes; batch row 1 fully padded: its output is exactly 0 and so are its gradients."""
    b, hq, hkv, n, m, d = 2, 2, 1, 21, 40, 16
    q, k, v = qkv(b, hq, hkv, n, m, d, seed=4)
    mask = torch.ones(b, m, dtype=torch.bool, device=DEV)
    mask[0, 5:11] = False
    mask[0, 30:] = False
    mask[1] = False
    for causal, window in ((True, None), (False, None), (True, 17)):
        out = check(q, k, v, elu_plus_one, causal=causal, offset=m - n, window=window, key_mask=mask)
        assert out[1].abs().max().item() == 0.0
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = lp.parallel_linear_attention(elu_plus_one(leaves[0]), elu_plus_one(leaves[1]), leaves[2], key_mask=mask)
    out.sum().backward()
    assert leaves[1].grad[1].abs().max().item() == 0.0 and leaves[2].grad[1].abs().max().item() == 0.0
    assert leaves[1].grad[0, :, 5:11].abs().max().item() == 0.0


def test_bfloat16():
    q, k, v = qkv(1, 2, 1, 37, 37, 32, dtype=torch.bfloat16, seed=5)
    check(q, k, v, elu_plus_one, causal=True)
    check(q, k, v, hedgehog, causal=False, grads=False)


def test_eps_and_chunk_size():
    """A large eps shrinks the output as in the reference; chunk 32 gives chunk 16's result."""
    q, k, v = qkv(1, 2, 1, 40, 40, 16, seed=6)
    check(q, k, v, elu_plus_one, causal=True, eps=10.0, grads=False)
    fq, fk = elu_plus_one(q), elu_plus_one(k)
    a = lp.parallel_linear_attention(fq, fk, v, causal=True, chunk=16)
    b = lp.parallel_linear_attention(fq, fk, v, causal=True, chunk=32)
    close(a, b, 1e-5, "chunk 16 vs 32")


@settings(max_examples=6, deadline=None)
@given(n=st.integers(1, 40), m=st.integers(1, 40), groups=st.sampled_from((1, 2, 3)), causal=st.booleans(),
       f=st.sampled_from((8, 16, 20)), window=st.sampled_from((None, 3, 17, 33)), shift=st.integers(-20, 20))
# a row that sees no key (den = eps) in a query chunk whose states are subtracted under a window: its do / eps once
# drowned the other rows' states in rounding (dk off by 0.4)
@example(n=18, m=1, groups=1, causal=False, f=8, window=3, shift=3)
def test_random_shapes(n, m, groups, causal, f, window, shift):
    q, k, v = qkv(1, groups, 1, n, m, f, seed=n * 41 + m)
    check(q, k, v, elu_plus_one, causal=causal, offset=m - n + shift, window=window, grads=n % 2 == 0)


def test_grid_has_a_program_per_head_and_chunk():
    """b = 1, H = 9 (3 KV heads), N = 16k, d = 64: every stage runs at least one program per (head, chunk) of its
    side (query heads for the query stages, KV heads for the key stages), the GPU's 64-row chunks and the
    interpreter's 16-row ones alike."""
    n = 16384
    for chunk in (64, 16):
        grids = lp.grid(1, 9, 3, n, n, 64, 64, chunk=chunk)
        chunks = n // chunk
        for name, heads in (("forward", 9), ("dq", 9), ("key_states", 3), ("query_states", 3), ("dk", 3),
                            ("dv", 3)):
            g = grids[name]
            assert g[0] == chunks and g[1] == heads, (name, g)
            assert g[0] * g[1] * g[2] >= heads * chunks
        assert grids["forward"][0] * grids["forward"][1] >= 9 * chunks


def test_linear_kind_routes_here(monkeypatch):
    """``attnswap.attention(..., "linear", impl="triton")`` runs this engine for causal / non-causal / windowed
    inputs with key padding shared by the heads; per-head key padding is declined with a reason (``impl="auto"``
    then runs the reference)."""
    calls = []
    real = linear_kernel.parallel_linear_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("causal"))
        return real(*args, **kwargs)

    monkeypatch.setattr(linear_kernel, "parallel_linear_attention", spy)
    q, k, v = qkv(2, 2, 1, 20, 20, 16, seed=7)
    mask = torch.ones(2, 20, dtype=torch.bool, device=DEV)
    mask[1, :4] = False
    out = attnswap.attention(q, k, v, "linear", impl="triton", causal=True, mask=mask)
    want = attnswap.attention(q.double(), k.double(), v.double(), "linear", impl="torch", causal=True, mask=mask)
    close(out, want, 1e-5, "linear kind via the parallel engine")
    assert calls == [True]
    out = attnswap.attention(q, k, v, "linear", impl="triton", causal=False, window=8, mask=mask)
    want = attnswap.attention(q.double(), k.double(), v.double(), "linear", impl="torch", causal=False, window=8,
                              mask=mask)
    close(out, want, 1e-5, "windowed linear kind via the parallel engine")
    assert calls == [True, False]
    per_head = torch.ones(1, 2, 1, 20, dtype=torch.bool, device=DEV)
    per_head[0, 0, 0, :3] = False
    with pytest.raises(AttnSwapError, match="shared by all heads"):
        attnswap.attention(q, k, v, "linear", impl="triton", causal=True, mask=per_head)
    assert calls == [True, False]


def test_clear_errors():
    q, k, v = qkv(1, 2, 1, 8, 8, 16)
    with pytest.raises(ValueError, match="key_mask"):
        lp.parallel_linear_attention(q, k, v, key_mask=torch.ones(1, 1, 1, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        lp.parallel_linear_attention(q, torch.cat([k] * 3, 1), torch.cat([v] * 3, 1))
    with pytest.raises(ValueError, match="fk must be"):
        lp.parallel_linear_attention(q, k[..., :8], v)
    with pytest.raises(ValueError, match="window"):
        lp.parallel_linear_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="chunk"):
        lp.parallel_linear_attention(q, k, v, chunk=24)
