"""Calibration of per-event posteriors: quantile-coverage curves.

For each event, the rank of the true value among its own posterior samples; if the
posteriors are calibrated the ranks are uniform, so the fraction of events whose
truth lies below the q-quantile of its samples equals q for every q
(arXiv:2006.06685, Sec. 3.2; the simulation-based-calibration rank statistic of
Talts et al., arXiv:1804.06788).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

__all__ = ["Calibration", "quantile_ranks", "calibration", "interval_coverage", "noise_floor"]


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def quantile_ranks(samples, truth) -> np.ndarray:
    """Rank of each truth among its S samples, as a fraction in (0, 1).

    r = (k + ½) / (S + 1), k = number of samples below the truth (ties count half):
    uniform over the S + 1 possible ranks when calibrated, so the coverage curve it
    gives deviates from the diagonal by at most ½/(S + 1) from the discreteness alone.
    """
    s, t = _np(samples), _np(truth)
    if s.ndim != 2 or t.shape != (s.shape[0],):
        raise ValueError(f"samples must be (N, S) and truth (N,), got {s.shape} and {t.shape}")
    below = (s < t[:, None]).sum(1) + 0.5 * (s == t[:, None]).sum(1)
    return (below + 0.5) / (s.shape[1] + 1)


def interval_coverage(samples, truth, level: float) -> float:
    """Fraction of events whose truth lies in the central ``level`` interval of its samples."""
    s, t = _np(samples), _np(truth)
    lo, hi = np.quantile(s, [(1 - level) / 2, (1 + level) / 2], axis=1)
    return float(np.mean((t >= lo) & (t <= hi)))


def noise_floor(n_events: int, n_samples: int, q, level: float = 0.95, replicas: int = 4000, seed: int = 0) -> float:
    """The ``level`` quantile of max |coverage − q| for a calibrated posterior.

    With n events and S samples each, a calibrated posterior gives ranks uniform over
    the S + 1 values of :func:`quantile_ranks`; the coverage curve on the grid ``q``
    then scatters about the diagonal only by chance. Its maximum deviation is the
    (discrete, gridded) Kolmogorov–Smirnov statistic, about 1.36/√n at 95% for a
    dense grid; here its quantile is computed exactly for this n, S and grid by
    drawing the rank counts of ``replicas`` calibrated test sets (multinomial, fixed
    seed). A measured max_deviation below it is consistent with calibration.
    """
    return _noise_floor(int(n_events), int(n_samples), tuple(np.asarray(q, dtype=np.float64).tolist()), float(level), int(replicas), int(seed))


@lru_cache(maxsize=256)
def _noise_floor(n_events: int, n_samples: int, q: tuple, level: float, replicas: int, seed: int) -> float:
    q = np.asarray(q)
    levels = (np.arange(n_samples + 1) + 0.5) / (n_samples + 1)
    below = (levels[None, :] <= q[:, None]).sum(1)  # rank values at or below each q
    counts = np.random.default_rng(seed).multinomial(n_events, np.full(n_samples + 1, 1.0 / (n_samples + 1)), size=replicas)
    cum = np.concatenate([np.zeros((replicas, 1)), np.cumsum(counts, 1)], 1)
    coverage = cum[:, below] / n_events
    return float(np.quantile(np.abs(coverage - q[None, :]).max(1), level))


@dataclass
class Calibration:
    """Quantile-coverage curve of one observable.

    Fields:
        q: quantile grid.
        coverage: fraction of events whose truth lies below the q-quantile of its samples.
        max_deviation: max |coverage − q| over the grid.
        coverage_68, coverage_95: fraction of truths inside the central 68% / 95% intervals.
        n_events: events in the curve; its statistical error is about √(q(1 − q)/n_events).
        noise_floor: 95% quantile of max_deviation for a calibrated posterior with as
            many events and samples (:func:`noise_floor`): below it, the deviation is
            not resolved by this test set.
    """

    q: list
    coverage: list
    max_deviation: float
    coverage_68: float
    coverage_95: float
    n_events: int
    noise_floor: float

    def as_dict(self) -> dict:
        return asdict(self)


def calibration(samples, truth, q=None) -> Calibration:
    """Coverage curve of posterior ``samples`` (N, S) against ``truth`` (N,)."""
    q = np.linspace(0.0, 1.0, 21) if q is None else np.asarray(q, dtype=np.float64)
    ranks = quantile_ranks(samples, truth)
    coverage = (ranks[None, :] <= q[:, None]).mean(1)
    return Calibration(
        q=q.tolist(),
        coverage=coverage.tolist(),
        max_deviation=float(np.abs(coverage - q).max()),
        coverage_68=interval_coverage(samples, truth, 0.68),
        coverage_95=interval_coverage(samples, truth, 0.95),
        n_events=int(len(ranks)),
        noise_floor=noise_floor(len(ranks), _np(samples).shape[1], q),
    )
