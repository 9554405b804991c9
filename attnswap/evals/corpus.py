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


def stdlib_docstrings(modules=DEFAULT_MODULES, min_chars: int = 200, *, methods: bool = False,
                      exclude=()) -> list[str]:
    """Module, class and function docstrings (at least ``min_chars`` long; with ``methods``, the docstrings of the
    classes' functions too), deduplicated and without those in ``exclude``, in a fixed order. Modules that do not
    import here are skipped."""
    seen, docs = set(exclude), []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for obj in _documented(module, methods):
            doc = inspect.getdoc(obj)
            if doc and len(doc) >= min_chars and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return docs


def _documented(module, methods: bool) -> list:
    items = [module]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", "") != module.__name__:
            continue
        if inspect.isfunction(obj):
            items.append(obj)
        elif inspect.isclass(obj):
            items.append(obj)
            if methods:
                items += [f for n, f in sorted(vars(obj).items()) if not n.startswith("_") and inspect.isfunction(f)]
    return items


def default_text(max_chars: int | None = None) -> str:
    text = "\n\n".join(stdlib_docstrings())
    return text[:max_chars] if max_chars else text


CALIBRATION_CHARS = 30_000


def calibration_text(max_chars: int = CALIBRATION_CHARS) -> str:
    """The last ``max_chars`` characters of the default corpus: text for calibration and attention transfer,
    disjoint from the evaluation text, which is read from the start (as long as it is shorter than the rest)."""
    text = default_text()
    return text[-max_chars:]


def fit_and_scored(eval_text: str, eval_source: str, fit_text: str | None = None, fit_source: str | None = None,
                   *, default_eval: bool = False) -> tuple[str, str, str, str]:
    """(text to score, its description, text to fit on, its description), disjoint. ``fit_text`` None: the offline
    calibration text (``calibration_text``), cut off the scored text when that is the default corpus
    (``default_eval``); ``fit_text`` equal to ``eval_text`` (one file for both): its last ``CALIBRATION_CHARS``
    characters fit (its last half when shorter than twice that) and the rest is scored."""
    from ..errors import AttnSwapError

    if fit_text is None:
        fit = calibration_text()
        scored = eval_text[:-len(fit)] if default_eval and eval_text.endswith(fit) else eval_text
        return scored, eval_source, fit, f"the last {len(fit)} characters of the offline corpus"
    if fit_text == eval_text:
        cut = CALIBRATION_CHARS if len(eval_text) >= 2 * CALIBRATION_CHARS else len(eval_text) // 2
        if cut == 0:
            raise AttnSwapError("the text to fit on and score is empty")
        return (eval_text[:-cut], f"{eval_source} less its last {cut} characters", eval_text[-cut:],
                f"the last {cut} characters of {eval_source}")
    if fit_text in eval_text or eval_text in fit_text:
        raise AttnSwapError("the fit text and the scored text overlap (one holds the other): give disjoint texts, "
                            "or the same file for both to split it")
    return eval_text, eval_source, fit_text, fit_source or "the fit text"


FINETUNE_CHARS = 120_000
# More of the standard library, for fine-tuning text disjoint from the evaluation corpus (those that import)
FINETUNE_MODULES = DEFAULT_MODULES + (
    "abc", "ast", "base64", "bisect", "calendar", "cmd", "codecs", "concurrent.futures", "configparser", "copy",
    "difflib", "dis", "doctest", "email.message", "email.utils", "enum", "filecmp", "fileinput", "fnmatch",
    "fractions", "ftplib", "getopt", "gettext", "glob", "gzip", "hashlib", "hmac", "html.parser", "http.cookiejar",
    "http.cookies", "http.server", "imaplib", "importlib.metadata", "importlib.resources", "ipaddress", "locale",
    "logging.handlers", "mailbox", "mimetypes", "multiprocessing", "netrc", "numbers", "operator", "optparse",
    "pdb", "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile", "pstats", "pydoc", "queue", "reprlib",
    "runpy", "sched", "secrets", "selectors", "shelve", "shlex", "smtplib", "socketserver", "tempfile", "timeit",
    "tokenize", "tomllib", "trace", "traceback", "types", "unittest.mock", "urllib.parse", "urllib.robotparser",
    "uuid", "warnings", "wave", "weakref", "wsgiref.handlers", "xml.dom.minidom", "xml.etree.ElementTree",
    "xml.sax", "xmlrpc.client", "zipapp", "zoneinfo",
)


def finetune_text(max_chars: int | None = None) -> str:
    """English prose for LoRA fine-tuning, disjoint from the first 8192 tokens ``attnswap eval`` scores by default:
    the default corpus's last ``FINETUNE_CHARS`` characters, then the docstrings of more of the standard library
    (classes' methods included) that the evaluation corpus does not hold, then the Python reference's topics
    (``pydoc_data``, where installed). About a million characters on CPython 3.11; ``max_chars`` keeps its start."""
    parts = [calibration_text(FINETUNE_CHARS)]
    parts += stdlib_docstrings(FINETUNE_MODULES, methods=True, exclude=stdlib_docstrings())
    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = {}
    parts += [topics[key] for key in sorted(topics)]
    text = "\n\n".join(parts)
    return text[:max_chars] if max_chars else text


def load_text(text_file: str | None = None, dataset: str | None = None) -> tuple[str, str]:
    """(text, description) from a file, a ``datasets`` name ``name[:config[:split]]`` (e.g.
    ``wikitext:wikitext-2-raw-v1:test``, used when reachable or cached), or the offline default corpus."""
    from pathlib import Path

    from ..errors import AttnSwapError

    if text_file and dataset:
        raise AttnSwapError("give either a text file or a dataset, not both")
    if text_file:
        path = Path(text_file)
        if not path.is_file():
            raise AttnSwapError(f"text file not found: {text_file}")
        return path.read_text(encoding="utf-8", errors="replace"), f"file {path.name}"
    if dataset:
        parts = dataset.split(":")
        if len(parts) > 3 or not parts[0]:
            raise AttnSwapError(f"malformed dataset {dataset!r}; write name[:config[:split]], "
                                "e.g. wikitext:wikitext-2-raw-v1:test")
        name, config, split = (parts + [None, None])[:3]
        try:
            import datasets
        except ImportError:
            raise AttnSwapError("datasets is not installed: pip install 'attnswap[eval]'") from None
        try:
            data = datasets.load_dataset(name, config or None, split=split or "test")
        except Exception as err:  # unknown name, no network and not cached, bad split, ...
            raise AttnSwapError(f"could not load dataset {dataset!r}: {type(err).__name__}: {err}; "
                                "pass --text-file or use the default corpus") from None
        column = "text" if "text" in data.column_names else data.column_names[0]
        return "\n\n".join(str(t) for t in data[column]), f"dataset {dataset}"
    return default_text(), "Python standard-library docstrings"
