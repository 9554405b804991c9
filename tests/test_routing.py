"""Routing by cost and the cheap paths: the whole call through torch's SDPA where it computes the kind exactly,
the GPU crossover rule, the exact top-value selection of the sparse kinds, the grouped products, and latency runs
that interleave the attentions they compare."""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))
from naive import naive_attention  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

import attnswap  # noqa: E402
from attnswap import dispatch  # noqa: E402
from attnswap.kinds import chunked, softmax  # noqa: E402
from attnswap.kinds.select import chunk_size, kth_largest, top_values  # noqa: E402
from attnswap.kinds.visibility import Visibility  # noqa: E402

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Counts the calls that took the whole-call SDPA route (and returned an output)."""
    calls = []

    def spy(*args, **kwargs):
        out = softmax.sdpa_attention(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(dispatch, "sdpa_attention", spy)
    return calls


def qkv(b, hq, hkv, n, m, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, n, d, generator=g), torch.randn(b, hkv, m, d, generator=g),
            torch.randn(b, hkv, m, d, generator=g))


# ---------------------------------------------------------------------------------------------------- the SDPA route


@pytest.mark.parametrize("case", [
    dict(n=1, m=37, causal=True),  # decode: the group's queries as one KV head's rows
    dict(n=1, m=37, causal=False),
    dict(n=23, m=23, causal=True),  # prefill, aligned as SDPA aligns it
    dict(n=9, m=31, causal=False),
    dict(n=6, m=11, causal=False, mask="padding"),  # a bool mask of the caller's
    dict(n=1, m=11, causal=False, mask="padding"),  # decode with key padding: still packed
    dict(n=6, m=11, causal=False, mask="empty_rows"),  # rows that see nothing are 0
    dict(n=6, m=11, causal=False, mask="per_head"),  # a mask per query head: enable_gqa
    dict(n=1, m=11, causal=False, mask="per_head"),
])
@pytest.mark.parametrize("groups", [1, 3])
def test_sdpa_route_is_exact_and_taken(case, groups, sdpa_calls):
    b, hkv = 2, 2
    hq = hkv * groups
    n, m = case["n"], case["m"]
    q, k, v = qkv(b, hq, hkv, n, m)
    mask = None
    g = torch.Generator().manual_seed(1)
    if case.get("mask") == "padding":
        mask = torch.rand(b, 1, 1, m, generator=g) > 0.3
        mask[..., 0] = True
    elif case.get("mask") == "empty_rows":
        mask = torch.rand(b, 1, n, m, generator=g) > 0.5
        mask[0, 0, 2] = False
    elif case.get("mask") == "per_head":
        mask = torch.rand(b, hq, n, m, generator=g) > 0.4
    for kind, options in (("softmax", {}), ("topk", {"k": m})):  # topk with k >= the keys is softmax
        sdpa_calls.clear()
        out = attnswap.attention(q, k, v, kind, causal=case["causal"], mask=mask, **options)
        assert sdpa_calls == [True], f"{kind} did not take the SDPA route"
        ref = naive_attention(q, k, v, "softmax", causal=case["causal"], mask=mask)
        torch.testing.assert_close(out.double(), ref.out, atol=1e-5, rtol=1e-4)
        if case.get("mask") == "empty_rows":
            assert (out[0, :, 2] == 0).all()


@pytest.mark.parametrize("case", [
    dict(n=5, m=12, causal=True),  # causal with an offset: SDPA aligns it upper-left
    dict(n=12, m=12, causal=True, window=4),  # a window that hides keys
    dict(n=6, m=6, causal=True, mask="padding"),  # causal and a mask at once
    dict(n=6, m=6, causal=False, mask="float_bias"),  # a score bias (ALiBi): not SDPA's visibility semantics
])
def test_what_sdpa_cannot_express_runs_the_reference(case, sdpa_calls):
    q, k, v = qkv(1, 4, 2, case["n"], case["m"])
    mask = None
    if case.get("mask") == "padding":
        mask = torch.ones(1, 1, 1, case["m"], dtype=torch.bool)
        mask[..., :2] = False
    elif case.get("mask") == "float_bias":
        mask = torch.randn(1, 1, case["n"], case["m"])
    out = attnswap.attention(q, k, v, "softmax", causal=case["causal"], window=case.get("window"), mask=mask)
    assert not any(sdpa_calls)
    ref = naive_attention(q, k, v, "softmax", causal=case["causal"], window=case.get("window"), mask=mask)
    torch.testing.assert_close(out.double(), ref.out, atol=1e-5, rtol=1e-4)


def test_what_changes_the_math_never_takes_sdpa(sdpa_calls):
    q, k, v = qkv(1, 4, 2, 7, 7)
    attnswap.attention(q, k, v, "softmax", causal=True, softcap=5.0)
    attnswap.attention(q, k, v, "softmax", causal=True, sinks=torch.zeros(4))
    attnswap.attention(q, k, v, "softmax", causal=True, return_weights=True)
    attnswap.attention(q, k, v, "topk", k=3, causal=False)  # fewer than the keys: not softmax
    attnswap.attention(q, k, v, "entmax", causal=True)
    assert not any(sdpa_calls)
    attnswap.attention(q, k, v, "topk", k=3, causal=True, window=3)  # the window shows at most 3 keys
    assert sdpa_calls == [False]  # offered (topk = softmax here), declined (the window), the reference ran


def test_swapped_model_equals_its_own_attention_through_the_route(sdpa_calls):
    """A softmax swap of a llama (GQA) takes the SDPA route in prefill and decoding and gives the model's logits."""
    model = tiny_model("llama", "sdpa")
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        own = model(ids).logits
        with attnswap.swapped(model, "softmax"):
            swapped = model(ids).logits
            generated = model.generate(ids, max_new_tokens=4, do_sample=False)
        reference = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert sdpa_calls and all(sdpa_calls)
    torch.testing.assert_close(swapped, own, atol=1e-4, rtol=1e-4)
    assert torch.equal(generated, reference)


def test_routing_rule_on_cuda_shapes():
    """The GPU rule without a GPU: flash-able calls below the measured crossover go to SDPA, others to the kernel."""
    rule = dispatch.prefer_sdpa
    small = dict(device_type="cuda", dtype=torch.bfloat16, pairs=1 << 20, head_dim=64, masked=False, impl="auto")
    assert rule(**small)
    assert not rule(**{**small, "pairs": dispatch.CUDA_SDPA_MAX_PAIRS})  # above the crossover: our kernel
    assert rule(**{**small, "pairs": dispatch.CUDA_SDPA_MAX_PAIRS, "impl": "torch"})  # forced torch: SDPA
    assert not rule(**{**small, "dtype": torch.float32})  # no flash kernel in fp32 (GQA would go O(N^2))
    assert not rule(**{**small, "masked": True})
    assert not rule(**{**small, "head_dim": 512})
    assert rule(**{**small, "device_type": "cpu", "dtype": torch.float32, "masked": True})
    assert not rule(**{**small, "device_type": "mps"})


# ------------------------------------------------------------------------------------------------ exact top values


@settings(max_examples=80, **SETTINGS)
@given(rows=st.integers(1, 4), m=st.integers(1, 700), k_frac=st.floats(0.0, 1.0), ties=st.booleans(),
       hidden=st.sampled_from([0.0, 0.5, 0.97]), fill=st.sampled_from(["-inf", "min"]), seed=st.integers(0, 2**31))
def test_top_values_equal_torch_topk(rows, m, k_frac, ties, hidden, fill, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (rows, m), generator=g).float() if ties else torch.randn(rows, m, generator=g)
    x[torch.rand(rows, m, generator=g) < hidden] = float("-inf") if fill == "-inf" else torch.finfo(x.dtype).min
    k = max(1, min(m, round(k_frac * m)))
    assert torch.equal(top_values(x, k, sorted=True), x.topk(k, dim=-1).values)
    assert torch.equal(kth_largest(x, k), x.topk(k, dim=-1).values[:, -1:])


def test_top_values_take_the_chunked_path_where_it_pays():
    assert chunk_size(2048, 64) > 1 and chunk_size(256, 64) == 1 and chunk_size(10, 64) == 1
    x = torch.randn(3, 2, 2049)  # leading dims and a tail past the last full stride
    assert torch.equal(top_values(x, 64, sorted=True), x.topk(64, dim=-1).values)


@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
@pytest.mark.parametrize("layout", ["causal", "padding"])
def test_entmax_on_long_rows(alpha, layout):
    """Rows longer than the support guess: the threshold found on the largest scores and checked, or (rows whose
    support is wider, here the flat heads beside peaked ones in the same block) continued over all keys."""
    from attnswap.kinds.entmax import SUPPORT_GUESS

    n, m = 40, 400
    q, k, v = qkv(1, 4, 2, n, m, d=16, seed=3)
    q = q * torch.tensor([0.02, 30.0, 0.02, 30.0]).view(1, 4, 1, 1)  # flat and peaked rows in each KV group
    kw = dict(causal=True) if layout == "causal" else dict(mask=torch.rand(1, 1, n, m) > 0.3)
    out = attnswap.attention(q, k, v, "entmax", alpha=alpha, **kw)
    ref = naive_attention(q, k, v, "entmax", alpha=alpha, **kw)
    torch.testing.assert_close(out.double(), ref.out, atol=1e-5, rtol=1e-4)
    support = (ref.weights > 0).sum(-1)
    assert support[:, 0::2].min() > SUPPORT_GUESS >= support[:, 1::2].max()  # both branches ran


@pytest.mark.parametrize("k", [8, 64])
def test_topk_on_long_rows_with_ties(k):
    """Integer scores (exact in fp32, many ties at the k-th) on rows long enough for the chunked selection."""
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-1, 2, (1, 4, 30, 4), generator=g).float()
    kk = torch.randint(-1, 2, (1, 2, 600, 4), generator=g).float()
    v = torch.randn(1, 2, 600, 6, generator=g)
    for kw in (dict(causal=True), dict(mask=torch.rand(1, 1, 30, 600, generator=g) > 0.5)):
        out, w = attnswap.attention(q, kk, v, "topk", k=k, scaling=1.0, return_weights=True, **kw)
        ref = naive_attention(q, kk, v, "topk", k=k, scaling=1.0, **kw)
        torch.testing.assert_close(out.double(), ref.out, atol=1e-5, rtol=1e-4)
        assert torch.equal(w > 0, ref.weights > 0)  # every score tied with the k-th is kept


def test_sparse_kinds_train_on_long_rows():
    """Gradients through the long-row paths equal the reference's (scores are not overwritten under autograd)."""
    q, k, v = qkv(1, 2, 1, 20, 300, d=8, seed=7)
    for kind, options in (("topk", {"k": 16}), ("entmax", {"alpha": 1.5}), ("sparsemax", {})):
        inputs = [t.clone().double().requires_grad_(True) for t in (q, k, v)]
        ours = [t.clone().requires_grad_(True) for t in (q, k, v)]
        attnswap.attention(*ours, kind, causal=True, **options).sum().backward()
        naive_attention(*inputs, kind if kind != "sparsemax" else "entmax", causal=True,
                        **(options or {"alpha": 2.0})).out.sum().backward()
        for a, b in zip(ours, inputs):
            torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------------------------------------- grouped products


@settings(max_examples=30, **SETTINGS)
@given(r=st.integers(1, 2), h=st.integers(1, 3), g=st.integers(1, 4), n=st.integers(1, 9), a=st.integers(1, 7),
       c=st.integers(1, 9))
def test_grouped_matmul_equals_broadcast(r, h, g, n, a, c):
    x = torch.randn(r, h, g, n, a)
    y = torch.randn(r, h, 1, a, c)
    torch.testing.assert_close(chunked.grouped_matmul(x, y), torch.matmul(x, y))
    torch.testing.assert_close(chunked.grouped_matmul(x[..., 1:, :], y), torch.matmul(x[..., 1:, :], y))


def test_most_visible_and_flat_mask():
    vis = Visibility(n=4, m=10, causal=True, offset=6, window=3)
    assert vis.most_visible() == 3
    mask = torch.ones(2, 3, 2, 1, 10, dtype=torch.bool)
    assert Visibility(n=4, m=10, mask=mask).flat_mask().shape == (2, 6, 1, 10)
    assert Visibility(n=4, m=10, mask=mask[:, :1, :1]).flat_mask().shape == (2, 1, 1, 10)


# ------------------------------------------------------------------------------------------ interleaved latency


def test_latency_arms_take_turns_and_fail_alone():
    from attnswap.evals.latency import measure_latency

    model = tiny_model("llama", "sdpa")
    entered = []

    def arm(label, fail=False):
        @contextlib.contextmanager
        def enter():
            entered.append(label)
            if fail:
                raise RuntimeError("this arm cannot run")
            with attnswap.swapped(model, label) if label != "own" else contextlib.nullcontext():
                yield

        return enter

    out = measure_latency(model, context_lengths=(8, 16), new_tokens=2, warmup=1, repeats=3,
                          arms={"own": arm("own"), "softmax": arm("softmax"), "bad": arm("bad", fail=True)})
    assert list(out) == ["own", "softmax", "bad"]
    for label in ("own", "softmax"):
        assert [r["context"] for r in out[label]] == [8, 16]
        assert all(r["attention"] == label and r["prefill_ms"] > 0 and r["repeats"] == 3 for r in out[label])
    assert all("cannot run" in r["error"] and r["prefill_ms"] is None for r in out["bad"])
    # per configuration: the warm-up round, then three timed rounds, each starting with the next arm ("bad" fails
    # in the warm-up and is left out after)
    assert entered == (["own", "softmax", "bad"] + ["own", "softmax"] + ["softmax", "own"] + ["own", "softmax"]) * 2
    with pytest.raises(attnswap.AttnSwapError, match="at least one arm"):
        measure_latency(model, context_lengths=(8,), arms={})
