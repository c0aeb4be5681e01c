"""Iterative Bayesian unfolding (D'Agostini), the binned reference for cINN unfolding.

The response matrix is filled from (truth, reco) training pairs, the test sample's
detector-level histogram is unfolded with ``pyunfold.iterative_unfold`` for a fixed
number of iterations, and :func:`chi2_ndf` is the one goodness-of-fit definition used
for both the cINN and the IBU result (``cinn_chi2_ndf`` and ``ibu_chi2_ndf`` in the job
report). Values outside the binning are clipped into the first/last bin everywhere
(:func:`clipped_histogram`), so every event is counted and all efficiencies are 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["IBUResult", "ibu_unfold", "chi2_ndf", "clipped_histogram", "bin_index"]

# pyunfold fills a dense (n_reco·n_truth)² response covariance every iteration; past
# this size (≈ 110×110 bins) that alone takes more than a GiB, so warn before it runs.
_DENSE_COV_WARN_BYTES = 1 << 30


@dataclass
class IBUResult:
    """Result of :func:`ibu_unfold`.

    Fields:
        edges: truth-level bin edges, shape (n_truth_bins + 1,).
        counts: unfolded event counts per truth bin (not densities). Their sum is the
            number of test events in range, which with the clipping convention of
            :func:`ibu_unfold` is every test event whose reco bin was populated in
            training (normally all of them).
        errors: statistical uncertainties of ``counts`` from pyunfold (``stat_err``:
            data errors sqrt(N) propagated through the iterations, Adye's method).
        iterations: number of iterations performed.
        response: normalised response matrix used, shape (n_reco_bins, n_truth_bins);
            ``response[i, j] = P(reco bin i | truth bin j)``, rows are reco bins and
            columns truth bins, so each column with training events sums to 1.
        sys_errors: uncertainties of ``counts`` from the finite training statistics in
            the response matrix (pyunfold's ``sys_err``, multinomial covariance).
    """

    edges: np.ndarray
    counts: np.ndarray
    errors: np.ndarray
    iterations: int
    response: np.ndarray
    sys_errors: np.ndarray | None = None


def _edges(edges, name: str) -> np.ndarray:
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or e.size < 2 or not np.all(np.isfinite(e)) or np.any(np.diff(e) <= 0):
        raise ValueError(f"{name} must be a 1-d, finite, strictly increasing array of at least 2 edges")
    return e


def _values(x, name: str) -> np.ndarray:
    v = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(v)):
        # NaN would silently land in the overflow bin through the clipping.
        raise ValueError(f"{name} contains non-finite values")
    return v


def bin_index(x, edges) -> np.ndarray:
    """Bin index of each value, bins [e_k, e_k+1) with the last one closed; values below
    the range go to bin 0 and above it to the last bin (under/overflow clipping)."""
    e = _edges(edges, "edges")
    idx = np.searchsorted(e, _values(x, "x"), side="right") - 1
    return np.clip(idx, 0, e.size - 2)


def clipped_histogram(x, edges) -> np.ndarray:
    """Event counts per bin with under/overflow clipped into the first/last bin; the
    reference histogram that :class:`IBUResult.counts` estimates."""
    e = _edges(edges, "edges")
    return np.bincount(bin_index(x, e), minlength=e.size - 1).astype(np.float64)


def ibu_unfold(train_truth, train_reco, test_reco, edges, reco_edges=None, iterations: int = 4, prior="uniform") -> IBUResult:
    """Unfold ``test_reco`` to the truth binning ``edges`` with D'Agostini's method.

    The response matrix P(reco bin i | truth bin j) is the 2-d histogram of the training
    pairs divided by the number of training events per truth bin; its uncertainties are
    binomial, sqrt(P(1 − P) / N_j). Under/overflow is clipped into the first/last bin in
    both the truth and reco binning (``reco_edges``, default ``edges``), for training and
    test alike, so no event is lost and the efficiencies are exactly 1: every event is a
    selected event in this job. The data uncertainties are sqrt(N) per reco bin.

    ``prior`` is "uniform" (flat over truth bins), "truth" (the normalised training truth
    histogram) or an explicit array of bin probabilities. ``pyunfold.iterative_unfold``
    runs exactly ``iterations`` iterations: its stopping test is ``ts < ts_stopping``
    and every test statistic is ≥ 0, so ``ts_stopping=0`` never fires and ``max_iter``
    decides.

    Memory/time: pyunfold builds a dense (n_reco·n_truth)² covariance each iteration,
    cheap for tens of bins but quartic in the bin count (a warning is issued past 1 GiB).
    """
    from pyunfold import iterative_unfold

    edges = _edges(edges, "edges")
    reco_edges = edges if reco_edges is None else _edges(reco_edges, "reco_edges")
    iterations = int(iterations)
    if iterations < 1:
        raise ValueError(f"iterations must be ≥ 1, got {iterations}")
    truth = _values(train_truth, "train_truth")
    reco = _values(train_reco, "train_reco")
    if truth.shape != reco.shape:
        raise ValueError(f"train_truth and train_reco differ in length: {truth.size} vs {reco.size}")
    if truth.size == 0:
        raise ValueError("no training events")
    n_t, n_r = edges.size - 1, reco_edges.size - 1
    if 8 * (n_t * n_r) ** 2 > _DENSE_COV_WARN_BYTES:
        import warnings

        warnings.warn(f"IBU with {n_r}×{n_t} bins: pyunfold allocates ≈{8 * (n_t * n_r) ** 2 / 2**30:.1f} GiB per "
                      "response covariance and iteration; consider fewer bins", ResourceWarning, stacklevel=2)

    # Joint histogram via a flat index: one bincount instead of a loop over events.
    ti, ri = bin_index(truth, edges), bin_index(reco, reco_edges)
    joint = np.bincount(ri * n_t + ti, minlength=n_r * n_t).reshape(n_r, n_t).astype(np.float64)
    n_truth = joint.sum(axis=0)
    populated = n_truth > 0
    safe_n = np.where(populated, n_truth, 1.0)
    response = joint / safe_n
    response_err = np.sqrt(response * (1.0 - response) / safe_n)

    data = clipped_histogram(_values(test_reco, "test_reco"), reco_edges)
    if data.sum() <= 0:
        raise ValueError("no test events")

    if isinstance(prior, str):
        if prior == "uniform":
            p = np.full(n_t, 1.0 / n_t)
        elif prior == "truth":
            p = n_truth / n_truth.sum()
        else:
            raise ValueError(f"prior must be 'uniform', 'truth' or an array, got {prior!r}")
    else:
        p = np.asarray(prior, dtype=np.float64)
        if p.shape != (n_t,) or np.any(p < 0) or p.sum() <= 0:
            raise ValueError(f"an explicit prior needs {n_t} non-negative entries with a positive sum")
        p = p / p.sum()

    efficiencies = np.ones(n_t)
    # pyunfold reads the training statistics per truth bin, used for the multinomial
    # response covariance, as (eff / eff_err)²; 1/sqrt(N_j) makes that N_j.
    efficiencies_err = np.where(populated, 1.0 / np.sqrt(safe_n), 0.0)

    out = iterative_unfold(
        data=data,
        data_err=np.sqrt(data),
        response=response,
        response_err=response_err,
        efficiencies=efficiencies,
        efficiencies_err=efficiencies_err,
        prior=p,
        ts="ks",
        ts_stopping=0.0,
        max_iter=iterations,
        cov_type="multinomial",
    )
    done = int(out["num_iterations"])
    if done != iterations:  # would mean pyunfold changed its stopping rule
        raise RuntimeError(f"pyunfold ran {done} iterations instead of {iterations}")
    return IBUResult(
        edges=edges,
        counts=np.asarray(out["unfolded"], dtype=np.float64),
        errors=np.asarray(out["stat_err"], dtype=np.float64),
        iterations=done,
        response=response,
        sys_errors=np.asarray(out["sys_err"], dtype=np.float64),
    )


def chi2_ndf(counts, reference, counts_errors=None, reference_errors=None) -> float:
    """χ²/ndf between two binned count distributions, as reported for both methods.

    χ²/ndf = Σ_k (c_k − r_k)² / (σ_c,k² + σ_r,k²) / n, summed over the n bins with
    σ_c,k² + σ_r,k² > 0. Missing errors default to Poisson, σ = sqrt(max(count, 0)).
    The two histograms are treated as independent; no normalisation is applied, so
    both must be counts for the same number of events. Returns NaN if no bin qualifies.
    """
    c = np.asarray(counts, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if c.shape != r.shape:
        raise ValueError(f"counts and reference differ in shape: {c.shape} vs {r.shape}")
    sc = np.sqrt(np.clip(c, 0, None)) if counts_errors is None else np.asarray(counts_errors, dtype=np.float64)
    sr = np.sqrt(np.clip(r, 0, None)) if reference_errors is None else np.asarray(reference_errors, dtype=np.float64)
    var = sc**2 + sr**2
    used = var > 0
    n = int(used.sum())
    if n == 0:
        return float("nan")
    return float(np.sum((c[used] - r[used]) ** 2 / var[used]) / n)
