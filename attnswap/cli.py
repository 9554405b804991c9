"""The ``attnswap`` command."""

from __future__ import annotations

import argparse
import json
import sys


def parse_attn_spec(spec: str) -> list[tuple[str, dict]]:
    """``"softmax,topk:k=64,entmax:alpha=1.5"`` -> [("softmax", {}), ("topk", {"k": 64}), ...]."""
    from .errors import AttnSwapError

    kinds = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, rest = item.partition(":")
        options = {}
        for pair in filter(None, rest.split(":")):
            key, eq, value = pair.partition("=")
            if not eq or not key:
                raise AttnSwapError(f"malformed attention spec {item!r}: options are written kind:name=value")
            options[key] = _number(value)
        kinds.append((name, options))
    if not kinds:
        raise AttnSwapError(f"empty attention spec {spec!r}; e.g. softmax,topk:k=64,entmax:alpha=1.5")
    return kinds


def _number(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


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


def cmd_demo(args) -> int:
    import time

    import torch

    from . import swapped
    from .default_model import load_default_model
    from .evals.corpus import default_text
    from .evals.perplexity import perplexity

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tokenizer = load_default_model()
    print(f"SmolLM2-135M-Instruct loaded in {time.perf_counter() - t0:.1f}s "
          f"({model.config.num_hidden_layers} layers, {model.config.num_attention_heads} heads, "
          f"{model.config.num_key_value_heads} KV heads)")
    ids = tokenizer(default_text(), return_tensors="pt").input_ids[:, : args.max_tokens]
    print(f"text: Python standard-library docstrings, {ids.shape[1]} tokens, windows of {args.max_length}")
    rows = [("model's own (sdpa)", {}, None)]
    rows += [(name + "".join(f" {k}={v}" for k, v in opts.items()), opts, name) for name, opts in
             parse_attn_spec(args.attn)]
    base = None
    print(f"{'attention':24s} {'ppl':>10s} {'vs own':>8s} {'seconds':>8s}")
    for label, opts, name in rows:
        if name is None:
            result = perplexity(model, ids, max_length=args.max_length)
        else:
            with swapped(model, name, **opts):
                result = perplexity(model, ids, max_length=args.max_length)
        base = base or result.ppl
        print(f"{label:24s} {result.ppl:10.3f} {result.ppl / base:7.3f}x {result.seconds:8.1f}", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="attnswap", description="Swap the attention of Hugging Face models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("kinds", help="list the attention kinds and their options")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_kinds)
    p = sub.add_parser("demo", help="perplexity of every kind on SmolLM2-135M (offline)")
    p.add_argument("--attn", default="softmax,topk:k=64,entmax:alpha=1.5,sparsemax,linear,taylor")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--max-length", type=int, default=512)
    p.set_defaults(fn=cmd_demo)
    args = parser.parse_args(argv)
    from .errors import AttnSwapError

    try:
        return args.fn(args)
    except AttnSwapError as err:
        print(f"attnswap: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
