"""Autograd works through every kind: a swapped model can be fine-tuned, and the chunked, recomputing
path gives the same gradients as one block."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import attnswap
from attnswap.kinds import chunked

KINDS = [("softmax", {}), ("topk", {"k": 4}), ("entmax", {"alpha": 1.5}), ("sparsemax", {}),
         ("entmax", {"alpha": 1.25}), ("linear", {}), ("taylor", {})]


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("kind,options", KINDS, ids=lambda x: str(x))
def test_optimizer_steps_change_weights_and_lower_loss(kind, options):
    model = tiny_llama()
    attnswap.swap_attention(model, kind, **options)
    model.train()
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (4, 24))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        q_grad = model.model.layers[0].self_attn.q_proj.weight.grad
        assert q_grad is not None and torch.isfinite(q_grad).all() and q_grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any("q_proj" in n for n in changed) and any("k_proj" in n for n in changed)


@pytest.mark.parametrize("kind,options", KINDS, ids=lambda x: str(x))
def test_blockwise_recompute_gives_same_gradients(kind, options, monkeypatch):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 40, 8, requires_grad=True)
    k = torch.randn(2, 2, 40, 8, requires_grad=True)
    v = torch.randn(2, 2, 40, 8, requires_grad=True)
    sinks = torch.randn(4, requires_grad=True)
    extra = {"form": "quadratic"} if kind in ("linear", "taylor") else {}
    use_sinks = kind not in ("linear",)

    def grads():
        out = attnswap.attention(q, k, v, kind, causal=True, window=25, sinks=sinks if use_sinks else None,
                                 **options, **extra)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        tensors = (q, k, v, sinks) if use_sinks else (q, k, v)
        result = [t.grad.clone() for t in tensors]
        for t in tensors:
            t.grad = None
        return out.detach(), result

    out_one, g_one = grads()
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 64)  # forces one query per block, rows and heads split
    out_many, g_many = grads()
    torch.testing.assert_close(out_many, out_one, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_many, g_one):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
