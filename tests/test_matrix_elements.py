"""LO matrix elements against the check values of PHYSICS.md and an angular integral."""

import math

import pytest
import torch
from scipy import integrate

from partonic.physics.constants import GEV2_TO_PB
from partonic.physics.matrix_elements import (
    drell_yan_dsigma_dcos,
    drell_yan_me2,
    drell_yan_sigma_hat,
)

# PHYSICS.md: σ̂ in pb at √ŝ = 50, 91.188, 200 GeV (α = 1/132.507, M_Z = 91.188,
# Γ_Z = 2.4414, s_W² = 0.22225)
CHECK = {2: [(50.0, 5.742), (91.188, 803.3), (200.0, 0.5557)], 1: [(50.0, 1.728), (91.188, 1028.0), (200.0, 0.3485)]}


@pytest.mark.parametrize("flavour", [1, 2])
def test_sigma_hat_check_values(flavour):
    for roots, expected in CHECK[flavour]:
        s = torch.tensor(roots**2, dtype=torch.float64)
        got = float(drell_yan_sigma_hat(s, flavour)) * GEV2_TO_PB
        # the sheet quotes 4 significant digits
        assert got == pytest.approx(expected, rel=5e-4), (flavour, roots, got)


@pytest.mark.parametrize("flavour", [1, 2, 3, 4, 5])
def test_angular_integral_and_me2_normalisation(flavour):
    for roots in (60.0, 91.188, 300.0):
        s = torch.tensor(roots**2, dtype=torch.float64)
        total = integrate.quad(lambda c: float(drell_yan_dsigma_dcos(s, torch.tensor(c, dtype=torch.float64), flavour)), -1, 1)[0]
        assert total == pytest.approx(float(drell_yan_sigma_hat(s, flavour)), rel=1e-10)
        # dσ̂/dcosθ = 2π · |M|² / (64 π² ŝ)
        c = torch.tensor(0.3, dtype=torch.float64)
        assert float(drell_yan_dsigma_dcos(s, c, flavour)) == pytest.approx(float(2 * math.pi * drell_yan_me2(s, c, flavour) / (64 * math.pi**2 * s)), rel=1e-12)


def test_forward_backward_asymmetry_sign():
    """Above the Z the ℓ⁻ follows the quark (A_FB > 0 for u and d at 200 GeV)."""
    s = torch.tensor(200.0**2, dtype=torch.float64)
    for flavour in (1, 2):
        fwd = integrate.quad(lambda c: float(drell_yan_dsigma_dcos(s, torch.tensor(c, dtype=torch.float64), flavour)), 0, 1)[0]
        bwd = integrate.quad(lambda c: float(drell_yan_dsigma_dcos(s, torch.tensor(c, dtype=torch.float64), flavour)), -1, 0)[0]
        assert fwd > bwd


def test_bad_flavour():
    with pytest.raises(ValueError, match="flavour must be 1–5"):
        drell_yan_sigma_hat(torch.tensor(100.0), 6)
