"""Text to evaluate on. The offline default is English prose every machine has: the docstrings of a fixed list
of Python standard-library modules, in a fixed order."""

from __future__ import annotations

import importlib
import inspect

DEFAULT_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal", "email",
    "functools", "heapq", "http.client", "inspect", "itertools", "json", "logging", "os", "pathlib", "pickle",
    "random", "re", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap",
    "threading", "typing", "unittest", "urllib.request", "zipfile",
)


def stdlib_docstrings(modules=DEFAULT_MODULES, min_chars: int = 200) -> list[str]:
    """Module, class and function docstrings (at least ``min_chars`` long), deduplicated, in a fixed order."""
    seen, docs = set(), []
    for name in modules:
        module = importlib.import_module(name)
        items = [module] + [obj for _, obj in sorted(vars(module).items())
                            if not _.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
                            and getattr(obj, "__module__", "") == module.__name__]
        for obj in items:
            doc = inspect.getdoc(obj)
            if doc and len(doc) >= min_chars and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return docs


def default_text(max_chars: int | None = None) -> str:
    text = "\n\n".join(stdlib_docstrings())
    return text[:max_chars] if max_chars else text
