"""Bad input gets a clear error naming the problem and the valid choices; user kinds plug in everywhere."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import attnswap
from attnswap import AttnSwapError


def qkv(b=1, hq=2, hkv=1, n=5, m=5, d=4):
    torch.manual_seed(0)
    return torch.randn(b, hq, n, d), torch.randn(b, hkv, m, d), torch.randn(b, hkv, m, d)


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize(
    "kind,options,needles",
    [
        ("nope", {}, ["unknown attention kind 'nope'", "softmax", "entmax", "taylor"]),
        ("topk", {"kk": 3}, ["unknown option 'kk'", "topk", "k (default 64)"]),
        ("topk", {"k": 0}, ["option 'k'", "integer >= 1", "0"]),
        ("topk", {"k": 2.5}, ["option 'k'", "integer >= 1", "float"]),
        ("topk", {"k": "64"}, ["option 'k'", "'64'", "str"]),
        ("entmax", {"alpha": 1.0}, ["option 'alpha'", "(1, 2]"]),
        ("entmax", {"alpha": 2.5}, ["option 'alpha'", "(1, 2]"]),
        ("entmax", {"alpha": "1.5"}, ["option 'alpha'", "str"]),
        ("sparsemax", {"alpha": 1.5}, ["unknown option 'alpha'", "sparsemax"]),
        ("linear", {"form": "fast"}, ["option 'form'", "auto", "quadratic", "linear_time"]),
        ("linear", {"eps": -1.0}, ["option 'eps'", ">= 0"]),
    ],
)
def test_bad_kind_or_option(kind, options, needles):
    q, k, v = qkv()
    for call in (lambda: attnswap.attention(q, k, v, kind, **options),
                 lambda: attnswap.swap_attention(tiny_llama(), kind, **options)):
        with pytest.raises(AttnSwapError) as err:
            call()
        for needle in needles:
            assert needle in str(err.value)


@pytest.mark.parametrize("shape", [(1, 2, 5, 4), (1, 3, 5, 5), (2, 1, 5, 5), (5, 5), (1, 1, 1, 1, 5)])
def test_mask_of_wrong_shape(shape):
    q, k, v = qkv()
    with pytest.raises(AttnSwapError, match=r"mask"):
        attnswap.attention(q, k, v, "softmax", mask=torch.ones(shape, dtype=torch.bool))


def test_bad_tensors_and_arguments():
    q, k, v = qkv()
    with pytest.raises(AttnSwapError, match="multiple of key/value heads"):
        attnswap.attention(torch.randn(1, 3, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    with pytest.raises(AttnSwapError, match="head_dim"):
        attnswap.attention(q, torch.randn(1, 1, 5, 3), torch.randn(1, 1, 5, 3))
    with pytest.raises(AttnSwapError, match="window"):
        attnswap.attention(q, k, v, window=0)
    with pytest.raises(AttnSwapError, match="impl must be one of"):
        attnswap.attention(q, k, v, impl="cuda")
    if "noscale" not in attnswap.available_kinds():
        from attnswap.kinds.softmax import normalize

        attnswap.register_kind("noscale", normalize, doc="a user kind (softmax's math), without a kernel")
    with pytest.raises(AttnSwapError, match="no Triton kernel"):
        attnswap.attention(q, k, v, "noscale", impl="triton")
    with pytest.raises(AttnSwapError, match="head dim 4 is not supported by the entmax kernel; valid head dims"):
        attnswap.attention(q, k, v, "entmax", impl="triton")
    with pytest.raises(AttnSwapError, match="mask must be bool"):
        attnswap.attention(q, k, v, mask=torch.ones(1, 1, 5, 5, dtype=torch.long))


def test_layers_out_of_range_and_no_attention():
    model = tiny_llama()
    with pytest.raises(AttnSwapError, match=r"valid indices are 0\.\.1"):
        attnswap.swap_attention(model, "topk", layers=[2])
    with pytest.raises(AttnSwapError, match="layer"):
        attnswap.swap_attention(model, "topk", layers="all")
    with pytest.raises(attnswap.UnsupportedModelError, match="no attention layers"):
        attnswap.swap_attention(torch.nn.Sequential(torch.nn.Linear(4, 4)), "softmax")
    with pytest.raises(AttnSwapError, match="torch.nn.Module"):
        attnswap.swap_attention("gpt2", "softmax")


def test_linear_time_form_refuses_what_it_cannot_honor():
    q, k, v = qkv(n=6, m=6)
    dense = torch.rand(1, 1, 6, 6) > 0.3
    with pytest.raises(AttnSwapError, match="dense mask"):
        attnswap.attention(q, k, v, "linear", mask=dense, form="linear_time")
    with pytest.raises(AttnSwapError, match="softcap"):
        attnswap.attention(q, k, v, "taylor", softcap=5.0, form="linear_time")
    bias = torch.zeros(1, 1, 6, 6)
    bias[..., 0] = 0.5
    with pytest.raises(AttnSwapError, match="bias"):
        attnswap.attention(q, k, v, "linear", mask=bias)


def test_fully_masked_rows_give_zeros_not_nan():
    q, k, v = qkv(n=4, m=4)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 1, :] = False
    for kind in attnswap.available_kinds():
        out = attnswap.attention(q, k, v, kind, mask=mask)
        assert torch.isfinite(out).all(), kind
        assert torch.equal(out[..., 1, :], torch.zeros_like(out[..., 1, :])), kind
        assert out[..., 0, :].abs().sum() > 0, kind


def test_float_additive_mask_is_a_bias_for_score_kinds():
    q, k, v = qkv(n=4, m=4)
    bias = torch.randn(1, 1, 4, 4)
    bias[..., 0, 3] = torch.finfo(torch.float32).min
    got = attnswap.attention(q, k, v, "softmax", mask=bias)
    scores = q @ k.transpose(-1, -2) * 0.5 + bias
    expected = torch.softmax(scores, -1) @ v
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_register_kind_works_in_attention_and_models():
    def relu_norm(scores, visible, power):
        w = torch.relu(scores) ** power
        if visible is not None:
            w = w * visible
        den = w.sum(-1, keepdim=True)
        return w / torch.where(den == 0, torch.ones_like(den), den)

    name = "relu_norm_test"
    attnswap.register_kind(name, relu_norm, options={"power": 2.0}, doc="ReLU^p normalized")
    assert attnswap.available_kinds()[name]["options"] == {"power": 2.0}
    q, k, v = qkv(n=6, m=6)
    out = attnswap.attention(q, k, v, name, causal=True, power=1.0)
    s = torch.relu(q @ k.transpose(-1, -2) * 0.5).masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), 0)
    den = s.sum(-1, keepdim=True)
    torch.testing.assert_close(out, (s / torch.where(den == 0, 1, den)) @ v, atol=1e-6, rtol=1e-5)
    with pytest.raises(AttnSwapError, match="option 'power'"):
        attnswap.attention(q, k, v, name, power="x")
    with pytest.raises(AttnSwapError, match="already registered"):
        attnswap.register_kind(name, relu_norm)
    with pytest.raises(AttnSwapError, match="built-in"):
        attnswap.register_kind("softmax", relu_norm, overwrite=True)
    with pytest.raises(AttnSwapError, match="dispatches on"):
        attnswap.register_kind("my_sdpa", relu_norm)
    model = tiny_llama()
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with attnswap.swapped(model, name):
            assert torch.isfinite(model(input_ids=ids).logits).all()
        assert torch.equal(model(input_ids=ids).logits, ref)
    from transformers import AttentionInterface

    assert "attnswap_" + name in AttentionInterface._global_mapping


def test_swap_replaces_and_context_manager_restores_previous_swap():
    model = tiny_llama()
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        first = attnswap.swap_attention(model, "topk", k=2)
        topk = model(input_ids=ids).logits
        second = attnswap.swap_attention(model, "entmax")
        assert not first.active and second.active
        with attnswap.swapped(model, "linear"):
            assert not torch.equal(model(input_ids=ids).logits, topk)
        again = model(input_ids=ids).logits
        attnswap.swap_attention(model, "entmax", alpha=1.5)
        assert torch.equal(again, model(input_ids=ids).logits)
        attnswap.restore_attention(model)
        attnswap.restore_attention(model)  # a second restore is a no-op
        assert torch.equal(model(input_ids=ids).logits, ref)


def test_layers_stay_one_way_and_calibrate_takes_no_layer_options():
    """The transformers layer (``attnswap.patches``) never imports the adaptation layer (``attnswap.adapt``):
    ``swap_attention(calibrate=...)`` is the public API's convenience above both. Calibration fits the per-layer
    options, so passing them as well is an error, not silently ignored."""
    import ast
    from pathlib import Path

    patches = Path(attnswap.__file__).parent / "patches"
    for source in patches.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith(("adapt", "attnswap.adapt")), f"{source.name} imports adapt"
                assert not (node.level == 2 and node.module in ("adapt", None)
                            and any(a.name == "adapt" for a in node.names)), f"{source.name} imports adapt"
    with pytest.raises(AttnSwapError, match="layer_options or calibrate"):
        attnswap.swap_attention(tiny_llama(), "sparsemax", calibrate=torch.zeros(1, 8, dtype=torch.long),
                                layer_options={0: {"score_scale": 2.0}})
