"""The ``output_gain`` option: one number, or one per query head, multiplying each head's attention output, on
every path (SDPA, reference, Triton kernel, ``StateCache`` decoding); trained end to end by ``calibrate(...,
end_to_end=True)`` (on by default with it), saved and reloaded exactly."""

import json

import pytest
import torch

import attnswap
from attnswap.registry import LearnedScale
from tiny_models import gqa_inputs, left_padded_batch, logits, tiny_model

GAINS = (0.5, 1.0, 1.7, 3.0)


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.mark.parametrize("kind,options", [("softmax", {}), ("entmax", {"alpha": 1.5}), ("topk", {"k": 4}),
                                          ("taylor", {}), ("linear", {}), ("window_linear", {"local_window": 3})])
def test_the_gain_multiplies_each_heads_output(kind, options):
    q, k, v = gqa_inputs()
    out = attnswap.attention(q, k, v, kind, causal=True, output_gain=GAINS, **options)
    plain = attnswap.attention(q, k, v, kind, causal=True, **options)
    torch.testing.assert_close(out, plain * torch.tensor(GAINS).view(1, 4, 1, 1), atol=1e-6, rtol=1e-6)
    assert torch.equal(attnswap.attention(q, k, v, kind, causal=True, output_gain=1.0, **options), plain)
    torch.testing.assert_close(attnswap.attention(q, k, v, kind, causal=True, output_gain=2.0, **options), 2 * plain)


def test_the_triton_kernel_path_honors_it():
    pytest.importorskip("triton")
    q, k, v = gqa_inputs(2, b=1, n=16, m=16, d=32)
    opts = dict(causal=True, output_gain=GAINS, score_scale=(0.7, 1.0, 1.5, 2.0), alpha=1.5)
    torch.testing.assert_close(attnswap.attention(q, k, v, "entmax", impl="triton", **opts),
                               attnswap.attention(q, k, v, "entmax", impl="torch", **opts), atol=1e-5, rtol=1e-5)


def test_a_learned_gain_is_the_same_gain_and_gets_a_gradient():
    q, k, v = gqa_inputs(3)
    learned = LearnedScale(GAINS)
    out = attnswap.attention(q, k, v, "sparsemax", causal=True, output_gain=learned)
    torch.testing.assert_close(out, attnswap.attention(q, k, v, "sparsemax", causal=True, output_gain=GAINS),
                               atol=1e-6, rtol=1e-6)
    out.square().sum().backward()
    assert learned.log_scale.grad is not None and learned.log_scale.grad.abs().sum() > 0


def test_output_gain_errors():
    q = torch.randn(1, 4, 5, 8)
    with pytest.raises(attnswap.AttnSwapError, match="'output_gain' of attention kind 'entmax' must be finite and > 0"):
        attnswap.attention(q, q, q, "entmax", output_gain=0.0)
    with pytest.raises(attnswap.AttnSwapError, match="output_gain has 2 values but the attention has 4 query heads"):
        attnswap.attention(q, q, q, "linear", output_gain=(1.0, 2.0))


@pytest.mark.parametrize("kind,options", [("taylor", {"score_scale": 0.8}),
                                          ("window_linear", {"local_window": 3, "sink_tokens": 1})])
def test_decoding_with_the_state_cache_applies_it_as_the_full_forward(kind, options):
    """The prefill goes through the dispatch, the decode steps through the cache's own paths: both take the gain."""
    from test_state_cache import dynamic, generate

    model = tiny_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size)
    heads = model.config.num_attention_heads
    attnswap.swap_attention(model, kind, output_gain=tuple(0.5 + 0.4 * h for h in range(heads)), **options)
    ref = generate(model, ids, mask, cache=dynamic(model), output_scores=True)
    out = generate(model, ids, mask, cache=attnswap.StateCache(model), output_scores=True)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), atol=1e-4, rtol=1e-4)
    attnswap.swap_attention(model, kind, **options)
    plain = generate(model, ids, mask, cache=dynamic(model), output_scores=True)
    assert not torch.allclose(torch.stack(plain.scores), torch.stack(ref.scores), atol=1e-3)


def test_end_to_end_calibration_trains_output_gains_that_reload_exactly(tmp_path):
    model = tiny_model("llama")
    heads = model.config.num_attention_heads
    ids, mask = left_padded_batch(model.config.vocab_size)
    data = torch.randint(1, model.config.vocab_size, (300,), generator=torch.Generator().manual_seed(1))
    handle = attnswap.calibrate(model, "entmax", data, window=64, holdout=0, end_to_end=True, end_to_end_steps=4,
                                alpha=1.5)  # output gains: on by default
    assert handle.calibration["end_to_end"]["output_gain"] is True
    for index, report in handle.calibration["layers"].items():
        assert handle.options_of(index)["output_gain"] == tuple(report["output_gain"])
        assert len(report["output_gain"]) == heads
    assert any(g != 1.0 for i in handle.layers for g in handle.options_of(i)["output_gain"])  # training moved them
    calibrated = logits(model, ids, mask)
    saved = json.loads(attnswap.save_swap(model, tmp_path / "swap").read_text())
    assert all(len(o["output_gain"]) == heads for o in saved["layer_options"].values())
    fresh = tiny_model("llama")
    attnswap.load_swap(fresh, tmp_path / "swap")
    assert torch.equal(logits(fresh, ids, mask), calibrated)
    assert all("output_gain" not in o for o in attnswap.calibrate(
        tiny_model("llama"), "entmax", data, window=64, holdout=0, end_to_end=True, end_to_end_steps=2,
        output_gain=False, alpha=1.5).layer_options.values())
    with pytest.raises(attnswap.AttnSwapError, match="output_gain is trained by the end-to-end stage"):
        attnswap.calibrate(tiny_model("llama"), "entmax", data, window=64, output_gain=True)


def test_eval_spec_and_command(tiny_dir, tmp_path, capsys):
    from attnswap.cli import main
    from attnswap.evals.specs import parse_attn

    spec, = parse_attn("sparsemax:calibrated:end_to_end:output_gain:query_gain")
    assert spec.output_gain and spec.query_gain and not spec.length_exponent
    assert spec.label == "sparsemax calibrated end-to-end query-gain output-gain"
    assert parse_attn("sparsemax:calibrated:end_to_end")[0] == spec  # the default
    only, = parse_attn("sparsemax:calibrated:end_to_end:no_query_gain")
    assert only.output_gain and not only.query_gain and only.label == "sparsemax calibrated end-to-end output-gain"
    with pytest.raises(attnswap.AttnSwapError, match="output_gain goes with end_to_end"):
        parse_attn("sparsemax:calibrated:output_gain")
    out = tmp_path / "cal"
    assert main(["calibrate", "--model", tiny_dir, "--attn", "sparsemax", "--out", str(out), "--window", "64",
                 "--windows", "2", "--holdout", "0", "--end-to-end", "--end-to-end-steps", "2", "--no-query-gain"]) == 0
    record = json.loads((out / "attnswap_swap.json").read_text())
    assert record["calibration"]["end_to_end"]["output_gain"] is True
    assert record["calibration"]["end_to_end"]["query_gain"] is False
    assert all("output_gain" in o for o in record["layer_options"].values())
    printed = capsys.readouterr().out  # the trained gains of layer 0, as the command prints them
    assert " ".join(f"{g:.2f}" for g in record["layer_options"]["0"]["output_gain"]) in printed
