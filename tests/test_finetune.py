"""LoRA fine-tuning of a swapped model (``attnswap.finetune``): it trains, it belongs to the swap (restore takes it
out exactly), it is saved and reloaded with the swap, and bad input is a clear error."""

import json

import pytest
import torch

import attnswap
from attnswap.adapt.finetune import Adapters
from attnswap.patches.swap import current_swap
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


def finetuned(family="llama", kind="linear", steps=25, objective="next_token", **options):
    model = tiny_model(family)
    ids, mask = left_padded_batch(model.config.vocab_size)
    own = logits(model, ids, mask)
    names = [n for n, _ in model.named_parameters()]
    attnswap.swap_attention(model, kind, **options)
    swapped = logits(model, ids, mask)
    handle = attnswap.finetune(model, patterned_tokens(model.config.vocab_size), window=32, steps=steps, lr=1e-2,
                               rank=4, objective=objective)
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
    with pytest.raises(attnswap.AttnSwapError, match=r"objective 'mse'; choose one of \['distill', 'next_token'\]"):
        attnswap.finetune(model, data, window=32, steps=2, objective="mse")
    with pytest.raises(attnswap.AttnSwapError, match="distill_top must be an integer >= 2"):
        attnswap.finetune(model, data, window=32, steps=2, distill_top=1)
    with pytest.raises(attnswap.AttnSwapError, match="do not fit this model"):
        attnswap.finetune(model, data, window=32, steps=2, targets=["no_such_layer"])
    with pytest.raises(attnswap.AttnSwapError, match="needs at least 13 windows of 32 tokens, the text has 12"):
        attnswap.finetune(model, data, window=32, steps=2, holdout=12)
    with pytest.raises(attnswap.AttnSwapError, match="holdout is a number of windows"):
        attnswap.finetune(model, data, window=32, steps=2, holdout=0.5)
    assert lora_names(model) == [] and all(p.requires_grad for p in model.parameters())
    attnswap.finetune(model, data, window=32, steps=1)
    with pytest.raises(attnswap.AttnSwapError, match="already has LoRA adapters"):
        attnswap.finetune(model, data, window=32, steps=1)


def kl_to_own(own: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over positions of KL(own || other) on the full vocabulary."""
    p, q = own.float().log_softmax(-1), other.float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def test_distill_loss_is_zero_on_the_teacher_and_positive_elsewhere():
    from attnswap.adapt.finetune import distill_loss

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(1, 6, 50, generator=g)
    values, ids = scores[0].log_softmax(-1).topk(8, dim=-1)
    target = (values, ids.to(torch.int32))
    assert distill_loss(scores, target).abs().item() < 1e-6
    assert distill_loss(scores + 3.0, target).abs().item() < 1e-6  # a constant shift is the same distribution
    worse = scores + torch.randn(1, 6, 50, generator=g)
    assert distill_loss(worse, target).item() > 1e-3
    every = scores[0].log_softmax(-1).topk(50, dim=-1)  # the teacher keeps all tokens: the exact KL
    assert distill_loss(worse, (every[0], every[1].to(torch.int32))).item() == pytest.approx(
        kl_to_own(scores[0], worse[0]), rel=1e-5)


def test_distill_loss_and_its_gradient_match_the_bucketed_kl_written_out():
    """The loss takes the rest bucket as what the kept tokens leave (one pass over the vocabulary): the same value
    and gradient as summing the student's probabilities of every token the teacher did not keep."""
    from attnswap.adapt.finetune import distill_loss

    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(1, 7, 300, generator=g) * 3
    values, ids = teacher[0].log_softmax(-1).topk(16, dim=-1)
    student = (teacher + torch.randn(1, 7, 300, generator=g)).requires_grad_(True)
    distill_loss(student, (values, ids.to(torch.int32))).backward()
    ours = student.grad.clone()
    student.grad = None
    q = student[0].softmax(-1)
    dropped = torch.ones_like(q, dtype=torch.bool).scatter(-1, ids, False)
    q_buckets = torch.cat([q.gather(-1, ids), (q * dropped).sum(-1, keepdim=True)], -1)
    p = values.exp()
    p_buckets = torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1)
    reference = (p_buckets * (p_buckets.log() - q_buckets.log())).sum(-1).mean()
    reference.backward()
    assert reference.item() > 1e-2
    assert distill_loss(student, (values, ids.to(torch.int32))).item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(ours, student.grad, rtol=1e-4, atol=1e-7)


def test_distillation_brings_the_swap_towards_the_models_own_distribution():
    model = tiny_model("llama")
    vocab = model.config.vocab_size
    tokens = patterned_tokens(vocab, 640 + 64)
    train, held_out = tokens[:640], tokens[640:]  # the same kind of text, not trained on
    own = logits(model, held_out[None])
    attnswap.swap_attention(model, "linear")
    raw = logits(model, held_out[None])
    handle = attnswap.finetune(model, train, window=32, steps=30, lr=1e-2, rank=4, distill_top=16)
    assert current_swap(model) is handle and handle.active  # back after the teacher pass
    report = handle.finetune
    assert report["objective"] == "distill" and report["distill_top"] == 16 and report["windows_used"] == 16
    assert report["loss_last"] < 0.5 * report["loss_first"]
    tuned = logits(model, held_out[None])
    assert kl_to_own(own, tuned) < 0.5 * kl_to_own(own, raw)  # on text it did not see


def test_teacher_targets_are_the_models_own_top_tokens():
    from attnswap.adapt.finetune import teacher_targets

    model = tiny_model("qwen2")
    window = patterned_tokens(model.config.vocab_size, 32)
    own = logits(model, window[None])[0].float().log_softmax(-1)
    handle = attnswap.swap_attention(model, "entmax", alpha=1.5)
    [(values, ids)] = teacher_targets(model, handle, window[None], top=5)
    expected_values, expected_ids = own.topk(5, dim=-1)
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), expected_ids)
    torch.testing.assert_close(values, expected_values)
    assert current_swap(model) is handle and handle.active


@pytest.mark.parametrize("feature_maps", [True, False])
def test_finetune_trains_the_transferred_feature_maps_too(tmp_path, feature_maps):
    from attnswap.registry import FEATURE_PROJ

    model = tiny_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size)
    data = patterned_tokens(model.config.vocab_size)
    handle = attnswap.transfer(model, "linear", data, window=32, max_windows=2, steps=3)
    before = {i: o[FEATURE_PROJ].weight.clone() for i, o in handle.layer_options.items()}
    attnswap.finetune(model, data, window=32, steps=5, lr=1e-2, rank=2, feature_maps=feature_maps)
    maps = {i: o[FEATURE_PROJ].weight for i, o in handle.layer_options.items()}
    assert all(torch.equal(maps[i], before[i]) != feature_maps for i in maps)
    assert not any(o[FEATURE_PROJ].weight.requires_grad for o in handle.layer_options.values())
    expected = sum(o[FEATURE_PROJ].weight.numel() + o[FEATURE_PROJ].bias.numel()
                   for o in handle.layer_options.values()) if feature_maps else 0
    assert handle.finetune["feature_map_parameters"] == expected
    tuned = logits(model, ids, mask)
    attnswap.save_swap(model, tmp_path)
    fresh = tiny_model("llama")
    attnswap.load_swap(fresh, tmp_path)
    assert torch.equal(logits(fresh, ids, mask), tuned)  # the trained maps are saved with the adapters


@pytest.mark.parametrize("lr,kept_step", [(0.05, "last"), (0.15, "between"), (0.5, "none")])
def test_held_back_check_keeps_the_best_point_or_no_adapters(tmp_path, lr, kept_step):
    """The windows held back are scored before training and at 8 points during it; the adapters and feature maps
    of the lowest point stay, and none at all when fine-tuning never beat the swap as it was (a learning rate too
    high: the held-back loss rises, then falls again, not always below where it started)."""
    from attnswap.adapt.finetune import distill_loss, teacher_targets
    from attnswap.registry import FEATURE_PROJ

    model = tiny_model("llama")
    ids, mask = left_padded_batch(model.config.vocab_size)
    data = patterned_tokens(model.config.vocab_size, 640)  # 20 windows of 32: the last 4 held back
    handle = attnswap.transfer(model, "linear", data, window=32, max_windows=2, steps=3)
    maps = {i: o[FEATURE_PROJ].weight.clone() for i, o in handle.layer_options.items()}
    swapped = logits(model, ids, mask)
    attnswap.finetune(model, data, window=32, steps=16, lr=lr, rank=4, distill_top=16)
    report = handle.finetune
    held = report["held_out"]
    steps, losses = zip(*held["checks"])
    assert steps == (0, 2, 4, 6, 8, 10, 12, 14, 16) and held["windows"] == 4 and report["windows"] == 16
    best = min(range(len(losses)), key=losses.__getitem__)
    assert held["kept_step"] == steps[best] and held["loss_kept"] == min(losses)
    expected = {"last": 16, "none": 0}.get(kept_step)
    assert held["kept_step"] == expected if expected is not None else 0 < held["kept_step"] < 16
    assert report["kept"] == (kept_step != "none")
    # the model as left scores the kept point's loss on the held-back windows
    windows = data.reshape(20, 32)[16:]
    targets = teacher_targets(model, handle, windows, top=16)
    with torch.no_grad():
        now = sum(distill_loss(model(input_ids=w[None]).logits, t).item() for w, t in zip(windows, targets)) / 4
    assert now == pytest.approx(held["loss_kept"], rel=1e-4)
    trained = {i: o[FEATURE_PROJ].weight for i, o in handle.layer_options.items()}
    assert all(not o[FEATURE_PROJ].weight.requires_grad for o in handle.layer_options.values())
    if kept_step == "none":
        assert handle.adapters is None and lora_names(model) == []
        assert all(p.requires_grad for p in model.parameters())
        assert all(torch.equal(trained[i], maps[i]) for i in maps)
        assert torch.equal(logits(model, ids, mask), swapped)  # exactly the swap before fine-tuning
        attnswap.save_swap(model, tmp_path)
        record = json.loads((tmp_path / "attnswap_swap.json").read_text())
        assert "lora" not in record and record["finetune"]["kept"] is False
        assert not (tmp_path / "attnswap_lora.safetensors").exists()
        assert attnswap.load_swap(tiny_model("llama"), tmp_path).finetune == report
    else:
        assert handle.adapters is not None and lora_names(model)
        assert not all(torch.equal(trained[i], maps[i]) for i in maps)


def test_finetune_without_a_held_back_check_trains_on_every_window():
    model = tiny_model("llama")
    attnswap.swap_attention(model, "linear")
    report = attnswap.finetune(model, patterned_tokens(model.config.vocab_size, 640), window=32, steps=4, lr=1e-2,
                               rank=2, holdout=0).finetune
    assert report["windows"] == 20 and "held_out" not in report and report["kept"] is True


def test_learning_rate_by_how_far_the_swap_starts(monkeypatch):
    """Without lr: 5e-4 when the distillation loss before training (held-back windows, else the first training
    window) is below 1 nat/token, 2e-3 above; the next-token objective 2e-3; a given lr as it is."""
    from attnswap.adapt import finetune as ft

    def report(threshold=ft.NEAR_LOSS, **kw):
        monkeypatch.setattr(ft, "NEAR_LOSS", threshold)
        model = tiny_model("llama")
        attnswap.swap_attention(model, "linear")
        return attnswap.finetune(model, patterned_tokens(model.config.vocab_size, 640), window=32, steps=1, rank=2,
                                 **kw).finetune

    near = report()
    start = near["held_out"]["loss_before"]
    assert 0 < start < 1.0 and near["lr"] == ft.NEAR_LR == 5e-4 and "held-back" in near["lr_rule"]
    far = report(threshold=start / 2)
    assert far["lr"] == ft.FAR_LR == 2e-3 and "far from" in far["lr_rule"]
    assert report(holdout=0)["lr_rule"].startswith("first window's distillation loss")
    assert report(objective="next_token")["lr"] == ft.FAR_LR
    given = report(lr=1e-3)
    assert given["lr"] == 1e-3 and given["lr_rule"] == "given"
