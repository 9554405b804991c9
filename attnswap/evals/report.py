"""Results on disk as they are measured, and tables for the terminal and Markdown.

    writer = ResultsWriter("runs/smollm2")
    writer.add("latency", record)          # results.json rewritten, one line appended to results.jsonl
    print(format_table(rows, [("kind", "attention", None), ("ppl", "perplexity", ".3f")]))
    writer.write_markdown("SmolLM2-135M", {"Perplexity": (rows, columns)})

A column is ``(key, header, fmt)`` (or ``(key, header)``): ``key`` a record key or a function of the row;
``fmt`` a format spec (``".3f"``, ``",d"``, ``".2%"``), a function of the value returning a string, or
``None`` (floats get 4 significant digits). Missing or ``None`` values show as ``-`` (terminal) / ``—``
(Markdown); NaN as ``nan``. Numeric columns are right-aligned.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["ResultsWriter", "format_table", "markdown_table", "to_jsonable"]

Column = tuple  # (key, header) or (key, header, fmt)


class ResultsWriter:
    """Writes every record as soon as it is added, so an interrupted run keeps what it measured.

    ``out_dir/results.json``: ``{section: [record, ...], ...}``, rewritten atomically (temporary file, then
    rename) after each ``add``. ``out_dir/results.jsonl``: one line ``{"section": ..., "record": {...}}`` per
    ``add``, appended. NaN and infinities are written as ``null``; tensors, numpy values, paths and dataclasses
    are converted. With ``resume=False`` (the default) earlier files in ``out_dir`` are replaced; with
    ``resume=True`` their records are loaded and kept.
    """

    def __init__(self, out_dir: str | os.PathLike, *, resume: bool = False):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.json_path = self.out_dir / "results.json"
        self.jsonl_path = self.out_dir / "results.jsonl"
        self.markdown_path = self.out_dir / "results.md"
        self.sections: dict[str, list[dict]] = {}
        if resume and self.json_path.exists():
            loaded = json.loads(self.json_path.read_text(encoding="utf-8"))
            self.sections = {str(k): list(v) for k, v in loaded.items()}
        elif not resume:
            self.jsonl_path.write_text("", encoding="utf-8")
            self._write_json()

    def add(self, section: str, record: Mapping[str, Any]) -> dict:
        """Appends ``record`` to ``section``; returns the record as written (JSON-safe)."""
        clean = to_jsonable(dict(record))
        self.sections.setdefault(section, []).append(clean)
        self._write_json()
        with open(self.jsonl_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"section": section, "record": clean}, allow_nan=False) + "\n")
            f.flush()
        return clean

    def records(self, section: str) -> list[dict]:
        return list(self.sections.get(section, []))

    def write_markdown(self, title: str, tables: Mapping[str, Any] | Sequence[tuple[str, Any]],
                       notes: str | None = None) -> Path:
        """``out_dir/results.md``: ``# title``, ``notes``, then per table ``## heading`` and the table.

        ``tables`` maps headings (or is a sequence of ``(heading, table)`` pairs) to either ready Markdown text
        or ``(rows, columns)``, rendered with :func:`markdown_table`.
        """
        items = tables.items() if isinstance(tables, Mapping) else tables
        parts = [f"# {title}", ""]
        if notes:
            parts += [notes.strip(), ""]
        for heading, table in items:
            if not isinstance(table, str):
                rows, columns = table
                table = markdown_table(rows, columns)
            parts += [f"## {heading}", "", table.rstrip("\n"), ""]
        _atomic_write(self.markdown_path, "\n".join(parts))
        return self.markdown_path

    def _write_json(self):
        _atomic_write(self.json_path, json.dumps(self.sections, indent=2, allow_nan=False) + "\n")


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """An aligned plain-text table: header, a rule of dashes, one line per row (two spaces between columns)."""
    header, body, numeric = _cells(rows, columns, missing="-")
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in body])


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """The same table as GitHub Markdown (numeric columns right-aligned, ``|`` in cells escaped)."""
    header, body, numeric = _cells(rows, columns, missing="—")

    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    rule = "|" + "|".join("---:" if num else "---" for num in numeric) + "|"
    return "\n".join([line(header), rule] + [line(r) for r in body])


def _cells(rows, columns, missing):
    columns = [tuple(c) + (None,) * (3 - len(c)) for c in columns]
    if any(len(c) != 3 for c in columns):
        raise ValueError("a column is (key, header) or (key, header, fmt)")
    header = [str(h) for _, h, _ in columns]
    body = []
    seen_value = [False] * len(columns)
    all_numeric = [True] * len(columns)
    for row in rows:
        cells = []
        for i, (key, _, fmt) in enumerate(columns):
            value = key(row) if callable(key) else row.get(key)
            if value is not None:
                seen_value[i] = True
                all_numeric[i] &= _is_number(value)
            cells.append(_format(value, fmt, missing))
        body.append(cells)
    numeric = [s and a for s, a in zip(seen_value, all_numeric)]
    return header, body, numeric


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) or _numpy_number(value)


def _numpy_number(value) -> bool:
    return type(value).__module__ == "numpy" and hasattr(value, "dtype") and value.dtype.kind in "iuf"


def _format(value, fmt, missing) -> str:
    if value is None:
        return missing
    if callable(fmt):
        return str(fmt(value))
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if fmt:
        try:
            return format(value, fmt)
        except (ValueError, TypeError):
            return str(value)
    if isinstance(value, float):
        return format(value, ".4g")
    return str(value)


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types: NaN/inf → ``None``, tensors and numpy values → lists / numbers, dataclasses → dicts,
    paths and other objects → ``str``."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "tolist") and callable(obj.tolist):  # torch tensors, numpy arrays and scalars
        try:
            return to_jsonable(obj.tolist())
        except Exception:  # noqa: BLE001
            pass
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def _atomic_write(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
