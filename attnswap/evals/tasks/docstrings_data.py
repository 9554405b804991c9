"""Loader of the ``attnswap_docstrings`` task: the shipped ``docstrings.jsonl`` as a ``datasets.DatasetDict``.

lm-eval calls ``load(**metadata, **dataset_kwargs)`` (the YAML's ``custom_dataset``); nothing is downloaded and
nothing is written to the datasets cache, so it works with ``HF_DATASETS_OFFLINE=1``.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).with_name("docstrings.jsonl")


def rows() -> list[dict]:
    with DATA.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load(**_ignored):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows())})
