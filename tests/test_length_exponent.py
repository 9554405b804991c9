"""The ``length_exponent`` option: a score scale that grows with the number of keys a query sees,
``score_scale * (n / LENGTH_REF) ** e``, applied on every path (reference, Triton kernel, ``StateCache`` decoding),
trained end to end by ``calibrate(..., end_to_end=True)``, saved and reloaded exactly."""

import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnswap
from attnswap.kinds import visibility
from attnswap.kinds.visibility import Visibility
from attnswap.registry import LENGTH_REF, LearnedExponent
from tiny_models import gqa_inputs, left_padded_batch, logits, tiny_model

SCORED = [("entmax", {"alpha": 1.5}), ("sparsemax", {}), ("topk", {"k": 4}), ("taylor", {})]


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def brute_counts(n, m, offset, causal, window, mask):
    """(b|1, Hkv|1, G|1, n): visible keys per query, pair by pair."""
    i = torch.arange(n)[:, None] + offset
    j = torch.arange(m)[None, :]
    ok = torch.ones(n, m, dtype=torch.bool)
    if causal:
        ok &= j <= i
    if window is not None:
        ok &= j > i - window
    if mask is not None:
        seen = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        ok = ok & seen
    else:
        ok = ok[None, None, None]
    return ok.sum(-1).float().clamp(min=1)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 12), extra=st.integers(0, 6), causal=st.booleans(), window=st.none() | st.integers(1, 8),
       mask=st.sampled_from([None, "padding", "dense", "additive"]), block=st.sampled_from([1 << 22, 7]),
       seed=st.integers(0, 99))
def test_key_counts_are_the_visible_keys(n, extra, causal, window, mask, block, seed):
    m = n + extra
    g = torch.Generator().manual_seed(seed)
    if mask == "padding":
        mask = torch.rand(2, 1, 1, 1, m, generator=g) > 0.3
    elif mask == "dense":
        mask = torch.rand(2, 2, 1, n, m, generator=g) > 0.4
    elif mask == "additive":
        mask = torch.where(torch.rand(1, 1, 3, n, m, generator=g) > 0.3, torch.randn(1, 1, 3, n, m, generator=g),
                           torch.tensor(torch.finfo(torch.float32).min))
    vis = Visibility(n=n, m=m, causal=causal, offset=m - n, window=window, mask=mask)
    before, visibility.COUNT_BLOCK = visibility.COUNT_BLOCK, block  # 7: one query per block
    try:
        got = vis.key_counts()
    finally:
        visibility.COUNT_BLOCK = before
    want = brute_counts(n, m, m - n, causal, window, vis.mask)
    assert got.dim() == 4 and got.dtype == torch.float32
    assert torch.equal(torch.broadcast_tensors(got, want)[0], torch.broadcast_tensors(want, got)[0])


@pytest.mark.parametrize("kind,options", SCORED)
def test_the_scale_grows_with_the_keys_each_query_sees(kind, options):
    q, k, v = gqa_inputs()
    scales, exponents = (0.5, 1.0, 2.0, 3.0), (0.0, 0.3, -0.5, 1.0)
    out = attnswap.attention(q, k, v, kind, causal=True, score_scale=scales, length_exponent=exponents, **options)
    seen = torch.arange(9) + 2 + 1.0  # causal, lower-right: query i sees keys 0 .. i + 2
    factor = torch.tensor(scales).view(4, 1) * (seen[None] / LENGTH_REF) ** torch.tensor(exponents).view(4, 1)
    ref = attnswap.attention(q * factor[None, :, :, None], k, v, kind, causal=True, **options)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, attnswap.attention(q, k, v, kind, causal=True, score_scale=scales, **options),
                              atol=1e-3)
    zero = attnswap.attention(q, k, v, kind, causal=True, score_scale=scales, length_exponent=0.0, **options)
    assert torch.equal(zero, attnswap.attention(q, k, v, kind, causal=True, score_scale=scales, **options))


def test_a_padding_mask_counts_only_the_keys_left():
    q, k, v = gqa_inputs(1)
    mask = torch.ones(2, 1, 1, 11, dtype=torch.bool)
    mask[1, ..., :4] = False  # row 1: its first four keys are padding
    out = attnswap.attention(q, k, v, "entmax", mask=mask, causal=True, length_exponent=0.5, alpha=1.5)
    seen = (torch.arange(9) + 3.0)[None].repeat(2, 1)
    seen[1] = (seen[1] - 4).clamp(min=1)
    ref = attnswap.attention(q * ((seen / LENGTH_REF) ** 0.5)[:, None, :, None], k, v, "entmax", mask=mask,
                             causal=True, alpha=1.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_the_triton_kernel_honors_it():
    pytest.importorskip("triton")
    q, k, v = gqa_inputs(2, b=1, n=16, m=16, d=32)  # a head dim the kernel takes
    opts = dict(causal=True, score_scale=(0.7, 1.0, 1.5, 2.0), length_exponent=(0.4, -0.2, 0.0, 0.8), alpha=1.5)
    torch.testing.assert_close(attnswap.attention(q, k, v, "entmax", impl="triton", **opts),
                               attnswap.attention(q, k, v, "entmax", impl="torch", **opts), atol=1e-5, rtol=1e-5)


def test_a_learned_exponent_is_the_same_exponent_and_gets_a_gradient():
    q, k, v = gqa_inputs(3)
    exponents = (0.1, -0.2, 0.3, 0.0)
    learned = LearnedExponent(exponents)
    out = attnswap.attention(q, k, v, "sparsemax", causal=True, length_exponent=learned)
    torch.testing.assert_close(out, attnswap.attention(q, k, v, "sparsemax", causal=True, length_exponent=exponents),
                               atol=1e-6, rtol=1e-6)
    out.square().sum().backward()
    assert learned.exponent.grad is not None and learned.exponent.grad.abs().sum() > 0
    assert learned.values() == exponents


def test_length_exponent_errors():
    q = torch.randn(1, 4, 5, 8)
    with pytest.raises(attnswap.AttnSwapError, match="'length_exponent' needs scores"):
        attnswap.attention(q, q, q, "linear", length_exponent=0.5)
    with pytest.raises(attnswap.AttnSwapError, match="finite"):
        attnswap.attention(q, q, q, "entmax", length_exponent=float("inf"))
    with pytest.raises(attnswap.AttnSwapError, match="one per query head"):
        attnswap.attention(q, q, q, "entmax", length_exponent=(0.1, 0.2))
    with pytest.raises(attnswap.AttnSwapError, match="number"):
        attnswap.attention(q, q, q, "entmax", length_exponent="big")


@pytest.mark.parametrize("kind,options", [("taylor", {"score_scale": 0.8}),
                                          ("window_linear", {"local_window": 3, "sink_tokens": 1})])
def test_decoding_with_the_state_cache_counts_the_keys_as_the_full_forward(kind, options):
    """Left-padded rows: each new token's scale comes from its row's real keys, in the running state's count as in
    the mask the full recomputation (a DynamicCache) sees."""
    from test_state_cache import dynamic, generate

    model = tiny_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size)
    heads = model.config.num_attention_heads
    attnswap.swap_attention(model, kind, length_exponent=tuple(0.6 - 0.3 * h for h in range(heads)), **options)
    ref = generate(model, ids, mask, cache=dynamic(model), output_scores=True)
    out = generate(model, ids, mask, cache=attnswap.StateCache(model), output_scores=True)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), atol=1e-4, rtol=1e-4)


def test_end_to_end_calibration_trains_exponents_that_reload_exactly(tmp_path):
    model = tiny_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size)
    data = torch.randint(1, model.config.vocab_size, (300,), generator=torch.Generator().manual_seed(1))
    handle = attnswap.calibrate(model, "sparsemax", data, window=64, holdout=0, end_to_end=True,
                                end_to_end_steps=4, length_exponent=True)
    layers = handle.calibration["layers"]
    assert handle.calibration["end_to_end"]["length_exponent"] is True
    assert all(len(r["length_exponent"]) == model.config.num_attention_heads for r in layers.values())
    assert any(any(e != 0 for e in r["length_exponent"]) for r in layers.values())  # training moved them
    for index, report in layers.items():
        assert handle.options_of(index)["length_exponent"] == tuple(report["length_exponent"])
    calibrated = logits(model, ids, mask)
    saved = json.loads(attnswap.save_swap(model, tmp_path / "swap").read_text())
    assert all("length_exponent" in o for o in saved["layer_options"].values())
    fresh = tiny_model("llama")
    attnswap.load_swap(fresh, tmp_path / "swap")
    assert torch.equal(logits(fresh, ids, mask), calibrated)
    plain = attnswap.calibrate(tiny_model("llama"), "sparsemax", data, window=64, holdout=0, end_to_end=True,
                               end_to_end_steps=2)  # the default: no exponents
    assert plain.calibration["end_to_end"]["length_exponent"] is False
    assert all("length_exponent" not in r for r in plain.calibration["layers"].values())
    assert all("length_exponent" not in plain.options_of(i) for i in plain.layers)
    with pytest.raises(attnswap.AttnSwapError, match="end_to_end=True"):
        attnswap.calibrate(tiny_model("llama"), "sparsemax", data, window=64, length_exponent=True)


def test_eval_spec_for_an_end_to_end_fit_with_length_exponents():
    from attnswap.evals.specs import parse_attn

    spec, = parse_attn("entmax:alpha=1.5:calibrated:end_to_end:length_exponent:no_query_gain:no_output_gain")
    assert spec.calibrated and spec.end_to_end and spec.length_exponent and spec.options == {"alpha": 1.5}
    assert spec.label == "entmax alpha=1.5 calibrated end-to-end length-exponent"
    assert not parse_attn("entmax:calibrated:end_to_end")[0].length_exponent
    with pytest.raises(attnswap.AttnSwapError, match="length_exponent goes with end_to_end"):
        parse_attn("entmax:calibrated:length_exponent")
