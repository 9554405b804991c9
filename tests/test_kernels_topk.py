"""Triton kernel of kind ``topk`` (``attnswap/kernels/topk.py``) against the PyTorch reference
(``attnswap/kinds/topk.py``): forward and backward through ``attnswap.attention(..., impl="triton")`` vs
``impl="torch"``, the per-row k-th score (``kth_threshold``) vs ``torch.topk``, ties at the k-th score, and the
thresholded softmax kernels (forward, split-KV decode). Without CUDA the kernels run in the Triton interpreter
on small shapes; on a GPU the same tests run larger shapes.
"""

import pytest
import torch

pytest.importorskip("triton")

from kernel_env import CUDA, DEV, S, make_qkv as make  # noqa: E402  (the interpreter is chosen in conftest.py)

from hypothesis import given, settings, strategies as st  # noqa: E402

import attnswap  # noqa: E402
import attnswap.kernels  # noqa: E402,F401  (registers the kernel)
from attnswap.kernels.flash_decode import flash_decode  # noqa: E402
from attnswap.kernels.flash_fwd import flash_forward  # noqa: E402
from attnswap.kernels.topk import kth_threshold, supports, topk_attention  # noqa: E402
from attnswap.kinds.visibility import Visibility  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
GRAD_TOL = 1e-4


def run_both(q, k, v, k_top, backward=False, **kw):
    """(triton output, reference output[, triton grads, reference grads]) for the same inputs."""
    results = []
    for impl in ("triton", "torch"):
        ins = [t.detach().clone().requires_grad_(backward) for t in (q, k, v)]
        sinks = kw.get("sinks")
        opts = dict(kw)
        if sinks is not None:
            opts["sinks"] = sinks.detach().clone().requires_grad_(backward)
            ins.append(opts["sinks"])
        out = attnswap.attention(*ins[:3], "topk", impl=impl, k=k_top, **opts)
        grads = None
        if backward:
            weight = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
            (out.float() * weight).sum().backward()
            grads = [t.grad for t in ins]
        results.append((out, grads))
    return results


def check(q, k, v, k_top, backward=False, **kw):
    (out, grads), (ref, ref_grads) = run_both(q, k, v, k_top, backward=backward, **kw)
    assert out.dtype == q.dtype and out.shape == ref.shape
    assert not torch.isnan(out).any()
    tol = TOL[q.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    if backward:
        for name, a, b in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads):
            assert not torch.isnan(a).any(), name
            torch.testing.assert_close(a.float(), b.float(), atol=GRAD_TOL, rtol=GRAD_TOL, msg=name)
    return out, ref


def reference_scores(q, k, scaling, softcap=None):
    """float64 scores (b, Hq, n, m)."""
    kk = k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = q.double() @ kk.transpose(-1, -2) * scaling
    return s if softcap is None else softcap * torch.tanh(s / softcap)


def reference_kth(s, visible, k_top):
    """Each row's k-th largest visible score; -inf where a row sees <= k_top keys."""
    filled = s.masked_fill(~visible, float("-inf"))
    count = visible.sum(-1)
    kth = filled.topk(min(k_top, s.shape[-1]), dim=-1).values[..., -1]
    return torch.where(count > k_top, kth, torch.full_like(kth, float("-inf")))


def causal_visible(n, m, offset, window=None):
    i = torch.arange(n)[:, None] + offset
    j = torch.arange(m)[None]
    vis = j <= i
    if window is not None:
        vis &= j > i - window
    return vis.to(DEV)


@pytest.mark.parametrize("k_top", [1, 4, 16, 64])
def test_k_values_forward_backward(k_top):
    """Causal n == m; k = 64 >= m keeps every visible key (plain causal softmax)."""
    q, k, v = make(1, 2, 1, 24 * S, 24 * S, 32, seed=k_top)
    check(q, k, v, k_top, backward=True, causal=True)


# (b, hq, hkv, n, m, d, causal, window, k_top)
CASES = [
    (1, 2, 2, 7, 29, 32, False, None, 5),  # non-causal, n < m, odd lengths
    (2, 2, 1, 9, 33, 64, True, None, 6),  # causal n < m: offset m - n
    (1, 3, 1, 19, 19, 32, True, 9, 4),  # sliding window (rows see <= 9 keys), GQA 3
    (1, 4, 2, 17, 23, 80, False, 6, 3),  # window without causal, GQA 2, padded head dim
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_h{}-{}_n{}_m{}_d{}_c{}_w{}_k{}".format(*c))
def test_situations_forward_backward(case):
    b, hq, hkv, n, m, d, causal, window, k_top = case
    q, k, v = make(b, hq, hkv, n, m * S, d, seed=n)
    check(q, k, v, k_top, backward=True, causal=causal, window=window)


def test_softcap_forward_backward():
    q, k, v = make(1, 2, 1, 13, 21, 32, seed=3)
    check(q * 4, k, v, 5, backward=True, causal=True, softcap=3.0)


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_gqa(groups):
    q, k, v = make(1, 2 * groups, 2, 11, 26, 32, seed=groups)
    check(q, k, v, 3, causal=True)


def test_key_padding_and_fully_padded_sequence():
    b, n, m = 3, 9, 30
    q, k, v = make(b, 2, 1, n, m, 32, seed=4)
    pad = torch.ones(b, m, dtype=torch.bool)
    pad[0, :5] = False  # left padding
    pad[1, 20:] = False  # right padding
    pad[2] = False  # a fully padded sequence
    mask = pad[:, None, None, :].to(DEV)
    out, _ = check(q, k, v, 4, backward=True, mask=mask, causal=True)
    assert out[2].eq(0).all()


def test_dense_mask_with_fully_masked_rows():
    b, hq, n, m = 2, 2, 13, 27
    q, k, v = make(b, hq, 1, n, m, 32, seed=5)
    mask = torch.rand(b, hq, n, m, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[0, 1, 3] = False
    mask[1, :, 7] = False
    mask = mask.to(DEV)
    out, _ = check(q, k, v, 5, backward=True, mask=mask)
    assert out[0, 1, 3].eq(0).all() and out[1, :, 7].eq(0).all()
    check(q, k, v, 2, mask=mask, causal=True, window=9)


def integer_inputs(b, hq, hkv, n, m, d, seed=0):
    """Small integer q, k: scores with scaling 1 are exact integers, so many tie exactly."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-1, 2, (b, hq, n, d), generator=g).float()
    k = torch.randint(-1, 2, (b, hkv, m, d), generator=g).float()
    v = torch.randn(b, hkv, m, d, generator=g)
    return [t.to(DEV) for t in (q, k, v)]


@pytest.mark.parametrize("k_top", [1, 3, 8])
def test_ties_keep_the_reference_set(k_top):
    b, hq, hkv, n, m, d = 1, 2, 1, 16, 29, 32
    q, k, v = integer_inputs(b, hq, hkv, n, m, d, seed=k_top)
    q = q / 4  # scores are multiples of 1/4: exact in fp32 and in every summation order
    s = reference_scores(q, k, 1.0)
    vis = causal_visible(n, m, m - n).expand(b, hq, n, m)
    want = reference_kth(s, vis, k_top)
    kept = ((s >= want[..., None]) & vis).sum(-1)
    assert (kept > k_top).any(), "the inputs must produce ties at the k-th score"
    got = kth_threshold(q, k, k_top=k_top, scaling=1.0, causal=True, offset=m - n)
    assert torch.equal(got.double(), want)
    _, stats = topk_attention(q, k, v, k_top=k_top, scaling=1.0, causal=True, offset=m - n, return_stats=True)
    assert abs(stats["kept_fraction"] - float(kept.sum()) / float(vis.sum())) < 1e-12
    assert 1 <= stats["passes"] <= 33
    check(q, k, v, k_top, backward=True, causal=True, scaling=1.0)


def test_kth_threshold_matches_torch_topk():
    b, hq, hkv, n, m, d = 2, 2, 1, 18, 40, 32
    q, k, _ = make(b, hq, hkv, n, m, d, seed=11)
    mask = (torch.rand(b, 1, n, m, generator=torch.Generator().manual_seed(2)) > 0.3).to(DEV)
    s = reference_scores(q, k, 0.2)
    for k_top in (1, 7, 33):
        for kw, vis in ((dict(), torch.ones(b, hq, n, m, dtype=torch.bool, device=DEV)),
                        (dict(causal=True, offset=m - n, mask=mask),
                         causal_visible(n, m, m - n) & mask.expand(b, hq, n, m))):
            got = kth_threshold(q, k, k_top=k_top, scaling=0.2, **kw)
            want = reference_kth(s, vis, k_top)
            assert got.shape == (b, hq, n) and got.dtype == torch.float32
            assert torch.equal(torch.isneginf(got), torch.isneginf(want))
            fin = torch.isfinite(want)
            torch.testing.assert_close(got[fin].double(), want[fin], atol=1e-5, rtol=1e-5)


def test_sinks_compete_in_the_selection():
    """The sink is one more always-visible score: in some rows it is among the top k, in others not."""
    q, k, v = make(1, 4, 2, 12, 20, 32, seed=8)
    sinks = torch.tensor([-3.0, 0.5, 1.0, 4.0]).to(DEV)
    out, ref = check(q, k, v, 3, backward=True, causal=True, sinks=sinks)
    check(q, k, v, 1, backward=True, sinks=sinks)
    s = reference_scores(q, k, 32 ** -0.5)
    with_sink = torch.cat([s, sinks.double().view(1, 4, 1, 1).expand(1, 4, 12, 1)], -1)
    thr = kth_threshold(q, k, k_top=3, scaling=32 ** -0.5, sinks=sinks)
    want = with_sink.topk(3, -1).values[..., -1]
    torch.testing.assert_close(thr.double(), want, atol=1e-5, rtol=1e-5)
    chosen = sinks.view(1, 4, 1) >= thr
    assert chosen.any() and not chosen.all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    q, k, v = make(1, 2, 1, 17, 31, 64, dtype=dtype, seed=2)
    check(q, k, v, 6, causal=True)


def test_decode_path_with_threshold():
    """The split-KV forward with a per-row threshold (sinks included) equals the one-pass forward."""
    n, m = 3, 150 * S
    q, k, v = make(2, 4, 2, n, m, 32, seed=6)
    mask = torch.rand(2, 1, n, m, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[1] = False  # a fully padded sequence
    sinks = torch.tensor([-2.0, 0.0, 1.5, 3.0]).to(DEV)
    kw = dict(scaling=0.25, causal=True, offset=m - n, window=100, softcap=4.0, sinks=sinks, mask=mask.to(DEV))
    thr = kth_threshold(q, k, k_top=5, **{x: kw[x] for x in kw if x != "sinks"}, sinks=sinks)
    o, lse = flash_decode(q, k, v, splits=3, threshold=thr, **kw)
    o2, lse2 = flash_forward(q, k, v, split_kv=False, threshold=thr, **kw)
    assert o[1].eq(0).all() and torch.isneginf(lse[1]).all()
    torch.testing.assert_close(o, o2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse2, atol=1e-5, rtol=1e-5)
    ref = attnswap.attention(q, k, v, "topk", impl="torch", k=5, causal=True, window=100, softcap=4.0,
                             sinks=sinks, scaling=0.25, mask=mask.to(DEV))
    torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)


def test_decode_routing_through_attention():
    """n <= 16 queries against m >= 512 keys take the split-KV forward (flash_fwd.use_split_kv)."""
    m = 520 if not CUDA else 4096
    q, k, v = make(1, 2, 1, 1, m, 32, seed=12)
    check(q, k, v, 8, causal=True, sinks=torch.tensor([0.0, 2.5]).to(DEV))


def test_supports_declines_clearly():
    q, k, v = make(1, 2, 1, 4, 4, 32)
    vis = Visibility(n=4, m=4)
    assert supports(q, k, v, vis, k=4) == (True, "")
    q48, k48, v48 = make(1, 2, 1, 4, 4, 48)
    ok, why = supports(q48, k48, v48, vis, k=4)
    assert not ok and "head dim 48" in why and "128" in why
    assert "dropout" in supports(q, k, v, vis, k=4, dropout=0.1)[1]
    assert "weights" in supports(q, k, v, vis, k=4, need_weights=True)[1]
    bias = Visibility(n=4, m=4, mask=torch.randn(1, 1, 1, 4, 4).to(DEV))
    assert "bias" in supports(q, k, v, bias, k=4)[1]
    assert not supports(q, k, v, vis, k=0)[0]
    with pytest.raises(attnswap.AttnSwapError, match="head dim"):
        attnswap.attention(q48, k48, v48, "topk", impl="triton", k=2)
    with pytest.raises(ValueError, match="k_top"):
        kth_threshold(q, k, k_top=0, scaling=1.0)


@settings(max_examples=5 if not CUDA else 30, deadline=None)
@given(hkv=st.integers(1, 2), groups=st.integers(1, 3), n=st.integers(1, 30), m=st.integers(1, 40),
       k_top=st.sampled_from([1, 2, 5, 16]), causal=st.booleans(), window=st.one_of(st.none(), st.integers(1, 12)),
       seed=st.integers(0, 100))
def test_random_shapes(hkv, groups, n, m, k_top, causal, window, seed):
    q, k, v = make(1, hkv * groups, hkv, n, m, 32, seed=seed)
    check(q, k, v, k_top, causal=causal, window=window)


# ---------------------------------------------------------------- the few-pass select's own paths

def crafted(values, scales, d=32):
    """q, k, v (1, 1, ., d) with the scores of scaling 1 exactly s[i, j] = scales[i] * values[j] (dyadic values:
    exact in fp32 and in every summation order)."""
    values = torch.as_tensor(values, dtype=torch.float32)
    scales = torch.as_tensor(scales, dtype=torch.float32)
    q = torch.zeros(1, 1, scales.numel(), d)
    k = torch.zeros(1, 1, values.numel(), d)
    q[..., 0], k[..., 0] = scales, values
    v = torch.randn(1, 1, values.numel(), d, generator=torch.Generator().manual_seed(0))
    return [t.to(DEV) for t in (q, k, v)]


def clustered_values(m, seed=0):
    """m key values: three far above the rest, a dense cluster of 200 (in tied triples, 2^-12 apart) and low
    ones, shuffled: the histogram's bin that holds the cluster holds more than CAP scores."""
    cluster = 1.0 + torch.div(torch.arange(200), 3, rounding_mode="floor") * 2.0 ** -12
    low = -64.0 + torch.arange(m - 203).float()
    values = torch.cat([torch.tensor([100.0, 64.0, 50.0]), cluster, low])
    return values[torch.randperm(m, generator=torch.Generator().manual_seed(seed))]


def check_kth(q, k, k_top, sinks=None, **kw):
    """kth_threshold equals the float64 reference exactly (the scores are exact); returns its stats."""
    n, m = q.shape[2], k.shape[2]
    s = reference_scores(q, k, 1.0)
    vis = torch.ones(1, 1, n, m, dtype=torch.bool, device=DEV)
    if kw.get("causal"):
        vis = causal_visible(n, m, kw.get("offset", 0)).expand(1, 1, n, m)
    if sinks is not None:
        s = torch.cat([s, sinks.double().view(1, 1, 1, 1).expand(1, 1, n, 1)], -1)
        vis = torch.cat([vis, torch.ones(1, 1, n, 1, dtype=torch.bool, device=DEV)], -1)
    got, stats = kth_threshold(q, k, k_top=k_top, scaling=1.0, sinks=sinks, return_stats=True, **kw)
    want = reference_kth(s, vis, k_top)
    assert torch.equal(got.double(), want)
    kept = ((s >= want[..., None]) & vis).sum(-1)
    assert (kept >= min(k_top, 1)).all()
    return stats, kept


@pytest.mark.parametrize("sink", [None, 1.0 + 5 * 2.0 ** -12])
def test_overflowing_bin_falls_back_exactly(sink):
    """More than CAP scores in the k-th's bin: the search continues (bisection, then the bracket is collected)."""
    m = 256
    q, k, _ = crafted(clustered_values(m), 2.0 ** torch.arange(-2, 2).repeat(4))
    sinks = None if sink is None else torch.tensor([sink]).to(DEV)
    stats, kept = check_kth(q, k, 10, sinks=sinks, causal=True, offset=m - 16)
    assert (kept > 10).any(), "the k-th score must be tied in some rows"
    assert stats["fallback_rows"] > 0 and stats["threshold_passes_max"] > 3


def test_tied_bin_needs_no_search():
    """A bin of more than CAP equal scores holds the k-th: that value is the threshold, no further sweep."""
    values = torch.cat([torch.tensor([9.0, 8.0, 7.0]), torch.ones(150), -10.0 - torch.arange(40).float()])
    q, k, _ = crafted(values[torch.randperm(193, generator=torch.Generator().manual_seed(1))], torch.ones(5))
    stats, kept = check_kth(q, k, 60)
    assert kept.eq(153).all()
    assert stats["threshold_passes"] == stats["threshold_passes_max"] == 3 and stats["fallback_rows"] == 0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy overflows on purpose here
def test_unbinnable_range_searches_the_whole_row():
    """Scores spanning more than fp32's range: no histogram; the bisection over the whole row is exact."""
    values = torch.cat([torch.tensor([3e38, -3e38, 2e38]), torch.randn(60, generator=torch.Generator().manual_seed(2))])
    q, k, _ = crafted(values, torch.ones(3))
    for k_top in (2, 7):
        stats, _ = check_kth(q, k, k_top)
        assert stats["fallback_rows"] == 3


def test_rows_seeing_at_most_k_keys():
    """Rows that see <= k keys keep them all (-inf); a row block of only such rows takes a single sweep."""
    q, k, _ = make(1, 1, 1, 40, 40, 32, seed=3)
    thr, stats = kth_threshold(q, k, k_top=64, scaling=0.2, causal=True, return_stats=True)
    assert torch.isneginf(thr).all() and stats["kept_fraction"] == 1.0
    assert stats["threshold_passes"] == stats["threshold_passes_max"] == 1 and stats["passes"] == 0.0
    s = reference_scores(q, k, 0.2)
    vis = causal_visible(40, 40, 0).expand(1, 1, 40, 40)
    thr, stats = kth_threshold(q, k, k_top=20, scaling=0.2, causal=True, return_stats=True)
    want = reference_kth(s, vis, 20)
    assert torch.equal(torch.isneginf(thr), torch.isneginf(want)) and torch.isneginf(thr[..., :20]).all()
    torch.testing.assert_close(thr[..., 20:].double(), want[..., 20:], atol=1e-5, rtol=1e-5)
    assert stats["threshold_passes"] == 3 and stats["threshold_passes_max"] == 3


def test_stats_on_a_peaked_input():
    """Peaked scores (a few keys far above the rest): three sweeps per row block, no fallback; the counts."""
    b, hq, n, m, k_top = 1, 2, 48, 64, 8
    q, k, v = make(b, hq, 1, n, m, 32, seed=4)
    q = q * 3
    _, stats = topk_attention(q, k, v, k_top=k_top, scaling=32 ** -0.5, causal=True, offset=m - n,
                              return_stats=True)
    assert set(stats) == {"threshold_passes", "threshold_passes_max", "passes", "fallback_rows", "kept_fraction",
                          "sweep_block_fraction", "skipped_block_fraction"}
    assert stats["threshold_passes"] <= 3 and stats["threshold_passes_max"] == 3
    assert stats["fallback_rows"] == 0 and stats["passes"] == 2.0
    s = reference_scores(q, k, 32 ** -0.5)
    vis = causal_visible(n, m, m - n).expand(b, hq, n, m)
    kept = ((s >= reference_kth(s, vis, k_top)[..., None]) & vis).sum(-1)
    assert abs(stats["kept_fraction"] - float(kept.sum()) / float(vis.sum())) < 1e-12


@settings(max_examples=4 if not CUDA else 20, deadline=None)
@given(m=st.integers(20, 120), n=st.integers(1, 20), k_top=st.integers(1, 70), levels=st.integers(1, 6),
       causal=st.booleans(), seed=st.integers(0, 100))
def test_random_tied_scores(m, n, k_top, levels, causal, seed):
    """Scores from a few levels (many ties, bins beyond CAP) at random k: always the reference's threshold."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, levels, (m,), generator=g).float() * 0.5 + torch.randn(m, generator=g).round() * 2
    q, k, _ = crafted(values, 2.0 ** torch.randint(-1, 2, (n,), generator=g).float())
    check_kth(q, k, k_top, causal=causal, offset=max(m - n, 0))


def test_blocks_without_candidates_are_skipped():
    """Key blocks whose largest score lies below every row's target bin are not visited by the collection sweep,
    and blocks below every row's threshold are counted as holding no kept key; the threshold stays exact."""
    g = torch.Generator().manual_seed(5)
    values = torch.randint(-5, 6, (96,), generator=g).float()  # six 16-key blocks (the interpreter's tiles)
    values[torch.randperm(16, generator=g)[:8]] = 20.0 + torch.arange(8).float()  # the top 8, all in block 0
    q, k, _ = crafted(values, 2.0 ** torch.randint(0, 2, (16,), generator=g).float())  # row scales 1 or 2
    stats, kept = check_kth(q, k, 8)
    assert kept.eq(8).all()  # a block's largest score (<= 10) is below every row's threshold (>= 20)
    assert stats["skipped_block_fraction"] == 5 / 6  # blocks 1-5 hold no kept key of any row
    assert stats["sweep_block_fraction"] == (6 + 1) / 12  # the histogram visits all, the collection block 0 only
    assert stats["threshold_passes"] == 3 and stats["fallback_rows"] == 0


# ---------------------------------------------------------------- block lists: the attention skips key blocks


def _listed_reference(q, k, v, allowed, scaling):
    """float64 softmax attention over the (query, key) pairs ``allowed`` (n, m); output and its gradients."""
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = (qd @ kd.transpose(-1, -2) * scaling).masked_fill(~allowed, float("-inf"))
    o = torch.softmax(s, -1) @ vd
    return o, (qd, kd, vd)


def test_flash_kernels_visit_only_the_listed_blocks():
    """Given lists that leave out key blocks (the threshold keeping everything), the forward, dq and dk/dv
    kernels see exactly the listed pairs: equal to attention restricted to them, not to the full attention."""
    from attnswap.kernels.block_map import NO_WEIGHT, WEIGHT, plan
    from attnswap.kernels.flash_bwd import flash_backward

    n, m, d, scaling = 40, 56, 32, 32 ** -0.5  # 3 x 4 blocks of 16 x 16, partial at both ends
    q, k, v = make(1, 1, 1, n, m, d, seed=11)
    levels = torch.tensor([[[WEIGHT, NO_WEIGHT, WEIGHT, NO_WEIGHT],
                            [NO_WEIGHT, WEIGHT, WEIGHT, WEIGHT],
                            [WEIGHT, WEIGHT, NO_WEIGHT, WEIGHT]]], dtype=torch.int8, device=DEV)
    allowed = (levels[0] == WEIGHT).repeat_interleave(16, 0)[:n].repeat_interleave(16, 1)[:, :m]
    lists = [plan(levels, (16, 16), (16, 16, 1, 1), n, m, by_key=by_key) for by_key in (False, True, False)]
    thr = torch.full((1, 1, n), float("-inf"), device=DEV)
    o, lse = flash_forward(q, k, v, scaling=scaling, threshold=thr, block_list=lists[0], split_kv=False)
    want, leaves = _listed_reference(q, k, v, allowed, scaling)
    torch.testing.assert_close(o.double(), want, atol=1e-5, rtol=1e-5)
    do = torch.randn_like(o)
    dq, dk, dv, _ = flash_backward(do, q, k, v, o, lse, scaling=scaling, threshold=thr,
                                   block_lists=(lists[1], lists[2]))
    want.backward(do.double())
    for name, got, leaf in zip(("dq", "dk", "dv"), (dq, dk, dv), leaves):
        torch.testing.assert_close(got.double(), leaf.grad, atol=1e-5, rtol=1e-5, msg=name)
    full, _ = flash_forward(q, k, v, scaling=scaling, split_kv=False)
    assert (full - o).abs().max() > 1e-2  # the left-out blocks did carry weight


def test_block_list_needs_a_threshold():
    from attnswap.kernels.block_map import WEIGHT, plan

    q, k, v = make(1, 1, 1, 16, 16, 32)
    bl = plan(torch.full((1, 1, 1), WEIGHT, dtype=torch.int8, device=DEV), (16, 16), (16, 16, 1, 1), 16, 16)
    with pytest.raises(ValueError, match="threshold"):
        flash_forward(q, k, v, scaling=1.0, block_list=bl, split_kv=False)


def test_forward_and_backward_skip_blocks_without_kept_keys():
    """The top 8 keys of every row sit in the first of six key blocks: the attention visits that block only
    (skipped_block_fraction 5/6) and forward and gradients equal the reference."""
    g = torch.Generator().manual_seed(5)
    values = torch.randint(-5, 6, (96,), generator=g).float()
    values[torch.randperm(16, generator=g)[:8]] = 20.0 + torch.arange(8).float()
    q, k, v = crafted(values, 2.0 ** torch.randint(0, 2, (16,), generator=g).float())
    q, k = q * 0.25, k * 0.25  # scores s / 16: a softmax with weight on several keys
    check(q, k, v, 8, backward=True, scaling=16.0)
    _, stats = topk_attention(q, k, v, k_top=8, scaling=16.0, return_stats=True)
    assert stats["skipped_block_fraction"] == 5 / 6


LISTED_TILES = {"fwd": (32, 16, 1, 1), "dkdv": (16, 32, 1, 1), "dq": (32, 32, 1, 1)}


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_h{}-{}_n{}_m{}_d{}_c{}_w{}_k{}".format(*c))
def test_lists_regridded_to_other_tiles(case, monkeypatch):
    """Each listed kernel on tiles other than the threshold kernel's (the lists regridded): still the reference."""
    import attnswap.kernels.topk as topk

    monkeypatch.setattr(topk, "listed_config", lambda kernel, *args: LISTED_TILES[kernel])
    b, hq, hkv, n, m, d, causal, window, k_top = case
    q, k, v = make(b, hq, hkv, n + 20, m * S + 20, d, seed=n + 1)
    check(q, k, v, k_top, backward=True, causal=causal, window=window)


@settings(max_examples=60, deadline=None)
@given(st.floats(-1e30, 1e30, allow_nan=False), st.floats(0.0, 0.9))
def test_tie_floor_keeps_the_kth_under_rounding_only(thr, frac):
    """The kernels' comparison threshold sits 2^-16 of max(|k-th|, 1) below the k-th score: a k-th score rounded
    down by far more than a dot's rounding (1e-6 relative) is still kept, one 2^-15 below is not; -inf (rows that
    keep every key) stays -inf."""
    from attnswap.kernels.topk import TIE_RTOL, tie_floor

    t = torch.tensor([thr], dtype=torch.float64)
    scale = max(abs(thr), 1.0)
    floor = tie_floor(t).item()
    assert floor <= thr
    assert thr - frac * TIE_RTOL * scale >= floor  # within the allowance: a tie, kept
    assert thr - 2 * TIE_RTOL * scale < floor  # twice as far: dropped
    assert tie_floor(torch.tensor([float("-inf")])).item() == float("-inf")


def test_listed_configs_on_a_gpu_by_head_dim_and_dtype(monkeypatch):
    """The fixed tiles of the listed launches (as a GPU run picks them): by padded head dim, the small ones for wide
    heads and fp32, never larger than the lengths."""
    import attnswap.kernels.topk as topk

    monkeypatch.setattr(topk, "interpreting", lambda: False)
    bf16 = torch.bfloat16
    assert topk.listed_config("fwd", 64, bf16, 4096, 4096) == topk._LISTED["fwd"][64]
    assert topk.listed_config("fwd", 48, bf16, 4096, 4096) == topk._LISTED["fwd"][64]
    assert topk.listed_config("dkdv", 80, bf16, 4096, 4096) == topk._LISTED["dkdv"][128]
    assert topk.listed_config("dq", 128, bf16, 4096, 4096) == topk._LISTED["dq"][128]
    assert topk.listed_config("dq", 256, bf16, 4096, 4096) == topk._LISTED["dq"]["tight"]
    assert topk.listed_config("fwd", 64, torch.float32, 4096, 4096) == topk._LISTED["fwd"]["tight"]
    assert topk.listed_config("fwd", 64, bf16, 20, 9)[:2] == (32, 16)  # capped at the lengths' powers of two
