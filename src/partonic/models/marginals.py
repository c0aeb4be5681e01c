"""Invertible per-coordinate Gaussianisation by the training data's quantiles.

Each coordinate x_k is mapped to u_k = Φ⁻¹(F_k(x_k)), with F_k the empirical CDF of
the training data, made piecewise linear between K knots (the data's quantiles at
probabilities Φ(z_j), z_j evenly spaced): the training data's marginals become
standard normal, and standard normal noise pushed through the inverse has the data's
marginals. A generator that starts near the identity (a residual generator) then
starts with every marginal right and only has to learn the correlations.

Beyond the outermost knots (|z| ≈ 4 for 2 × 10⁵ events) both directions continue
linearly with the mean slope of the outer 20% of the knots, i.e. with Gaussian tails,
so the map is defined, monotone and invertible on the whole real line.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["QuantileMarginals"]


def _piecewise_linear(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor, slope_lo: torch.Tensor, slope_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column k of x (N, D): the line through the knots (xp[k], fp[k]) (D, K, xp
    increasing), continued with ``slope_lo``/``slope_hi`` (D,) beyond its ends; returns
    the values and the slopes (N, D)."""
    xt = x.t().contiguous()
    k = xp.shape[1]
    idx = torch.searchsorted(xp, xt).clamp(1, k - 1)
    x0, x1 = xp.gather(1, idx - 1), xp.gather(1, idx)
    f0, f1 = fp.gather(1, idx - 1), fp.gather(1, idx)
    slope = (f1 - f0) / (x1 - x0).clamp(min=torch.finfo(x.dtype).tiny)
    below, above = xt < xp[:, :1], xt > xp[:, -1:]
    slope = torch.where(below, slope_lo[:, None].expand_as(slope), torch.where(above, slope_hi[:, None].expand_as(slope), slope))
    y = f0 + (xt - x0) * slope
    y = torch.where(below, fp[:, :1] + (xt - xp[:, :1]) * slope, y)
    y = torch.where(above, fp[:, -1:] + (xt - xp[:, -1:]) * slope, y)
    return y.t(), slope.t()


class QuantileMarginals(nn.Module):
    """u = Φ⁻¹(F(x)) per coordinate, F the training data's piecewise-linear CDF.

    Arguments:
        dim: number of coordinates.
        knots: number of quantiles per coordinate (at least 8).

    Example:
        >>> g = QuantileMarginals(3).fit(x)    # x: (N, 3)
        >>> u = g(x)                           # each column standard normal
        >>> x_back = g.inverse(u)              # equal to x up to rounding
    """

    def __init__(self, dim: int, knots: int = 256):
        super().__init__()
        if knots < 8:
            raise ValueError(f"knots must be at least 8, got {knots}")
        self.register_buffer("x_knots", torch.linspace(-4.0, 4.0, knots, dtype=torch.float64).repeat(dim, 1))
        self.register_buffer("z_knots", torch.linspace(-4.0, 4.0, knots, dtype=torch.float64).repeat(dim, 1))

    @property
    def knots(self) -> int:
        return self.x_knots.shape[1]

    def fit(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> "QuantileMarginals":
        """Knots from the data x (N, dim), optionally weighted (weight (N,); negative
        weights enter the net CDF, kept monotone); the outermost knots sit at the
        quantiles 10/N and 1 − 10/N (capped at |z| = 5), where ten events fix each."""
        data = x.detach().double().cpu().numpy()
        n, dim = data.shape
        if dim != self.x_knots.shape[0]:
            raise ValueError(f"expected {self.x_knots.shape[0]} coordinates, got {dim}")
        if n < 100:
            raise ValueError(f"quantile marginals need at least 100 events, got {n}")
        if weight is not None:
            w = weight.detach().double().cpu().numpy()
            if w.shape != (n,) or not w.sum() > 0:
                raise ValueError(f"weights must have shape ({n},) and a positive sum")
            n_eff = min(float(n), float(w.sum() ** 2 / (w * w).sum()))  # the outer knots rest on effective events
        else:
            n_eff = float(n)
        z_max = min(5.0, -float(torch.special.ndtri(torch.tensor(min(10.0 / n_eff, 0.1), dtype=torch.float64))))
        z = np.linspace(-z_max, z_max, self.knots)
        p = torch.special.ndtr(torch.from_numpy(z)).numpy()
        if weight is None:
            xq = np.quantile(data, p, axis=0).T  # (dim, K)
        else:
            xq = np.empty((dim, self.knots))
            for k in range(dim):
                order = np.argsort(data[:, k], kind="stable")
                cw = np.cumsum(w[order])
                cdf = np.maximum.accumulate((cw - 0.5 * w[order]) / cw[-1])
                xq[k] = np.interp(p, cdf, data[order, k])
        # strictly increasing knots, at least a float32-resolvable step apart (a value
        # that many events share, or a constant coordinate, would give infinite slopes)
        step = 1e-6 * np.maximum(np.abs(xq).max(1), 1.0)[:, None] * np.arange(self.knots)[None, :]
        xq = np.maximum.accumulate(xq - step, axis=1) + step
        self.x_knots.copy_(torch.from_numpy(xq))
        self.z_knots.copy_(torch.from_numpy(np.broadcast_to(z, xq.shape).copy()))
        return self

    def _tail_slopes(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """dz/dx beyond the low and high ends: the mean over the outer 20% of the knots
        (about 1.3 in z for 2 × 10⁵ events: a narrower span makes the tails noisy)."""
        m = max(1, self.knots // 5)
        xp, zp = self.x_knots.to(dtype), self.z_knots.to(dtype)
        lo = (zp[:, m] - zp[:, 0]) / (xp[:, m] - xp[:, 0])
        hi = (zp[:, -1] - zp[:, -1 - m]) / (xp[:, -1] - xp[:, -1 - m])
        return lo, hi

    def forward_with_log_det(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u and log|du/dx| (N,)."""
        lo, hi = self._tail_slopes(x.dtype)
        u, slope = _piecewise_linear(x, self.x_knots.to(x.dtype), self.z_knots.to(x.dtype), lo, hi)
        return u, torch.log(slope).sum(1)

    def inverse_with_log_det(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x and log|dx/du| (N,)."""
        lo, hi = self._tail_slopes(u.dtype)
        x, slope = _piecewise_linear(u, self.z_knots.to(u.dtype), self.x_knots.to(u.dtype), 1.0 / lo, 1.0 / hi)
        return x, torch.log(slope).sum(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_log_det(x)[0]

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        return self.inverse_with_log_det(u)[0]
