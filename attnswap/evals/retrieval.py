"""Retrieval at depth: a fact hidden at several depths of filler text of several context lengths, then asked for.

    rows = retrieval_at_depth(model, tokenizer, contexts=(1024, 2048), depths=(0, 50, 100), trials=2)

Each grid point (context length N, depth d %, trial t) is one prompt of exactly ``N - len(answer)`` tokens:

    intro | filler[:i] | fact | filler[i:] | question        then the answer (N tokens in all)

with ``i = round(d / 100 * len(filler))`` (0 %: the fact right after the intro, 100 %: right before the question).
The filler is a window of the text (the offline corpus by default) at a seeded offset; the value (a passkey of
``digits`` digits) and the distractors (``distractors`` other values of the same number of digits) are seeded too,
so a grid point's prompt is the same for every attention compared and the same ``seed`` gives the same run.

The haystack: every depth of one (context, trial) uses the same filler window (the offset is seeded by context
and trial only), so only the fact's place differs between them, as in the usual needle-in-a-haystack design.
Their prompts then share ``intro | filler[:i]``: the run prefills that prefix once per haystack, growing it depth by
depth (shallowest first), and each depth prefills only the rest of its prompt from there (``CacheMark`` rewinds
the cache after each; a ``StateCache`` continues its running state in linear time, as its first prefill does).
Each prompt's tokens are still processed exactly once at their positions, so the scores are those of prefilling
the whole prompt (to float rounding); the grid costs less than one prefill per grid point.

Each prompt's prefill (``use_cache=True``, only the last position's logits) gives:

- ``rank``: the true answer's place among the candidates (true + distractors) by summed log-likelihood
  ``log p(answer | prompt)`` (1 = best; ties count against it); each candidate is scored from the same cache, which
  is rewound after it (``CacheMark``): all candidates in one forward (side by side, a tree mask) on a K/V cache,
  one by one on a ``StateCache``. ``graded = (C - rank) / (C - 1)`` with C candidates: 1 at the top, 0 at the
  bottom, 0.5 on average for a model that cannot tell (chance); it grades small models that never say the value.
- ``exact``: greedy decoding (argmax each step, what ``generate(do_sample=False)`` does) of as many tokens as the
  answer has, through the cache ``generate`` would use (a ``StateCache`` for the feature-map kinds: their
  constant-size running state), matches the value (the stripped text starts with it). Decoding stops as soon as
  the text so far cannot, so ``generated`` then holds the first wrong word.

Memory: the prefill keeps only the last position's logits (``logits_to_keep``), and the attention paths are the
memory-bounded ones (the kinds' chunked engine on CPU, the Triton kernels on GPU): no N x N tensor.
"""

from __future__ import annotations

import contextlib
import inspect
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from ..errors import AttnSwapError
from ..patches.state_cache import StateCache, cache_argument, new_cache
from ..patches.swap import find_attention
from .cache_rewind import CacheMark

__all__ = ["DEFAULT_CONTEXTS", "DEFAULT_DEPTHS", "FACTS", "RetrievalPrompt", "build_prompt", "check_grid",
           "default_contexts", "max_positions", "retrieval_at_depth", "score_haystack", "score_prompt",
           "summarize"]

DEFAULT_CONTEXTS = (1024, 2048, 4096, 8192)
DEFAULT_DEPTHS = (0, 25, 50, 75, 100)
DEFAULT_TRIALS = 2
DEFAULT_DISTRACTORS = 9
DEFAULT_DIGITS = 5

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about it.\n\n")
NAMES = ("Alice", "Bruno", "Chiara", "Dmitri", "Esther", "Farid", "Greta", "Hiroshi", "Ines", "Jonas", "Kavya",
         "Lars", "Mei", "Nadia", "Oscar", "Priya")
# fact kind -> (fact, question, answer) templates; {value} the number asked for, {name} a seeded name
FACTS = {
    "passkey": ("\nThe pass key is {value}. Remember it. {value} is the pass key.\n",
                "\n\nWhat is the pass key? The pass key is", " {value}"),
    "name_value": ("\n{name}'s special number is {value}. Remember it. {name}'s special number is {value}.\n",
                   "\n\nWhat is {name}'s special number? {name}'s special number is", " {value}"),
}


@dataclass
class RetrievalPrompt:
    """One grid point's prompt: ``input_ids`` (the prompt, without the answer), where the fact sits
    (``fact_start``/``fact_end``, token positions), the value asked for and the candidates (index 0 the true one)."""

    context: int
    depth: float
    trial: int
    input_ids: list[int]
    fact_start: int
    fact_end: int
    fact_ids: list[int]
    value: str
    candidates: list[str]  # the answers' values: the true one first, then the distractors
    candidate_ids: list[list[int]]
    filler_offset: int
    name: str | None = None

    @property
    def answer_ids(self) -> list[int]:
        return self.candidate_ids[0]


def max_positions(model) -> int | None:
    """The longest sequence the model takes (``max_position_embeddings`` / ``n_positions``), or None."""
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "get_text_config", lambda **_: None)(decoder=True)):
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def default_contexts(model) -> list[int]:
    """``DEFAULT_CONTEXTS`` up to the model's maximum (that maximum alone when every default is above it)."""
    limit = max_positions(model)
    return [n for n in DEFAULT_CONTEXTS if limit is None or n <= limit] or [limit]


def check_grid(contexts: Iterable[int], depths: Iterable[float], trials: int, *, limit: int | None,
               what: str = "retrieval") -> tuple[list[int], list[float]]:
    """Validated (contexts, depths): a clear error for an empty grid, a context above the model's maximum (or
    below 1), a depth outside [0, 100], fewer than one trial."""
    contexts, depths = list(contexts), list(depths)
    if not contexts:
        raise AttnSwapError(f"{what}: the grid is empty: give at least one context length, e.g. 1024,2048")
    if not depths:
        raise AttnSwapError(f"{what}: the grid is empty: give at least one depth in [0, 100] (percent), e.g. 0,50,100")
    for n in contexts:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise AttnSwapError(f"{what}: context lengths must be positive integers, got {n!r}")
        if limit is not None and n > limit:
            raise AttnSwapError(f"{what}: context length {n} is above the model's maximum of {limit} positions; "
                                f"valid context lengths are 1..{limit}")
    for d in depths:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 100:
            raise AttnSwapError(f"{what}: depth {d!r} is outside [0, 100]: depths are percentages of the filler "
                                "(0 = right after the intro, 100 = right before the question)")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise AttnSwapError(f"{what}: trials must be an integer >= 1, got {trials!r}")
    return contexts, depths


def _grid_rng(seed: int, context: int, depth: float, trial: int) -> random.Random:
    # an integer seed (Python hashes strings per process): the same grid point gives the same draws everywhere
    return random.Random(((seed * 1_000_003 + context) * 1_009 + round(depth * 1000)) * 101 + trial)


def _haystack_rng(seed: int, context: int, trial: int) -> random.Random:
    """The filler window's draw: the same for every depth of a (context, trial), so their prompts share a prefix."""
    return random.Random(((seed * 1_000_003 + context) * 1_009 - 1) * 101 + trial)


def _values(rng: random.Random, digits: int, count: int) -> list[str]:
    """``count`` distinct numbers of ``digits`` digits (no leading zero)."""
    space = 9 * 10 ** (digits - 1)
    if count > space:
        raise AttnSwapError(f"retrieval: {count} distinct values of {digits} digits do not exist; use fewer "
                            "distractors or more digits")
    picked = rng.sample(range(space), count)
    return [str(10 ** (digits - 1) + v) for v in picked]


def _encode(tokenizer, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special).input_ids)


def build_prompt(tokenizer, filler_ids: Sequence[int], *, context: int, depth: float, trial: int = 0,
                 seed: int = 0, fact: str = "passkey", distractors: int = DEFAULT_DISTRACTORS,
                 digits: int = DEFAULT_DIGITS) -> RetrievalPrompt:
    """The prompt of one grid point (see the module doc); ``filler_ids`` the tokens of the filler text (a window of
    them is used, wrapping around when the text is shorter than needed)."""
    if fact not in FACTS:
        raise AttnSwapError(f"retrieval: unknown fact {fact!r}; facts: {', '.join(FACTS)}")
    if digits < 1 or distractors < 1:
        raise AttnSwapError(f"retrieval: need digits >= 1 and distractors >= 1, got {digits} and {distractors}")
    if not len(filler_ids):
        raise AttnSwapError("retrieval: the filler text has no tokens")
    rng = _grid_rng(seed, context, depth, trial)
    values = _values(rng, digits, distractors + 1)
    name = rng.choice(NAMES)
    fact_t, question_t, answer_t = FACTS[fact]
    value = values[0]
    intro = _encode(tokenizer, INTRO, special=True)
    fact_ids = _encode(tokenizer, fact_t.format(value=value, name=name))
    question = _encode(tokenizer, question_t.format(name=name))
    candidate_ids = [_encode(tokenizer, answer_t.format(value=v)) for v in values]
    prompt_len = context - len(candidate_ids[0])
    filler_len = prompt_len - len(intro) - len(fact_ids) - len(question)
    if filler_len < 0:
        raise AttnSwapError(f"retrieval: context length {context} is too short for the prompt: the intro, fact, "
                            f"question and answer alone take {context - filler_len} tokens")
    # the window start, from (seed, context, trial) alone; any filler length up to the context fits from there
    offset = _haystack_rng(seed, context, trial).randrange(max(1, len(filler_ids) - context + 1))
    filler = [filler_ids[(offset + i) % len(filler_ids)] for i in range(filler_len)]
    at = round(depth / 100 * filler_len)
    ids = intro + filler[:at] + fact_ids + filler[at:] + question
    start = len(intro) + at
    return RetrievalPrompt(context=context, depth=depth, trial=trial, input_ids=ids, fact_start=start,
                           fact_end=start + len(fact_ids), fact_ids=fact_ids, value=value, candidates=values,
                           candidate_ids=candidate_ids, filler_offset=offset,
                           name=name if fact == "name_value" else None)


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def score_prompt(model, prompt: RetrievalPrompt, tokenizer=None, *, cache=None, cached: int = 0) -> dict:
    """The prefill of ``prompt``, then every candidate's log-likelihood and a greedy answer from that cache.

    ``cache`` (from ``new_cache``) may already hold the prompt's first ``cached`` tokens (a haystack's shared
    prefix): only the rest is prefilled, and the cache is rewound to what it held on entry before returning.
    Returns ``logprobs`` (per candidate, the true one first), ``rank``, ``graded``, ``generated_ids``,
    ``generated`` (decoded, when a tokenizer is given), ``exact`` and ``prefill_s`` / ``seconds``."""
    device = next(model.parameters()).device
    if cache is None:
        cache, cached = new_cache(model), 0
    if not 0 <= cached < len(prompt.input_ids):
        raise AttnSwapError(f"retrieval: {cached} cached tokens of a {len(prompt.input_ids)}-token prompt: the "
                            "cache must leave at least the prompt's last token to prefill")
    entry = CacheMark(cache)
    with_cache = {cache_argument(model): cache, "use_cache": True}
    last_only = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    start = time.perf_counter()
    try:
        ids = torch.tensor([prompt.input_ids[cached:]], device=device)
        last = model(input_ids=ids, **with_cache, **last_only).logits[0, -1].float().log_softmax(-1)
        prefill_s = time.perf_counter() - start
        mark = CacheMark(cache)
        rest = (_packed_continuations if _can_pack(model, cache) else _each_continuation)(
            model, prompt.candidate_ids, len(prompt.input_ids), with_cache, mark, device)
        hopeless = None
        if tokenizer is not None:
            def hopeless(tokens):  # the answer so far can no longer start with the value
                said = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                return bool(said) and not (prompt.value.startswith(said) or said.startswith(prompt.value))
        generated = _greedy(model, last, len(prompt.answer_ids), with_cache, last_only, device, hopeless)
    finally:
        entry.rewind()
    logprobs = [float(last[cand[0]].double() + more) for cand, more in zip(prompt.candidate_ids, rest)]
    true = logprobs[0]
    rank = 1 + sum(1 for lp in logprobs[1:] if lp >= true)
    count = len(logprobs)
    text = tokenizer.decode(generated, skip_special_tokens=True) if tokenizer is not None else None
    exact = (text.strip().startswith(prompt.value) if text is not None else generated == prompt.answer_ids)
    return {"logprobs": logprobs, "rank": rank, "graded": (count - rank) / (count - 1), "candidates": count,
            "generated_ids": generated, "generated": text, "exact": bool(exact), "prefill_s": prefill_s,
            "seconds": time.perf_counter() - start}


def score_haystack(model, prompts: Sequence[RetrievalPrompt], tokenizer=None,
                   on_scored: Callable[[RetrievalPrompt, dict], object] | None = None) -> list[dict]:
    """``score_prompt`` for prompts that share their tokens up to the fact (the depths of one haystack), the
    shared prefix prefilled once: shallowest fact first, the cache grows to each fact's start, each prompt is
    scored from there. Returns the results in the order given; ``on_scored(prompt, result)`` as each is measured
    (shallowest first). Each result's ``prefix_s`` is the time spent growing the prefix up to its fact."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: prompts[i].fact_start)
    for a, b in zip(order, order[1:]):
        first, then = prompts[a], prompts[b]
        if first.input_ids[:first.fact_start] != then.input_ids[:first.fact_start]:
            raise AttnSwapError("retrieval: these prompts do not share their text before the fact (a haystack's "
                                "depths come from build_prompt with the same context, trial and seed)")
    cache, cached = new_cache(model), 0
    with_cache = {cache_argument(model): cache, "use_cache": True}
    last_only = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    results: list[dict | None] = [None] * len(prompts)
    with torch.no_grad():
        for i in order:
            prompt = prompts[i]
            start = time.perf_counter()
            if prompt.fact_start > cached:
                grow = torch.tensor([prompt.input_ids[cached:prompt.fact_start]], device=device)
                model(input_ids=grow, **with_cache, **last_only)
                cached = prompt.fact_start
            prefix_s = time.perf_counter() - start
            scored = score_prompt(model, prompt, tokenizer, cache=cache, cached=cached)
            scored["prefix_s"] = prefix_s
            scored["seconds"] += prefix_s
            results[i] = scored
            if on_scored is not None:
                on_scored(prompt, scored)
    return results


def _can_pack(model, cache) -> bool:
    """Candidates go in one forward (a tree mask) on K/V caches of models whose attention takes a custom 4D mask;
    a running state (``StateCache``) cannot skip a sibling candidate's keys, so it takes them one by one."""
    if isinstance(cache, StateCache):
        return False
    try:
        return all(route == "interface" for _, _, route in find_attention(model))
    except AttnSwapError:
        return False


def _each_continuation(model, candidates, prefix_len, with_cache, mark, device) -> list[float]:
    """Per candidate, ``sum_{i>=1} log p(c_i | prompt, c_<i)``: one forward each from the prefix, rewound after."""
    out = []
    for cand in candidates:
        if len(cand) < 2:
            out.append(0.0)
            continue
        logits = model(input_ids=torch.tensor([cand[:-1]], device=device), **with_cache).logits[0]
        logp = logits.float().log_softmax(-1)
        out.append(float(logp[torch.arange(len(cand) - 1, device=device),
                              torch.tensor(cand[1:], device=device)].double().sum()))
        mark.rewind()
    return out


def _packed_continuations(model, candidates, prefix_len, with_cache, mark, device) -> list[float]:
    """The same sums from one forward: the candidates (but their last tokens) side by side after the prefix, each
    seeing the prefix and its own earlier tokens only (a 4D additive mask), at the positions it would have alone."""
    pieces = [cand[:-1] for cand in candidates]
    total = sum(len(p) for p in pieces)
    if total == 0:
        return [0.0] * len(candidates)
    dtype = next(model.parameters()).dtype
    mask = torch.full((total, prefix_len + total), torch.finfo(dtype).min, dtype=dtype, device=device)
    mask[:, :prefix_len] = 0
    positions, starts, at = [], [], 0
    for piece in pieces:
        n = len(piece)
        block = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        mask[at:at + n, prefix_len + at:prefix_len + at + n].masked_fill_(block, 0)
        positions += range(prefix_len, prefix_len + n)
        starts.append(at)
        at += n
    ids = torch.tensor([[t for piece in pieces for t in piece]], device=device)
    logits = model(input_ids=ids, attention_mask=mask[None, None],
                   position_ids=torch.tensor([positions], device=device), **with_cache).logits[0]
    mark.rewind()
    logp = logits.float().log_softmax(-1)
    out = []
    for cand, start in zip(candidates, starts):
        n = len(cand) - 1
        out.append(float(logp[torch.arange(start, start + n, device=device),
                              torch.tensor(cand[1:], device=device)].double().sum()) if n else 0.0)
    return out


def _greedy(model, last_logprobs, steps: int, with_cache: dict, last_only: dict, device, hopeless=None) -> list[int]:
    """Greedy tokens continuing the prefilled cache (the first from the prefill's last logits); stops early once
    ``hopeless(tokens)`` says they can no longer give the answer."""
    token = int(last_logprobs.argmax())
    out = [token]
    for _ in range(steps - 1):
        if hopeless is not None and hopeless(out):
            break
        logits = model(input_ids=torch.tensor([[token]], device=device), **with_cache, **last_only).logits
        token = int(logits[0, -1].argmax())
        out.append(token)
    return out


def retrieval_at_depth(model, tokenizer, *, contexts: Iterable[int] | None = None,
                       depths: Iterable[float] = DEFAULT_DEPTHS, trials: int = DEFAULT_TRIALS, seed: int = 0,
                       text: str | None = None, fact: str = "passkey", distractors: int = DEFAULT_DISTRACTORS,
                       digits: int = DEFAULT_DIGITS,
                       arms: dict[str, Callable[[], contextlib.AbstractContextManager]] | None = None,
                       on_record: Callable[[dict], object] | None = None,
                       progress: Callable[[int], object] | None = None) -> list[dict]:
    """One row per grid point and arm (context outer, then trial, then arm, then depth, shallowest first: one
    haystack's depths share their prefix, see the module doc).

    ``contexts`` default: ``DEFAULT_CONTEXTS`` up to the model's maximum (that maximum alone when all are above it);
    given ones above it are an error. ``text``: the filler (default: the offline corpus). ``arms``: {label: () ->
    context manager} (the model's own attention and swaps): each grid point's prompt is scored under every arm in
    turn; without ``arms`` the model is scored as it is (label None). ``on_record(row)`` as each row is measured
    (write it out: an interrupted run keeps what it measured), ``progress(points)`` after each haystack.
    """
    if contexts is None:
        contexts = default_contexts(model)
    contexts, depths = check_grid(contexts, depths, trials, limit=max_positions(model))
    if text is None:
        from .corpus import default_text

        text = default_text()
    filler_ids = _encode(tokenizer, text)
    run_arms = arms if arms is not None else {None: contextlib.nullcontext}
    was_training = model.training
    model.eval()
    rows = []
    try:
        for context in contexts:
            for trial in range(trials):
                haystack = [build_prompt(tokenizer, filler_ids, context=context, depth=depth, trial=trial, seed=seed,
                                         fact=fact, distractors=distractors, digits=digits) for depth in depths]
                for label, arm in run_arms.items():
                    def record(prompt, scored, label=label):
                        row = _row(label, prompt, scored, seed, fact)
                        rows.append(row)
                        if on_record is not None:
                            on_record(row)

                    with arm():
                        score_haystack(model, haystack, tokenizer, on_scored=record)
                if progress is not None:
                    progress(len(haystack))
    finally:
        model.train(was_training)
    return rows


def _row(label, prompt: RetrievalPrompt, scored: dict, seed: int, fact: str) -> dict:
    row = {"attention": label} if label is not None else {}
    row.update({
        "context": prompt.context, "depth": prompt.depth, "trial": prompt.trial, "seed": seed, "fact": fact,
        "value": prompt.value, "name": prompt.name, "fact_start": prompt.fact_start, "fact_end": prompt.fact_end,
        "prompt_tokens": len(prompt.input_ids), "filler_offset": prompt.filler_offset,
        "rank": scored["rank"], "candidates": scored["candidates"], "graded": scored["graded"],
        "exact": scored["exact"], "generated": scored["generated"], "true_logprob": scored["logprobs"][0],
        "distractor_logprobs": scored["logprobs"][1:], "prefill_s": scored["prefill_s"],
        "prefix_s": scored.get("prefix_s", 0.0), "seconds": scored["seconds"],
    })
    return row


def summarize(rows: Sequence[dict]) -> dict[str, dict]:
    """{attention: {"grid": {(context, depth): {"graded", "exact", "top1", "trials"}}, "contexts", "depths",
    "graded", "exact", "top1"}}: means over trials per cell, and over the whole grid."""
    out: dict[str, dict] = {}
    for row in rows:
        label = row.get("attention")
        entry = out.setdefault(label, {"cells": {}, "contexts": [], "depths": []})
        if row["context"] not in entry["contexts"]:
            entry["contexts"].append(row["context"])
        if row["depth"] not in entry["depths"]:
            entry["depths"].append(row["depth"])
        entry["cells"].setdefault((row["context"], row["depth"]), []).append(row)
    for entry in out.values():
        entry["contexts"].sort()
        entry["depths"].sort()
        cells = entry.pop("cells")
        entry["grid"] = {key: _means(group) for key, group in cells.items()}
        everything = [r for group in cells.values() for r in group]
        entry.update(_means(everything))
        entry["by_context"] = {c: _means([r for (cc, _), g in cells.items() if cc == c for r in g])
                               for c in entry["contexts"]}
    return out


def _means(rows: Sequence[dict]) -> dict:
    n = len(rows)
    return {"graded": sum(r["graded"] for r in rows) / n, "exact": sum(bool(r["exact"]) for r in rows) / n,
            "top1": sum(r["rank"] == 1 for r in rows) / n, "rank": sum(r["rank"] for r in rows) / n, "trials": n}
