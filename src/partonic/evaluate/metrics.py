"""Metrics of generated and unweighted samples, as typed results.

References: unweighting efficiency, arXiv:2001.10028 (Gao et al.) and MadNIS;
quantile MSE and amplification, arXiv:2008.06545 (Butter et al., "GANplifying");
classifier two-sample test, arXiv:2305.16774 (Das et al.).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

#: a histogram bin is "bulk" when it holds at least this fraction of the reference
BULK_FRACTION = 0.01

__all__ = [
    "BULK_FRACTION",
    "UnweightingEfficiency",
    "unweighting_efficiency",
    "hit_or_miss",
    "HistogramComparison",
    "compare_histograms",
    "weighted_histogram",
    "quantile_edges",
    "qmse",
    "amplification",
    "fwhm",
    "ResonanceFit",
    "fit_breit_wigner",
    "auc",
    "classifier_auc",
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
    bins where either has an error, a bin the sample leaves empty with the error of the
    count the reference expects there (ndf counts the bins; no constraint is subtracted
    for the normalisation); ``max_bulk_deviation`` max |ratio − 1| over bins
    holding ≥ ``bulk_fraction`` of the reference, whether or not the sample fills
    them (an empty one is a ratio of 0), ``max_bulk_deviation_error`` the
    statistical error of the ratio in that bin (NaN where the sample is empty);
    ``max_bulk_pull`` max |pull| over the same bins.
    """

    edges: list
    ratio: list
    ratio_error: list
    pull: list
    chi2: float
    ndf: int
    max_bulk_deviation: float
    max_bulk_pull: float
    max_bulk_deviation_error: float = float("nan")

    @property
    def chi2_ndf(self) -> float:
        return self.chi2 / max(self.ndf, 1)


def compare_histograms(sample, reference, edges, sample_weights=None, reference_weights=None, bulk_fraction: float = BULK_FRACTION) -> HistogramComparison:
    """Compare shapes (both normalised to unit area within the edges)."""
    hs, es = weighted_histogram(sample, edges, sample_weights)
    hr, er = weighted_histogram(reference, edges, reference_weights)
    return _compare(hs, es, hr, er, edges, bulk_fraction)


def compare_to_expected(sample, expected, edges, sample_weights=None, bulk_fraction: float = BULK_FRACTION) -> HistogramComparison:
    """Compare a sample's shape with an exactly known one: ``expected`` holds the
    reference's content per bin (e.g. σ from a quadrature), without statistical error,
    so the ratio errors and pulls are the sample's alone."""
    hs, es = weighted_histogram(sample, edges, sample_weights)
    hr = np.asarray(expected, dtype=float)
    if hr.shape != hs.shape:
        raise ValueError(f"expected has {hr.shape[0] if hr.ndim else 0} bins, the edges make {hs.shape[0]}")
    return _compare(hs, es, hr, np.zeros_like(hr), edges, bulk_fraction)


def _compare(hs, es, hr, er, edges, bulk_fraction) -> HistogramComparison:
    ns, nr = hs.sum(), hr.sum()
    if ns <= 0 or nr <= 0:
        raise ValueError("cannot compare empty histograms")
    ps, pr = hs / ns, hr / nr
    es_n, er_n = es / ns, er / nr
    filled = (pr > 0) & (ps > 0)
    # a bin the sample leaves empty has no error of its own (√Σw² = 0): it gets the error
    # of the count the reference expects there, pr/n_eff with the sample's effective
    # number of events (Pearson's error), so that it counts, most of all against an
    # exactly known reference
    n_eff = ns**2 / max(float((es**2).sum()), 1e-300)
    empty = (ps == 0) & (pr > 0)
    es_n = np.where(empty, np.sqrt(np.clip(pr, 0.0, None) / n_eff), es_n)  # (a negative-weight bin is never "empty")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(pr > 0, ps / pr, np.nan)
        ratio_err = np.where(filled, ratio * np.sqrt((es_n / np.where(ps > 0, ps, 1)) ** 2 + (er_n / np.where(pr > 0, pr, 1)) ** 2), np.nan)
        sigma = np.sqrt(es_n**2 + er_n**2)
        pull = np.where(sigma > 0, (ps - pr) / sigma, 0.0)
    used = sigma > 0
    chi2 = float((pull[used] ** 2).sum())
    # the bulk is where the reference is: a bulk bin the sample leaves empty is a ratio of 0
    bulk = pr >= bulk_fraction
    worst = int(np.flatnonzero(bulk)[np.argmax(np.abs(ratio[bulk] - 1))]) if bulk.any() else -1
    return HistogramComparison(
        edges=list(map(float, edges)), ratio=[float(r) for r in ratio], ratio_error=[float(r) for r in ratio_err],
        pull=[float(p) for p in pull], chi2=chi2, ndf=int(used.sum()),
        max_bulk_deviation=float(abs(ratio[worst] - 1)) if worst >= 0 else float("nan"),
        max_bulk_pull=float(np.abs(pull[bulk]).max()) if bulk.any() else float("nan"),
        max_bulk_deviation_error=float(ratio_err[worst]) if worst >= 0 else float("nan"),
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


def fwhm(values, weights, centre: float, window: float = 10.0, bins: int = 200) -> float:
    """Full width at half maximum of a peak, from a fine histogram with linear interpolation."""
    edges = np.linspace(centre - window, centre + window, bins + 1)
    h, _ = np.histogram(_np(values), edges, weights=None if weights is None else _np(weights))
    if h.max() <= 0:
        return float("nan")
    # light smoothing against bin-to-bin noise
    h = np.convolve(h, np.ones(3) / 3, mode="same")
    mids = 0.5 * (edges[1:] + edges[:-1])
    k = int(np.argmax(h))
    half = h[k] / 2
    left = k
    while left > 0 and h[left] > half:
        left -= 1
    right = k
    while right < len(h) - 1 and h[right] > half:
        right += 1
    interp = lambda i, j: mids[i] + (half - h[i]) * (mids[j] - mids[i]) / (h[j] - h[i]) if h[j] != h[i] else mids[i]  # noqa: E731
    return float(interp(right, right - 1) - interp(left, left + 1))


@dataclass
class ResonanceFit:
    """Position and width of a resonance peak.

    Fields: ``position`` and ``width`` (GeV) of a Breit–Wigner (Cauchy) line shape
    fitted by unbinned maximum likelihood in ``window`` around the nominal mass, on a
    flat background of fraction ``background``; their standard errors ``position_error``
    and ``width_error`` (inverse Hessian); ``fwhm`` of the histogram (no line-shape
    assumption); ``events`` in the window. The position is bounded by the window; where
    there is no peak, the fit says so with a background fraction near 1 and a
    position or width at the window's edge, not with a number outside it.
    """

    position: float
    width: float
    position_error: float
    width_error: float
    background: float
    fwhm: float
    events: int
    window: tuple[float, float]

    def as_dict(self) -> dict:
        return asdict(self)


def fit_breit_wigner(masses, mass: float, width: float, window_widths: float = 10.0) -> ResonanceFit:
    """Fit a Cauchy peak + flat background to ``masses`` in mass ± window_widths·width.

    The Cauchy density ½Γ/π / ((m − M)² + Γ²/4) is normalised on the window with
    arctan, so a peak cut by the window is fitted without bias.

    Example:
        >>> fit = fit_breit_wigner(m_w, 80.4, 2.05)
        >>> fit.position, fit.width
    """
    from scipy.optimize import minimize

    lo, hi = mass - window_widths * width, mass + window_widths * width
    m = _np(masses)
    m = m[(m >= lo) & (m <= hi)]
    if len(m) < 20:
        return ResonanceFit(float("nan"), float("nan"), float("nan"), float("nan"), float("nan"), float("nan"), int(len(m)), (lo, hi))

    def nll(params):
        pos, log_g, logit_b = params
        g = math.exp(log_g)
        b = 1.0 / (1.0 + math.exp(-logit_b))
        norm = (math.atan(2 * (hi - pos) / g) - math.atan(2 * (lo - pos) / g)) / math.pi
        peak = 0.5 * g / math.pi / ((m - pos) ** 2 + 0.25 * g * g) / norm
        return -np.log((1 - b) * peak + b / (hi - lo)).sum()

    # The position is kept inside the window, M = lo + (hi − lo)·σ(s): without a peak the
    # likelihood is flat in M, and an unbounded fit wandered off to M = −812 GeV.
    to_pos = lambda s: lo + (hi - lo) / (1.0 + math.exp(-s))  # noqa: E731
    inside = min(max((float(np.median(m)) - lo) / (hi - lo), 1e-3), 1 - 1e-3)
    start = np.array([math.log(inside / (1 - inside)), math.log(width), -3.0])
    res = minimize(lambda q: nll((to_pos(q[0]), q[1], q[2])), start, method="Nelder-Mead",
                   options={"xatol": 1e-6, "fatol": 1e-6, "maxiter": 4000})
    res.x = np.array([to_pos(res.x[0]), res.x[1], res.x[2]])
    pos, log_g, logit_b = res.x
    g = math.exp(log_g)
    # standard errors of (M, log Γ) from a finite-difference Hessian of the NLL at the
    # optimum, the background fraction held fixed (it often sits at its boundary, 0)
    steps = np.array([1e-3 * g, 1e-3])
    hess = np.zeros((2, 2))
    for i in range(2):
        for j in range(2):
            ei, ej = np.zeros(3), np.zeros(3)
            ei[i], ej[j] = steps[i], steps[j]
            hess[i, j] = (nll(res.x + ei + ej) - nll(res.x + ei - ej) - nll(res.x - ei + ej) + nll(res.x - ei - ej)) / (4 * steps[i] * steps[j])
    try:
        cov = np.linalg.inv(hess)
        pos_err, log_g_err = math.sqrt(max(cov[0, 0], 0.0)), math.sqrt(max(cov[1, 1], 0.0))
    except np.linalg.LinAlgError:
        pos_err = log_g_err = float("nan")
    return ResonanceFit(
        position=float(pos), width=float(g), position_error=float(pos_err), width_error=float(g * log_g_err),
        background=float(1.0 / (1.0 + math.exp(-logit_b))), fwhm=fwhm(m, None, mass, window=window_widths * width, bins=200),
        events=int(len(m)), window=(lo, hi),
    )


def auc(scores_a, scores_b) -> float:
    """Area under the ROC curve for telling sample b (label 1) from a (label 0) by the
    score: the probability that a random b outscores a random a (Mann–Whitney U, ties
    counted half)."""
    from scipy.stats import rankdata

    a, b = _np(scores_a), _np(scores_b)
    ranks = rankdata(np.concatenate([a, b]))
    return float((ranks[len(a):].sum() - len(b) * (len(b) + 1) / 2) / (len(a) * len(b)))


def classifier_auc(truth, generated, epochs: int = 20, width: int = 128, layers: int = 3, seed: int = 0, max_events: int = 200_000, batch_size: int = 1024, device="cpu") -> float:
    """Classifier two-sample test (arXiv:2305.16774): an MLP learns truth (0) against
    generated (1) on half of each sample (equal sizes, standardised features); the
    ROC AUC on the other half is returned. 0.5: the classifier finds no difference.

    ``truth`` and ``generated`` are (N, d) feature arrays."""
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    x0 = torch.as_tensor(_np(truth), dtype=torch.float32)
    x1 = torch.as_tensor(_np(generated), dtype=torch.float32)
    n = min(len(x0), len(x1), max_events)
    x0 = x0[torch.randperm(len(x0), generator=gen)[:n]]
    x1 = x1[torch.randperm(len(x1), generator=gen)[:n]]
    half = n // 2
    train_x = torch.cat([x0[:half], x1[:half]])
    train_y = torch.cat([torch.zeros(half), torch.ones(half)])
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    norm = lambda x: ((x - mean) / std).to(device)  # noqa: E731
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    d = train_x.shape[1]
    for _ in range(layers):
        mods += [nn.Linear(d, width), nn.LeakyReLU(0.2)]
        d = width
    net = nn.Sequential(*mods, nn.Linear(d, 1)).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    loss_fn = nn.BCEWithLogitsLoss()
    xt, yt = norm(train_x), train_y.to(device)
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen).to(device)
        for s in range(0, len(xt), batch_size):
            idx = order[s : s + batch_size]
            opt.zero_grad()
            loss_fn(net(xt[idx])[:, 0], yt[idx]).backward()
            opt.step()
        sched.step()
    with torch.no_grad():
        s0 = torch.cat([net(norm(c))[:, 0].cpu() for c in x0[half:].split(65536)])
        s1 = torch.cat([net(norm(c))[:, 0].cpu() for c in x1[half:].split(65536)])
    return auc(s0, s1)
