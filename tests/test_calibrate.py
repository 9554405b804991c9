"""Training-free calibration (per-layer, per-head score scales), the ``score_scale`` option every path applies, and
saving / loading a swap beside the model."""

import json

import pytest
import torch

import attnswap
from attnswap.evals.specs import parse_attn
from tiny_models import left_padded_batch, logits, tiny_model

SCORED = [("entmax", {"alpha": 1.5}), ("sparsemax", {}), ("topk", {"k": 4}), ("taylor", {})]


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.mark.parametrize("kind,options", SCORED)
def test_score_scale_is_a_scale_on_the_scores(kind, options):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 16, generator=g), torch.randn(2, 2, 11, 16, generator=g), torch.randn(2, 2, 11, 16,
                                                                                                         generator=g)
    per_head = (0.5, 1.0, 2.0, 3.0)
    out = attnswap.attention(q, k, v, kind, causal=True, score_scale=per_head, **options)
    ref = attnswap.attention(q * torch.tensor(per_head).view(1, 4, 1, 1), k, v, kind, causal=True, **options)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out, attnswap.attention(q, k, v, kind, causal=True, **options), atol=1e-3)
    one = attnswap.attention(q, k, v, kind, causal=True, score_scale=2.0, **options)
    torch.testing.assert_close(one, attnswap.attention(2 * q, k, v, kind, causal=True, **options), atol=1e-6, rtol=0)


def test_score_scale_errors():
    q = torch.randn(1, 4, 5, 8)
    with pytest.raises(attnswap.AttnSwapError, match="has none"):
        attnswap.attention(q, q, q, "linear", score_scale=2.0)
    with pytest.raises(attnswap.AttnSwapError, match="> 0"):
        attnswap.attention(q, q, q, "entmax", score_scale=-1.0)
    with pytest.raises(attnswap.AttnSwapError, match="one per query head"):
        attnswap.attention(q, q, q, "entmax", score_scale=(1.0, 2.0))


@pytest.mark.parametrize("kind,options", SCORED)
def test_calibration_lowers_the_output_error_and_is_applied(kind, options):
    model = tiny_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size)
    own = logits(model, ids, mask)
    data = torch.randint(1, model.config.vocab_size, (300,), generator=torch.Generator().manual_seed(1))
    handle = attnswap.calibrate(model, kind, data, window=64, max_windows=3, **options)
    cal = handle.calibration
    assert cal["tokens"] == 192 and set(cal["layers"]) == set(handle.layers)
    for layer, report in cal["layers"].items():
        assert report["error_after"] <= report["error_before"] + 1e-7  # scale 1 is a candidate
        assert handle.options_of(layer)["score_scale"] == tuple(report["score_scale"])
        assert len(report["score_scale"]) == model.config.num_attention_heads
    assert cal["mean_error_after"] < cal["mean_error_before"]
    calibrated = logits(model, ids, mask)
    raw = attnswap.swap_attention(model, kind, **options)
    assert not torch.allclose(calibrated, logits(model, ids, mask))  # the scales change the model
    raw.restore()
    assert torch.equal(logits(model, ids, mask), own)  # restore is still bit-identical


def test_swap_attention_calibrate_argument_and_per_layer_options():
    model = tiny_model("llama")
    data = torch.randint(1, model.config.vocab_size, (1, 130))
    handle = attnswap.swap_attention(model, "entmax", calibrate={"data": data, "window": 64}, layers=[1], alpha=1.5)
    assert handle.layers == [1] and "score_scale" in handle.options_of(1)
    with pytest.raises(attnswap.AttnSwapError, match="not swapped"):
        handle.options_of(0)
    with pytest.raises(attnswap.AttnSwapError, match="not swapped"):
        attnswap.swap_attention(model, "entmax", layers=[1], layer_options={0: {"score_scale": 2.0}})


@pytest.mark.parametrize("kind,options", [("entmax", {"alpha": 1.5}), ("sparsemax", {})])
def test_saved_swap_reloads_identically(tmp_path, kind, options):
    model = tiny_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size)
    own = logits(model, ids, mask)
    data = torch.randint(1, model.config.vocab_size, (200,))
    attnswap.calibrate(model, kind, data, window=64, **options)
    calibrated = logits(model, ids, mask)
    path = attnswap.save_swap(model, tmp_path / "swap")
    saved = json.loads(path.read_text())
    assert saved["kind"] == kind and saved["layer_options"] and saved["calibration"]["layers"]
    attnswap.restore_attention(model)
    assert torch.equal(logits(model, ids, mask), own)
    fresh = tiny_model("llama")  # the same weights (same seed), a new object
    handle = attnswap.load_swap(fresh, tmp_path / "swap")
    assert torch.equal(logits(fresh, ids, mask), calibrated)
    assert handle.calibration["mean_error_after"] == saved["calibration"]["mean_error_after"]
    attnswap.restore_attention(fresh)
    assert torch.equal(logits(fresh, ids, mask), own)


def test_calibrated_taylor_decodes_with_the_state_cache():
    model = tiny_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size)
    attnswap.calibrate(model, "taylor", torch.randint(1, model.config.vocab_size, (128,)), window=64)
    assert_state_decoding_matches_kv(model, ids, mask)


def assert_state_decoding_matches_kv(model, ids, mask):
    """generate() with the StateCache it builds gives the tokens of a DynamicCache (full recomputation)."""
    from transformers import DynamicCache
    from attnswap.patches.state_cache import cache_argument

    with torch.no_grad():
        kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        ref = model.generate(ids, **kw, **{cache_argument(model): DynamicCache(config=model.config)})
        assert torch.equal(model.generate(ids, **kw), ref)


def test_bad_input_is_a_clear_error(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(attnswap.AttnSwapError, match="shorter than one window"):
        attnswap.calibrate(model, "entmax", torch.arange(1, 50), window=64)
    with pytest.raises(attnswap.AttnSwapError, match="attnswap.transfer"):
        attnswap.calibrate(model, "linear", torch.arange(1, 200), window=64)
    with pytest.raises(attnswap.AttnSwapError, match="tokenizer"):
        attnswap.calibrate(model, "entmax", "some text", window=64)
    with pytest.raises(attnswap.AttnSwapError, match="not swapped"):
        attnswap.save_swap(model, tmp_path / "none")
    with pytest.raises(attnswap.AttnSwapError, match="no saved swap"):
        attnswap.load_swap(model, tmp_path / "none")
    attnswap.swap_attention(model, "topk", k=2)
    attnswap.save_swap(model, tmp_path / "llama")
    other = tiny_model("qwen2")
    with pytest.raises(attnswap.AttnSwapError, match="another model"):
        attnswap.load_swap(other, tmp_path / "llama")
    retrained = tiny_model("llama", seed=1)
    with pytest.raises(attnswap.AttnSwapError, match="other weights"):
        attnswap.load_swap(retrained, tmp_path / "llama")
    with pytest.raises(attnswap.AttnSwapError, match="no scores to calibrate"):
        parse_attn("linear:calibrated")


def test_eval_specs_for_calibrated_and_saved_rows():
    specs = parse_attn("entmax:alpha=1.5:calibrated,saved:/some/dir,topk:k=8")
    assert [s.label for s in specs] == ["entmax alpha=1.5 calibrated", "saved /some/dir", "topk k=8"]
    assert specs[0].calibrated and specs[1].swap_dir == "/some/dir" and not specs[2].calibrated


TRANSFERABLE = [("linear", {}), ("taylor", {}), ("linear", {"feature_map": "hedgehog"}),
                 ("window_linear", {"local_window": 6, "sink_tokens": 2})]


@pytest.mark.parametrize("kind,options", TRANSFERABLE, ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x.values())))
def test_transfer_learns_maps_that_lower_the_error_and_reload(tmp_path, kind, options):
    model = tiny_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size)
    own = logits(model, ids, mask)
    data = torch.randint(1, model.config.vocab_size, (256,), generator=torch.Generator().manual_seed(2))
    attnswap.swap_attention(model, kind, **options)
    raw = logits(model, ids, mask)
    handle = attnswap.transfer(model, kind, data, window=64, max_windows=4, steps=60, lr=1e-2, **options)
    report = handle.transfer
    assert report["tokens"] == 256 and report["steps"] == 60
    assert report["mean_error_after"] < 0.9 * report["mean_error_before"]
    projection = handle.options_of(0)["feature_proj"]
    assert projection.weight.shape == (model.config.num_key_value_heads, 8, 8)
    transferred = logits(model, ids, mask)
    assert not torch.allclose(transferred, raw)
    attnswap.save_swap(model, tmp_path / "t")
    assert (tmp_path / "t" / "attnswap_swap.safetensors").is_file()
    attnswap.restore_attention(model)
    assert torch.equal(logits(model, ids, mask), own)
    loaded = attnswap.load_swap(tiny_model("llama"), tmp_path / "t")
    assert torch.equal(logits(loaded.model, ids, mask), transferred)
    assert loaded.transfer["mean_error_after"] == report["mean_error_after"]
    if loaded.kind.state_features is not None:
        assert_state_decoding_matches_kv(loaded.model, ids, mask)  # the state cache applies the learned maps too
    else:
        assert_cached_decoding_matches_full(loaded.model, ids, mask)


def assert_cached_decoding_matches_full(model, ids, mask, steps=3):
    """Prefill then one token at a time with a cache: the last logits equal one forward over everything."""
    from transformers import DynamicCache
    from attnswap.patches.state_cache import cache_argument

    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits[:, -steps:]
        cache, got = DynamicCache(config=model.config), []
        model(ids[:, :-steps], attention_mask=mask[:, :-steps], use_cache=True, **{cache_argument(model): cache})
        for t in range(ids.shape[1] - steps, ids.shape[1]):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], use_cache=True,
                        **{cache_argument(model): cache})
            got.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(got, 1), full, atol=1e-4, rtol=1e-4)


def test_window_linear_projection_acts_on_its_linear_part_only():
    """With every key inside the exact window, a window_linear swap with any learned map is the model's softmax."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size)
    own = logits(model, ids, mask)
    data = torch.randint(1, model.config.vocab_size, (128,), generator=torch.Generator().manual_seed(3))
    handle = attnswap.transfer(model, "window_linear", data, window=32, max_windows=4, steps=5, lr=0.1, local_window=4)
    assert not torch.allclose(logits(model, ids, mask), own, atol=1e-3)
    learned = {i: {"feature_proj": handle.options_of(i)["feature_proj"]} for i in handle.layers}
    attnswap.restore_attention(model)
    attnswap.swap_attention(model, "window_linear", local_window=ids.shape[1], sink_tokens=0, eps=0.0,
                            layer_options=learned)
    real = mask.bool()  # padded positions see no key at all: not compared
    torch.testing.assert_close(logits(model, ids, mask)[real], own[real], atol=1e-5, rtol=1e-5)


def test_transfer_bad_input():
    model = tiny_model("llama")
    with pytest.raises(attnswap.AttnSwapError, match="attnswap.calibrate"):
        attnswap.transfer(model, "entmax", torch.arange(1, 200), window=64)
    with pytest.raises(attnswap.AttnSwapError, match="shorter than one window"):
        attnswap.transfer(model, "linear", torch.arange(1, 20), window=64)
    with pytest.raises(attnswap.AttnSwapError, match="steps"):
        attnswap.transfer(model, "linear", torch.arange(1, 200), window=64, steps=0)
    with pytest.raises(attnswap.AttnSwapError, match="no feature map"):
        parse_attn("topk:k=4:transferred")
    assert parse_attn("linear:transferred")[0].label == "linear transferred"
    assert parse_attn("window_linear:local_window=32:transferred")[0].transferred
    with pytest.raises(attnswap.AttnSwapError, match="feature_map"):
        attnswap.transfer(model, "window_linear", torch.arange(1, 200), window=64, feature_map="relu")
