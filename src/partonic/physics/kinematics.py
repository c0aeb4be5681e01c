"""Batched four-vector kinematics in torch, batch dimension first.

Four-momenta are tensors with a last dimension of size 4 ordered (E, px, py, pz);
any leading batch shape is allowed. Angles follow the usual collider conventions:
pseudorapidity η = −ln tan(θ/2), azimuth φ ∈ (−π, π].
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "pt",
    "eta",
    "phi",
    "rapidity",
    "mass",
    "mass2",
    "to_ptetaphim",
    "from_ptetaphim",
    "invariant_mass",
    "boost",
    "boost_to_rest_frame",
    "delta_phi",
    "delta_r",
    "minkowski_dot",
]


def _split(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if p.shape[-1] != 4:
        raise ValueError(f"four-momenta need a last dimension of size 4 (E, px, py, pz), got shape {tuple(p.shape)}")
    return p[..., 0], p[..., 1], p[..., 2], p[..., 3]


def minkowski_dot(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """p·q with metric (+, −, −, −)."""
    return p[..., 0] * q[..., 0] - (p[..., 1:] * q[..., 1:]).sum(-1)


def pt(p: torch.Tensor) -> torch.Tensor:
    """Transverse momentum √(px² + py²)."""
    _, px, py, _ = _split(p)
    return torch.hypot(px, py)


def phi(p: torch.Tensor) -> torch.Tensor:
    """Azimuth atan2(py, px) in (−π, π]."""
    _, px, py, _ = _split(p)
    return torch.atan2(py, px)


def eta(p: torch.Tensor) -> torch.Tensor:
    """Pseudorapidity asinh(pz / pT); ±inf for momenta along the beam."""
    _, px, py, pz = _split(p)
    return torch.asinh(pz / torch.hypot(px, py))


def rapidity(p: torch.Tensor) -> torch.Tensor:
    """Rapidity ½ ln((E + pz) / (E − pz))."""
    e, _, _, pz = _split(p)
    return 0.5 * torch.log((e + pz) / (e - pz))


def mass2(p: torch.Tensor) -> torch.Tensor:
    """Invariant mass squared E² − |p|² (can be slightly negative from rounding)."""
    return minkowski_dot(p, p)


def mass(p: torch.Tensor) -> torch.Tensor:
    """Invariant mass, signed like the vector package: −√(−m²) for space-like p."""
    m2 = mass2(p)
    return torch.sign(m2) * torch.sqrt(m2.abs())


def to_ptetaphim(p: torch.Tensor) -> torch.Tensor:
    """(E, px, py, pz) → (pT, η, φ, m), stacked in the last dimension."""
    return torch.stack([pt(p), eta(p), phi(p), mass(p)], dim=-1)


def from_ptetaphim(v: torch.Tensor) -> torch.Tensor:
    """(pT, η, φ, m) → (E, px, py, pz); m may be negative for space-like vectors."""
    if v.shape[-1] != 4:
        raise ValueError(f"(pT, eta, phi, m) needs a last dimension of size 4, got shape {tuple(v.shape)}")
    p_t, et, ph, m = v.unbind(-1)
    px = p_t * torch.cos(ph)
    py = p_t * torch.sin(ph)
    pz = p_t * torch.sinh(et)
    p2 = p_t**2 + pz**2
    e = torch.sqrt(torch.clamp(p2 + torch.sign(m) * m**2, min=0.0))
    return torch.stack([e, px, py, pz], dim=-1)


def invariant_mass(*momenta: torch.Tensor) -> torch.Tensor:
    """Invariant mass of the sum of several four-momenta."""
    if not momenta:
        raise ValueError("invariant_mass needs at least one four-momentum")
    total = momenta[0]
    for q in momenta[1:]:
        total = total + q
    return mass(total)


def boost(p: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Lorentz boost of p by velocity beta (shape (..., 3), |beta| < 1).

    A particle at rest is given the velocity +beta (active boost), as in
    vector's ``boost_beta3`` and ROOT's ``TLorentzVector::Boost``.
    """
    b2 = (beta**2).sum(-1)
    gamma = 1.0 / torch.sqrt(1.0 - b2)
    bp = (beta * p[..., 1:]).sum(-1)
    # (γ − 1)/β² written as γ²/(γ + 1) stays finite for β → 0.
    gamma2 = gamma**2 / (gamma + 1.0)
    e = gamma * (p[..., 0] + bp)
    vec = p[..., 1:] + (gamma2 * bp + gamma * p[..., 0]).unsqueeze(-1) * beta
    return torch.cat([e.unsqueeze(-1), vec], dim=-1)


def boost_to_rest_frame(p: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """Boost p into the rest frame of the (time-like) four-momentum ``frame``."""
    beta = -frame[..., 1:] / frame[..., :1]
    return boost(p, beta)


def delta_phi(phi1: torch.Tensor, phi2: torch.Tensor) -> torch.Tensor:
    """φ1 − φ2 wrapped into [−π, π)."""
    return torch.remainder(phi1 - phi2 + math.pi, 2.0 * math.pi) - math.pi


def delta_r(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """ΔR = √(Δη² + Δφ²) between two sets of four-momenta (pseudorapidity)."""
    return torch.hypot(eta(p) - eta(q), delta_phi(phi(p), phi(q)))
