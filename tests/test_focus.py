"""Attention focus versus context length: the model's own attention observed block by block (equal to swapped
softmax), the sweep's rows per attention / layer / context, bounded blocks, bad grids, ``attnswap eval focus``."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

import attnswap.evals.entropy as entropy_mod
import attnswap.evals.own_attention as own_mod
from attnswap import swapped
from attnswap.cli import main
from attnswap.errors import AttnSwapError
from attnswap.evals import runner
from attnswap.evals.corpus import default_text
from attnswap.evals.entropy import METRICS, attention_stats
from attnswap.evals.focus import focus_sweep
from attnswap.evals.own_attention import own_attention_stats
from attnswap.evals.specs import parse_attn
from tiny_models import left_padded_batch, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model, tok = LlamaForCausalLM.from_pretrained(tiny_dir).eval(), AutoTokenizer.from_pretrained(tiny_dir)
    return model, tok, tok(default_text(max_chars=6000), return_tensors="pt").input_ids


def assert_stats_close(a, b, tol=TOL):
    assert torch.equal(a.rows, b.rows)
    for name in METRICS:
        x, y = a.metric(name), b.metric(name)
        assert torch.equal(x.isnan(), y.isnan()), name
        assert float((x - y).abs().nan_to_num(0).max()) <= tol, name


@pytest.mark.parametrize("family,impl", [("llama", "sdpa"), ("mistral", "sdpa"), ("gemma2", "eager"),
                                         ("gpt_oss", "eager")])
def test_own_attention_equals_swapped_softmax(family, impl, monkeypatch):
    """Padding, sliding windows, softcaps and sinks, in query blocks of one row."""
    monkeypatch.setattr(own_mod, "BLOCK_ELEMENTS", 1)
    model = tiny_model(family, impl)
    ids, mask = left_padded_batch()
    assert_stats_close(own_attention_stats(model, ids, mask), attention_stats(model, ids, mask, kind="softmax"))


def test_own_attention_is_observed_in_bounded_blocks(tiny, monkeypatch):
    model, _, ids = tiny
    seen, block = [], entropy_mod._Accumulator.block

    def spy(self, module, p, *args, **kwargs):
        seen.append(p.numel())
        return block(self, module, p, *args, **kwargs)

    monkeypatch.setattr(entropy_mod._Accumulator, "block", spy)
    monkeypatch.setattr(own_mod, "BLOCK_ELEMENTS", 4 * 256 * 16)  # 16 query rows of 256 keys, 4 heads
    n = 256
    stats = own_attention_stats(model, ids[:, :n])
    assert max(seen) <= 4 * n * 16 < 4 * n * n and len(seen) == 2 * n // 16
    assert int(stats.rows.sum()) == 2 * 4 * n
    with swapped(model, "topk", k=4), pytest.raises(AttnSwapError, match="restore its swap first"):
        own_attention_stats(model, ids[:, :8])


def test_focus_sweep_rows_per_attention_layer_and_context(tiny):
    model, _, ids = tiny
    specs = parse_attn("softmax,topk:k=4,entmax:alpha=1.5")
    rows, complete = runner.run_focus(model, ids, specs, contexts=[256, 64, 128], show=False)
    assert complete and len(rows) == 3 * 4
    assert [(r["context"], r["attention"]) for r in rows] == [
        (n, a) for n in (64, 128, 256) for a in ("model's own", "softmax", "topk k=4", "entmax alpha=1.5")]
    for row in rows:
        assert set(METRICS) <= set(row) and all(len(row["per_layer"][m]) == 2 for m in METRICS)
    by = {(r["attention"], r["context"]): r for r in rows}
    for n in (64, 128, 256):
        own, soft = by[("model's own", n)], by[("softmax", n)]
        for name in METRICS:
            assert abs(own[name] - soft[name]) <= TOL, (n, name)
            assert own["per_layer"][name] == pytest.approx(soft["per_layer"][name], abs=TOL)
        assert by[("topk k=4", n)]["sparsity"] > 0 and by[("model's own", n)]["sparsity"] == 0
    # a wider context spreads causal softmax over more keys: its entropy grows with N
    assert by[("softmax", 64)]["entropy"] < by[("softmax", 256)]["entropy"]


def test_focus_bad_grids(tiny):
    model, _, ids = tiny
    stats = {"softmax": lambda part: attention_stats(model, part)}
    with pytest.raises(AttnSwapError, match="context length 1024 is above the model's maximum of 512"):
        focus_sweep(model, ids, contexts=[1024], stats=stats)
    with pytest.raises(AttnSwapError, match="grid is empty"):
        focus_sweep(model, ids, contexts=[], stats=stats)
    with pytest.raises(AttnSwapError, match="fewer than the longest context"):
        focus_sweep(model, ids[:, :100], contexts=[128], stats=stats)


def test_eval_focus_command(tiny_dir, tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["eval", "focus", "--model", tiny_dir, "--attn", "softmax,topk:k=4,linear", "--contexts",
                 "64,128", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "eff. tokens" in printed and "model's own" in printed
    rows = json.loads((out / "results.json").read_text())["focus"]
    assert {(r["attention"], r["context"]) for r in rows} == {
        (a, n) for a in ("model's own", "softmax", "topk k=4", "linear") for n in (64, 128)}
    assert "Attention focus" in (out / "results.md").read_text()
    assert (out / "focus.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["eval", "focus", "--model", tiny_dir, "--contexts", "64,4096", "--out", str(out)]) == 2
    assert "above the model's maximum of 512" in capsys.readouterr().err
