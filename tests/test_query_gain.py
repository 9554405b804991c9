"""The ``query_gain`` option: per query head, one factor per coordinate of its queries, applied on every path
(reference, Triton kernel, ``StateCache`` decoding); trained end to end by ``calibrate(..., end_to_end=True)``
(on by default with it) as a gain per rotary frequency (both coordinates of a pair the model's RoPE turns together share
one), saved and reloaded exactly."""

import functools
import json
import sys

import pytest
import torch
import transformers
from hypothesis import given, settings, strategies as st

import attnswap
from attnswap.adapt.rotary_pairs import gain_index
from attnswap.dispatch import constant_tensor
from attnswap.registry import LearnedGain
from tiny_models import gqa_inputs, left_padded_batch, logits, tiny_model

SCORED = [("entmax", {"alpha": 1.5}), ("sparsemax", {}), ("topk", {"k": 4}), ("taylor", {})]


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _gains(heads=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(tuple(float(x) for x in row) for row in torch.rand(heads, d, generator=g) * 2 + 0.2)


@pytest.mark.parametrize("kind,options", SCORED)
def test_the_gain_multiplies_each_coordinate_of_each_heads_queries(kind, options):
    q, k, v = gqa_inputs()
    gains = _gains()
    out = attnswap.attention(q, k, v, kind, causal=True, query_gain=gains, score_scale=(0.5, 1.0, 2.0, 3.0),
                             **options)
    factor = torch.tensor(gains)[None, :, None, :] * torch.tensor((0.5, 1.0, 2.0, 3.0)).view(1, 4, 1, 1)
    torch.testing.assert_close(out, attnswap.attention(q * factor, k, v, kind, causal=True, **options),
                               atol=1e-5, rtol=1e-5)
    ones = ((1.0,) * 16,) * 4
    assert torch.equal(attnswap.attention(q, k, v, kind, causal=True, query_gain=ones, **options),
                       attnswap.attention(q, k, v, kind, causal=True, **options))
    assert not torch.allclose(out, attnswap.attention(q, k, v, kind, causal=True, score_scale=(0.5, 1.0, 2.0, 3.0),
                                                      **options), atol=1e-3)


@functools.lru_cache
def _rope_model(family):
    """A tiny model of ``family``; cohere (interleaved RoPE) built here, the rest from tiny_models."""
    if family == "cohere":
        torch.manual_seed(0)
        return transformers.CohereForCausalLM(transformers.CohereConfig(
            hidden_size=32, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=1, intermediate_size=32,
            vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    return tiny_model(family)


def _random_gain(d, index):
    learned = LearnedGain(4, d, index)
    with torch.no_grad():
        learned.log_gain.normal_()
    return learned.factor("cpu")[None, :, None, :]


@settings(max_examples=25, deadline=None)
@given(family=st.sampled_from(["llama", "gpt_neox", "cohere"]), n=st.integers(1, 10), offset=st.integers(0, 20),
       seed=st.integers(0, 99))
def test_a_learned_gain_commutes_with_the_models_own_rope(family, n, offset, seed):
    """The coordinates the model's RoPE turns together share a gain (rotate-half llama, partial rotary gpt_neox,
    interleaved cohere), so gaining after RoPE is gaining before it: the scores stay a function of the relative
    position. The rotate-half tie over the whole head does not commute with gpt_neox's or cohere's."""
    model = _rope_model(family)
    apply = sys.modules[type(model).__module__].apply_rotary_pos_emb
    rope = next(m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding"))
    d = model.config.hidden_size // model.config.num_attention_heads
    torch.manual_seed(seed)
    q, k = torch.randn(1, 4, n, d), torch.randn(1, 4, n, d)
    cos, sin = rope(q, torch.arange(offset, offset + n)[None])
    gain = _random_gain(d, gain_index(model, d))
    torch.testing.assert_close(apply(q, k, cos, sin)[0] * gain, apply(q * gain, k, cos, sin)[0], atol=1e-5, rtol=1e-5)
    if family != "llama" and offset + n > 1:  # some position turns: the whole-head rotate-half tie is wrong there
        half = _random_gain(d, None)
        assert not torch.allclose(apply(q, k, cos, sin)[0] * half, apply(q * half, k, cos, sin)[0], atol=1e-3)


def test_the_gain_parameters_follow_each_models_rotary_layout():
    """Rotated pairs share a parameter; coordinates RoPE leaves alone (partial rotary, no RoPE) have their own."""
    gptj = transformers.GPTJForCausalLM(transformers.GPTJConfig(n_embd=32, n_head=4, n_layer=1, rotary_dim=4,
                                                                vocab_size=64, bos_token_id=1, eos_token_id=2))
    assert gain_index(tiny_model("llama"), 8).tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert gain_index(tiny_model("gpt_neox"), 8).tolist() == [0, 0, 1, 2, 3, 4, 5, 6]  # rotary_pct 0.25
    assert gain_index(gptj, 8).tolist() == [0, 0, 1, 1, 2, 3, 4, 5]  # interleaved, rotary_dim 4
    assert gain_index(_rope_model("cohere"), 8).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert gain_index(tiny_model("gpt2"), 8).tolist() == list(range(8))  # learned positions: nothing turns


def test_the_triton_kernel_honors_it():
    pytest.importorskip("triton")
    q, k, v = gqa_inputs(2, b=1, n=16, m=16, d=32)  # a head dim the kernel takes
    opts = dict(causal=True, score_scale=(0.7, 1.0, 1.5, 2.0), query_gain=_gains(d=32, seed=2), alpha=1.5)
    torch.testing.assert_close(attnswap.attention(q, k, v, "entmax", impl="triton", **opts),
                               attnswap.attention(q, k, v, "entmax", impl="torch", **opts), atol=1e-5, rtol=1e-5)


def test_a_learned_gain_is_the_same_gain_and_gets_a_gradient():
    q, k, v = gqa_inputs(3)
    learned = LearnedGain(4, 16)
    with torch.no_grad():
        learned.log_gain.uniform_(-0.5, 0.5)
    out = attnswap.attention(q, k, v, "sparsemax", causal=True, query_gain=learned)
    values = learned.values()
    assert len(values) == 4 and all(len(row) == 16 and row[:8] == row[8:] for row in values)
    torch.testing.assert_close(out, attnswap.attention(q, k, v, "sparsemax", causal=True, query_gain=values),
                               atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    assert learned.log_gain.grad is not None and learned.log_gain.grad.abs().sum() > 0


def test_the_gain_tensor_is_made_once_per_option_value():
    gains = _gains()
    first = constant_tensor(gains, "cpu")
    assert constant_tensor(gains, "cpu") is first
    copy = tuple(tuple(row) for row in gains)  # equal, another object: its own tensor, same numbers
    assert constant_tensor(copy, "cpu") is not first and torch.equal(constant_tensor(copy, "cpu"), first)


def test_query_gain_errors():
    q = torch.randn(1, 4, 5, 8)
    with pytest.raises(attnswap.AttnSwapError, match="'query_gain' needs scores"):
        attnswap.attention(q, q, q, "linear", query_gain=((1.0,) * 8,) * 4)
    with pytest.raises(attnswap.AttnSwapError, match=r"one row per query head.*\(Hq, head_dim\)"):
        attnswap.attention(q, q, q, "entmax", query_gain=(1.0,) * 8)  # one flat row
    with pytest.raises(attnswap.AttnSwapError, match="one row per query head"):
        attnswap.attention(q, q, q, "entmax", query_gain=((1.0,) * 8, (1.0,) * 7))
    with pytest.raises(attnswap.AttnSwapError, match="finite numbers > 0"):
        attnswap.attention(q, q, q, "entmax", query_gain=((1.0,) * 8, (1.0,) * 7 + (0.0,), (1.0,) * 8, (1.0,) * 8))
    with pytest.raises(attnswap.AttnSwapError, match=r"shape \(2, 8\).*4 query heads of dim 8"):
        attnswap.attention(q, q, q, "entmax", query_gain=((1.0,) * 8,) * 2)
    with pytest.raises(attnswap.AttnSwapError, match=r"shape \(4, 6\)"):
        attnswap.attention(q, q, q, "entmax", query_gain=((1.0,) * 6,) * 4)
    with pytest.raises(attnswap.AttnSwapError, match="even head dim"):
        LearnedGain(4, 7)


def test_decoding_with_the_state_cache_applies_it_as_the_full_forward():
    from test_state_cache import dynamic, generate

    model = tiny_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size)
    heads = model.config.num_attention_heads
    d = model.config.hidden_size // heads
    attnswap.swap_attention(model, "taylor", query_gain=_gains(heads, d, seed=4), score_scale=0.8)
    ref = generate(model, ids, mask, cache=dynamic(model), output_scores=True)
    out = generate(model, ids, mask, cache=attnswap.StateCache(model), output_scores=True)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), atol=1e-4, rtol=1e-4)
    attnswap.swap_attention(model, "taylor", score_scale=0.8)
    assert not torch.allclose(torch.stack(generate(model, ids, mask, cache=dynamic(model),
                                                   output_scores=True).scores), torch.stack(ref.scores), atol=1e-3)


def test_end_to_end_calibration_trains_paired_gains_that_reload_exactly(tmp_path):
    model = tiny_model("llama")
    heads = model.config.num_attention_heads
    d = model.config.hidden_size // heads
    ids, mask = left_padded_batch(model.config.vocab_size)
    data = torch.randint(1, model.config.vocab_size, (300,), generator=torch.Generator().manual_seed(1))
    handle = attnswap.calibrate(model, "sparsemax", data, window=64, holdout=0, end_to_end=True,
                                end_to_end_steps=4, length_exponent=True)  # query gains: on by default
    assert handle.calibration["end_to_end"]["query_gain"] is True
    for index, report in handle.calibration["layers"].items():
        gains = handle.options_of(index)["query_gain"]
        assert len(gains) == heads and all(len(row) == d and row[: d // 2] == row[d // 2:] for row in gains)
        assert len(report["query_gain_spread"]) == heads and "length_exponent" in report
    assert any(x != 1.0 for i in handle.layers for row in handle.options_of(i)["query_gain"] for x in row)
    calibrated = logits(model, ids, mask)
    saved = json.loads(attnswap.save_swap(model, tmp_path / "swap").read_text())
    assert all(len(o["query_gain"]) == heads for o in saved["layer_options"].values())
    fresh = tiny_model("llama")
    attnswap.load_swap(fresh, tmp_path / "swap")
    assert torch.equal(logits(fresh, ids, mask), calibrated)
    plain = attnswap.calibrate(tiny_model("llama"), "sparsemax", data, window=64, holdout=0, end_to_end=True,
                               end_to_end_steps=2, query_gain=False)
    assert plain.calibration["end_to_end"]["query_gain"] is False
    assert all("query_gain" not in plain.options_of(i) for i in plain.layers)
    layer_wise = attnswap.calibrate(tiny_model("llama"), "sparsemax", data, window=64, holdout=0)
    assert all("query_gain" not in layer_wise.options_of(i) for i in layer_wise.layers)  # no end-to-end: no gains
    with pytest.raises(attnswap.AttnSwapError, match="query_gain is trained by the end-to-end stage"):
        attnswap.calibrate(tiny_model("llama"), "sparsemax", data, window=64, query_gain=True)
    with pytest.raises(attnswap.AttnSwapError,
                       match=r"calibrate's query_gain is True or False.*swap_attention\(model, kind, query_gain=...\)"):
        attnswap.calibrate(tiny_model("llama"), "sparsemax", data, window=64, query_gain=((1.0,) * d,) * heads)


def test_eval_spec_and_command_for_an_end_to_end_fit_with_query_gains(tiny_dir, tmp_path, capsys):
    from attnswap.cli import main
    from attnswap.evals.specs import parse_attn

    spec, = parse_attn("entmax:alpha=1.5:calibrated:end_to_end:length_exponent:no_output_gain")
    assert spec.end_to_end and spec.query_gain and spec.length_exponent and spec.options == {"alpha": 1.5}
    assert not spec.output_gain
    assert spec.label == "entmax alpha=1.5 calibrated end-to-end length-exponent query-gain"
    assert parse_attn("entmax:calibrated:end_to_end")[0].query_gain  # the default with end_to_end
    assert parse_attn("entmax:calibrated:end_to_end:query_gain")[0] == parse_attn("entmax:calibrated:end_to_end")[0]
    bare, = parse_attn("entmax:calibrated:end_to_end:no_query_gain:no_output_gain")
    assert not (bare.query_gain or bare.output_gain) and bare.label == "entmax calibrated end-to-end"
    assert not parse_attn("entmax:calibrated")[0].query_gain
    with pytest.raises(attnswap.AttnSwapError, match="query_gain goes with end_to_end"):
        parse_attn("entmax:calibrated:query_gain")
    with pytest.raises(attnswap.AttnSwapError, match="no_query_gain goes with end_to_end"):
        parse_attn("entmax:calibrated:no_query_gain")
    with pytest.raises(attnswap.AttnSwapError, match="query_gain and no_query_gain contradict"):
        parse_attn("entmax:calibrated:end_to_end:query_gain:no_query_gain")
    out = tmp_path / "cal"
    assert main(["calibrate", "--model", tiny_dir, "--attn", "sparsemax", "--out", str(out), "--window", "64",
                 "--windows", "2", "--holdout", "0", "--end-to-end", "--end-to-end-steps", "2", "--no-output-gain"]) == 0
    printed = capsys.readouterr().out
    assert "query-gain spread" in printed and "output gains" not in printed  # a column only for what was trained
    record = json.loads((out / "attnswap_swap.json").read_text())
    assert record["calibration"]["end_to_end"]["query_gain"] is True
    assert all("query_gain" in o for o in record["layer_options"].values())
    assert main(["calibrate", "--model", tiny_dir, "--attn", "sparsemax", "--out", str(out), "--window", "64",
                 "--query-gain"]) == 2
    assert "end_to_end=True" in capsys.readouterr().err
