"""The naive weighted Drell-Yan generator: σ against an independent quadrature,
agreement between phase-space mappings, kinematics, efficiency."""

import math

import numpy as np
import pytest
import torch

from partonic.evaluate.metrics import hit_or_miss, unweighting_efficiency
from partonic.physics import kinematics as kin
from partonic.physics.pdf import GridPDF
from partonic.simulate.weighted import EXACT_OBSERVABLES, DrellYanGenerator, DrellYanSetup, exact_histograms


@pytest.fixture(scope="module")
def pdf():
    return GridPDF("NNPDF23_lo_as_0130_qed")


def quadrature_sigma(gen: DrellYanGenerator) -> float:
    return gen.integrate()


def test_sigma_matches_quadrature_for_every_mapping(pdf):
    setup = DrellYanSetup(m_min=50.0)
    exact = quadrature_sigma(DrellYanGenerator(setup, pdf))
    assert 1400 < exact < 1700  # LO, one lepton flavour, 13 TeV (PHYSICS.md: 1.5–1.9 nb)
    for mapping, n in (("breit_wigner", 400_000), ("multichannel", 400_000), ("tau_y", 400_000), ("flat", 1_000_000)):
        gen = DrellYanGenerator(DrellYanSetup(m_min=50.0, mapping=mapping), pdf)
        w = gen.generate(n, torch.Generator().manual_seed(11)).weight
        sigma, err = w.mean().item(), w.std().item() / math.sqrt(n)
        # flat sampling has heavy-tailed weights: its error estimate is itself noisy,
        # so allow 4σ there
        k = 4.0 if mapping == "flat" else 3.0
        assert abs(sigma - exact) < k * err, (mapping, sigma, err, exact)


def test_high_mass_window(pdf):
    setup = DrellYanSetup(m_min=500.0, m_max=1000.0, mapping="tau_y")
    gen = DrellYanGenerator(setup, pdf)
    exact = quadrature_sigma(gen)
    w = gen.generate(300_000, torch.Generator().manual_seed(2)).weight
    assert abs(w.mean().item() - exact) < 3 * w.std().item() / math.sqrt(len(w))


def test_event_kinematics(pdf):
    gen = DrellYanGenerator(DrellYanSetup(mapping="breit_wigner"), pdf)
    ev = gen.generate(20_000, torch.Generator().manual_seed(4))
    keep = ev.weight > 0
    pair = ev.leptons[:, 0] + ev.leptons[:, 1]
    torch.testing.assert_close(kin.mass(pair)[keep], ev.m[keep], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kin.rapidity(pair)[keep], ev.y[keep], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(kin.mass(ev.leptons)[keep], torch.full_like(ev.leptons[keep][..., 0], 0.105658), rtol=1e-5, atol=1e-6)
    # transverse momentum balance at LO
    assert pair[:, 1:3].abs().max() < 1e-8
    # channels add up to the weight
    torch.testing.assert_close(ev.channels.sum(1), ev.weight)
    probs = gen.channel_probabilities(ev.m[keep], ev.y[keep], ev.cos_theta[keep])
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(1), torch.ones_like(probs[:, 0]))


def test_naive_efficiency_is_low_and_hit_or_miss_is_unbiased(pdf):
    gen = DrellYanGenerator(DrellYanSetup(mapping="flat"), pdf)
    ev = gen.generate(500_000, torch.Generator().manual_seed(5))
    eff = unweighting_efficiency(ev.weight)
    assert eff.efficiency < 0.01 and eff.efficiency_naive <= eff.efficiency
    # hit-or-miss at the true maximum keeps the shape: compare m_ll above/below M_Z
    kept = hit_or_miss(ev.weight, generator=torch.Generator().manual_seed(6))
    frac_w = (ev.weight * (ev.m < 91.188)).sum() / ev.weight.sum()
    frac_k = (ev.m[kept] < 91.188).double().mean()
    n = len(kept)
    assert abs(frac_k - frac_w) < 4 * math.sqrt(frac_w * (1 - frac_w) / n) + 0.05  # few events: loose


def test_bad_setup():
    with pytest.raises(ValueError, match="mapping"):
        DrellYanSetup(mapping="vegas")
    with pytest.raises(ValueError, match="m_min < m_max"):
        DrellYanSetup(m_min=100.0, m_max=50.0)


def test_sigma_agrees_with_pythia8(pdf):
    """Pythia8's own σ for ffbar2gmZ with the same PDF file, mass cut and its
    electroweak inputs (fixed α(M_Z), s_W², s̄_W², running Z width) read back."""
    from partonic.physics.matrix_elements import ElectroweakParameters
    from partonic.simulate.pythia import pythia_drell_yan

    ref = pythia_drell_yan(m_min=50.0, pdf_path=pdf.path, n_events=100_000, seed=3)
    assert "pythia_errors" not in ref
    ours = quadrature_sigma(DrellYanGenerator(DrellYanSetup(m_min=50.0, ew=ElectroweakParameters(**ref["electroweak"])), pdf))
    assert abs(ours - ref["sigma_pb"]) < 3 * ref["error_pb"], (ours, ref)
    assert abs(ours / ref["sigma_pb"] - 1) < 0.01


def test_exact_histograms_agree_with_the_monte_carlo(pdf):
    """The quadrature's σ per bin of every observable (the jobs' truth) against 4 × 10⁵
    weighted events (an independent estimate): pulls and χ² within statistics, and the
    bins add up to the total σ where they cover the whole range."""
    from partonic.jobs.unweight import OBSERVABLES

    gen = DrellYanGenerator(DrellYanSetup(m_min=50.0, mapping="multichannel"), pdf)
    edges = {name: spec[1](50.0) for name, spec in OBSERVABLES.items()}
    assert set(edges) == set(EXACT_OBSERVABLES)
    exact = exact_histograms(gen, edges)
    total = gen.integrate()
    assert exact["cos_theta"].sum() == pytest.approx(total, rel=1e-4)  # cos θ* ∈ [−1, 1]: all of σ
    assert exact["m_ll"].sum() == pytest.approx(gen.integrate(50.0, 1000.0), rel=1e-4)
    n = 400_000
    ev = gen.generate(n, torch.Generator().manual_seed(21))
    obs = {k: v.numpy() for k, v in ev.observables().items()}
    w = ev.weight.numpy()
    for name, e in edges.items():
        h, _ = np.histogram(obs[name], e, weights=w / n)
        h2, _ = np.histogram(obs[name], e, weights=(w / n) ** 2)
        filled = h2 > 0
        pull = (h - exact[name])[filled] / np.sqrt(h2[filled])
        ndf = int(filled.sum())
        assert (pull**2).sum() / ndf < 1 + 4 * math.sqrt(2 / ndf), (name, (pull**2).sum() / ndf)
        assert np.abs(pull).max() < 4.0, (name, np.abs(pull).max())
    with pytest.raises(ValueError, match="no quadrature"):
        exact_histograms(gen, {"phi_ll": np.linspace(0, 1, 3)})
