"""Phase space: closed-form volumes, conservation, on-shell masses, distributions."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from partonic.physics import kinematics as kin
from partonic.physics.phasespace import (
    breit_wigner_map,
    massless_volume,
    rambo_diet,
    tau_y_map,
    two_body_volume,
)

SQRT_S = 500.0


def mc_volume(weights):
    w = weights.double()
    return w.mean().item(), (w.std() / math.sqrt(len(w))).item()


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_massless_momentum_conservation_and_on_shell(n, rng):
    s = torch.full((20000,), SQRT_S, dtype=torch.float64)
    p, w = rambo_diet(s, n, generator=rng)
    total = p.sum(1)
    torch.testing.assert_close(total, torch.tensor([SQRT_S, 0, 0, 0], dtype=torch.float64).expand_as(total), rtol=0, atol=1e-12 * SQRT_S)
    # massless on-shell relative to the energy scale, at double precision
    assert (kin.mass2(p).abs() / p[..., 0] ** 2).max() < 1e-12
    assert (p[..., 0] > 0).all()
    torch.testing.assert_close(w, torch.full_like(w, massless_volume(n, SQRT_S**2)))


def test_massless_volume_formula_special_cases():
    assert massless_volume(2, 1.0) == pytest.approx(1 / (8 * math.pi))
    # Φ_3 = s / (256 π³)
    assert massless_volume(3, 4.0) == pytest.approx(4.0 / (256 * math.pi**3))


@pytest.mark.parametrize("n", [2, 3, 4])
def test_massive_algorithm_at_tiny_masses_reproduces_massless_volume(n, rng):
    # The massive weight fluctuates event by event, so this is a genuine MC volume.
    s = torch.full((200000,), SQRT_S, dtype=torch.float64)
    _, w = rambo_diet(s, n, masses=[1e-3] * n, generator=rng)
    vol, err = mc_volume(w)
    exact = massless_volume(n, SQRT_S**2)
    assert abs(vol - exact) < 3 * err + 1e-6 * exact


def test_massive_two_body_volume(rng):
    m1, m2 = 173.0, 80.4
    s = torch.full((1000,), SQRT_S, dtype=torch.float64)
    p, w = rambo_diet(s, 2, masses=[m1, m2], generator=rng)
    exact = two_body_volume(SQRT_S**2, m1, m2).item()
    torch.testing.assert_close(w, torch.full_like(w, exact), rtol=1e-10, atol=0)
    torch.testing.assert_close(kin.mass(p), torch.tensor([m1, m2], dtype=torch.float64).expand(1000, 2), rtol=1e-9, atol=1e-9)


def test_massive_three_body_volume_against_dalitz_integral(rng):
    """Φ_3 = 1/(128 π³ s) ∫∫ ds12 ds23 over the Dalitz region (PDG kinematics review)."""
    m = [4.7, 0.0, 80.4]
    s = SQRT_S**2
    t = torch.full((400000,), SQRT_S, dtype=torch.float64)
    p, w = rambo_diet(t, 3, masses=m, generator=rng)
    vol, err = mc_volume(w)

    def lam(a, b, c):
        return a * a + b * b + c * c - 2 * a * b - 2 * a * c - 2 * b * c

    def width(s12):
        # range of s23 at fixed s12 (PDG eq. 49.23)
        e2 = (s12 - m[0] ** 2 + m[1] ** 2) / (2 * math.sqrt(s12))
        e3 = (s - s12 - m[2] ** 2) / (2 * math.sqrt(s12))
        p2, p3 = math.sqrt(max(e2**2 - m[1] ** 2, 0)), math.sqrt(max(e3**2 - m[2] ** 2, 0))
        return 4 * p2 * p3

    area, _ = integrate.quad(width, (m[0] + m[1]) ** 2, (SQRT_S - m[2]) ** 2, limit=200)
    exact = area / (128 * math.pi**3 * s)
    assert abs(vol - exact) < 3 * err, (vol, err, exact)
    m2_true = torch.tensor(m, dtype=torch.float64) ** 2
    assert ((kin.mass2(p) - m2_true).abs() / p[..., 0] ** 2).max() < 1e-12
    torch.testing.assert_close(p.sum(1)[:, 0], t, rtol=1e-12, atol=1e-9)


def test_four_body_pair_mass_distribution(rng):
    """Massless 4-body: the density of u = s12/s is ∝ Φ2(u) Φ3(s; √(us), 0, 0).

    A second, independent check of the algorithm beyond its constant weight."""
    n_ev = 200000
    p, _ = rambo_diet(torch.full((n_ev,), 1.0, dtype=torch.float64), 4, generator=rng)
    u = kin.mass2(p[:, 0] + p[:, 1]).clamp(min=0).numpy()

    def phi3_one_massive(m2):
        # ∫ ds23 λ^{1/2}(1, m2, s23) over s23 ∈ [0, (1 − √m2)²] (massless pair inside)
        f = lambda s23: math.sqrt(max((1 - m2 - s23) ** 2 - 4 * m2 * s23, 0.0))
        return integrate.quad(f, 0, (1 - math.sqrt(m2)) ** 2)[0]

    edges = np.linspace(0, 1, 21)
    dens = lambda x: phi3_one_massive(x)  # Φ2 of a massless pair is constant
    expected = np.array([integrate.quad(dens, a, b)[0] for a, b in zip(edges[:-1], edges[1:])])
    expected *= n_ev / expected.sum()
    counts, _ = np.histogram(u, edges)
    keep = expected > 20
    chi2 = (((counts - expected) ** 2 / expected)[keep]).sum()
    ndf = keep.sum() - 1
    # 5σ of a χ² with ndf degrees of freedom
    assert chi2 < ndf + 5 * math.sqrt(2 * ndf), (chi2, ndf)


def test_three_body_dalitz_is_flat(rng):
    """For massless 3-body the Dalitz density in (s12, s23) is uniform: u = s12/s ∝ 2(1 − u)."""
    n_ev = 200000
    p, _ = rambo_diet(torch.full((n_ev,), 1.0, dtype=torch.float64), 3, generator=rng)
    u = kin.mass2(p[:, 0] + p[:, 1]).numpy()
    counts, edges = np.histogram(u, np.linspace(0, 1, 11))
    expected = n_ev * np.diff(2 * edges - edges**2)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 9 + 5 * math.sqrt(18), chi2


def test_breit_wigner_map_integral(rng):
    m, g, lo, hi = 91.188, 2.4414, 50.0**2, 150.0**2
    r = torch.rand(200000, generator=rng, dtype=torch.float64)
    s, jac = breit_wigner_map(r, m, g, lo, hi)
    assert s.min() >= lo and s.max() <= hi
    # ∫ ds s² / ((s − M²)² + M²Γ²) has a closed form; compare the MC estimate
    f = s**2 / ((s - m * m) ** 2 + (m * g) ** 2)
    est = (jac * f).double()
    exact = integrate.quad(lambda x: x * x / ((x - m * m) ** 2 + (m * g) ** 2), lo, hi, points=[m * m], limit=200)[0]
    assert abs(est.mean().item() - exact) < 3 * est.std().item() / math.sqrt(len(est))


def test_tau_y_map_area(rng):
    tmin = 1e-3
    r = torch.rand(400000, 2, generator=rng, dtype=torch.float64)
    x1, x2, jac = tau_y_map(r[:, 0], r[:, 1], tmin)
    assert (x1 <= 1 + 1e-12).all() and (x2 <= 1 + 1e-12).all()
    torch.testing.assert_close(x1 * x2, torch.exp(math.log(tmin) * (1 - r[:, 0])), rtol=1e-12, atol=0)
    # area of {x1 x2 > τmin} in the unit square: 1 − τmin + τmin ln τmin
    exact = 1 - tmin + tmin * math.log(tmin)
    est = jac.mean().item()
    err = jac.std().item() / math.sqrt(len(jac))
    assert abs(est - exact) < 3 * err


def test_bad_inputs():
    s = torch.full((4,), 10.0, dtype=torch.float64)
    with pytest.raises(ValueError, match="n >= 2"):
        rambo_diet(s, 1)
    with pytest.raises(ValueError, match="add up to more"):
        rambo_diet(s, 2, masses=[6.0, 5.0])
    with pytest.raises(ValueError, match="shape"):
        rambo_diet(s, 3, r=torch.rand(4, 4))
