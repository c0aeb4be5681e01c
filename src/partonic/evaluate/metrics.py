"""Metrics of generated and unweighted samples, as typed results.

References: unweighting efficiency, arXiv:2001.10028 (Gao et al.) and MadNIS;
quantile MSE and amplification, arXiv:2008.06545 (Butter et al., "GANplifying").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

__all__ = [
    "UnweightingEfficiency",
    "unweighting_efficiency",
    "hit_or_miss",
    "HistogramComparison",
    "compare_histograms",
    "weighted_histogram",
    "quantile_edges",
    "qmse",
    "amplification",
]


def _np(x) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


@dataclass
class UnweightingEfficiency:
    """Unweighting efficiency of a weighted sample (arXiv:2001.10028, sec. 2).

    Fields:
        efficiency: ⟨w⟩ / w_max with the robust w_max below.
        efficiency_naive: ⟨w⟩ / max(w) of the whole sample.
        w_max: median of the maxima of ``replicas`` disjoint sub-samples (bootstrap-like,
            stable against single extreme weights).
        overweight_fraction: fraction of events with w > w_max.
        overweight_xsec_fraction: Σ(w − w_max) over those events / Σ w, the bias a
            hit-or-miss at w_max would cause if over-weights were simply capped.
        negative_fraction: fraction of events with w < 0.
    """

    efficiency: float
    efficiency_naive: float
    w_max: float
    overweight_fraction: float
    overweight_xsec_fraction: float
    negative_fraction: float

    def as_dict(self) -> dict:
        return asdict(self)


def unweighting_efficiency(weights, replicas: int = 100, generator: np.random.Generator | None = None) -> UnweightingEfficiency:
    """Robust unweighting efficiency ε = ⟨|w|⟩ / w_max (see :class:`UnweightingEfficiency`)."""
    w = np.abs(_np(weights))
    if w.size == 0 or w.sum() <= 0:
        raise ValueError("unweighting efficiency needs a sample with non-zero weights")
    rng = generator or np.random.default_rng(0)
    chunks = np.array_split(rng.permutation(w), min(replicas, w.size))
    w_max = float(np.median([c.max() for c in chunks if c.size]))
    mean = float(w.mean())
    over = w > w_max
    return UnweightingEfficiency(
        efficiency=mean / w_max,
        efficiency_naive=mean / float(w.max()),
        w_max=w_max,
        overweight_fraction=float(over.mean()),
        overweight_xsec_fraction=float((w[over] - w_max).sum() / w.sum()),
        negative_fraction=float((_np(weights) < 0).mean()),
    )


def hit_or_miss(weights: torch.Tensor, w_max: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of events kept with probability |w| / w_max (w_max default: max |w|).
    Events with |w| > w_max are kept (their excess is reported by the efficiency)."""
    w = weights.abs()
    w_max = float(w.max()) if w_max is None else float(w_max)
    u = torch.rand(w.shape, generator=generator, dtype=w.dtype, device="cpu").to(w.device)
    return torch.nonzero(u * w_max < w)[:, 0]


def weighted_histogram(values, edges, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """Sum of weights per bin and its statistical error √(Σ w²)."""
    v = _np(values)
    w = np.ones_like(v) if weights is None else _np(weights)
    h, _ = np.histogram(v, edges, weights=w)
    h2, _ = np.histogram(v, edges, weights=w * w)
    return h, np.sqrt(h2)


@dataclass
class HistogramComparison:
    """A sample's normalised histogram against a reference, bin by bin.

    Fields: ``edges``; ``ratio`` sample/reference and ``ratio_error`` (both samples'
    statistics); ``pull`` (difference / combined error); ``chi2`` and ``ndf`` over
    bins where both are filled; ``max_bulk_deviation`` max |ratio − 1| over bins
    holding ≥ ``bulk_fraction`` of the reference; ``max_bulk_pull`` likewise for |pull|.
    """

    edges: list
    ratio: list
    ratio_error: list
    pull: list
    chi2: float
    ndf: int
    max_bulk_deviation: float
    max_bulk_pull: float

    @property
    def chi2_ndf(self) -> float:
        return self.chi2 / max(self.ndf, 1)


def compare_histograms(sample, reference, edges, sample_weights=None, reference_weights=None, bulk_fraction: float = 0.01) -> HistogramComparison:
    """Compare shapes (both normalised to unit area within the edges)."""
    hs, es = weighted_histogram(sample, edges, sample_weights)
    hr, er = weighted_histogram(reference, edges, reference_weights)
    ns, nr = hs.sum(), hr.sum()
    if ns <= 0 or nr <= 0:
        raise ValueError("cannot compare empty histograms")
    ps, pr = hs / ns, hr / nr
    es_n, er_n = es / ns, er / nr
    filled = (pr > 0) & (ps > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(pr > 0, ps / pr, np.nan)
        ratio_err = np.where(filled, ratio * np.sqrt((es_n / np.where(ps > 0, ps, 1)) ** 2 + (er_n / np.where(pr > 0, pr, 1)) ** 2), np.nan)
        sigma = np.sqrt(es_n**2 + er_n**2)
        pull = np.where(sigma > 0, (ps - pr) / sigma, 0.0)
    chi2 = float((pull[filled] ** 2).sum())
    bulk = filled & (pr >= bulk_fraction)
    return HistogramComparison(
        edges=list(map(float, edges)), ratio=[float(r) for r in ratio], ratio_error=[float(r) for r in ratio_err],
        pull=[float(p) for p in pull], chi2=chi2, ndf=int(filled.sum()),
        max_bulk_deviation=float(np.nanmax(np.abs(ratio[bulk] - 1))) if bulk.any() else float("nan"),
        max_bulk_pull=float(np.abs(pull[bulk]).max()) if bulk.any() else float("nan"),
    )


def quantile_edges(reference, n_quantiles: int, weights=None) -> np.ndarray:
    """Bin edges with equal probability under the (weighted) reference."""
    v = _np(reference)
    w = np.ones_like(v) if weights is None else _np(weights)
    order = np.argsort(v)
    cdf = np.cumsum(w[order])
    cdf /= cdf[-1]
    inner = np.interp(np.arange(1, n_quantiles) / n_quantiles, cdf, v[order])
    return np.concatenate([[-np.inf], inner, [np.inf]])


def qmse(sample, edges, weights=None) -> float:
    """Quantile MSE (arXiv:2008.06545): (1/N_q) Σ_j (x_j − 1/N_q)², x_j = sample fraction in
    equal-probability bin j of the truth."""
    h, _ = weighted_histogram(sample, edges, weights)
    x = h / h.sum()
    nq = len(edges) - 1
    return float(((x - 1.0 / nq) ** 2).mean())


def amplification(q: float, n_train: float, n_quantiles: int) -> float:
    """N_equiv / N_train with N_equiv = (1 − 1/N_q)/(N_q · qMSE): how many true events a
    sample of plateau qMSE is worth, per training event (arXiv:2008.06545)."""
    if q <= 0:
        return math.inf
    return (1.0 - 1.0 / n_quantiles) / (n_quantiles * q) / n_train
