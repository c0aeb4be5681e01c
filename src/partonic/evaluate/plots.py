"""Plots a physicist reads: normalised distributions with a ratio panel, in the HEP
style of mplhep, saved as PDF and PNG."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .metrics import weighted_histogram  # noqa: E402

__all__ = ["Series", "ratio_plot", "calibration_plot"]

_COLORS = ["black", "#3f90da", "#e42536", "#964a8b", "#f89c20", "#2ca02c", "#7a5230"]


@dataclass
class Series:
    """One sample to draw: values, optional weights, a legend label. ``exact`` marks a
    reference without statistical error (drawn without a band), see :meth:`histogram`."""

    values: np.ndarray
    label: str
    weights: np.ndarray | None = None
    exact: bool = False

    @classmethod
    def histogram(cls, edges, contents, label: str) -> "Series":
        """An exactly known histogram (e.g. σ per bin from a quadrature) on ``edges``."""
        edges = np.asarray(edges, dtype=float)
        return cls(0.5 * (edges[1:] + edges[:-1]), label, np.asarray(contents, dtype=float), exact=True)


def _style():
    try:
        import mplhep

        plt.style.use(mplhep.style.CMS)
        plt.rcParams["font.size"] = 13
    except Exception:  # noqa: BLE001 - the plot still works without the style
        pass


def ratio_plot(
    series: list[Series],
    edges: np.ndarray,
    xlabel: str,
    path: str | Path,
    title: str = "",
    logy: bool = False,
    ratio_range: tuple[float, float] = (0.8, 1.2),
) -> list[Path]:
    """Normalised histograms (the first series is the reference) with statistical
    bands, and a ratio panel to the reference. Writes ``path`` as .pdf and .png."""
    _style()
    fig, (ax, rax) = plt.subplots(2, 1, figsize=(7, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.05})
    widths = np.diff(edges)
    ref_h, ref_e = None, None
    for i, s in enumerate(series):
        h, e = weighted_histogram(s.values, edges, s.weights)
        if s.exact:
            e = np.zeros_like(e)
        norm = max(h.sum(), 1e-300) * widths  # a sample with nothing in range draws as zero
        dens, err = h / norm, e / norm
        color = _COLORS[i % len(_COLORS)]
        ax.stairs(dens, edges, label=s.label, color=color, linewidth=1.6)
        ax.stairs(dens + err, edges, baseline=dens - err, fill=True, alpha=0.25, color=color)
        if i == 0:
            ref_h, ref_e = dens, err
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.where(ref_h > 0, ref_e / ref_h, 0)
            rax.stairs(1 + rel, edges, baseline=1 - rel, fill=True, alpha=0.25, color=color)
            rax.axhline(1.0, color=color, linewidth=1)
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(ref_h > 0, dens / ref_h, np.nan)
                rerr = np.where(ref_h > 0, err / ref_h, np.nan)
            rax.stairs(ratio, edges, color=color, linewidth=1.4)
            rax.stairs(ratio + rerr, edges, baseline=ratio - rerr, fill=True, alpha=0.25, color=color)
    ax.set_ylabel("normalised")
    if logy:
        ax.set_yscale("log")
    ax.legend(title=title or None, fontsize=10, title_fontsize=10, loc="best")
    rax.set_ylim(*ratio_range)
    rax.set_ylabel(f"ratio to\n{series[0].label}", fontsize=10)
    rax.set_xlabel(xlabel)
    return _save(fig, path)


def _save(fig, path: str | Path) -> list[Path]:
    """Write the figure as PDF and PNG next to each other and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for ext in (".pdf", ".png"):
        target = path.with_suffix(ext)
        fig.savefig(target, bbox_inches="tight", dpi=110)
        written.append(target)
    plt.close(fig)
    return written


def calibration_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "",
                     floor: float | None = None, labels: dict[str, str] | None = None,
                     focus: tuple[str, ...] | None = None, target: float | None = None) -> list[Path]:
    """Quantile-coverage curves: fraction of events whose truth lies below the q-quantile
    of their own posterior samples, against q (ideal: the diagonal), and below them the
    deviation coverage − q, where calibrated curves differ: with ``floor``, the band that
    a calibrated posterior stays within by chance on as many events (95%); with
    ``target``, dotted lines at ±target. ``labels`` names the curves (default: their
    keys); the deviation panel's range fits the ``focus`` curves (default: all), the
    others may leave it."""
    _style()
    fig, (ax, rax) = plt.subplots(2, 1, figsize=(6, 7.5), sharex=True, gridspec_kw={"height_ratios": [2.2, 1], "hspace": 0.05})
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    rax.axhline(0.0, color="grey", linestyle="--", linewidth=1)
    if floor is not None and np.isfinite(floor):
        rax.axhspan(-floor, floor, color="grey", alpha=0.2, label=f"calibrated, 95% (±{floor:.3f})")
    if target is not None:
        for sign in (-1, 1):
            rax.axhline(sign * target, color="black", linestyle=":", linewidth=1, label=f"target ±{target:g}" if sign > 0 else None)
    largest = 0.0
    for i, (name, (q, cov)) in enumerate(curves.items()):
        color = _COLORS[(i + 1) % len(_COLORS)]
        label = (labels or {}).get(name, name)
        ax.plot(q, cov, label=label, color=color)
        rax.plot(q, np.asarray(cov) - np.asarray(q), color=color)
        if focus is None or name in focus:
            largest = max(largest, float(np.abs(np.asarray(cov) - np.asarray(q)).max()))
    if title:
        ax.set_title(title, fontsize=11, loc="left")
    ax.set_ylabel("fraction of events with truth below q")
    ax.legend(fontsize=9, loc="upper left", ncol=2 if len(curves) > 4 else 1)
    limit = max(0.02, 1.25 * largest, 1.5 * (floor or 0.0), 1.3 * (target or 0.0))
    rax.set_ylim(-limit, limit)
    rax.set_ylabel("coverage − q", fontsize=10)
    rax.set_xlabel("quantile q")
    if (floor is not None and np.isfinite(floor)) or target is not None:
        rax.legend(fontsize=8, loc="lower left", ncol=2)
    return _save(fig, path)