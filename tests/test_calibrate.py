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
    handle = attnswap.calibrate(model, kind, data, window=64, max_windows=3, holdout=0, **options)
    cal = handle.calibration
    assert cal["tokens"] == 192 and set(cal["layers"]) == set(handle.layers)
    assert cal["kept"] == "layer-wise" and "held_out_loss" not in cal  # no held-back windows: no check
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


def _topk_calls(n, m, seed):
    """Recorded-call tuples (q, k, v, vis, scaling, softcap, sinks) of one causal layer call."""
    from attnswap.kinds.visibility import Visibility

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, length, 16, generator=g) * 2 for length in (n, m, m))
    return [(q, k, v, Visibility(n=n, m=m, causal=True, offset=m - n), 0.25, None, None)]


def test_a_fitted_scale_is_kept_only_where_it_lowers_the_held_back_error():
    """topk k = 8: on 64 keys the search moves the scales off 1; on held-back calls that see at most 8 keys topk is
    softmax, exact at scale 1 only, so no head keeps its fitted scale."""
    from attnswap import registry
    from attnswap.adapt.calibrate import fit_layer

    kind, options = registry.resolve("topk", {"k": 8})
    fit_calls, short_calls = _topk_calls(32, 64, 0), _topk_calls(8, 8, 1)
    scales, _, _, kept = fit_layer(kind, options, fit_calls)
    assert any(x != 1.0 for x in scales) and kept.all()  # without a check every fitted scale stands
    scales, before, after, kept = fit_layer(kind, options, fit_calls, short_calls)
    assert scales == (1.0, 1.0) and not kept.any() and torch.equal(before, after) and before.max() < 1e-10
    scales, before, after, kept = fit_layer(kind, options, fit_calls, _topk_calls(32, 64, 2))
    assert all((x != 1.0) == bool(keep) for x, keep in zip(scales, kept)) and (after <= before).all()


@pytest.mark.parametrize("losses,kept", [((1.0, 2.0), "uncalibrated"), ((2.0, 1.0), "layer-wise"),
                                         ((1.0, 1.0), "uncalibrated")])
def test_the_scales_are_dropped_when_the_held_back_loss_does_not_fall(monkeypatch, losses, kept):
    """The whole-model check: each stage's held-back loss (uncalibrated, then layer-wise); the lowest stays, and a
    tie keeps no scales."""
    import attnswap.adapt.calibrate as calibration

    results = iter(losses)
    monkeypatch.setattr(calibration, "next_token_loss", lambda model, ids: next(results))
    model = tiny_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size)
    data = torch.randint(1, model.config.vocab_size, (300,), generator=torch.Generator().manual_seed(1))
    handle = attnswap.calibrate(model, "entmax", data, window=64, alpha=1.5)
    cal = handle.calibration
    assert cal["kept"] == kept and cal["held_out_tokens"] == 128 and cal["tokens"] == 128
    assert cal["held_out_loss"] == dict(zip(("uncalibrated", "layer-wise"), losses))
    kept = kept == "layer-wise"
    assert all(("score_scale" in handle.options_of(layer)) is kept for layer in handle.layers)
    got = logits(model, ids, mask)
    attnswap.swap_attention(model, "entmax", alpha=1.5, layer_options=handle.layer_options if kept else None)
    assert torch.equal(got, logits(model, ids, mask))
    for report in cal["layers"].values():  # held-back errors: a head keeps a fitted scale only where it helps
        assert report["heads_kept"] == sum(x != 1.0 for x in report["score_scale"])
        assert report["error_after"] <= report["error_before"]


@pytest.mark.parametrize("kind,options", SCORED)
def test_a_learned_scale_is_the_same_scale_and_gets_a_gradient(kind, options):
    from attnswap.registry import LearnedScale

    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(1, 4, 9, 16, generator=g), torch.randn(1, 2, 11, 16, generator=g), torch.randn(
        1, 2, 11, 16, generator=g)
    scales = (0.5, 1.0, 2.0, 3.0)
    learned = LearnedScale(scales)
    out = attnswap.attention(q, k, v, kind, causal=True, score_scale=learned, **options)
    torch.testing.assert_close(out, attnswap.attention(q, k, v, kind, causal=True, score_scale=scales, **options),
                               atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    assert learned.log_scale.grad is not None and learned.log_scale.grad.abs().sum() > 0
    assert learned.values() == scales


def test_end_to_end_training_lowers_the_distillation_loss_and_touches_no_weight():
    from attnswap.adapt.finetune import distill_loss, teacher_targets
    from attnswap.adapt.scale_training import train_scales

    model = tiny_model("llama")
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    heads, layers = model.config.num_attention_heads, model.config.num_hidden_layers
    start = {i: {"score_scale": (1.0,) * heads} for i in range(layers)}
    window = torch.randint(1, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(4))

    def loss_at(layer_options):
        handle = attnswap.swap_attention(model, "sparsemax", layer_options=layer_options)
        target = teacher_targets(model, handle, window, top=64)[0]
        with torch.no_grad():
            return float(distill_loss(model(input_ids=window).logits, target))

    before = loss_at(start)
    trained, losses = train_scales(model, "sparsemax", window, start, steps=15, lr=0.05)
    assert len(losses) == 15 and set(trained) == set(start)
    assert all(len(o["score_scale"]) == heads and o["score_scale"] != start[0]["score_scale"]
               for o in trained.values())
    assert loss_at(trained) < before
    assert all(torch.equal(p, weights[n]) and p.requires_grad == flags[n] for n, p in model.named_parameters())


def test_calibrate_end_to_end_reports_every_stage():
    model = tiny_model("llama")
    data = torch.randint(1, model.config.vocab_size, (300,), generator=torch.Generator().manual_seed(1))
    handle = attnswap.calibrate(model, "sparsemax", data, window=64, end_to_end=True, end_to_end_steps=3)
    cal = handle.calibration
    assert set(cal["held_out_loss"]) == {"uncalibrated", "layer-wise", "end-to-end"}
    assert cal["kept"] == min(cal["held_out_loss"], key=cal["held_out_loss"].get)
    assert cal["end_to_end"]["steps"] == 3 and all("end_to_end_scale" in r for r in cal["layers"].values())
    with pytest.raises(attnswap.AttnSwapError, match="steps >= 1"):
        attnswap.calibrate(model, "sparsemax", data, window=64, end_to_end=True, end_to_end_steps=0)


def test_the_held_back_loss_is_the_models_next_token_loss():
    from attnswap.adapt.calibrate import next_token_loss

    model = tiny_model("llama")
    ids = torch.randint(1, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    want = -logp.gather(-1, ids[:, 1:, None]).mean()
    assert abs(next_token_loss(model, ids) - float(want)) < 1e-5


def test_swap_attention_calibrate_argument_and_per_layer_options():
    model = tiny_model("llama")
    data = torch.randint(1, model.config.vocab_size, (1, 130))
    handle = attnswap.swap_attention(model, "entmax", calibrate={"data": data, "window": 64, "holdout": 0}, layers=[1],
                                      alpha=1.5)
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
    attnswap.calibrate(model, kind, data, window=64, holdout=0, **options)
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
    with pytest.raises(attnswap.AttnSwapError, match="at least two windows"):
        attnswap.calibrate(model, "entmax", torch.arange(1, 100), window=64)
    with pytest.raises(attnswap.AttnSwapError, match=r"holdout .* must be in \[0, 1\)"):
        attnswap.calibrate(model, "entmax", torch.arange(1, 300), window=64, holdout=1.0)
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
