"""Normalizing flows with rational-quadratic spline couplings.

References: C. Durkan, A. Bekasov, I. Murray, G. Papamakarios, "Neural Spline
Flows", arXiv:1906.04032 (the monotonic rational-quadratic spline, eq. 4–8).

A flow maps data x ∈ ℝᵈ to a standard normal z; ``log_prob`` adds the log-Jacobian,
``sample`` inverts it exactly. One-dimensional data get an unconditional spline;
more dimensions alternate coupling layers whose splines are predicted by an MLP
from the untouched coordinates.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["rq_spline", "SplineFlow", "mlp"]

MIN_BIN = 1e-3
MIN_DERIVATIVE = 1e-3


def mlp(n_in: int, n_out: int, width: int, layers: int, activation=nn.SiLU) -> nn.Sequential:
    """A plain MLP with ``layers`` hidden layers; the last layer starts at zero so that a
    coupling begins as the identity."""
    mods: list[nn.Module] = []
    d = n_in
    for _ in range(layers):
        mods += [nn.Linear(d, width), activation()]
        d = width
    last = nn.Linear(d, n_out)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    mods.append(last)
    return nn.Sequential(*mods)


def rq_spline(x: torch.Tensor, params: torch.Tensor, bound: float, inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Monotonic rational-quadratic spline on [−bound, bound], identity outside.

    Arguments:
        x: values, any shape (...).
        params: (..., 3K − 1) unnormalised widths (K), heights (K) and inner-knot
            derivatives (K − 1).
        bound: half-width of the spline interval.
        inverse: evaluate the inverse map.

    Returns:
        y and log|dy/dx| (of the map evaluated, so the inverse gives log|dx/dy|).
    """
    k = (params.shape[-1] + 1) // 3
    w_raw, h_raw, d_raw = params[..., :k], params[..., k : 2 * k], params[..., 2 * k :]
    widths = MIN_BIN + (1 - MIN_BIN * k) * F.softmax(w_raw, dim=-1)
    heights = MIN_BIN + (1 - MIN_BIN * k) * F.softmax(h_raw, dim=-1)
    # softplus(0) + min = 1 at initialisation → identity for zero parameters
    derivs = MIN_DERIVATIVE + F.softplus(d_raw + math.log(math.expm1(1 - MIN_DERIVATIVE)))
    ones = torch.ones_like(derivs[..., :1])
    derivs = torch.cat([ones, derivs, ones], dim=-1)
    cw = F.pad(torch.cumsum(widths, -1), (1, 0)) * 2 * bound - bound
    ch = F.pad(torch.cumsum(heights, -1), (1, 0)) * 2 * bound - bound
    cw[..., -1], ch[..., -1] = bound, bound
    inside = (x > -bound) & (x < bound)
    xc = x.clamp(-bound, bound)
    knots = ch if inverse else cw
    idx = torch.searchsorted(knots[..., 1:-1].contiguous(), xc[..., None].contiguous()).clamp(max=k - 1)

    def pick(t):
        return t.gather(-1, idx)[..., 0]

    x_k, y_k = pick(cw), pick(ch)
    w_k, h_k = pick(cw[..., 1:] - cw[..., :-1]), pick(ch[..., 1:] - ch[..., :-1])
    d_k, d_k1 = pick(derivs[..., :-1]), pick(derivs[..., 1:])
    s = h_k / w_k
    if not inverse:
        xi = (xc - x_k) / w_k
        one_m = xi * (1 - xi)
        denom = s + (d_k1 + d_k - 2 * s) * one_m
        y = y_k + h_k * (s * xi**2 + d_k * one_m) / denom
        dydx = s**2 * (d_k1 * xi**2 + 2 * s * one_m + d_k * (1 - xi) ** 2) / denom**2
        logdet = torch.log(dydx)
    else:
        # The root formula loses precision in float32 (cancellation in b² − 4ac):
        # solve in float64 and return in the input precision.
        dtype = x.dtype
        xc, x_k, y_k, w_k, h_k, d_k, d_k1 = (t.double() for t in (xc, x_k, y_k, w_k, h_k, d_k, d_k1))
        s = h_k / w_k
        dy = xc - y_k
        a = h_k * (s - d_k) + dy * (d_k1 + d_k - 2 * s)
        b = h_k * d_k - dy * (d_k1 + d_k - 2 * s)
        c = -s * dy
        disc = torch.clamp(b * b - 4 * a * c, min=0)
        xi = (2 * c) / (-b - torch.sqrt(disc))
        one_m = xi * (1 - xi)
        denom = s + (d_k1 + d_k - 2 * s) * one_m
        y = x_k + xi * w_k
        dydx = s**2 * (d_k1 * xi**2 + 2 * s * one_m + d_k * (1 - xi) ** 2) / denom**2
        logdet = -torch.log(dydx)
        y, logdet = y.to(dtype), logdet.to(dtype)
    y = torch.where(inside, y, x)
    logdet = torch.where(inside, logdet, torch.zeros_like(logdet))
    return y, logdet


class _Coupling(nn.Module):
    def __init__(self, dim: int, mask: torch.Tensor, bins: int, width: int, layers: int, bound: float, context: int):
        super().__init__()
        self.register_buffer("mask", mask)
        self.bins, self.bound = bins, bound
        n_cond = int(mask.sum()) + context
        self.n_out = int((~mask).sum())
        if n_cond == 0:
            self.free = nn.Parameter(torch.zeros(self.n_out, 3 * bins - 1))
            self.net = None
        else:
            self.net = mlp(n_cond, self.n_out * (3 * bins - 1), width, layers)

    def _params(self, x, c):
        if self.net is None:
            return self.free.expand(x.shape[0], -1, -1)
        inp = x[:, self.mask]
        if c is not None:
            inp = torch.cat([inp, c], dim=1)
        return self.net(inp).view(x.shape[0], self.n_out, 3 * self.bins - 1)

    def forward(self, x, c=None, inverse=False):
        params = self._params(x, c)
        moved, logdet = rq_spline(x[:, ~self.mask], params, self.bound, inverse=inverse)
        out = x.clone()
        out[:, ~self.mask] = moved
        return out, logdet.sum(1)


class SplineFlow(nn.Module):
    """A normalizing flow x → z ~ N(0, 1) of rational-quadratic spline couplings.

    References: arXiv:1906.04032.

    Arguments:
        dim: data dimension (1 allowed).
        blocks: coupling layers (alternating masks; for dim 1, stacked unconditional splines).
        bins: spline bins K.
        width, layers: the conditioner MLPs.
        bound: spline interval [−bound, bound] (identity outside).
        context: dimension of an optional condition vector.

    Example:
        >>> flow = SplineFlow(2, blocks=4)
        >>> x, logp = flow.sample(1000)
        >>> torch.allclose(flow.log_prob(x), logp, atol=1e-4)
        True
    """

    def __init__(self, dim: int, blocks: int = 6, bins: int = 16, width: int = 128, layers: int = 2, bound: float = 5.0, context: int = 0):
        super().__init__()
        self.dim = dim
        couplings = []
        for i in range(blocks):
            if dim == 1:
                mask = torch.zeros(1, dtype=torch.bool)
            else:
                mask = torch.zeros(dim, dtype=torch.bool)
                # alternate halves, shifting which coordinates condition
                perm = torch.roll(torch.arange(dim), shifts=i)
                mask[perm[: dim // 2]] = True
                if i % 2 == 1:
                    mask = ~mask
            couplings.append(_Coupling(dim, mask, bins, width, layers, bound, context))
        self.couplings = nn.ModuleList(couplings)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x → z and log|dz/dx|."""
        logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for layer in self.couplings:
            x, ld = layer(x, c)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """z → x and log|dx/dz|."""
        logdet = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        for layer in reversed(self.couplings):
            z, ld = layer(z, c, inverse=True)
            logdet = logdet + ld
        return z, logdet

    @staticmethod
    def _base_log_prob(z):
        return -0.5 * (z**2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)

    def log_prob(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        z, logdet = self.forward(x, c)
        return self._base_log_prob(z) + logdet

    def sample(self, n: int, c: torch.Tensor | None = None, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples and their log-density."""
        p = next(self.parameters())
        z = torch.randn(n, self.dim, generator=generator, dtype=p.dtype, device="cpu" if generator is not None else p.device).to(p.device)
        x, logdet = self.inverse(z, c)
        return x, self._base_log_prob(z) - logdet
