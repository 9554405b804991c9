"""How much of a pretrained model a feature-map swap gets back, and for how many fine-tuning steps: the model's own
perplexity, the raw swap's, after attention transfer, then after LoRA fine-tuning (``attnswap.finetune``, default
recipe) for each step count asked, every run starting again from the same transferred swap.

    python benchmarks/lora_recovery.py [--attn linear:feature_map=hedgehog] [--lora-steps 200,1000] [--device cuda]

Default model SmolLM2-135M; perplexity of the first ``--eval-tokens`` tokens of the offline corpus in windows of
``--window``; transfer on the calibration text; fine-tuning on the offline fine-tuning text (disjoint from the
evaluated text). The texts come from the running Python's standard-library docstrings, which differ between Python
versions: ``--dump-texts DIR`` writes the three texts here, ``--texts DIR`` reads them on another machine, so that
its figures are comparable. One JSON line per row in ``benchmarks/results/<device>.jsonl`` (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import attnswap
from attnswap.adapt.finetune import finetune
from attnswap.adapt.transfer import transfer
from attnswap.evals import runner
from attnswap.evals.corpus import calibration_text, default_text, finetune_text
from attnswap.evals.perplexity import perplexity
from attnswap.evals.specs import parse_attn
from common import device_label, record

TEXTS = {"eval": default_text, "calibration": calibration_text, "finetune": finetune_text}


def load_texts(folder: str | None) -> dict:
    if folder is None:
        return {name: make() for name, make in TEXTS.items()}
    return {name: (Path(folder) / f"{name}.txt").read_text() for name in TEXTS}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--attn", default="linear:feature_map=hedgehog", help="one kind with its options")
    ap.add_argument("--model", default=None, help="a Hugging Face model folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--lora-steps", default="200", help="comma-separated LoRA step counts, one run each")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--transfer-steps", type=int, default=None, help="Adam steps per layer (default: transfer's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--texts", default=None, help="read eval/calibration/finetune.txt from this folder")
    ap.add_argument("--dump-texts", default=None, help="write this Python's three texts to this folder and stop")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    if args.dump_texts:
        Path(args.dump_texts).mkdir(parents=True, exist_ok=True)
        for name, text in load_texts(None).items():
            (Path(args.dump_texts) / f"{name}.txt").write_text(text)
        print(f"wrote {', '.join(TEXTS)} texts to {args.dump_texts}")
        return []
    spec = parse_attn(args.attn)[0]
    texts = load_texts(args.texts)
    model, tokenizer = runner.load_model(args.model, dtype=args.dtype, device=args.device)
    ids = {name: runner.tokenize(tokenizer, text) for name, text in texts.items()}
    evaluated = ids["eval"][:, : args.eval_tokens]
    device = device_label(args.device)
    common = dict(bench="lora_recovery", attn=args.attn, device=device, dtype=args.dtype, window=args.window,
                  eval_tokens=int(evaluated.shape[1]), torch=torch.__version__, texts=args.texts or "this Python's")

    def ppl() -> float:
        return perplexity(model, evaluated, max_length=args.window).ppl

    rows = []

    def row(stage: str, value: float, own: float, **fields) -> None:
        rows.append(record(device, out_dir=args.out, **common, stage=stage, ppl=value, vs_own=value / own, **fields))
        extra = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        print(f"{stage:>14}: perplexity {value:9.3f}  ({value / own:6.2f}x own)  {extra}", flush=True)

    own = ppl()
    row("own", own, own)
    with attnswap.swapped(model, spec.kind, **spec.options):
        row("raw", ppl(), own)
    start = time.perf_counter()
    settings = {"steps": args.transfer_steps} if args.transfer_steps else {}
    handle = transfer(model, spec.kind, ids["calibration"], window=args.window, progress=True, **settings,
                      **spec.options)
    row("transfer", ppl(), own, seconds=time.perf_counter() - start, tokens=handle.transfer["tokens"],
        steps_per_layer=handle.transfer["steps"])
    with tempfile.TemporaryDirectory() as saved:
        attnswap.save_swap(model, saved)
        for steps in (int(s) for s in args.lora_steps.split(",")):
            attnswap.restore_attention(model)
            attnswap.load_swap(model, saved)
            report = finetune(model, ids["finetune"], window=args.window, steps=steps, progress=True).finetune
            row(f"lora {steps}", ppl(), own, seconds=report["seconds"], steps=steps, tokens=report["tokens"],
                windows=report["windows"], lr=report["lr"], objective=report["objective"],
                loss_first=report["loss_first"], loss_last=report["loss_last"],
                loss_curve_every_10=report["loss_curve"][::10])
    attnswap.restore_attention(model)
    return rows


if __name__ == "__main__":
    main()
