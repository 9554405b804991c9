"""Build ``docstrings.jsonl``, the data of the offline lm-eval task ``attnswap_docstrings``.

    python attnswap/evals/tasks/make_docstrings.py      # rewrites docstrings.jsonl next to this file

Each item is one prose sentence from a Python standard-library docstring, cut in two: the model reads the first
part (``context``) and scores four continuations (``choices``): the sentence's own ending (``label``) and the
endings of three other sentences. Deterministic: a fixed module list, a fixed order and a seeded RNG; the
docstrings (hence the file) depend on the Python version, so the file is generated once and shipped.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
import sys
from pathlib import Path

MODULES = (
    "argparse", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal", "functools", "heapq",
    "inspect", "itertools", "json", "logging", "os", "pathlib", "pickle", "random", "re", "shutil", "socket",
    "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest", "zipfile",
)
N_ITEMS = 120
SEED = 1234
OUT = Path(__file__).with_name("docstrings.jsonl")

_PROSE = re.compile(r"^[A-Z][A-Za-z ,;'\-]+\.$")  # plain English: no code, digits, brackets or quotes


def docstrings() -> list[str]:
    seen, out = set(), []
    for name in MODULES:
        module = importlib.import_module(name)
        objs = [module] + [o for n, o in sorted(vars(module).items()) if not n.startswith("_")
                           and (inspect.isclass(o) or inspect.isfunction(o))
                           and getattr(o, "__module__", "") == module.__name__]
        for obj in objs:
            doc = inspect.getdoc(obj)
            if doc and doc not in seen:
                seen.add(doc)
                out.append(doc)
    return out


def sentences() -> list[str]:
    seen, out = set(), []
    for doc in docstrings():
        for para in doc.split("\n\n"):
            text = " ".join(para.split())
            for sent in re.split(r"(?<=\.)\s+", text):
                words = sent.split()
                if 10 <= len(words) <= 30 and _PROSE.match(sent) and sent not in seen:
                    seen.add(sent)
                    out.append(sent)
    return out


def items() -> list[dict]:
    rng = random.Random(SEED)
    pool = sentences()
    rng.shuffle(pool)
    cut = []
    for sent in pool:
        words = sent.split()
        k = max(5, len(words) // 2)
        cut.append((" ".join(words[:k]), " ".join(words[k:k + 8])))  # endings of at most 8 words
    out = []
    for i, (context, ending) in enumerate(cut[:N_ITEMS]):
        others = [e for j, (_, e) in enumerate(cut) if j != i and e != ending]
        choices = rng.sample(others, 3)
        label = rng.randrange(4)
        choices.insert(label, ending)
        out.append({"id": i, "context": context, "choices": choices, "label": label})
    return out


def main() -> None:
    rows = items()
    if len(rows) < N_ITEMS:
        sys.exit(f"only {len(rows)} items; need {N_ITEMS}")
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} items to {OUT} (Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
