"""LoRA fine-tuning of a swapped model (``attnswap.finetune``): it trains, it belongs to the swap (restore takes it
out exactly), it is saved and reloaded with the swap, and bad input is a clear error."""

import json

import pytest
import torch

import attnswap
from attnswap.adapt.finetune import Adapters
from tiny_models import left_padded_batch, logits, tiny_model

pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def patterned_tokens(vocab: int, n: int = 400, seed: int = 1) -> torch.Tensor:
    """Token ids with structure to learn: a short random phrase repeated with a random token between copies."""
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(1, vocab, (7,), generator=g)
    parts = []
    while sum(p.numel() for p in parts) < n:
        parts += [phrase, torch.randint(1, vocab, (1,), generator=g)]
    return torch.cat(parts)[:n]


def lora_names(model) -> list:
    return [n for n, _ in model.named_parameters() if Adapters.owns(n)]


def finetuned(family="llama", kind="linear", steps=25, **options):
    model = tiny_model(family)
    ids, mask = left_padded_batch(model.config.vocab_size)
    own = logits(model, ids, mask)
    names = [n for n, _ in model.named_parameters()]
    attnswap.swap_attention(model, kind, **options)
    swapped = logits(model, ids, mask)
    handle = attnswap.finetune(model, patterned_tokens(model.config.vocab_size), window=32, steps=steps, lr=1e-2,
                               rank=4)
    return model, handle, (ids, mask), own, swapped, names


@pytest.mark.parametrize("family,kind,options", [("llama", "linear", {}), ("qwen2", "entmax", {"alpha": 1.5}),
                                                 ("gpt2", "window_linear", {"local_window": 4, "sink_tokens": 1})])
def test_finetune_trains_adapters_and_restore_is_exact(family, kind, options):
    model, handle, (ids, mask), own, swapped, names = finetuned(family, kind, **options)
    report = handle.finetune
    assert report["steps"] == 25 and report["tokens"] == 25 * 32 and report["rank"] == 4
    assert report["loss_last"] < report["loss_first"] - 0.5  # the repeated phrase is learnt
    assert len(report["loss_curve"]) == 25
    assert report["trainable_parameters"] == sum(p.numel() for n, p in model.named_parameters() if Adapters.owns(n))
    assert lora_names(model) and all(p.requires_grad == Adapters.owns(n) for n, p in model.named_parameters())
    tuned = logits(model, ids, mask)
    assert not torch.allclose(tuned, swapped, atol=1e-4)
    attnswap.restore_attention(model)
    assert lora_names(model) == [] and [n for n, _ in model.named_parameters()] == names
    assert all(p.requires_grad for p in model.parameters())  # the flags before fine-tuning
    assert torch.equal(logits(model, ids, mask), own)


def test_adapters_leave_and_come_back_with_their_swap():
    model, handle, (ids, mask), own, swapped, _ = finetuned()
    tuned = logits(model, ids, mask)
    with attnswap.swapped(model, "linear"):  # another swap for a block: the adapters are out
        assert lora_names(model) == []
        assert torch.equal(logits(model, ids, mask), swapped)
    assert lora_names(model) and torch.equal(logits(model, ids, mask), tuned)  # the same handle, back
    attnswap.swap_attention(model, "linear")
    assert lora_names(model) == [] and torch.equal(logits(model, ids, mask), swapped)


def test_finetuned_swap_saves_and_reloads_identically(tmp_path):
    model, handle, (ids, mask), own, _, _ = finetuned()
    tuned = logits(model, ids, mask)
    attnswap.save_swap(model, tmp_path)
    record = json.loads((tmp_path / "attnswap_swap.json").read_text())
    assert record["lora"]["rank"] == 4 and record["finetune"]["steps"] == 25
    assert (tmp_path / "attnswap_lora.safetensors").is_file()
    fresh = tiny_model("llama")  # same seed: the same original weights
    loaded = attnswap.load_swap(fresh, tmp_path)
    assert loaded.finetune == handle.finetune
    assert torch.equal(logits(fresh, ids, mask), tuned)
    attnswap.restore_attention(fresh)
    assert torch.equal(logits(fresh, ids, mask), own)
    other = tiny_model("llama", seed=5)
    with pytest.raises(attnswap.AttnSwapError, match="other weights"):
        attnswap.load_swap(other, tmp_path)
    (tmp_path / "attnswap_lora.safetensors").unlink()
    with pytest.raises(attnswap.AttnSwapError, match="attnswap_lora.safetensors is missing"):
        attnswap.load_swap(tiny_model("llama"), tmp_path)
    # saving the swap again without adapters removes the stale file
    attnswap.swap_attention(model, "linear")
    attnswap.save_swap(model, tmp_path)
    assert "lora" not in json.loads((tmp_path / "attnswap_swap.json").read_text())


def test_finetune_bad_input():
    model = tiny_model("llama")
    data = patterned_tokens(model.config.vocab_size)
    with pytest.raises(attnswap.AttnSwapError, match="swap .or transfer. the model first"):
        attnswap.finetune(model, data, window=32, steps=2)
    attnswap.swap_attention(model, "linear")
    with pytest.raises(attnswap.AttnSwapError, match="steps >= 1"):
        attnswap.finetune(model, data, window=32, steps=0)
    with pytest.raises(attnswap.AttnSwapError, match="rank must be a positive integer"):
        attnswap.finetune(model, data, window=32, steps=2, rank=0)
    with pytest.raises(attnswap.AttnSwapError, match="shorter than one window"):
        attnswap.finetune(model, data[:20], window=32, steps=2)
    with pytest.raises(attnswap.AttnSwapError, match="do not fit this model"):
        attnswap.finetune(model, data, window=32, steps=2, targets=["no_such_layer"])
    assert lora_names(model) == [] and all(p.requires_grad for p in model.parameters())
    attnswap.finetune(model, data, window=32, steps=1)
    with pytest.raises(attnswap.AttnSwapError, match="already has LoRA adapters"):
        attnswap.finetune(model, data, window=32, steps=1)
