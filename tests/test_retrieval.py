"""Retrieval at depth: where the fact sits, the candidates' ranking from one prefill, greedy answers, seeds, grids,
the runner (interrupts keep rows) and ``attnswap eval retrieval`` end to end, on a tiny random llama."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, LlamaForCausalLM

import attnswap
from attnswap.cli import main
from attnswap.errors import AttnSwapError
from attnswap.evals import retrieval as retrieval_mod
from attnswap.evals import runner
from attnswap.evals.corpus import default_text
from attnswap.evals.report import ResultsWriter
from attnswap.evals.retrieval import (FACTS, INTRO, build_prompt, check_grid, retrieval_at_depth, score_haystack,
                                      score_prompt, summarize)
from attnswap.evals.specs import parse_attn
from attnswap.patches.state_cache import StateCache, new_cache

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return LlamaForCausalLM.from_pretrained(tiny_dir).eval(), AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def filler(tiny):
    return tiny[1](default_text(max_chars=20_000), add_special_tokens=False).input_ids


def hand_logprobs(model, prompt):
    """Each candidate's summed log-likelihood from one full forward of prompt + candidate (no cache)."""
    out = []
    for cand in prompt.candidate_ids:
        ids = torch.tensor([prompt.input_ids + cand])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
        n = len(prompt.input_ids)
        out.append(sum(float(logp[n - 1 + i, t]) for i, t in enumerate(cand)))
    return out


@settings(max_examples=25, deadline=None)
@given(context=st.integers(120, 512), depth=st.floats(0, 100, allow_nan=False), trial=st.integers(0, 3),
       fact=st.sampled_from(sorted(FACTS)))
def test_fact_sits_where_the_grid_says(tiny, filler, context, depth, trial, fact):
    tok = tiny[1]
    p = build_prompt(tok, filler, context=context, depth=depth, trial=trial, seed=3, fact=fact)
    intro = tok(INTRO).input_ids
    template, question, _ = FACTS[fact]
    fact_ids = tok(template.format(value=p.value, name=p.name), add_special_tokens=False).input_ids
    question_ids = tok(question.format(name=p.name), add_special_tokens=False).input_ids
    assert len(p.input_ids) + len(p.answer_ids) == context  # the answer ends exactly at the context length
    filler_len = context - len(p.answer_ids) - len(intro) - len(fact_ids) - len(question_ids)
    assert p.input_ids[:len(intro)] == intro and p.input_ids[-len(question_ids):] == question_ids
    assert p.fact_start == len(intro) + round(depth / 100 * filler_len)
    assert p.input_ids[p.fact_start:p.fact_end] == fact_ids == p.fact_ids
    # the filler around the fact is the corpus window at the recorded offset, in order
    around = p.input_ids[len(intro):p.fact_start] + p.input_ids[p.fact_end:len(p.input_ids) - len(question_ids)]
    assert around == [filler[(p.filler_offset + i) % len(filler)] for i in range(filler_len)]
    assert len(set(p.candidates)) == len(p.candidates) == 10
    assert all(len(v) == 5 and v[0] != "0" for v in p.candidates)
    assert p.answer_ids == tok(" " + p.value, add_special_tokens=False).input_ids


@pytest.mark.parametrize("kind,options", [(None, {}), ("eager", {}), ("topk", {"k": 8}), ("entmax", {"alpha": 1.5}),
                                          ("linear", {}), ("window_linear", {})])
def test_ranking_from_one_prefill_equals_hand_computation(tiny, tiny_dir, filler, kind, options):
    """Scored from one cached prefix (all candidates in one tree-masked forward on K/V caches, one by one with
    rewinds on the StateCache of linear kinds) = full forwards of prompt + candidate."""
    model, tok = tiny
    if kind == "eager":  # the model's own eager attention: the tree mask as an additive float mask
        model, kind = LlamaForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager").eval(), None
    prompt = build_prompt(tok, filler, context=160, depth=40, trial=1, seed=5, distractors=5)
    with attnswap.swapped(model, kind, **options) if kind else torch.no_grad():
        state = kind in ("linear", "window_linear")
        assert (type(new_cache(model)) is StateCache) == state
        assert retrieval_mod._can_pack(model, new_cache(model)) == (not state)
        scored = score_prompt(model, prompt, tok)
        hand = hand_logprobs(model, prompt)
    assert scored["logprobs"] == pytest.approx(hand, abs=1e-4)
    assert scored["rank"] == 1 + sum(lp >= hand[0] for lp in hand[1:])
    assert scored["graded"] == (6 - scored["rank"]) / 5 and scored["candidates"] == 6


@pytest.mark.parametrize("kind", [None, "linear"])
def test_greedy_answer_equals_generate(tiny, filler, kind):
    model, tok = tiny
    prompt = build_prompt(tok, filler, context=150, depth=70, seed=2)
    with attnswap.swapped(model, kind) if kind else torch.no_grad():
        scored = score_prompt(model, prompt, tok)
        ids = torch.tensor([prompt.input_ids])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(prompt.answer_ids),
                             min_new_tokens=len(prompt.answer_ids), do_sample=False, pad_token_id=0)
        plain = score_prompt(model, prompt)  # no tokenizer: no early stop, exact = the answer's tokens
    full = ref[0, ids.shape[1]:].tolist()
    assert scored["exact"] == tok.decode(full).strip().startswith(prompt.value)
    assert scored["generated_ids"] == full[:len(scored["generated_ids"])]  # stops at the first hopeless token
    said = tok.decode(scored["generated_ids"]).strip()
    assert len(scored["generated_ids"]) == len(full) or not prompt.value.startswith(said)
    assert plain["generated_ids"] == full and plain["exact"] == (full == prompt.answer_ids)


@pytest.mark.parametrize("kind,options", [(None, {}), ("topk", {"k": 8}), ("linear", {}), ("window_linear", {})])
def test_haystack_prefix_shared_changes_no_score(tiny, filler, kind, options):
    """The depths of one (context, trial) share the filler window, so their prompts agree up to the fact; scoring
    them from a prefix prefilled once (K/V caches and running states alike) gives each prompt's
    scores from its own whole prefill, and the cache is left as it was (the next depth starts from the prefix)."""
    model, tok = tiny
    prompts = [build_prompt(tok, filler, context=176, depth=d, trial=1, seed=4, distractors=4) for d in (60, 0, 100, 30)]
    assert len({p.filler_offset for p in prompts}) == 1
    deepest = max(prompts, key=lambda p: p.fact_start)
    assert all(p.input_ids[:p.fact_start] == deepest.input_ids[:p.fact_start] for p in prompts)
    with (attnswap.swapped(model, kind, **options) if kind else torch.no_grad()):
        assert isinstance(new_cache(model), StateCache) == (kind in ("linear", "window_linear"))
        together = score_haystack(model, prompts, tok)
        alone = [score_prompt(model, p, tok) for p in prompts]
    for t, a in zip(together, alone):
        assert t["logprobs"] == pytest.approx(a["logprobs"], abs=1e-4)
        assert (t["rank"], t["generated_ids"], t["exact"]) == (a["rank"], a["generated_ids"], a["exact"])
    assert together[1]["prefix_s"] >= 0 and together[2]["prefix_s"] >= 0
    other = build_prompt(tok, filler, context=176, depth=50, trial=2, seed=4, distractors=4)
    with pytest.raises(AttnSwapError, match="do not share their text before the fact"):
        score_haystack(model, [prompts[0], other], tok)


def test_same_seed_same_rows_and_own_equals_softmax(tiny):
    model, tok = tiny
    text = default_text(max_chars=20_000)
    arms = {"own": lambda: torch.no_grad(), "softmax": lambda: attnswap.swapped(model, "softmax")}
    common = dict(contexts=[128, 192], depths=[0, 100], trials=2, text=text, distractors=4, arms=arms)

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("prefill_s", "prefix_s", "seconds")} for r in rows]

    a = strip(retrieval_at_depth(model, tok, seed=7, **common))
    b = strip(retrieval_at_depth(model, tok, seed=7, **common))
    assert a == b and len(a) == 2 * 2 * 2 * 2
    c = strip(retrieval_at_depth(model, tok, seed=8, **common))
    assert [r["value"] for r in c] != [r["value"] for r in a]
    own = [r for r in a if r["attention"] == "own"]
    soft = [r for r in a if r["attention"] == "softmax"]
    for x, y in zip(own, soft):
        assert x["true_logprob"] == pytest.approx(y["true_logprob"], abs=1e-4)
        assert x["distractor_logprobs"] == pytest.approx(y["distractor_logprobs"], abs=1e-4)
        same = ("context", "depth", "trial", "value", "fact_start", "rank", "graded", "exact", "generated")
        assert {k: x[k] for k in same} == {k: y[k] for k in same}
    summary = summarize(a)
    assert summary["own"]["graded"] == summary["softmax"]["graded"]
    assert set(summary["own"]["grid"]) == {(128, 0), (128, 100), (192, 0), (192, 100)}


def test_bad_grids_are_clear_errors(tiny, filler):
    model, tok = tiny
    with pytest.raises(AttnSwapError, match=r"context length 1024 is above the model's maximum of 512.*1\.\.512"):
        retrieval_at_depth(model, tok, contexts=[256, 1024], text="some text")
    for depth in (-1, 100.5):
        with pytest.raises(AttnSwapError, match=r"outside \[0, 100\]"):
            check_grid([256], [0, depth], 1, limit=512)
    with pytest.raises(AttnSwapError, match="grid is empty"):
        check_grid([], [0], 1, limit=512)
    with pytest.raises(AttnSwapError, match="grid is empty"):
        check_grid([256], [], 1, limit=512)
    with pytest.raises(AttnSwapError, match="trials"):
        check_grid([256], [0], 0, limit=512)
    with pytest.raises(AttnSwapError, match="too short for the prompt"):
        build_prompt(tok, filler, context=30, depth=0)
    with pytest.raises(AttnSwapError, match="unknown fact"):
        build_prompt(tok, filler, context=300, depth=0, fact="recipe")


def test_interrupted_run_keeps_what_it_measured(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    real, calls = retrieval_mod.score_prompt, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(retrieval_mod, "score_prompt", flaky)
    writer = ResultsWriter(tmp_path)
    rows, complete = runner.run_retrieval(model, tok, parse_attn("topk:k=4"), text=default_text(max_chars=9000),
                                          contexts=[128], depths=[0, 50, 100], trials=1, writer=writer, show=False)
    assert not complete and len(rows) == 3
    assert len(json.loads((tmp_path / "results.json").read_text())["retrieval"]) == 3
    assert (tmp_path / "results.jsonl").read_text().count("\n") == 3


def test_eval_retrieval_command(tiny_dir, tmp_path, capsys):
    out = tmp_path / "res"
    code = main(["eval", "retrieval", "--model", tiny_dir, "--attn", "softmax,topk:k=8,linear", "--out", str(out),
                 "--contexts", "128,256", "--depths", "0,100", "--trials", "1", "--distractors", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "graded" in printed and "topk k=8" in printed and "100%" in printed
    rows = json.loads((out / "results.json").read_text())["retrieval"]
    assert len(rows) == 4 * 2 * 2 and {r["attention"] for r in rows} == {"model's own", "softmax", "topk k=8",
                                                                           "linear"}
    assert all(r["candidates"] == 4 for r in rows)
    assert (out / "results.jsonl").read_text().count("\n") == len(rows)
    assert "Retrieval at depth" in (out / "results.md").read_text()
    for name in ("retrieval.png", "retrieval_exact.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert main(["eval", "retrieval", "--model", tiny_dir, "--contexts", "1024", "--out", str(out)]) == 2
    assert main(["eval", "retrieval", "--model", tiny_dir, "--contexts", "256", "--depths", "150",
                 "--out", str(out)]) == 2
    assert "outside [0, 100]" in capsys.readouterr().err
