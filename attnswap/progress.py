"""Progress bars (tqdm when installed), for the evaluation runs and the fits."""

from __future__ import annotations


def progress_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar (disabled when not ``enabled``), or None without tqdm."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, disable=not enabled)
