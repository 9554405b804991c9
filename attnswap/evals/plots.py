"""Figures for the evaluation results, written straight to files (PNG, SVG, PDF, ... by the path's suffix).

Built on ``matplotlib.figure.Figure`` with the Agg canvas, never ``pyplot``: no window ever opens and the
global matplotlib backend is left alone. Every function creates the parent folder, returns the path written,
and copes with NaN, ``None`` and missing data (a grey cell, a gap, an "n/a" bar, or a "no data" note).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator

__all__ = ["entropy_heatmap", "entropy_heatmaps", "focus_plot", "grid_heatmaps", "latency_plot", "perplexity_plot"]

_CMAP = "viridis"
_DPI = 120


def entropy_heatmap(matrix, title: str, path: str | os.PathLike, *, metric_name: str = "entropy",
                    vmin: float | None = None, vmax: float | None = None, cmap: str = _CMAP,
                    annotate: bool | None = None) -> Path:
    """One heatmap of a (layers × heads) matrix: layer on y (layer 0 at the top), head on x, a colour bar.

    ``matrix``: tensor, array or (possibly ragged) nested lists; NaN / ``None`` cells are grey. ``annotate``
    writes the values in the cells (default: when there are at most 64 cells).
    """
    return entropy_heatmaps({title: matrix}, path, metric_name, vmin=vmin, vmax=vmax, cmap=cmap,
                            annotate=annotate, panel_titles=True, title=None)


def _heatmap_panels(mats: Mapping[str, np.ndarray], path, *, panel_size, decorate, metric_name: str,
                    title: str | None, vmin: float | None, vmax: float | None, cmap: str) -> Path:
    """The panel grid both heatmap plots share: one panel per matrix (up to 4 per row), one colour scale (from the
    finite values of all panels unless ``vmin`` / ``vmax`` are given), NaN cells grey, one colour bar labelled
    ``metric_name``; ``decorate(ax, name, m, norm)`` labels each drawn panel; ``panel_size`` (width, height) in
    inches."""
    finite = np.concatenate([m[np.isfinite(m)] for m in mats.values()] or [np.empty(0)])
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    norm = Normalize(lo, hi)
    n = max(len(mats), 1)
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    panel_w, panel_h = panel_size
    fig = Figure(figsize=(ncols * panel_w + 1.2, nrows * panel_h + (0.5 if title else 0.2)), dpi=_DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    colormap = _cmap_with_bad(cmap)
    image = None
    for ax, (name, m) in zip(axes.flat, mats.items()):
        if m.size == 0:
            _no_data(ax, name)
            continue
        image = ax.imshow(np.ma.masked_invalid(m), cmap=colormap, norm=norm, aspect="auto",
                          interpolation="nearest", origin="upper")
        decorate(ax, name, m, norm)
    for ax in list(axes.flat)[len(mats):]:
        if not mats:
            _no_data(ax, title or metric_name)
        else:
            ax.set_axis_off()
    if image is not None:  # no colour bar when nothing was drawn
        fig.colorbar(image, ax=axes.ravel().tolist(), label=metric_name, shrink=0.9)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _write_values(ax, m, norm, fmt: str) -> None:
    """Each cell's value in the cell (``n/a`` for NaN), dark on light cells and light on dark ones."""
    for (i, j), v in np.ndenumerate(m):
        text = "n/a" if not np.isfinite(v) else format(v, fmt)
        shade = norm(v) if np.isfinite(v) else 0.0
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="black" if shade > 0.55 else "white")


def entropy_heatmaps(stats_by_kind: Mapping[str, Any], path: str | os.PathLike, metric_name: str = "entropy", *,
                     title: str | None = None, vmin: float | None = None, vmax: float | None = None,
                     cmap: str = _CMAP, annotate: bool | None = None, panel_titles: bool = True) -> Path:
    """One panel per kind (up to 4 per row), all on one colour scale (from the finite values of all panels
    unless ``vmin`` / ``vmax`` are given), one shared colour bar labelled ``metric_name``."""
    mats = {str(k): _as_matrix(v) for k, v in stats_by_kind.items()}
    shapes = [m.shape for m in mats.values()] or [(1, 1)]
    max_l = max(max(s[0] for s in shapes), 1)
    max_h = max(max(s[1] for s in shapes), 1)
    cell = min(0.45, 4.0 / max(max_l, max_h))  # inches per cell, panels between ~2.5 and ~4.5 inches

    def decorate(ax, name, m, norm):
        if panel_titles:
            ax.set_title(name, fontsize=10)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=min(m.shape[1], 12), integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=min(m.shape[0], 16), integer=True))
        if annotate if annotate is not None else m.size <= 64:
            _write_values(ax, m, norm, ".2g")

    size = (min(max(2.6, max_h * cell + 1.0), 5.0), min(max(2.4, max_l * cell + 0.9), 6.0))
    return _heatmap_panels(mats, path, panel_size=size, decorate=decorate, metric_name=metric_name, title=title,
                           vmin=vmin, vmax=vmax, cmap=cmap)


def _context_axis(ax) -> None:
    """A log2 x axis of context lengths, ticked at the lengths plotted, labelled as plain numbers."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(_ContextLocator())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))


def latency_plot(records_by_kind: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike, *,
                 title: str | None = None, log_y: bool | str = "auto") -> Path:
    """Prefill time (ms) and decode throughput (tokens/s) against context length (log₂ x axis), one line per
    kind (per kind and batch size when there are several batch sizes). Records with ``error`` or without a
    value are left out; the legend counts the failed ones. ``log_y="auto"``: a log y axis on a panel whose
    values span more than 20×."""
    fig = Figure(figsize=(11, 4.2), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax_pre, ax_dec = fig.subplots(1, 2)
    batches = {r.get("batch") for recs in records_by_kind.values() for r in recs}
    specs = [(ax_pre, "prefill_ms", "prefill time (ms)", "prefill"),
             (ax_dec, "decode_tok_s", "decode throughput (tokens/s)", "decode")]
    for ax, key, ylabel, name in specs:
        drawn, span = False, []
        for idx, (kind, recs) in enumerate(records_by_kind.items()):
            for batch in sorted({r.get("batch") for r in recs}, key=lambda b: (b is None, b or 0)):
                rows = [r for r in recs if r.get("batch") == batch]
                points = sorted((r["context"], _num(r.get(key))) for r in rows
                                if not r.get("error") and _num(r.get("context")) > 0)
                points = [(x, y) for x, y in points if math.isfinite(y) and y > 0]
                failed = sum(1 for r in rows if r.get("error"))
                label = str(kind) + (f" (batch {batch})" if len(batches) > 1 else "")
                if failed:
                    label += f" — {failed} failed"
                if not points:
                    if failed:  # keep the kind in the legend
                        ax.plot([], [], marker="x", linestyle="none", color=f"C{idx % 10}", label=label)
                    continue
                xs, ys = zip(*points)
                span += ys
                ax.plot(xs, ys, marker="o", color=f"C{idx % 10}", label=label,
                        linestyle=["-", "--", ":", "-."][sorted(batches, key=str).index(batch) % 4])
                drawn = True
        if drawn:
            _context_axis(ax)
            ax.legend(fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
            if log_y is True or (log_y == "auto" and max(span) > 20 * min(span)):
                ax.set_yscale("log")
        else:
            _no_data(ax)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(name)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def perplexity_plot(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, baseline: float | None = None, *,
                    title: str | None = None, label_key: str = "label", ylabel: str = "perplexity") -> Path:
    """Bars of ``ppl`` per row (label: the row's ``label_key`` if present, else ``kind``), log y axis, values
    written on the bars, a dashed line at ``baseline`` (e.g. the model's own attention). Rows without a finite
    positive ``ppl`` get an "n/a" mark in place of a bar."""
    labels = [str(r.get(label_key) or r.get("kind", "?")) for r in rows]
    values = [_num(r.get("ppl")) for r in rows]
    good = [v for v in values if math.isfinite(v) and v > 0]
    base = _num(baseline)
    fig = Figure(figsize=(max(4.5, 0.9 * len(rows) + 1.5), 4.2), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if not good:
        _no_data(ax)
    else:
        refs = good + ([base] if math.isfinite(base) and base > 0 else [])
        lo, hi = min(refs), max(refs)
        floor = lo / 2 if lo > 0 else 1e-3
        ax.set_yscale("log")
        ax.set_ylim(floor, hi * 3)
        xs = np.arange(len(rows))
        for x, v in zip(xs, values):
            if math.isfinite(v) and v > 0:
                ax.bar(x, v - floor, bottom=floor, color="C0", width=0.7)
                ax.text(x, v * 1.08, f"{v:.4g}", ha="center", va="bottom", fontsize=8)
            else:
                ax.text(x, floor * 1.15, "n/a", ha="center", va="bottom", fontsize=8, color="C3")
        ax.set_xticks(xs, labels, rotation=30 if max(map(len, labels), default=0) > 8 else 0, ha="right"
                      if max(map(len, labels), default=0) > 8 else "center")
        if math.isfinite(base) and base > 0:
            ax.axhline(base, color="C3", linestyle="--", linewidth=1.2, label=f"baseline {base:.4g}")
            ax.legend(fontsize=8, loc="upper left")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.set_ylabel(ylabel + " (log scale)")
    ax.set_title(title or "perplexity by attention kind")
    return _save(fig, path)


def grid_heatmaps(grids: Mapping[str, Any], path: str | os.PathLike, *, row_labels: Sequence[Any],
                  col_labels: Sequence[Any], ylabel: str, xlabel: str, metric_name: str,
                  vmin: float | None = 0.0, vmax: float | None = 1.0, title: str | None = None,
                  cmap: str = _CMAP) -> Path:
    """One (rows x columns) heatmap per label (up to 4 per row), one colour scale, values written in the cells:
    e.g. retrieval score per context length (rows) and depth (columns). NaN / ``None`` cells are grey."""
    mats = {str(k): _as_matrix(v) for k, v in grids.items()}

    def decorate(ax, name, m, norm):
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(m.shape[1]), [str(c) for c in col_labels][:m.shape[1]])
        ax.set_yticks(range(m.shape[0]), [str(r) for r in row_labels][:m.shape[0]])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        _write_values(ax, m, norm, ".2f")

    size = (min(max(2.8, 0.6 * len(col_labels) + 1.4), 6.0), min(max(2.4, 0.45 * len(row_labels) + 1.0), 6.0))
    return _heatmap_panels(mats, path, panel_size=size, decorate=decorate, metric_name=metric_name, title=title,
                           vmin=vmin, vmax=vmax, cmap=cmap)


_FOCUS_LABELS = {"entropy": "entropy (nats)", "normalized_entropy": "normalized entropy", "gini": "Gini",
                 "max_weight": "max weight", "effective_tokens": "effective tokens",
                 "sparsity": "fraction of exact zeros"}


def focus_plot(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
               metrics: Sequence[str] = ("entropy", "normalized_entropy", "effective_tokens", "max_weight",
                                         "sparsity"), title: str | None = None) -> Path:
    """Each statistic (mean over layers, heads and queries) against context length N (log2 x axis), one panel per
    statistic, one line per attention (rows: ``attention``, ``context`` and the metric values)."""
    labels = list(dict.fromkeys(str(r.get("attention")) for r in rows))
    fig = Figure(figsize=(4.0 * min(len(metrics), 3) + 0.6, 3.4 * math.ceil(len(metrics) / 3)), dpi=_DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(math.ceil(len(metrics) / 3), min(len(metrics), 3), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        drawn = False
        for idx, label in enumerate(labels):
            points = sorted((_num(r.get("context")), _num(r.get(metric))) for r in rows
                            if str(r.get("attention")) == label)
            points = [(x, y) for x, y in points if math.isfinite(x) and x > 0 and math.isfinite(y)]
            if not points:
                continue
            xs, ys = zip(*points)
            if label == "model's own":  # hollow and on top: visible where softmax (equal to it) lies beneath
                ax.plot(xs, ys, marker="o", markersize=9, markerfacecolor="none", linestyle="--", linewidth=2,
                        color=f"C{idx % 10}", label=label, zorder=3)
            else:
                ax.plot(xs, ys, marker="o", color=f"C{idx % 10}", label=label)
            drawn = True
        if drawn:
            _context_axis(ax)
            if metric == "effective_tokens":  # 7 for top-k beside thousands for linear: both readable
                ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        else:
            _no_data(ax)
        ax.set_xlabel("context length N (tokens, log scale)")
        ax.set_ylabel(_FOCUS_LABELS.get(metric, metric) + (" (log scale)" if metric == "effective_tokens" else ""))
        ax.set_title(_FOCUS_LABELS.get(metric, metric))
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_axis_off()
    handles, names = next(((a.get_legend_handles_labels()) for a in axes.flat if a.get_legend_handles_labels()[0]),
                          ([], []))
    if handles:
        fig.legend(handles, names, loc="outside lower center", ncols=min(len(names), 4), fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


# --- helpers ------------------------------------------------------------------------------------------------


def _as_matrix(matrix) -> np.ndarray:
    """A float (rows, cols) array with NaN for ``None``; ragged rows padded with NaN; 1-D → one row."""
    if matrix is None:
        return np.empty((0, 0))
    if hasattr(matrix, "detach"):
        matrix = matrix.detach().float().cpu().numpy()
    if isinstance(matrix, np.ndarray) and matrix.dtype != object:
        m = matrix.astype(float)
    else:
        rows = list(matrix)
        if rows and not any(isinstance(r, (list, tuple, np.ndarray)) or hasattr(r, "detach") for r in rows):
            rows = [rows]
        rows = [[_num(v) for v in (r.tolist() if hasattr(r, "tolist") else r)] for r in rows]
        width = max((len(r) for r in rows), default=0)
        m = np.full((len(rows), width), np.nan)
        for i, r in enumerate(rows):
            m[i, :len(r)] = r
    if m.ndim == 1:
        m = m[None, :]
    if m.ndim != 2:
        raise ValueError(f"expected a (layers, heads) matrix, got shape {m.shape}")
    return m


def _num(value) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _cmap_with_bad(name):
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad="#bbbbbb")


def _no_data(ax, title: str | None = None):
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)


class _ContextLocator(MaxNLocator):
    """Ticks at the powers of two in range, labelled as plain numbers."""

    def tick_values(self, vmin, vmax):
        lo, hi = sorted((vmin, vmax))
        lo, hi = max(lo, 1), max(hi, 1)
        ticks = [2.0**e for e in range(int(math.floor(math.log2(lo))), int(math.ceil(math.log2(hi))) + 1)]
        while len(ticks) > 10:
            ticks = ticks[::2]
        return np.array(ticks)

    def __call__(self):
        vmin, vmax = self.axis.get_view_interval()
        return self.tick_values(vmin, vmax)


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
