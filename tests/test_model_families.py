"""attnswap on tiny random models of each supported transformers family.

Reference semantics: the unswapped model with eager attention. Exception: ``falcon_alibi`` is compared with
the unswapped model loaded with the same implementation, because transformers' two Falcon-ALiBi paths disagree
(eager adds the ALiBi bias twice: in the scores and again through the mask FalconModel.forward builds; sdpa adds
it once) and attnswap mirrors whichever path the model was loaded with.
"""

from __future__ import annotations

import re

import pytest
import torch
import transformers as T

import attnswap
from tiny_models import (
    DECODER_FAMILIES,
    FAMILIES,
    PAD,
    SDPA_FAMILIES,
    VOCAB,
    left_padded_batch,
    model_class,
    num_attention_layers,
    tiny_config,
    tiny_model,
)

TOL = 1e-4
KINDS = [
    ("topk", {"k": 4}),
    ("entmax", {"alpha": 1.5}),
    ("sparsemax", {}),
    ("linear", {}),
    ("taylor", {}),
]
KIND_IDS = [k for k, _ in KINDS]
ALL_KINDS = ["softmax"] + KIND_IDS

# Every layer of the tiny mistral is a sliding window of 4 keys, so topk with k=4 cannot change anything.
TOPK_NOOP = {"mistral"}
# A kind without scores cannot add a score bias (ALiBi); attnswap refuses instead of silently dropping it.
NO_SCORE_BIAS = {("falcon_alibi", "linear")}


def ref_impl(family: str, impl: str = "eager") -> str:
    return impl if family == "falcon_alibi" else "eager"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch():
    return left_padded_batch(VOCAB)


def fwd(model, batch, **kw):
    ids, am = batch
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=am, **kw)


def logits(model, batch):
    return fwd(model, batch).logits


def valid_maxdiff(a, b, am):
    """Max abs difference over non-padded positions."""
    m = am.bool()
    return (a[m] - b[m]).abs().max().item()


def reference_logits(family, batch, impl="eager"):
    return logits(tiny_model(family, ref_impl(family, impl)), batch)


def assert_differs(a, b, am, what, atol=1e-3):
    d = valid_maxdiff(a, b, am)
    assert d > atol, f"{what}: logits did not change (max abs diff {d:.2e})"


# --------------------------------------------------------------------------------------------------------------
# softmax swap == eager


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_softmax_swap_matches_eager(family, impl, batch):
    if impl == "sdpa" and family not in SDPA_FAMILIES:
        pytest.skip(f"{family} has no sdpa implementation in transformers")
    ids, am = batch
    ref = reference_logits(family, batch, impl)
    model = tiny_model(family, impl)
    attnswap.swap_attention(model, "softmax")
    out = logits(model, batch)
    assert out.dtype == torch.float32
    assert torch.isfinite(out[am.bool()]).all()
    d = valid_maxdiff(out, ref, am)
    assert d < TOL, f"{family} ({impl}) softmax swap vs {ref_impl(family, impl)}: max abs diff {d:.2e}"


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_greedy_generate_softmax_matches_eager(family, batch):
    ids, am = batch
    gen = dict(max_new_tokens=8, do_sample=False, num_beams=1, pad_token_id=PAD)
    ref_model = tiny_model(family, ref_impl(family))
    with torch.no_grad():
        ref = ref_model.generate(input_ids=ids, attention_mask=am, **gen)
    model = tiny_model(family, "eager")
    attnswap.swap_attention(model, "softmax")
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=am, **gen)
    assert out.shape == ref.shape == (ids.shape[0], ids.shape[1] + 8)
    assert torch.equal(out, ref), f"{family}: generated\n{out[:, ids.shape[1]:]}\nexpected\n{ref[:, ids.shape[1]:]}"


# --------------------------------------------------------------------------------------------------------------
# restore


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_restore_is_bit_identical(family, impl, batch):
    if impl == "sdpa" and family not in SDPA_FAMILIES:
        pytest.skip(f"{family} has no sdpa implementation in transformers")
    ids, am = batch
    model = tiny_model(family, impl)
    base = logits(model, batch)

    handle = attnswap.swap_attention(model, "entmax", alpha=1.5)
    swapped = logits(model, batch)
    assert_differs(swapped, base, am, f"{family} entmax")
    attnswap.restore_attention(model)
    assert torch.equal(logits(model, batch), base)

    # the handle restores too
    handle = attnswap.swap_attention(model, "sparsemax")
    assert_differs(logits(model, batch), base, am, f"{family} sparsemax")
    handle.restore()
    assert torch.equal(logits(model, batch), base)

    # a second swap replaces the first (it does not stack), and one restore undoes both
    attnswap.swap_attention(model, "topk", k=4)
    attnswap.swap_attention(model, "entmax", alpha=1.5)
    twice = logits(model, batch)
    d = valid_maxdiff(twice, swapped, am)
    assert d < 1e-6, f"{family}: swap topk then entmax differs from entmax alone by {d:.2e}"
    attnswap.restore_attention(model)
    assert torch.equal(logits(model, batch), base)


# --------------------------------------------------------------------------------------------------------------
# every kind


@pytest.mark.parametrize("kind,options", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_kind_runs_and_changes_logits(family, kind, options, batch):
    ids, am = batch
    model = tiny_model(family, "eager")
    attnswap.swap_attention(model, "softmax")
    soft = logits(model, batch)
    if (family, kind) in NO_SCORE_BIAS:
        with pytest.raises(attnswap.AttnSwapError, match=kind):
            attnswap.swap_attention(model, kind, **options)
            logits(model, batch)
        return
    attnswap.swap_attention(model, kind, **options)
    out = logits(model, batch)
    assert out.shape == soft.shape and out.dtype == torch.float32
    assert torch.isfinite(out[am.bool()]).all(), f"{family} {kind}: non-finite logits at non-padded positions"
    assert torch.isfinite(out).all(), f"{family} {kind}: non-finite logits at padded positions"
    if kind == "topk" and family in TOPK_NOOP:
        assert valid_maxdiff(out, soft, am) < TOL
    else:
        assert_differs(out, soft, am, f"{family} {kind}")


@pytest.mark.parametrize("family", FAMILIES)
def test_topk_with_k_at_least_seq_len_is_softmax(family, batch):
    ids, am = batch
    ref = reference_logits(family, batch)
    model = tiny_model(family, "eager")
    attnswap.swap_attention(model, "topk", k=ids.shape[1] + 3)
    d = valid_maxdiff(logits(model, batch), ref, am)
    assert d < TOL, f"{family}: topk(k >= n) vs softmax max abs diff {d:.2e}"


CACHE_FAMILIES = ["llama", "mistral", "gemma2", "gpt2", "gpt_neox", "gpt_oss", "gpt_neo", "falcon", "falcon_alibi"]


@pytest.mark.parametrize("kind,options", [("softmax", {})] + KINDS, ids=ALL_KINDS)
@pytest.mark.parametrize("family", CACHE_FAMILIES)
def test_cached_decoding_matches_full_forward(family, kind, options, batch):
    """Logits produced step by step (KV cache) equal a full forward pass over the generated sequence."""
    if (family, kind) in NO_SCORE_BIAS:
        pytest.skip("kind cannot honor the family's score bias (checked in test_every_kind_runs_and_changes_logits)")
    ids, am = batch
    n_new = 4
    model = tiny_model(family, "eager")
    attnswap.swap_attention(model, kind, **options)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=am, max_new_tokens=n_new, do_sample=False, pad_token_id=PAD,
            return_dict_in_generate=True, output_logits=True,
        )
    seq = out.sequences
    step_logits = torch.stack(out.logits, dim=1)  # (b, n_new, V)
    full_am = torch.cat([am, torch.ones(am.shape[0], n_new, dtype=am.dtype)], dim=1)
    pos = (full_am.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(input_ids=seq, attention_mask=full_am, position_ids=pos).logits
    n = ids.shape[1]
    full_steps = full[:, n - 1 : n - 1 + n_new]
    assert torch.isfinite(step_logits).all()
    d = (full_steps - step_logits).abs().max().item()
    assert d < TOL, f"{family} {kind}: cached decoding vs full forward max abs diff {d:.2e}"


# --------------------------------------------------------------------------------------------------------------
# layers=


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_subset(family, batch):
    ids, am = batch
    m = am.bool()
    model = tiny_model(family, "eager")
    n = num_attention_layers(model)
    base = fwd(model, batch, output_hidden_states=True)
    hs_base = base.hidden_states
    assert len(hs_base) == n + 1

    # only layer 0: the output of layer 0 and the logits change
    with attnswap.swapped(model, "entmax", layers=[0], alpha=1.5):
        first = fwd(model, batch, output_hidden_states=True)
    assert_differs(first.hidden_states[1], hs_base[1], am, f"{family} entmax layers=[0] (layer 0 output)")
    assert_differs(first.logits, base.logits, am, f"{family} entmax layers=[0]")
    assert torch.equal(logits(model, batch), base.logits)

    # only the last layer: everything before it is untouched
    with attnswap.swapped(model, "entmax", layers=[n - 1], alpha=1.5):
        last = fwd(model, batch, output_hidden_states=True)
    for i in range(n):
        d = (last.hidden_states[i][m] - hs_base[i][m]).abs().max().item()
        assert d < 1e-5, f"{family}: layers=[{n - 1}] changed hidden state {i} (max abs diff {d:.2e})"
    assert_differs(last.logits, base.logits, am, f"{family} entmax layers=[{n - 1}]")

    # every layer by index == no layers argument, and != layers=[0]
    with attnswap.swapped(model, "entmax", layers=range(n), alpha=1.5):
        every = logits(model, batch)
    with attnswap.swapped(model, "entmax", alpha=1.5):
        default = logits(model, batch)
    d = valid_maxdiff(every, default, am)
    assert d < 1e-6, f"{family}: layers=range({n}) vs all layers max abs diff {d:.2e}"
    assert_differs(every, first.logits, am, f"{family} layers=all vs layers=[0]")
    assert torch.equal(logits(model, batch), base.logits)


def test_layers_by_the_configs_layer_type(batch):
    """layers="full_attention" swaps exactly the layers the config's layer_types calls so (gemma2: sliding, full,
    sliding), the same as their indices; a type the model lacks is a clear error naming the types it has."""
    model = tiny_model("gemma2", "eager")
    assert model.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    with attnswap.swapped(model, "entmax", layers="full_attention", alpha=1.5) as handle:
        by_type = logits(model, batch)
        assert handle.layers == [1]
    with attnswap.swapped(model, "entmax", layers=[1], alpha=1.5):
        by_index = logits(model, batch)
    assert torch.equal(by_type, by_index)
    with attnswap.swapped(model, "entmax", layers="sliding_attention", alpha=1.5) as handle:
        assert handle.layers == [0, 2]
    with pytest.raises(attnswap.AttnSwapError, match="full_attention, sliding_attention"):
        attnswap.swap_attention(model, "entmax", layers="global", alpha=1.5)


def _names_range(msg: str, n: int) -> bool:
    hi, top = n - 1, n
    pats = [
        rf"\b0\s*(\.\.\.?|-|–|to|,|:)\s*{hi}\b",
        rf"\b0\s*(,|\.\.|to|:)\s*{top}\s*[\)\]]",
        rf"range\((0,\s*)?{top}\)",
        rf"\b{top} (attention |self-attention )?layers",
        rf"<\s*{top}\b",
        rf"<=\s*{hi}\b",
    ]
    return any(re.search(p, msg) for p in pats)


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_out_of_range(family, batch):
    model = tiny_model(family, "eager")
    base = logits(model, batch)
    n = num_attention_layers(model)
    for bad in (n, n + 7):
        with pytest.raises((ValueError, IndexError)) as ei:
            attnswap.swap_attention(model, "entmax", layers=[0, bad], alpha=1.5)
        msg = str(ei.value)
        assert str(bad) in msg, f"message does not name the bad index {bad}: {msg!r}"
        assert _names_range(msg, n), f"message does not name the valid range 0..{n - 1}: {msg!r}"
        # a rejected swap leaves the model untouched
        assert torch.equal(logits(model, batch), base)


# --------------------------------------------------------------------------------------------------------------
# transformers registration


def test_kinds_registered_with_transformers():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for kind in ALL_KINDS:
        name = f"attnswap_{kind}"
        assert name in ALL_ATTENTION_FUNCTIONS, name
        assert name in ALL_MASK_ATTENTION_FUNCTIONS, name


@pytest.mark.parametrize("family", FAMILIES)
def test_from_config_attnswap_softmax(family, batch):
    ids, am = batch
    eager = tiny_model(family, "eager")
    ref = logits(eager, batch)
    model = model_class(family).from_config(tiny_config(family), attn_implementation="attnswap_softmax").eval()
    model.load_state_dict(eager.state_dict())
    out = logits(model, batch)
    d = valid_maxdiff(out, ref, am)
    assert d < TOL, f"{family} attn_implementation='attnswap_softmax' vs eager: max abs diff {d:.2e}"

    other = model_class(family).from_config(tiny_config(family), attn_implementation="attnswap_sparsemax").eval()
    other.load_state_dict(eager.state_dict())
    sp = logits(other, batch)
    assert torch.isfinite(sp[am.bool()]).all()
    assert_differs(sp, ref, am, f"{family} attnswap_sparsemax")


def test_from_pretrained_attnswap_softmax(tmp_path, batch):
    ids, am = batch
    eager = tiny_model("llama", "eager")
    ref = logits(eager, batch)
    eager.save_pretrained(tmp_path)
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="attnswap_softmax").eval()
    assert model.config._attn_implementation == "attnswap_softmax"
    d = valid_maxdiff(logits(model, batch), ref, am)
    assert d < TOL, f"from_pretrained attnswap_softmax vs eager: max abs diff {d:.2e}"


# --------------------------------------------------------------------------------------------------------------
# swapped() context manager


@pytest.mark.parametrize("family", FAMILIES)
def test_swapped_context_manager_restores(family, batch):
    ids, am = batch
    model = tiny_model(family, "eager")
    base = logits(model, batch)
    with attnswap.swapped(model, "entmax", alpha=1.5):
        inside = logits(model, batch)
    assert_differs(inside, base, am, f"{family} swapped(entmax)")
    assert torch.equal(logits(model, batch), base)

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom):
        with attnswap.swapped(model, "topk", k=2):
            assert_differs(logits(model, batch), base, am, f"{family} swapped(topk)")
            raise Boom()
    assert torch.equal(logits(model, batch), base)


@pytest.mark.parametrize("family", ["llama", "gpt_neo"])
def test_nested_swapped_restores(family, batch):
    ids, am = batch
    model = tiny_model(family, "eager")
    base = logits(model, batch)
    with attnswap.swapped(model, "entmax", alpha=1.5):
        outer = logits(model, batch)
        with attnswap.swapped(model, "topk", k=2):
            assert_differs(logits(model, batch), outer, am, f"{family} inner swapped(topk)")
        assert torch.equal(logits(model, batch), outer), "inner exit did not go back to the outer swap"
    assert torch.equal(logits(model, batch), base), "model still swapped after leaving both blocks"


@pytest.mark.parametrize("family", ["llama", "gpt_neo"])
def test_handle_restore_after_swapped_block(family, batch):
    ids, am = batch
    model = tiny_model(family, "eager")
    base = logits(model, batch)
    handle = attnswap.swap_attention(model, "entmax", alpha=1.5)
    outer = logits(model, batch)
    with attnswap.swapped(model, "topk", k=2):
        pass
    assert torch.equal(logits(model, batch), outer)
    handle.restore()
    assert torch.equal(logits(model, batch), base), "handle.restore() left the model swapped"


# --------------------------------------------------------------------------------------------------------------
# output_attentions (beyond the listed contract: a swapped model should still report its attention weights)


@pytest.mark.parametrize("family", FAMILIES)
def test_output_attentions_softmax_matches_eager(family, batch):
    ids, am = batch
    ref = fwd(tiny_model(family, "eager"), batch, output_attentions=True).attentions
    model = tiny_model(family, "eager")
    attnswap.swap_attention(model, "softmax")
    out = fwd(model, batch, output_attentions=True).attentions
    assert len(out) == len(ref) == num_attention_layers(model), f"{len(out)} attention maps, eager gives {len(ref)}"
    rows = am.bool()[:, None, :, None]
    for i, (a, b) in enumerate(zip(out, ref)):
        assert a is not None, f"layer {i}: no attention weights"
        d = (a - b).masked_select(rows).abs().max().item()
        assert d < 1e-5, f"layer {i}: attention weights max abs diff {d:.2e}"


# --------------------------------------------------------------------------------------------------------------
# unsupported models


def _assert_real_error(err):
    assert not isinstance(err, (AttributeError, NameError, ImportError, KeyError)), (
        f"expected a deliberate error, got {type(err).__name__}: {err}"
    )


@pytest.mark.parametrize("family", ["bloom"])
def test_unsupported_family_names_it(family, batch):
    model = tiny_model(family, "eager")
    base = logits(model, batch)
    with pytest.raises(Exception) as ei:
        attnswap.swap_attention(model, "entmax", alpha=1.5)
    _assert_real_error(ei.value)
    assert family in str(ei.value).lower(), f"message does not name {family!r}: {ei.value}"
    assert torch.equal(logits(model, batch), base)


def _no_attention_models():
    yield "linear", torch.nn.Linear(8, 8)
    yield "mlp", torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    yield "mamba", tiny_model("mamba", None)


@pytest.mark.parametrize("name", ["linear", "mlp", "mamba"])
def test_model_without_attention(name):
    model = dict(_no_attention_models())[name]
    with pytest.raises(Exception) as ei:
        attnswap.swap_attention(model, "softmax")
    _assert_real_error(ei.value)
    msg = str(ei.value).lower()
    assert "attention" in msg and re.search(r"\bno\b|not find|found|without|does not have|has no", msg), msg
