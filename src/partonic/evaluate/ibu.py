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

__all__ = ["IBUResult", "ibu_unfold", "chi2_ndf", "clipped_histogram", "bin_index", "bootstrap_chi2"]

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


def clipped_histogram(x, edges, weights=None) -> np.ndarray:
    """Event counts (or summed ``weights``) per bin with under/overflow clipped into the
    first/last bin; the reference histogram that :class:`IBUResult.counts` estimates."""
    e = _edges(edges, "edges")
    w = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    return np.bincount(bin_index(x, e), weights=w, minlength=e.size - 1).astype(np.float64)


def ibu_unfold(train_truth, train_reco, test_reco, edges, reco_edges=None, iterations: int = 4, prior="uniform", test_weights=None) -> IBUResult:
    """Unfold ``test_reco`` to the truth binning ``edges`` with D'Agostini's method.

    The response matrix P(reco bin i | truth bin j) is the 2-d histogram of the training
    pairs divided by the number of training events per truth bin; its uncertainties are
    binomial, sqrt(P(1 − P) / N_j). Under/overflow is clipped into the first/last bin in
    both the truth and reco binning (``reco_edges``, default ``edges``), for training and
    test alike, so no event is lost and the efficiencies are exactly 1: every event is a
    selected event in this job. The data uncertainties are sqrt(N) per reco bin, or
    sqrt(Σw²) with ``test_weights`` (one non-negative weight per test event, e.g. a
    bootstrap replica's Poisson counts).

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

    test = _values(test_reco, "test_reco")
    if test_weights is None:
        data = clipped_histogram(test, reco_edges)
        data_err = np.sqrt(data)
    else:
        tw = np.asarray(test_weights, dtype=np.float64).reshape(-1)
        if tw.shape != test.shape or not np.all(np.isfinite(tw)) or np.any(tw < 0):
            raise ValueError(f"test_weights must be {test.size} finite, non-negative values, one per test event")
        data = clipped_histogram(test, reco_edges, tw)
        data_err = np.sqrt(clipped_histogram(test, reco_edges, tw * tw))
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
        data_err=data_err,
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


def bootstrap_chi2(truth_bins, sample_bins, unfold, n_bins: int, replicas: int, seed: int = 0) -> dict:
    """The statistical error of the difference of two methods' χ²/ndf to truth.

    χ²/ndf of a 30-bin comparison scatters by about sqrt(2/30) ≈ 0.26 from one test set
    to the next, and both methods unfold the same events against the same truth, so
    their values are correlated: only the paired difference says which is closer. Each
    replica draws a Poisson(1) count per test event (the bootstrap of the test set) and
    recomputes the truth histogram, the sampled method's histogram (``sample_bins``,
    (N, S) bin indices of S samples per event, counted 1/S each) and the binned method's
    result ``unfold(weights)`` (e.g. IBU of the replica's detector histogram), then
    both χ²/ndf with :func:`chi2_ndf`. The training, and so the response and the
    network, stays fixed: the errors are those of the test set.

    A χ² is quadratic in the residuals r = method − truth, and a replica adds its own
    noise ε on top of the observed r, which already holds one draw of it: the replicas'
    variance of rᵀAr exceeds the test sets' by 2 Var(εᵀAε) (Gaussian ε; the cross term
    4rᵀAΣAr is right on average because E[rrᵀ] = μμᵀ + Σ). The variance returned is the
    replicas' minus twice that of εᵀAε, the replica's noise alone in the observed
    errors; uncorrected, the bootstrap overstates the error by up to a factor of two
    (tests/test_ibu.py measures both against independent test sets).

    Returns the error of the difference (sampled − binned), so corrected (NaN where the
    correction exceeds the replicas' variance: undetermined), and the replicas'
    uncorrected one, an upper bound. (Each χ²/ndf alone is left without an error: near
    χ²/ndf ≈ 1 its correction is as large as its replicas' variance, and the estimate
    often comes out at zero.)
    """
    t_bins = np.asarray(truth_bins).reshape(-1)
    s_bins = np.asarray(sample_bins)
    if s_bins.ndim != 2 or s_bins.shape[0] != t_bins.size:
        raise ValueError(f"sample_bins must be (N, S) with N = {t_bins.size} test events, got {s_bins.shape}")
    replicas = int(replicas)
    if replicas < 2:
        raise ValueError(f"replicas must be ≥ 2, got {replicas}")
    n, s = s_bins.shape
    flat = s_bins.reshape(-1)

    def histograms(w):
        truth = np.bincount(t_bins, weights=w, minlength=n_bins).astype(np.float64)
        sampled = np.bincount(flat, weights=np.repeat(w / s, s), minlength=n_bins)
        return truth, sampled, np.asarray(unfold(w), dtype=np.float64)

    t0, c0, u0 = histograms(np.ones(n))
    # the replica's noise alone, in chi2_ndf's Poisson errors of the observed test set
    err_c, err_u, zero = np.sqrt(c0 + t0), np.sqrt(u0 + t0), np.zeros(n_bins)
    rng = np.random.default_rng(seed)
    chi2 = np.empty((replicas, 2))
    noise = np.empty((replicas, 2))
    for k in range(replicas):
        t, c, u = histograms(rng.poisson(1.0, n).astype(np.float64))
        chi2[k] = chi2_ndf(c, t), chi2_ndf(u, t)
        noise[k] = (chi2_ndf((c - t) - (c0 - t0), zero, err_c, zero), chi2_ndf((u - t) - (u0 - t0), zero, err_u, zero))

    diff = chi2[:, 0] - chi2[:, 1]
    variance = diff.var(ddof=1) - 2 * (noise[:, 0] - noise[:, 1]).var(ddof=1)
    # the correction can exceed the replicas' own variance (few replicas, or a difference
    # dominated by the noise term): the error is then not determined, and the uncorrected
    # one, which overstates it, is the bound that is left
    return {"replicas": replicas, "difference_error": float(np.sqrt(variance)) if variance > 0 else float("nan"),
            "difference_error_uncorrected": float(diff.std(ddof=1))}
