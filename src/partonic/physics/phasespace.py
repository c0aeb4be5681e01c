"""Phase-space generators and mappings in torch, each returning momenta or
variables together with their weight (phase-space volume element or Jacobian).

Conventions: dΦ_n = (2π)⁴ δ⁴(P − Σp_i) Π_i d³p_i / ((2π)³ 2E_i), momenta
(E, px, py, pz), batch dimension first, generated in the rest frame of P.
"""

from __future__ import annotations

import math

import torch

from . import kinematics as kin

__all__ = [
    "massless_volume",
    "two_body_volume",
    "rambo_diet",
    "breit_wigner_map",
    "tau_y_map",
    "uniform_tau_map",
]


def massless_volume(n: int, s: float | torch.Tensor) -> float | torch.Tensor:
    """Closed-form volume of massless n-body phase space (arXiv:1308.2922, eq. 2.3):
    Φ_n = (π/2)^{n−1} s^{n−2} / ((n−1)! (n−2)!) · (2π)^{4−3n}."""
    if n < 2:
        raise ValueError(f"n-body phase space needs n >= 2, got {n}")
    return (
        (math.pi / 2.0) ** (n - 1) * s ** (n - 2)
        / (math.factorial(n - 1) * math.factorial(n - 2)) * (2.0 * math.pi) ** (4 - 3 * n)
    )


def two_body_volume(s, m1, m2):
    """Two-body phase space Φ_2 = λ^{1/2}(s, m1², m2²) / (8π s)."""
    s = torch.as_tensor(s, dtype=torch.float64)
    lam = (s - (m1 + m2) ** 2) * (s - (m1 - m2) ** 2)
    return torch.sqrt(torch.clamp(lam, min=0.0)) / (8.0 * math.pi * s)


def _solve_mass_fraction(r: torch.Tensor, k: int) -> torch.Tensor:
    """Solve (k+1) u^k − k u^{k+1} = r for u ∈ [0, 1] (the CDF of the squared mass
    fraction in RAMBO on diet, arXiv:1308.2922 with u = (M_i/M_{i−1})²)."""
    if k == 0:
        return torch.ones_like(r)
    # The CDF is monotone; bisection is robust, Newton polishes to full precision.
    lo, hi = torch.zeros_like(r), torch.ones_like(r)
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        below = (k + 1) * mid**k - k * mid ** (k + 1) < r
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    u = 0.5 * (lo + hi)
    for _ in range(3):
        f = (k + 1) * u**k - k * u ** (k + 1) - r
        df = k * (k + 1) * (u ** (k - 1) - u**k)
        step = torch.where(df > 0, f / torch.clamp(df, min=1e-300), torch.zeros_like(f))
        u = torch.clamp(u - step, lo, hi)
    return u


def _direction(r_cos: torch.Tensor, r_phi: torch.Tensor) -> torch.Tensor:
    cos_t = 2.0 * r_cos - 1.0
    sin_t = torch.sqrt(torch.clamp(1.0 - cos_t**2, min=0.0))
    ph = 2.0 * math.pi * r_phi
    return torch.stack([sin_t * torch.cos(ph), sin_t * torch.sin(ph), cos_t], dim=-1)


def rambo_diet(
    sqrt_s: torch.Tensor,
    n: int,
    r: torch.Tensor | None = None,
    masses: list[float] | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RAMBO on diet: n-body phase space from 3n − 4 random numbers.

    References: S. Plätzer, arXiv:1308.2922 (massless algorithm); massive
    momenta by the rescaling of R. Kleiss, W.J. Stirling, S.D. Ellis, Comput.
    Phys. Commun. 40 (1986) 359.

    Arguments:
        sqrt_s: total energy √s in the rest frame, shape (B,).
        n: number of final-state particles (≥ 2).
        r: uniform numbers, shape (B, 3n − 4); drawn with ``generator`` if absent.
        masses: n final-state masses (default all zero).

    Returns:
        momenta of shape (B, n, 4) in the rest frame, and the weight (B,) such
        that ⟨weight · f⟩ = ∫ dΦ_n f. Massless weights are the constant Φ_n.

    Example:
        >>> p, w = rambo_diet(torch.full((10,), 100.0, dtype=torch.float64), 3)
        >>> p.shape, bool(torch.allclose(p.sum(1)[:, 0], torch.tensor(100.0, dtype=torch.float64)))
        (torch.Size([10, 3, 4]), True)
    """
    if n < 2:
        raise ValueError(f"rambo_diet needs n >= 2 final-state particles, got {n}")
    sqrt_s = torch.as_tensor(sqrt_s)
    if not sqrt_s.is_floating_point():
        sqrt_s = sqrt_s.to(torch.float64)
    batch = sqrt_s.shape[0]
    dtype, device = sqrt_s.dtype, sqrt_s.device
    if r is None:
        r = torch.rand(batch, 3 * n - 4, generator=generator, dtype=dtype, device=device)
    elif r.shape != (batch, 3 * n - 4):
        raise ValueError(f"rambo_diet with n={n} needs random numbers of shape ({batch}, {3 * n - 4}), got {tuple(r.shape)}")
    r = r.to(dtype)

    r_mass, r_angles = r[:, : n - 2], r[:, n - 2 :]
    big_q = torch.zeros(batch, 4, dtype=dtype, device=device)
    big_q[:, 0] = sqrt_s
    m_prev = sqrt_s
    momenta = []
    for i in range(2, n + 1):
        if i < n:
            u = _solve_mass_fraction(r_mass[:, i - 2], n - i)
            m_i = torch.sqrt(u) * m_prev
        else:
            m_i = torch.zeros_like(m_prev)
        q = (m_prev**2 - m_i**2) / (2.0 * m_prev)
        nhat = _direction(r_angles[:, 2 * (i - 2)], r_angles[:, 2 * (i - 2) + 1])
        p_rest = torch.cat([q[:, None], q[:, None] * nhat], dim=1)
        big_q_rest = torch.cat([torch.sqrt(q**2 + m_i**2)[:, None], -q[:, None] * nhat], dim=1)
        beta = big_q[:, 1:] / big_q[:, :1]
        momenta.append(kin.boost(p_rest, beta))
        big_q = kin.boost(big_q_rest, beta)
        m_prev = m_i
    momenta.append(big_q)
    p = torch.stack(momenta, dim=1)
    weight = torch.full((batch,), 1.0, dtype=dtype, device=device) * massless_volume(n, sqrt_s**2)

    if masses is None:
        return p, weight
    m = torch.as_tensor(masses, dtype=dtype, device=device)
    if m.shape != (n,):
        raise ValueError(f"rambo_diet needs {n} masses, got shape {tuple(m.shape)}")
    if (m < 0).any():
        raise ValueError(f"masses must be non-negative, got {m.tolist()}")
    if bool((m.sum() >= sqrt_s).any()):
        raise ValueError(f"the masses {m.tolist()} add up to more than the available sqrt(s) = {sqrt_s.min().item():.6g}")
    return _rescale_massive(p, sqrt_s, m, weight)


def _rescale_massive(p, sqrt_s, m, weight):
    """Kleiss–Stirling–Ellis rescaling of massless momenta to masses m: find ξ with
    Σ √(m_i² + ξ² E_i²) = √s, then k_i = (√(m_i² + ξ²E_i²), ξ p⃗_i), weight factor
    ξ^{2n−3} Π(|k_i|/k_i⁰) · √s / Σ(|k_i|²/k_i⁰)."""
    n = p.shape[1]
    e = p[..., 0]
    xi = torch.sqrt(torch.clamp(1.0 - (m.sum() / sqrt_s) ** 2, min=1e-12))[:, None]
    for _ in range(50):
        ek = torch.sqrt(m**2 + (xi * e) ** 2)
        f = ek.sum(1, keepdim=True) - sqrt_s[:, None]
        df = (xi * e**2 / ek).sum(1, keepdim=True)
        xi = torch.clamp(xi - f / df, min=1e-12, max=1.0)
        if bool((f.abs() < 1e-14 * sqrt_s[:, None]).all()):
            break
    ek = torch.sqrt(m**2 + (xi * e) ** 2)
    k = torch.cat([ek[..., None], xi[..., None] * p[..., 1:]], dim=-1)
    kabs = xi * e
    factor = (
        xi[:, 0] ** (2 * n - 3)
        * (kabs / ek).prod(1)
        * sqrt_s / (kabs**2 / ek).sum(1)
    )
    return k, weight * factor


def breit_wigner_map(
    r: torch.Tensor, mass: float, width: float, s_min: float | torch.Tensor, s_max: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map r ∈ [0, 1] to s ∈ [s_min, s_max] distributed as a Breit–Wigner
    1/((s − M²)² + M²Γ²): s = M² + MΓ tan ρ with ρ uniform.

    Returns s and the Jacobian ds/dr, so ⟨jac · f(s)⟩ = ∫ ds f(s).
    """
    mg = mass * width
    rho_min = torch.atan((torch.as_tensor(s_min, dtype=r.dtype) - mass**2) / mg)
    rho_max = torch.atan((torch.as_tensor(s_max, dtype=r.dtype) - mass**2) / mg)
    rho = rho_min + (rho_max - rho_min) * r
    s = mass**2 + mg * torch.tan(rho)
    jac = (rho_max - rho_min) * ((s - mass**2) ** 2 + mg**2) / mg
    return s, jac


def uniform_tau_map(r: torch.Tensor, tau_min: float) -> tuple[torch.Tensor, torch.Tensor]:
    """τ = τ_min^(1 − r): flat in ln τ on [τ_min, 1]; returns τ and dτ/dr."""
    log_tmin = math.log(tau_min)
    tau = torch.exp(log_tmin * (1.0 - r))
    return tau, -tau * log_tmin


def tau_y_map(
    r_tau: torch.Tensor, r_y: torch.Tensor, tau_min: float, tau: torch.Tensor | None = None, tau_jac: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Momentum fractions from (τ, y): x1 = √τ e^y, x2 = √τ e^−y, with y uniform in
    [½ ln τ, −½ ln τ]. τ is flat in ln τ unless (tau, tau_jac) come from another
    mapping (e.g. a Breit–Wigner in s = τ S).

    Returns x1, x2 and the Jacobian of dx1 dx2 = dτ dy with respect to (r_tau, r_y).
    """
    if tau is None:
        tau, tau_jac = uniform_tau_map(r_tau, tau_min)
    elif tau_jac is None:
        raise ValueError("tau_y_map: a supplied tau needs its Jacobian tau_jac")
    half_log = 0.5 * torch.log(tau)
    y = half_log * (1.0 - 2.0 * r_y)  # uniform in [½ ln τ, −½ ln τ]
    x1 = torch.sqrt(tau) * torch.exp(y)
    x2 = torch.sqrt(tau) * torch.exp(-y)
    return x1, x2, tau_jac * (-2.0 * half_log)
