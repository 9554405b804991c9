"""lm-eval tasks that ship with attnswap (data included, offline). ``TASK_DIR`` is what ``--include_path`` gets."""

from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent
TASKS = ("attnswap_docstrings",)
