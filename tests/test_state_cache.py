"""The recurrent-state cache (``attnswap.StateCache``): decoding a model swapped to ``linear`` / ``taylor`` with a
constant-size running state per layer must give what full recomputation over K/V gives."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import attnswap
from attnswap.kinds import window_linear
from attnswap.kinds.feature_map import prefix_parts
from attnswap.kinds.linear import FEATURE_MAPS
from attnswap.patches import state_cache
from attnswap.patches.state_cache import StateLayer, WindowStateLayer, cache_argument, new_cache
from tiny_models import left_padded_batch, num_attention_layers, tiny_model

FEATURE_KINDS = ["linear", "taylor"]
# window_linear: a bounded cache (sink and window K/V per row, a running state of the keys in between); a window of
# 3 and 2 sink tokens make the prompts (up to 20 tokens) and the decoded ones leave the window on the way
WINDOWED = {"local_window": 3, "sink_tokens": 2}


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def generate(model, ids, mask, cache=None, **kw):
    extra = {} if cache is None else {cache_argument(model): cache}
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                              return_dict_in_generate=True, **extra, **kw)


def dynamic(model):
    return DynamicCache(config=model.config)


def cache_sizes(model, lengths=(16, 64)) -> list:
    """Bytes a fresh StateCache holds after a prefill of each length."""
    sizes = []
    for length in lengths:
        cache = attnswap.StateCache(model)
        with torch.no_grad():
            model(torch.randint(1, 50, (1, length)), **{cache_argument(model): cache})
        sizes.append(cache.nbytes())
    return sizes


@pytest.mark.parametrize("kind", FEATURE_KINDS)
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_oss"])
def test_generate_with_state_equals_full_recomputation(family, kind):
    model = tiny_model(family)
    ids, mask = left_padded_batch(model.config.vocab_size)
    attnswap.swap_attention(model, kind)
    ref = generate(model, ids, mask, cache=dynamic(model))
    out = generate(model, ids, mask)  # no cache given: generate builds a StateCache itself
    assert isinstance(out.past_key_values if hasattr(out, "past_key_values") else out.cache, attnswap.StateCache)
    assert torch.equal(out.sequences, ref.sequences)


@pytest.mark.parametrize("kind", FEATURE_KINDS)
def test_softmax_layers_keep_kv_beside_the_state(kind):
    model = tiny_model("llama")
    n_layers = num_attention_layers(model)
    ids, mask = left_padded_batch(model.config.vocab_size)
    attnswap.swap_attention(model, kind, layers=[0])
    cache = attnswap.StateCache(model)
    kinds = [type(layer) for layer in cache.layers]
    assert kinds[0] is StateLayer and all(k is not StateLayer for k in kinds[1:]) and len(kinds) == n_layers
    ref = generate(model, ids, mask, cache=dynamic(model))
    out = generate(model, ids, mask, cache=cache)
    assert torch.equal(out.sequences, ref.sequences)
    assert cache.layers[1].keys.shape[-2] == ids.shape[1] + 5  # the softmax layer kept its K/V


@given(steps=st.lists(st.integers(0, 3), min_size=1, max_size=12), start=st.integers(0, 4),
       chunk=st.integers(1, 5), with_state=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_prefix_parts_equal_dense_attention_over_each_querys_prefix(steps, start, chunk, with_state, seed):
    """Query p sees the state and keys [0, ends[p]), ends nondecreasing: the chunked running-state form must equal
    the dense sum, whatever the chunk."""
    g = torch.Generator().manual_seed(seed)
    ends = torch.tensor(steps).cumsum(0) + start
    n, m, hkv, groups, d = len(steps), int(ends[-1]) + 2, 2, 3, 4
    q = torch.randn(1, hkv, groups, n, d, generator=g)
    k, v = torch.randn(1, hkv, 1, m, d, generator=g), torch.randn(1, hkv, 1, m, 5, generator=g)
    phi = FEATURE_MAPS["elu"]
    initial = (torch.rand(1, hkv, 1, d, 5, generator=g), torch.rand(1, hkv, 1, d, generator=g)) if with_state else None
    num, den = prefix_parts(lambda a, b: phi(q[..., a:b, :]), lambda a, b: phi(k[..., a:b, :]), v, ends,
                            initial=initial, chunk=chunk)
    seen = (torch.arange(m)[None, :] < ends[:, None]).float()
    a = (phi(q) @ phi(k).transpose(-1, -2)) * seen
    want_num, want_den = a @ v, a.sum(-1)
    if initial is not None:
        want_num, want_den = want_num + phi(q) @ initial[0], want_den + (phi(q) * initial[1].unsqueeze(-2)).sum(-1)
    torch.testing.assert_close(num, want_num, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(den, want_den, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("small_chunks", [False, True], ids=["chunks", "small-chunks"])
@pytest.mark.parametrize("kind,options", [(k, {}) for k in FEATURE_KINDS] + [("window_linear", WINDOWED)],
                         ids=FEATURE_KINDS + ["window_linear"])
def test_prefill_in_chunks_equals_one_forward(kind, options, small_chunks, monkeypatch):
    """A cache continued by several tokens at once (left padding): with small query chunks, the continuation's
    linear-time form folds new keys into its running state between chunks."""
    if small_chunks:
        monkeypatch.setattr(state_cache, "QUERY_CHUNK", 3)
        monkeypatch.setattr(window_linear, "CHUNK", 3)
    model = tiny_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size, seq=20)
    attnswap.swap_attention(model, kind, **options)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = attnswap.StateCache(model)
        arg = cache_argument(model)
        parts = [model(ids[:, a:b], attention_mask=mask[:, :b], **{arg: cache}).logits
                 for a, b in ((0, 7), (7, 8), (8, 20))]
    real = mask.bool()
    torch.testing.assert_close(torch.cat(parts, 1)[real], full[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,options", [(k, {}) for k in FEATURE_KINDS] + [("window_linear", WINDOWED)],
                         ids=FEATURE_KINDS + ["window_linear"])
def test_beam_search_reorders_the_state(kind, options):
    model = tiny_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size)
    attnswap.swap_attention(model, kind, **options)
    ref = generate(model, ids, mask, cache=dynamic(model), num_beams=3)
    out = generate(model, ids, mask, num_beams=3)
    assert torch.equal(out.sequences, ref.sequences)


@pytest.mark.parametrize("kind", FEATURE_KINDS)
def test_state_size_is_constant_and_a_tenth_of_kv_at_32k(kind):
    """The state does not grow with the context; at SmolLM2's head layout (3 KV heads, head dim 64) it is at most
    1/10 of the bf16 K/V cache a 32k context needs."""
    model = tiny_model("llama")
    attnswap.swap_attention(model, kind)
    sizes = cache_sizes(model)
    assert sizes[0] == sizes[1]
    # the same state on SmolLM2's layout, per layer: features x (head dim + 1) fp32 per KV head
    d, hkv, context = 64, 3, 32768
    phi, _, _ = attnswap.registry.get(kind).state_features(d ** -0.5, {"eps": 1e-6})
    features = phi(torch.zeros(1, d)).shape[-1]
    state_bytes = hkv * features * (d + 1) * 4
    kv_bytes = 2 * hkv * context * d * 2
    assert state_bytes <= kv_bytes / 10


def test_decode_cache_stays_flat_in_measure_latency():
    from attnswap.evals.latency import measure_latency

    model = tiny_model("llama")
    attnswap.swap_attention(model, "linear")
    recs = measure_latency(model, context_lengths=(16, 64), new_tokens=2, warmup=0, repeats=1)
    assert recs[0]["cache_mb"] > 0 and recs[0]["cache_mb"] == pytest.approx(recs[1]["cache_mb"], rel=0.01)
    attnswap.restore_attention(model)
    recs = measure_latency(model, context_lengths=(16, 64), new_tokens=2, warmup=0, repeats=1)
    assert recs[1]["cache_mb"] > 3 * recs[0]["cache_mb"]  # K/V grows with the context


def test_restore_removes_the_generation_cache_and_invalidates_state_caches():
    model = tiny_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size)
    attnswap.swap_attention(model, "linear")
    cache = attnswap.StateCache(model)
    assert "_prepare_cache_for_generation" in model.__dict__
    attnswap.restore_attention(model)
    assert "_prepare_cache_for_generation" not in model.__dict__
    assert isinstance(new_cache(model), DynamicCache) and not isinstance(new_cache(model), attnswap.StateCache)
    with pytest.raises(attnswap.AttnSwapError, match="no longer active"):
        with torch.no_grad():
            model(ids, attention_mask=mask, **{cache_argument(model): cache})


def test_bad_uses_are_clear_errors():
    model = tiny_model("llama")
    with pytest.raises(attnswap.AttnSwapError, match="not swapped"):
        attnswap.StateCache(model)
    attnswap.swap_attention(model, "topk", k=4)
    with pytest.raises(attnswap.AttnSwapError, match="linear, taylor and window_linear have one"):
        attnswap.StateCache(model)
    attnswap.swap_attention(model, "linear")
    cache = attnswap.StateCache(model)
    ids = torch.randint(1, 50, (1, 8))
    arg = cache_argument(model)
    with torch.no_grad():
        model(ids, **{arg: cache})
        with pytest.raises(attnswap.AttnSwapError, match="cannot be cropped"):
            cache.crop(-1)
        # a 4D mask that hides a past key from the new query cannot be honored by a running state
        bad = torch.ones(1, 1, 1, 9, dtype=torch.bool)
        bad[..., 2] = False
        with pytest.raises(attnswap.AttnSwapError, match="hides past keys"):
            model(ids[:, :1], attention_mask=bad, **{arg: cache})


def test_legacy_families_keep_kv_in_generate():
    model = tiny_model("gpt_neo")
    ids, mask = left_padded_batch(model.config.vocab_size)
    attnswap.swap_attention(model, "linear")
    ref = generate(model, ids, mask, cache=dynamic(model))
    out = generate(model, ids, mask)
    assert torch.equal(out.sequences, ref.sequences)


@pytest.mark.parametrize("kind", FEATURE_KINDS)
def test_softcapped_family_keeps_kv_where_scores_are_capped(kind):
    """gemma2 softcaps its scores: taylor (scores) keeps K/V there; linear (no scores, softcap ignored) keeps state."""
    model = tiny_model("gemma2")
    ids, mask = left_padded_batch(model.config.vocab_size)
    attnswap.swap_attention(model, kind)
    ref = generate(model, ids, mask, cache=dynamic(model))
    out = generate(model, ids, mask)
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    assert isinstance(cache, attnswap.StateCache) == (kind == "linear")
    assert torch.equal(out.sequences, ref.sequences)



def learned_projection(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    hkv, d = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    d = getattr(model.config, "head_dim", None) or d
    weight = torch.eye(d).repeat(hkv, 1, 1) + 0.3 * torch.randn(hkv, d, d, generator=g)
    return attnswap.registry.FeatureProjection(weight, 0.1 * torch.randn(hkv, d, generator=g))


@pytest.mark.parametrize("family,options", [("llama", {}), ("qwen2", {"feature_map": "elu"}), ("gpt_oss", {}),
                                            ("gemma2", {}), ("llama", {"projection": True, "score_scale": 1.3})],
                         ids=["llama", "qwen2-elu", "gpt_oss-sinks", "gemma2-softcap", "llama-learned"])
def test_window_linear_decodes_with_a_bounded_cache_like_full_recomputation(family, options):
    model = tiny_model(family)
    ids, mask = left_padded_batch(model.config.vocab_size)
    options = dict(options)
    if options.pop("projection", False):
        options["feature_proj"] = learned_projection(model)
    attnswap.swap_attention(model, "window_linear", **WINDOWED, **options)
    ref = generate(model, ids, mask, cache=dynamic(model), output_scores=True)
    cache = attnswap.StateCache(model)
    out = generate(model, ids, mask, cache=cache, output_scores=True)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), atol=1e-4, rtol=1e-4)
    windowed = [layer for layer in cache.layers if isinstance(layer, WindowStateLayer)]
    assert windowed and all(layer.keys.shape[2] == 2 + 3 and layer.state is not None for layer in windowed)
    assert isinstance(generate(model, ids, mask).past_key_values, attnswap.StateCache)  # generate's own choice


def test_window_linear_cache_is_bounded():
    model = tiny_model("llama")
    attnswap.swap_attention(model, "window_linear", **WINDOWED)
    sizes = cache_sizes(model, (16, 64, 200))
    assert sizes[0] == sizes[1] == sizes[2]
