"""Leading-order matrix elements in torch.

Drell–Yan q q̄ → γ*/Z → ℓ⁻ ℓ⁺ with the couplings of the project's physics sheet
(PHYSICS.md, after Ellis–Stirling–Webber, "QCD and collider physics", eq. 9.7ff):

    dσ̂/dΩ = α²/(4ŝ) · (1/N_c) · [A0 (1 + cos²θ) + A1 cos θ],   σ̂ = 4πα² A0/(3ŝN_c)

θ is the angle between the incoming quark and the outgoing ℓ⁻ in the partonic
rest frame; |M|² (spin- and colour-averaged) = 64π² ŝ dσ̂/dΩ.

Top-pair production q q̄ → t t̄ and g g → t t̄ (Combridge, Nucl. Phys. B151 (1979)
429; Ellis–Stirling–Webber Table 10.2; PHYSICS.md "tt̄ at LO"), with
τ1 = (m² − t)/ŝ, τ2 = (m² − u)/ŝ, ρ = 4m²/ŝ and dσ̂/dt = Σ|M|²/(16π ŝ²).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .constants import ALPHA_EM_MZ, ALPHA_S_MZ, GAMMA_Z, M_TOP, M_Z, SIN2_THETA_W

__all__ = ["ElectroweakParameters", "QUARK_CHARGE", "QUARK_T3", "drell_yan_coefficients", "drell_yan_dsigma_dcos", "drell_yan_me2", "drell_yan_sigma_hat", "ttbar_me2", "ttbar_sigma_hat"]

N_C = 3.0
QUARK_CHARGE = {1: -1.0 / 3.0, 2: 2.0 / 3.0, 3: -1.0 / 3.0, 4: 2.0 / 3.0, 5: -1.0 / 3.0}
QUARK_T3 = {1: -0.5, 2: 0.5, 3: -0.5, 4: 0.5, 5: -0.5}


@dataclass(frozen=True)
class ElectroweakParameters:
    """Fixed α, M_Z, Γ_Z and s_W² (defaults: the MG5 'sm' values of PHYSICS.md).

    ``sin2_w_bar`` (default: ``sin2_w``) enters the vector couplings only, as in
    Pythia 8, which distinguishes the two. ``running_width`` replaces M_Z Γ_Z in the
    Breit–Wigner by ŝ Γ_Z / M_Z (Pythia 8's ``ffbar2gmZ``).
    """

    alpha: float = ALPHA_EM_MZ
    m_z: float = M_Z
    gamma_z: float = GAMMA_Z
    sin2_w: float = SIN2_THETA_W
    sin2_w_bar: float | None = None
    running_width: bool = False


def drell_yan_coefficients(shat: torch.Tensor, flavour: int, ew: ElectroweakParameters = ElectroweakParameters()):
    """(A0, A1) of q q̄ → γ*/Z → ℓ⁻ℓ⁺ for a quark flavour 1–5 (PHYSICS.md)."""
    if abs(flavour) not in QUARK_CHARGE:
        raise ValueError(f"Drell–Yan quark flavour must be 1–5 (d, u, s, c, b), got {flavour}")
    q_q, t3_q = QUARK_CHARGE[abs(flavour)], QUARK_T3[abs(flavour)]
    sw2 = ew.sin2_w
    sw2_vec = sw2 if ew.sin2_w_bar is None else ew.sin2_w_bar
    kappa = 1.0 / (4.0 * sw2 * (1.0 - sw2))
    v_l, a_l = -0.5 + 2.0 * sw2_vec, -0.5
    v_q, a_q = t3_q - 2.0 * q_q * sw2_vec, t3_q
    width_term = (shat * ew.gamma_z / ew.m_z) ** 2 if ew.running_width else (ew.gamma_z * ew.m_z) ** 2
    d = (shat - ew.m_z**2) ** 2 + width_term
    chi1 = kappa * shat * (shat - ew.m_z**2) / d
    chi2 = kappa**2 * shat**2 / d
    a0 = q_q**2 - 2.0 * q_q * v_l * v_q * chi1 + (v_l**2 + a_l**2) * (v_q**2 + a_q**2) * chi2
    a1 = -4.0 * q_q * a_l * a_q * chi1 + 8.0 * v_l * a_l * v_q * a_q * chi2
    return a0, a1


def drell_yan_dsigma_dcos(shat, cos_theta, flavour: int, ew: ElectroweakParameters = ElectroweakParameters()):
    """dσ̂/dcos θ (azimuth integrated) in GeV⁻²."""
    a0, a1 = drell_yan_coefficients(shat, flavour, ew)
    return 2.0 * math.pi * ew.alpha**2 / (4.0 * shat * N_C) * (a0 * (1.0 + cos_theta**2) + a1 * cos_theta)


def drell_yan_me2(shat, cos_theta, flavour: int, ew: ElectroweakParameters = ElectroweakParameters()):
    """Spin- and colour-averaged |M|² = 64π² ŝ dσ̂/dΩ (dimensionless)."""
    a0, a1 = drell_yan_coefficients(shat, flavour, ew)
    return 16.0 * math.pi**2 * ew.alpha**2 / N_C * (a0 * (1.0 + cos_theta**2) + a1 * cos_theta)


def drell_yan_sigma_hat(shat, flavour: int, ew: ElectroweakParameters = ElectroweakParameters()):
    """Total partonic σ̂ = 4πα² A0 / (3 ŝ N_c) in GeV⁻²."""
    a0, _ = drell_yan_coefficients(shat, flavour, ew)
    return 4.0 * math.pi * ew.alpha**2 * a0 / (3.0 * shat * N_C)


def _ttbar_check_channel(channel: str) -> None:
    if channel not in ("qq", "gg"):
        raise ValueError(f"tt̄ channel must be 'qq' or 'gg', got {channel!r}")


def ttbar_me2(shat, that, channel: str, m_top: float = M_TOP, alpha_s=ALPHA_S_MZ):
    """Spin- and colour-averaged |M|² of q q̄ → t t̄ (``channel="qq"``) or g g → t t̄
    (``"gg"``) at ŝ and t̂ = (p_q − p_t)² (dimensionless; PHYSICS.md)."""
    _ttbar_check_channel(channel)
    m2 = m_top * m_top
    uhat = 2.0 * m2 - shat - that
    tau1, tau2, rho = (m2 - that) / shat, (m2 - uhat) / shat, 4.0 * m2 / shat
    gs4 = (4.0 * math.pi * alpha_s) ** 2
    if channel == "qq":
        return gs4 * (4.0 / 9.0) * (tau1**2 + tau2**2 + rho / 2.0)
    return gs4 * (1.0 / (6.0 * tau1 * tau2) - 3.0 / 8.0) * (tau1**2 + tau2**2 + rho - rho**2 / (4.0 * tau1 * tau2))


def ttbar_sigma_hat(shat, channel: str, m_top: float = M_TOP, alpha_s=ALPHA_S_MZ):
    """Total partonic σ̂ in GeV⁻² (zero below threshold), the closed forms of PHYSICS.md."""
    _ttbar_check_channel(channel)
    shat = torch.as_tensor(shat, dtype=torch.float64)
    rho = torch.clamp(4.0 * m_top**2 / shat, max=1.0)
    beta = torch.sqrt(1.0 - rho)
    if channel == "qq":
        out = 8.0 * math.pi * alpha_s**2 / (27.0 * shat) * beta * (1.0 + rho / 2.0)
    else:
        log = torch.log((1.0 + beta) / torch.clamp(1.0 - beta, min=1e-300))
        out = math.pi * alpha_s**2 / (3.0 * shat) * ((1.0 + rho + rho**2 / 16.0) * log - beta * (7.0 / 4.0 + 31.0 * rho / 16.0))
    return torch.where(beta > 0, out, torch.zeros_like(out))
