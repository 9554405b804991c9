"""attention_stats: per layer x head statistics of a swapped kind's attention, block by block.

Reference: the same statistics computed directly, in float64, from the eager model's ``output_attentions``
weights (N x N per head, fine at these sizes).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import transformers as T

import attnswap
import attnswap.evals.entropy as entropy_mod
import attnswap.kinds.chunked as chunked
from attnswap.errors import AttnSwapError
from attnswap.evals.entropy import METRICS, AttentionStats, attention_stats
from tiny_models import PAD, VOCAB, left_padded_batch, seed_everything, tiny_model

TOL = 1e-4
KINDS = [
    ("softmax", {}),
    ("topk", {"k": 2}),
    ("entmax", {"alpha": 1.5}),
    ("sparsemax", {}),
    ("linear", {}),
    ("taylor", {}),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Engine blocks of a few scores (one query row, one batch row, one KV head each) and observer pieces of
    one row, so every statistic is assembled from many blocks."""
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 5)
    monkeypatch.setattr(entropy_mod, "PIECE_ELEMENTS", 3)


def llama(heads=4, kv=2, layers=2, max_pos=64, seed=0, impl="eager"):
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv, head_dim=8,
                        max_position_embeddings=max_pos, pad_token_id=PAD, bos_token_id=1, eos_token_id=None,
                        initializer_range=0.2)
    seed_everything(seed)
    return T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=impl).eval()


# --------------------------------------------------------------------------------------------------------------
# the reference: statistics straight from N x N weights


def reference_stats(attentions, attention_mask, visible):
    """``attentions``: per layer (b, H, N, N); ``visible(w)`` -> bool (b, 1|H, N, N) = A_i. Returns
    {metric: (layers, H) float64} and the row counts, with the definitions of attention_stats written naively
    (Gini as the mean absolute difference)."""
    out = {name: [] for name in METRICS}
    rows = []
    for w in attentions:
        w = w.double()
        vis = visible(w).expand_as(w)
        w = torch.where(vis, w, torch.zeros((), dtype=w.dtype))
        a = vis.sum(-1).double()
        valid = (a >= 1) & attention_mask.bool()[:, None, :]
        ent = -torch.special.xlogy(w, w).sum(-1)
        total = w.sum(-1)
        pair = vis[..., :, None] & vis[..., None, :]
        mad = ((w[..., :, None] - w[..., None, :]).abs() * pair).sum((-1, -2))
        gini = mad / (2 * a.clamp_min(1) * total)
        eff = 1 / (w * w).sum(-1)
        zeros = ((w == 0) & vis).sum(-1).double()

        def mean(x, where):
            return torch.where(where, x, torch.zeros((), dtype=x.dtype)).sum((0, 2)) / where.sum((0, 2))

        normal = valid & (a >= 2)
        out["entropy"].append(mean(ent, valid))
        out["normalized_entropy"].append(mean(ent / a.clamp_min(2).log(), normal))
        out["gini"].append(mean(gini, valid))
        out["max_weight"].append(mean(w.amax(-1), valid))
        out["effective_tokens"].append(mean(eff, valid))
        out["sparsity"].append((zeros * valid).sum((0, 2)) / (a * valid).sum((0, 2)))
        rows.append(valid.sum((0, 2)))
    return {k: torch.stack(v) for k, v in out.items()}, torch.stack(rows)


def causal_padded(attention_mask):
    def visible(w):
        n = w.shape[-1]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        return causal[None, None] & attention_mask.bool()[:, None, None, :]

    return visible


def eager_attentions(model, ids, am):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=am, output_attentions=True).attentions


def assert_matches(stats: AttentionStats, ref, ref_rows, tol=TOL):
    for name in METRICS:
        got, want = stats.metric(name), ref[name]
        assert got.dtype == torch.float64 and got.shape == want.shape, (name, got.shape, want.shape)
        d = (got - want).abs().max().item()
        assert d < tol, f"{name}: max abs diff {d:.2e}\n{got}\n{want}"
    assert torch.equal(stats.rows, ref_rows.to(torch.int64))


def inputs(batch=2, seq=14, pad=0, seed=0):
    if pad:
        return left_padded_batch(VOCAB, batch=batch, seq=seq, pad=pad, seed=seed)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, seq), generator=g), torch.ones(batch, seq, dtype=torch.long)


# --------------------------------------------------------------------------------------------------------------
# softmax through the chunked path == the same statistics from eager weights


@pytest.mark.parametrize("blocks", ["default", "tiny"])
@pytest.mark.parametrize("case", ["mha", "gqa_left_padded"])
def test_softmax_matches_eager_weights(case, blocks, request):
    if blocks == "tiny":
        request.getfixturevalue("tiny_blocks")
    if case == "mha":
        model, (ids, am) = llama(heads=4, kv=4), inputs(batch=2, seq=16)
    else:
        model, (ids, am) = llama(heads=4, kv=2), inputs(batch=3, seq=14, pad=4)
    ref, ref_rows = reference_stats(eager_attentions(model, ids, am), am, causal_padded(am))
    stats = attention_stats(model, ids, am)  # kind="softmax"
    assert stats.kind == "softmax" and stats.layers == [0, 1]
    assert getattr(model, "_attnswap_handle", None) is None  # the swap is undone
    assert_matches(stats, ref, ref_rows)
    if case == "gqa_left_padded":  # the padded queries of row 1 are not counted
        assert stats.rows.unique().tolist() == [3 * 14 - 4]


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gpt_oss", "gpt_neo", "bert", "falcon"])
def test_softmax_matches_eager_weights_families(family):
    """Sliding windows, softcaps, sinks (rows sum to < 1), class-patched families and an encoder. Softmax is
    positive on every visible key of these tiny models, so A_i = the support of the eager weights."""
    model = tiny_model(family, "eager")
    ids, am = left_padded_batch(VOCAB)
    ref, ref_rows = reference_stats(eager_attentions(model, ids, am), am, lambda w: w > 0)
    assert_matches(attention_stats(model, ids, am), ref, ref_rows)


# --------------------------------------------------------------------------------------------------------------
# every kind: ranges, sparsity, block-size independence


@pytest.fixture(scope="module")
def long_case():
    model = llama(heads=4, kv=2, max_pos=128)
    ids, am = left_padded_batch(VOCAB, batch=2, seq=96, pad=10, seed=3)
    return model, ids, am


@pytest.mark.parametrize("kind,opts", KINDS, ids=[k for k, _ in KINDS])
def test_kind_statistics(kind, opts, long_case, monkeypatch):
    model, ids, am = long_case
    stats = attention_stats(model, ids, am, kind=kind, **opts)
    assert stats.kind == kind and stats.options == attnswap.swap_attention(model, kind, **opts).options
    attnswap.restore_attention(model)
    assert stats.rows.unique().tolist() == [2 * 96 - 10]
    eps = 1e-6
    for name in METRICS:
        assert torch.isfinite(stats.metric(name)).all(), name
    assert (stats.normalized_entropy >= -eps).all() and (stats.normalized_entropy <= 1 + eps).all()
    assert (stats.gini >= -eps).all() and (stats.gini <= 1 + eps).all()
    assert (stats.max_weight > 0).all() and (stats.max_weight <= 1 + eps).all()
    assert (stats.effective_tokens >= 1 - eps).all()
    assert (stats.entropy >= -eps).all()
    assert (stats.sparsity >= 0).all() and (stats.sparsity <= 1).all()
    if kind in ("softmax", "linear", "taylor"):
        assert (stats.sparsity == 0).all(), stats.sparsity
    else:
        assert (stats.sparsity > 0).all(), stats.sparsity
    if kind == "topk":  # at most 2 keys per row (no ties among random scores)
        assert (stats.effective_tokens <= 2 + 1e-4).all(), stats.effective_tokens
        assert (stats.sparsity > 0.9).all()
    if kind == "softmax":  # softmax: the densest, the kinds below it sparser
        assert stats.mean("gini") < 0.6

    # the same with blocks of a single query row (and one batch row, one KV head) and observer pieces of one row
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(entropy_mod, "PIECE_ELEMENTS", 16)
    small = attention_stats(model, ids, am, kind=kind, **opts)
    assert torch.equal(small.rows, stats.rows)
    for name in METRICS:
        d = (small.metric(name) - stats.metric(name)).abs().max().item()
        assert d < 1e-5, f"{kind} {name}: block size changed the result by {d:.2e}"


def test_sparse_kinds_are_sparser(long_case):
    model, ids, am = long_case
    s = {k: attention_stats(model, ids, am, kind=k, **o).summary() for k, o in KINDS if k != "entmax"}
    assert s["softmax"]["sparsity"] == 0
    for k in ("topk", "sparsemax"):
        assert s[k]["sparsity"] > 0.3 and s[k]["gini"] > s["softmax"]["gini"], (k, s[k], s["softmax"])
        assert s[k]["effective_tokens"] < s["softmax"]["effective_tokens"]


# --------------------------------------------------------------------------------------------------------------
# API: layers, kind=None, linear_time, batch_size, to_dict / summary


def test_layers_not_swapped_are_nan():
    model = llama(layers=3)
    ids, am = inputs(batch=2, seq=12, pad=3)
    full = attention_stats(model, ids, am)
    part = attention_stats(model, ids, am, layers=[1])
    assert part.layers == [1] and part.num_layers == 3 and part.num_heads == 4
    for name in METRICS:
        t = part.metric(name)
        assert torch.isnan(t[[0, 2]]).all(), name
        # layer 0 is the model's own eager softmax, so layer 1 sees the same input as in the full swap
        assert (t[1] - full.metric(name)[1]).abs().max().item() < 1e-5, name
    assert part.rows[[0, 2]].eq(0).all() and torch.equal(part.rows[1], full.rows[1])
    d = part.to_dict()
    assert d["metrics"]["entropy"]["per_layer"][0] is None and d["metrics"]["entropy"]["per_head"][2][0] is None
    assert math.isclose(d["metrics"]["entropy"]["mean"], part.entropy[1].mean().item())


def test_kind_none_uses_current_swap():
    model = llama()
    ids, am = inputs(batch=2, seq=12, pad=3)
    with pytest.raises(AttnSwapError, match="not swapped"):
        attention_stats(model, ids, am, kind=None)
    explicit = attention_stats(model, ids, am, kind="topk", k=3, layers=[0])
    handle = attnswap.swap_attention(model, "topk", k=3, layers=[0])
    current = attention_stats(model, ids, am, kind=None)
    assert handle.active and model._attnswap_handle is handle
    assert current.kind == "topk" and current.options == {"k": 3} and current.layers == [0]
    for name in METRICS:
        assert torch.equal(torch.nan_to_num(current.metric(name), 7.0), torch.nan_to_num(explicit.metric(name), 7.0))
    with pytest.raises(AttnSwapError, match="as it is"):
        attention_stats(model, ids, am, kind=None, k=4)
    # an explicit kind on a swapped model: the earlier swap comes back afterwards
    attention_stats(model, ids, am, kind="sparsemax")
    assert handle.active and model._attnswap_handle is handle
    attnswap.restore_attention(model)


@pytest.mark.parametrize("kind", ["linear", "taylor"])
def test_linear_time_form_is_observed_through_the_quadratic_form(kind):
    model = llama()
    ids, am = inputs(batch=2, seq=12, pad=3)
    quad = attention_stats(model, ids, am, kind=kind, form="quadratic")
    lt = attention_stats(model, ids, am, kind=kind, form="linear_time")
    with attnswap.swapped(model, kind, form="linear_time") as handle:
        current = attention_stats(model, ids, am, kind=None)
        assert model._attnswap_handle is handle and handle.options["form"] == "linear_time"
    for s in (lt, current):
        for name in METRICS:
            assert torch.equal(s.metric(name), quad.metric(name)), name


def test_batch_size_and_reports():
    model = llama()
    ids, am = inputs(batch=3, seq=14, pad=4)
    whole = attention_stats(model, ids, am, kind="entmax", alpha=1.25)
    one = attention_stats(model, ids, am, kind="entmax", alpha=1.25, batch_size=1)
    assert torch.equal(one.rows, whole.rows)
    for name in METRICS:
        assert (one.metric(name) - whole.metric(name)).abs().max().item() < 1e-6, name
    d = json.loads(json.dumps(whole.to_dict(), allow_nan=False))
    assert d["kind"] == "entmax" and d["options"] == {"alpha": 1.25} and d["layers"] == [0, 1]
    assert set(d["metrics"]) == set(METRICS)
    m = d["metrics"]["gini"]
    assert len(m["per_head"]) == 2 and len(m["per_head"][0]) == 4 and len(m["per_layer"]) == 2
    assert math.isclose(m["mean"], sum(m["per_layer"]) / 2)
    assert list(whole.summary()) == list(METRICS)
    assert all(isinstance(v, float) for v in whole.summary().values())
    assert "entmax" in repr(whole)
    with pytest.raises(AttnSwapError):
        attention_stats(model, ids, am[:, :5])
    with pytest.raises(AttnSwapError):
        attention_stats(model, ids, am, batch_size=0)


# --------------------------------------------------------------------------------------------------------------
# bounded memory at N = 4096

MEMORY_CODE = r"""
import json, resource, sys
import torch, transformers as T
import attnswap.kinds.chunked as chunked, attnswap.evals.entropy as E
from attnswap.evals.entropy import attention_stats

torch.set_num_threads(1)
n, heads = int(sys.argv[1]), 4
cfg = T.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=heads, num_key_value_heads=2, head_dim=8, max_position_embeddings=n,
                    pad_token_id=0)
torch.manual_seed(0)
model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
ids = torch.randint(2, 128, (1, n))
chunked.BLOCK_ELEMENTS, E.PIECE_ELEMENTS = 1 << 18, 1 << 16
attention_stats(model, ids[:, :64])  # warm-up: lazy imports, one-time allocations
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
s = attention_stats(model, ids)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(growth_kib=after - before, rows=s.rows.tolist(), summary=s.summary())))
"""


def test_long_input_memory_is_bounded():
    """One layer, 4 heads, N = 4096 in a fresh process: the layer's weights as (H, N, N) fp32 would be 256 MiB
    (64 MiB per head). With the engine's blocks set to 2^18 scores (1 MiB) the whole run, statistics included,
    must grow the peak RSS by less than one head's N x N matrix (measured: about 15-20 MiB). Small blocks make
    the point at N = 4096 in a few seconds: memory follows the block size, not N^2 (at the default 2^22-score
    blocks the engine alone takes ~120 MiB at any N, see test_long_memory.py)."""
    n = 4096
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", MEMORY_CODE, str(n)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stderr[-4000:]}"
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(res)
    assert res["rows"] == [[n] * 4]
    s = res["summary"]
    assert 0.99 < s["normalized_entropy"] <= 1 and s["sparsity"] == 0  # near-uniform: a tiny random model
    per_head = n * n * 4
    growth = res["growth_kib"] * 1024
    assert growth < per_head, (f"peak RSS grew by {growth / 2**20:.1f} MiB "
                               f"(one head's N x N: {per_head / 2**20:.0f} MiB)")
