"""pp → tt̄ → 6 quarks: LO matrix elements, Pythia8 parton level, the MMD GAN, resonance
fits, the classifier test, LHE output with the decay chain, and the generate job."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from partonic.cards import CardError, parse_card
from partonic.cli import main
from partonic.evaluate.metrics import auc, classifier_auc, fit_breit_wigner
from partonic.io.lhe import LHEEvents, LHEInit, LHEProcess, read_lhe, write_lhe
from partonic.jobs.common import JobError
from partonic.jobs.generate import incoming_probabilities, on_shell, quarks_from_lhe, ttbar_cross_section, ttbar_lhe_events
from partonic.models.mmd_gan import MMDGAN, QUARK_MASSES, TopQuarkRepresentation, resonance_masses, swap_beams
from partonic.models.weighted_gan import WeightedGAN
from partonic.physics import kinematics as kin
from partonic.physics.constants import GEV2_TO_PB
from partonic.physics.matrix_elements import ttbar_me2, ttbar_sigma_hat
from partonic.physics.pdf import AlphaS, load_pdf
from partonic.simulate.pythia import shower_lhe, ttbar_chunk, ttbar_settings


@pytest.fixture(scope="module")
def pythia_ttbar():
    """2000 parton-level tt̄ events from Pythia8 (about 0.3 s)."""
    out = ttbar_chunk({"n_events": 2000, "settings": ttbar_settings(11)})
    out["on_shell"] = on_shell(torch.from_numpy(out["quarks"]))
    return out


# ------------------------------------------------------------ matrix elements
@pytest.mark.parametrize("sqrt_shat, qq, gg", [(400, 21.75, 12.85), (500, 18.06, 17.93), (1000, 5.02, 11.37)])
def test_ttbar_sigma_hat_matches_the_check_values(sqrt_shat, qq, gg):
    s = torch.tensor(float(sqrt_shat) ** 2, dtype=torch.float64)
    # check values of PHYSICS.md are quoted to 4 digits
    assert float(ttbar_sigma_hat(s, "qq", 173.0, 0.118)) * GEV2_TO_PB == pytest.approx(qq, rel=5e-4)
    assert float(ttbar_sigma_hat(s, "gg", 173.0, 0.118)) * GEV2_TO_PB == pytest.approx(gg, rel=5e-4)


@pytest.mark.parametrize("channel", ["qq", "gg"])
def test_ttbar_me2_integrates_to_sigma_hat(channel):
    """∫ dt |M|²/(16π ŝ²) over the physical t range equals the closed-form σ̂ (a second method)."""
    m2 = 173.0**2
    for roots in (360.0, 700.0, 3000.0):
        s = torch.tensor(roots**2, dtype=torch.float64)
        beta = math.sqrt(1 - 4 * m2 / roots**2)
        c = torch.linspace(-1, 1, 40001, dtype=torch.float64)
        t = m2 - roots**2 / 2 * (1 - beta * c)
        integrand = ttbar_me2(s, t, channel) / (16 * math.pi * s * s) * (roots**2 * beta / 2)
        assert float(torch.trapezoid(integrand, c)) == pytest.approx(float(ttbar_sigma_hat(s, channel)), rel=1e-6)
    assert float(ttbar_sigma_hat(torch.tensor(300.0**2), channel)) == 0.0  # below threshold
    with pytest.raises(ValueError, match="'qq' or 'gg'"):
        ttbar_sigma_hat(s, "qg")


# ------------------------------------------------------------------ Pythia8
def test_pythia_ttbar_gives_six_quarks_from_the_decay_chain(pythia_ttbar):
    ids, q = pythia_ttbar["ids"], torch.from_numpy(pythia_ttbar["quarks"])
    assert pythia_ttbar["errors"] == {} and pythia_ttbar["n_failed"] == 0
    assert (ids[:, 0] == 5).all() and (ids[:, 3] == -5).all()
    assert np.isin(ids[:, 1], [2, 4]).all() and np.isin(ids[:, 2], [-1, -3]).all()
    assert np.isin(ids[:, 4], [1, 3]).all() and np.isin(ids[:, 5], [-2, -4]).all()
    assert float(kin.pt(q.sum(1)).max()) < 1e-6  # no ISR: the six quarks balance in pT
    m = resonance_masses(q)
    # medians of Breit–Wigner samples sit at the pole: 2000 events give ~Γ/2·π/√(4n) ≈ 0.05 GeV
    assert np.median(m[:, :2].numpy()) == pytest.approx(80.385, abs=0.3)
    assert np.median(m[:, 2:].numpy()) == pytest.approx(173.0, abs=0.3)
    assert 200 < pythia_ttbar["sigma_pb"] < 260  # PHYSICS.md: Pythia8 reports about 234 pb


def test_incoming_flavour_shares_match_pythia(pythia_ttbar):
    """The LO share of g g (PDF × |M|²) at each Pythia event, averaged, equals the
    fraction of g g events Pythia generated, within its binomial error."""
    q = torch.from_numpy(pythia_ttbar["quarks"])
    inc = pythia_ttbar["incoming"]
    total = q.sum(1)
    x1, x2 = (total[:, 0] + total[:, 3]) / 13000.0, (total[:, 0] - total[:, 3]) / 13000.0
    pa = torch.stack([x1 * 6500, 0 * x1, 0 * x1, x1 * 6500], 1)
    top = q[:, :3].sum(1)
    mt = torch.sqrt(kin.pt(top) ** 2 + kin.mass2(top))
    pdf = load_pdf("NNPDF23_lo_as_0130_qed", 0)
    probs = incoming_probabilities(x1, x2, kin.mass2(total), kin.mass2(pa - top), pdf, AlphaS(0.13, 1), mt)
    predicted = float(probs[:, 0].mean())
    observed = float(((inc[:, 0] == 21) & (inc[:, 1] == 21)).mean())
    assert abs(predicted - observed) < 3 * math.sqrt(observed * (1 - observed) / len(q)), (predicted, observed)
    # q q̄ with the quark from beam 1 and from beam 2 are equally likely in pp (symmetric)
    assert float(probs[:, 1].mean()) == pytest.approx(float(probs[:, 2].mean()), abs=0.01)


def test_lo_cross_section_matches_pythia():
    """σ(pp → tt̄) at LO from our own integral (PDF grid, α_s, |M|², quadrature)
    equals Pythia8's for stable tops at the pole mass, with Pythia's α_s (0.130 at one
    loop, nf ≤ 6), scales (μ² = m_T²) and PDF (NNPDF2.3 QCD+QED LO), within three of
    Pythia's Monte Carlo standard errors (about 0.2% after 10⁵ events, 1.5 s)."""
    import pythia8mc

    py = pythia8mc.Pythia("", False)
    for line in ["Beams:eCM = 13000", "Top:gg2ttbar = on", "Top:qqbar2ttbar = on", "ProcessLevel:resonanceDecays = off",
                 "PhaseSpace:useBreitWigners = off", "PartonLevel:all = off", "HadronLevel:all = off", "Random:setSeed = on",
                 "Random:seed = 5", "Next:numberCount = 0", "Init:showProcesses = off", "Init:showChangedSettings = off"]:
        assert py.readString(line)
    assert py.init()
    settings = py.settings
    assert (settings.mode("SigmaProcess:renormScale2"), settings.mode("SigmaProcess:factorScale2")) == (2, 1)  # m_T-based
    assert settings.parm("SigmaProcess:Kfactor") == 1.0
    alpha_s = AlphaS(settings.parm("SigmaProcess:alphaSvalue"), settings.mode("SigmaProcess:alphaSorder"),
                     nf_max=settings.mode("StandardModel:alphaSnfmax"))
    while py.infoPython().nAccepted() < 100_000:
        py.next()
    sigma_pythia, error = py.infoPython().sigmaGen() * 1e9, py.infoPython().sigmaErr() * 1e9
    ours = ttbar_cross_section(load_pdf("NNPDF23_lo_as_0130_qed", 0), alpha_s, 13000.0, py.particleData.m0(6))
    assert error < 0.003 * sigma_pythia
    assert abs(ours - sigma_pythia) < 3 * error, (ours, sigma_pythia, error)
    # the quadrature has converged: twice the nodes in every direction moves it by < 10⁻⁴
    finer = ttbar_cross_section(load_pdf("NNPDF23_lo_as_0130_qed", 0), alpha_s, 13000.0, py.particleData.m0(6), nodes=(96, 48, 24))
    assert finer == pytest.approx(ours, rel=1e-4)


# ---------------------------------------------------------------------- model
@pytest.mark.parametrize("representation", ["momenta", "ptetaphi", "logpt"])
def test_representation_round_trip(pythia_ttbar, representation):
    quarks = pythia_ttbar["on_shell"]
    rep = TopQuarkRepresentation(representation).fit(quarks)
    u = rep(quarks)
    assert u.shape == (len(quarks), 18)
    assert u.mean(0).abs().max() < 1e-8 and (u.std(0) - 1).abs().max() < 1e-8
    assert torch.allclose(rep.inverse(u), quarks, rtol=1e-9, atol=1e-7)
    # masses of the generated quarks are fixed by flavour
    back = rep.inverse(torch.randn(50, 18, dtype=torch.float64, generator=torch.Generator().manual_seed(4)))
    # √(E² − p²) of a massless quark rounds to ~√ε·E ≈ 1.5e-8 E (log pT draws reach E ≫ 10³ GeV)
    deviation = (kin.mass(back) - torch.tensor(QUARK_MASSES, dtype=torch.float64)).abs()
    assert bool((deviation <= 1e-4 + 1e-6 * back[..., 0]).all())


@pytest.mark.parametrize("angles", ["lab", "helicity"])
def test_decay_representation_round_trip_and_physical_events(pythia_ttbar, angles):
    """The decay chain (16 coordinates): exact round trip on Pythia8 events, and every
    vector of ℝ¹⁶ an event with on-shell quarks, balanced transverse momentum and
    resonance masses inside the training windows."""
    quarks = pythia_ttbar["on_shell"]
    rep = TopQuarkRepresentation("decay", angles=angles).fit(quarks)
    u = rep(quarks)
    assert rep.dim == 16 and u.shape == (len(quarks), 16)
    assert u.mean(0).abs().max() < 1e-8 and (u.std(0) - 1).abs().max() < 1e-8
    assert torch.allclose(rep.inverse(u), quarks, rtol=1e-9, atol=1e-7)
    back = rep.inverse(torch.randn(2000, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))
    deviation = (kin.mass(back) - torch.tensor(QUARK_MASSES, dtype=torch.float64)).abs()
    assert bool((deviation <= 1e-4 + 1e-6 * back[..., 0]).all())
    assert back[..., 1:3].sum(1).abs().max() < 1e-6 * back[..., 0].sum(1).max()
    with pytest.raises(CardError, match="latent_dim ≥ 16"):
        parse_card({"job": "generate", "name": "x", "model": {"representation": "decay", "generator": "residual", "latent_dim": 8}})
    with pytest.raises(CardError, match="representation = 'decay' only"):
        parse_card({"job": "generate", "name": "x", "model": {"representation": "logpt", "decay_angles": "helicity"}})
    m = resonance_masses(back)
    windows = rep.windows
    assert bool(((m >= windows[:, 0] - 1e-4) & (m <= windows[:, 1] + 1e-4)).all())


def test_decay_coordinates_against_vector_boosts(pythia_ttbar):
    """The b direction in the top rest frame and the quark direction in the W⁺ rest
    frame, from scikit-hep vector's boosts, give the representation's angle coordinates."""
    import vector

    from partonic.models.mmd_gan import decay_coordinates

    quarks = pythia_ttbar["on_shell"][:500]
    rep = TopQuarkRepresentation("decay").fit(pythia_ttbar["on_shell"])
    raw = decay_coordinates(quarks, rep.windows)
    a = quarks.numpy()
    v = [vector.array({"E": a[:, i, 0], "px": a[:, i, 1], "py": a[:, i, 2], "pz": a[:, i, 3]}) for i in range(6)]
    top, w = v[0] + v[1] + v[2], v[1] + v[2]
    b_rest, q_rest = v[0].boost_beta3(-top.to_beta3()), v[1].boost_beta3(-w.to_beta3())
    for rest, cols in ((b_rest, (5, 6)), (q_rest, (8, 9))):
        cos_theta = rest.pz / rest.p
        np.testing.assert_allclose(torch.special.ndtr(raw[:, cols[0]]).numpy(), (1 + cos_theta) / 2, atol=1e-9)
        np.testing.assert_allclose(torch.special.ndtr(raw[:, cols[1]]).numpy(), (rest.phi + math.pi) / (2 * math.pi), atol=1e-9)
    np.testing.assert_allclose(raw[:, 1].numpy(), top.rapidity, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(raw[:, 3].numpy(), (v[3] + v[4] + v[5]).rapidity, rtol=1e-9, atol=1e-9)


def test_helicity_angles_show_the_w_polarisation(pythia_ttbar):
    """In helicity axes the round trip holds, and the quark of each W decay carries the
    LO W polarisation of top decays: ⟨cos θ⟩ = ±F_L/2 with F_L = 2m_W²/(m_t² + 2m_W²)
    (m_b = 0; + for the up-type quark of W⁺, − for the down-type quark of W⁻), while in
    the lab axes the same angle averages to 0."""
    from partonic.models.mmd_gan import decay_coordinates
    from partonic.physics.constants import M_TOP, M_W

    quarks = pythia_ttbar["on_shell"]
    rep = TopQuarkRepresentation("decay", angles="helicity").fit(quarks)
    assert torch.allclose(rep.inverse(rep(quarks)), quarks, rtol=1e-9, atol=1e-7)
    f_l = 2 * M_W**2 / (M_TOP**2 + 2 * M_W**2)
    for angles, expected in (("helicity", f_l / 2), ("lab", 0.0)):
        raw = decay_coordinates(quarks, rep.windows, angles=angles)
        for column, sign in ((8, 1), (14, -1)):
            cos_theta = 2 * torch.special.ndtr(raw[:, column]) - 1
            standard_error = float(cos_theta.std()) / math.sqrt(len(cos_theta))
            assert abs(float(cos_theta.mean()) - sign * expected) < 4 * standard_error, (angles, column)
    with pytest.raises(ValueError, match="decay angles"):
        TopQuarkRepresentation("decay", angles="beam")


def test_decay_representation_turns_standard_normal_masses_into_breit_wigners():
    """Standard normal mass coordinates are relativistic Breit–Wigner masses: the
    quartiles of the W and top masses, computed from the generated four-momenta, are
    those of the closed-form CDF in the window (within four standard errors)."""
    from partonic.models.mmd_gan import RESONANCES, decay_momenta

    n = 40_000
    windows = torch.tensor([[50.0, 110.0], [50.0, 110.0], [150.0, 200.0], [150.0, 200.0]], dtype=torch.float64)
    raw = torch.randn(n, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    raw[:, 0] = raw[:, 0] * 0.5 + 4.5  # log pT of the top
    m = resonance_masses(decay_momenta(raw, windows))
    for k, (_, mass, width) in enumerate(RESONANCES.values()):
        lo, hi = (math.atan((x**2 - mass**2) / (mass * width)) for x in windows[k].tolist())
        for q in (0.25, 0.5, 0.75):
            expected = math.sqrt(mass**2 + mass * width * math.tan(lo + q * (hi - lo)))
            density = (hi - lo) ** -1 * 2 * expected * mass * width / ((expected**2 - mass**2) ** 2 + (mass * width) ** 2)
            standard_error = math.sqrt(q * (1 - q) / n) / density
            assert abs(float(torch.quantile(m[:, k], q)) - expected) < 4 * standard_error, (k, q)


def test_a_few_steps_on_the_mmd_term_decrease_it(pythia_ttbar):
    torch.manual_seed(0)
    real = pythia_ttbar["on_shell"].float()
    gan = MMDGAN(TopQuarkRepresentation("logpt").fit(real.double()), width=32, layers=2, mmd_weight=1.0)
    opt = torch.optim.Adam(gan.generator.parameters(), lr=3e-3)
    z_eval = torch.randn(1000, gan.latent_dim)

    def mmd_now():
        with torch.no_grad():
            return float(gan.mmd(gan.generate(z_eval), real[:1000]))

    before = mmd_now()
    for _ in range(60):
        opt.zero_grad()
        idx = torch.randint(0, len(real), (256,))
        gan.mmd(gan.generate(torch.randn(256, gan.latent_dim)), real[idx]).backward()
        opt.step()
    after = mmd_now()
    # the estimator's own noise: MMD² between two independent truth samples of 1000
    noise = abs(float(gan.mmd(real[:1000], real[1000:2000])))
    assert noise < 0.05 and before - after > 10 * noise + 0.3, (before, after, noise)


@pytest.mark.parametrize("options", [{}, {"spectral_norm": True, "batch_statistics": True, "discriminator_masses": True}])
def test_gan_loss_is_finite_with_gradients_for_both_networks(pythia_ttbar, options):
    torch.manual_seed(1)
    real = pythia_ttbar["on_shell"][:128]
    gan = MMDGAN(TopQuarkRepresentation("ptetaphi").fit(real), width=16, layers=2, **options)
    out = gan.loss((real,))
    assert set(out) >= {"loss", "loss_d", "loss_g", "mmd"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    for net in (gan.generator, gan.discriminator):
        grads = [p.grad for p in net.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(float(g.abs().sum()) > 0 for g in grads)
    assert gan.sample(10).shape == (10, 6, 4)


# --------------------------------------------------------------------- metrics
def test_breit_wigner_fit_recovers_position_and_width():
    rng = np.random.default_rng(5)
    m = 80.4 + 2.05 / 2 * rng.standard_cauchy(100_000)
    background = rng.uniform(80.4 - 20.5, 80.4 + 20.5, 10_000)
    fit = fit_breit_wigner(np.concatenate([m, background]), 80.4, 2.05)
    assert abs(fit.position - 80.4) < 3 * fit.position_error
    assert abs(fit.width - 2.05) < 3 * fit.width_error
    assert fit.width_error < 0.02
    # a Gaussian smear of σ = 2 GeV is a much wider peak for both measures
    wide = fit_breit_wigner(rng.normal(80.4, 2.0, 100_000), 80.4, 2.05)
    assert wide.width > 1.2 * fit.width and wide.fwhm > 2 * fit.fwhm
    # no peak at all (a GAN without MMD): a density falling linearly by 60% over
    # [150, 200] GeV. The position stays in the window (an unbounded fit put it at
    # 50 GeV with Γ = 10⁻⁶ GeV, the far tail of a Cauchy mimicking the slope).
    x = rng.uniform(size=40_000)
    falling = 150.0 + 50.0 * (1 - np.sqrt(1 - 0.6 * 1.4 * x)) / 0.6
    for masses in (falling, rng.uniform(0.0, 400.0, 20_000)):
        fit = fit_breit_wigner(masses, 172.96, 1.36)
        assert fit.window[0] <= fit.position <= fit.window[1]
        assert fit.background > 0.9 or fit.width > 10 * 1.36


def test_auc_and_the_classifier_test():
    assert auc([0.0, 1.0], [2.0, 3.0]) == 1.0 and auc([2.0, 3.0], [0.0, 1.0]) == 0.0
    assert auc([1.0, 1.0], [1.0, 1.0]) == 0.5
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(20_000, 4)), rng.normal(size=(20_000, 4))
    same = classifier_auc(x, y, epochs=3, seed=1)
    # AUC standard error for n = 10⁴ per class on the test half: √((2n+1)/(12 n²)) ≈ 0.004
    assert abs(same - 0.5) < 4 * math.sqrt((2 * 10_000 + 1) / (12 * 10_000**2)) + 0.01  # + the classifier's own overfit
    y[:, 0] *= 1.3
    assert classifier_auc(x, y, epochs=3, seed=1) > 0.54


# ----------------------------------------------------------------------- LHE
def _colour_balanced(events: LHEEvents) -> bool:
    """Every colour tag appears once as a source (outgoing colour, incoming anticolour)
    and once as a sink (outgoing anticolour, incoming colour), resonances left out."""
    for i in range(len(events)):
        sources, sinks = [], []
        for k in range(int(events.n_particles[i])):
            st, c1, c2 = int(events.status[i, k]), int(events.color1[i, k]), int(events.color2[i, k])
            if st == 1:
                sources.append(c1), sinks.append(c2)
            elif st == -1:
                sources.append(c2), sinks.append(c1)
        if sorted(c for c in sources if c) != sorted(c for c in sinks if c) or len(set(c for c in sources if c)) != len([c for c in sources if c]):
            return False
    return True


def test_lhe_events_carry_a_balanced_decay_chain(pythia_ttbar, tmp_path):
    quarks, ids = pythia_ttbar["on_shell"][:300], torch.from_numpy(pythia_ttbar["ids"][:300])
    # a generated event balances pT only approximately: perturb, the writer must restore it
    quarks = on_shell(quarks + torch.cat([torch.zeros(300, 6, 1), torch.randn(300, 6, 3, dtype=torch.float64)], 2))
    pdf = load_pdf("NNPDF23_lo_as_0130_qed", 0)
    events, info = ttbar_lhe_events(quarks, ids, 230.0, 13000.0, pdf, AlphaS(0.13, 1), torch.Generator().manual_seed(0))
    assert info["events"] + info["dropped_x_above_1"] == 300 and info["mean_pt_removed_gev"] > 0.5
    path = write_lhe(tmp_path / "tt.lhe", events, LHEInit(energies=(6500.0, 6500.0), processes=[LHEProcess(230.0, 1.0, 230.0)]))
    _, back = read_lhe(path)
    assert len(back) == info["events"]
    p, st = back.momenta, back.status
    incoming = (p * (st == -1)[..., None]).sum(1)
    outgoing = (p * (st == 1)[..., None]).sum(1)
    assert torch.allclose(incoming, outgoing, rtol=1e-9, atol=1e-6)
    assert (back.pid[:, 2] == 6).all() and (back.pid[:, 4] == 24).all() and (back.pid[:, 6] == -24).all()
    for r, daughters in {2: (4, 5), 3: (6, 7), 4: (8, 9), 6: (10, 11)}.items():
        # each resonance is the mother of its daughters, their sum, with their mass
        assert all(bool((back.mother1[:, d] == r + 1).all()) for d in daughters)
        assert torch.allclose(p[:, list(daughters)].sum(1), p[:, r], rtol=1e-9, atol=1e-6)
        assert torch.allclose(back.mass[:, r], kin.mass(p[:, r]), rtol=1e-7)
    assert _colour_balanced(back)
    # the record reads back into the six quarks, in order, with the resonance masses
    q_back, id_back = quarks_from_lhe(back)
    assert torch.equal(id_back, back.pid[:, [5, 8, 9, 7, 10, 11]])
    assert torch.allclose(resonance_masses(q_back), back.mass[:, [4, 6, 2, 3]], rtol=1e-7)
    shower = shower_lhe(path, max_events=30, hadronise=False)
    assert shower.n_accepted == 30 and shower.errors == {}


def test_lhe_without_the_decay_chain_is_refused_naming_the_event(pythia_ttbar):
    n = 3
    events = LHEEvents(
        pid=torch.tensor([[21, 21, 6, -6]] * n), status=torch.tensor([[-1, -1, 1, 1]] * n), mother1=torch.tensor([[0, 0, 1, 1]] * n),
        mother2=torch.tensor([[0, 0, 2, 2]] * n), color1=torch.zeros(n, 4, dtype=torch.long), color2=torch.zeros(n, 4, dtype=torch.long),
        momenta=torch.zeros(n, 4, 4, dtype=torch.float64), mass=torch.zeros(n, 4, dtype=torch.float64), weight=torch.ones(n),
        scale=torch.ones(n), aqed=torch.ones(n), aqcd=torch.ones(n), process_id=torch.ones(n, dtype=torch.long),
    )
    with pytest.raises(JobError, match=r"f.lhe: event 1 is not t t̄"):
        quarks_from_lhe(events, where="f.lhe: ")


# ----------------------------------------------------------------------- job
def test_generate_job_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("PARTONIC_CACHE", str(tmp_path / "cache"))
    card = tmp_path / "tt.yaml"
    card.write_text(
        "job: generate\nname: tt_tiny\nseed: 2\n"
        "data: {source: pythia, n_events: 3000, workers: 1}\n"
        "model: {layers: 2, width: 32, representation: logpt}\n"
        "training: {batch_size: 256, epochs: 1, optimizer: {name: adam, lr: 1.0e-3, betas: [0.5, 0.9]}, schedule: {name: constant}}\n"
        "evaluation: {n_generated: 3000, bins: 10, classifier_events: 3000, classifier_epochs: 1, shower_events: 20}\n"
    )
    out = tmp_path / "run"
    assert main(["generate", "--card", str(card), "--output", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    for name in ("W+", "W-", "t", "tbar"):
        for key in ("truth", "generated", "generated_no_mmd"):
            assert set(report["resonances"][name][key]) >= {"position", "width"}
        assert report["resonances"][name]["truth"]["position"] == pytest.approx(80.4 if "W" in name else 173.0, abs=0.5)
    assert 0.5 <= report["classifier_auc"] <= 1.0 and "classifier_auc_no_mmd" in report
    assert math.isfinite(report["max_bulk_deviation"]) and report["timing"]["generate_events_per_s"] > 0
    assert report["outputs"]["model"] == "model.pt" and len(report["outputs"]["plots"]) == 2 * len(report["observables"])
    _, events = read_lhe(out / report["outputs"]["lhe"])
    assert len(events) == report["lhe"]["events"] and report["shower_check"]["n_accepted"] == 20
    assert report["shower_check"]["errors"] == {}
    assert report["evaluation_truth"] == {"events": 3000, "independent_of_training": False}
    # the cached Pythia sample is reused by a second run, which compares with held-out events
    assert main(["generate", "--card", str(card), "--output", str(tmp_path / "run2"), "--device", "cpu", "--set", "model.ablation=false", "--set", "lhe.write=false",
                 "--set", "evaluation.plots=false", "--set", "evaluation.truth_events=2000"]) == 0
    second = json.loads((tmp_path / "run2" / "report.json").read_text())
    assert second["pythia"]["cached"] is True and "generated_no_mmd" not in second["resonances"]["t"]
    assert second["outputs"]["plots"] == [] and second["outputs"]["lhe"] is None
    assert second["evaluation_truth"] == {"events": 2000, "independent_of_training": True}
    assert second["pythia_evaluation_truth"]["cached"] is False and second["pythia_evaluation_truth"]["cache_key"] != second["pythia"]["cache_key"]
    assert second["resonances"]["t"]["truth"]["position"] == pytest.approx(173.0, abs=0.5)
    # a different sample: the truth fits differ from the first run's (which used the training events)
    assert second["resonances"]["t"]["truth"] != report["resonances"]["t"]["truth"]


def test_held_out_truth_never_shares_a_pythia_seed_with_the_training_sample():
    from partonic.jobs.generate import HELD_OUT_SEED_OFFSET
    from partonic.simulate.pythia import _chunk_seed

    for seed in (0, 1, 2, 17, 12345):
        train = {_chunk_seed(seed, i) for i in range(500)}
        held = {_chunk_seed(seed + HELD_OUT_SEED_OFFSET, i) for i in range(500)}
        assert len(train) == len(held) == 500 and not train & held


def test_generate_from_lhe_files_holds_out_the_events_after_n_events(pythia_ttbar, tmp_path, capsys):
    quarks, ids = pythia_ttbar["on_shell"][:700], torch.from_numpy(pythia_ttbar["ids"][:700])
    events, _ = ttbar_lhe_events(quarks, ids, 230.0, 13000.0, load_pdf("NNPDF23_lo_as_0130_qed", 0), AlphaS(0.13, 1), torch.Generator().manual_seed(0))
    lhe = write_lhe(tmp_path / "tt.lhe", events, LHEInit(energies=(6500.0, 6500.0), processes=[LHEProcess(230.0, 1.0, 230.0)]))
    n_file = len(events)
    card = tmp_path / "tt.yaml"
    card.write_text(
        "job: generate\nname: tt_lhe\nseed: 3\n"
        f"data: {{source: lhe, files: [{lhe}], n_events: 400}}\n"
        "model: {layers: 2, width: 16, representation: logpt, ablation: false}\n"
        "training: {batch_size: 128, epochs: 1}\nlhe: {write: false}\n"
        "evaluation: {n_generated: 1000, bins: 8, classifier_events: 1000, classifier_epochs: 1, plots: false, truth_events: 250}\n"
    )
    out = tmp_path / "run"
    assert main(["generate", "--card", str(card), "--output", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["training_events"] == 400 and report["evaluation_truth"] == {"events": 250, "independent_of_training": True}
    # more held-out events than the files have left: the error says how many there are
    capsys.readouterr()
    assert main(["generate", "--card", str(card), "--output", str(tmp_path / "run2"), "--device", "cpu", "--set", "evaluation.truth_events=5000"]) == 1
    err = capsys.readouterr().err
    assert "evaluation.truth_events = 5000" in err and f"hold {n_file} events, 400 of them for training" in err and f"at most {n_file - 400}" in err


def test_generate_card_errors_name_the_field(tmp_path, capsys):
    card = tmp_path / "bad.yaml"
    card.write_text("job: generate\nname: x\nmodel: {mmd_wieght: 2}\n")
    assert main(["check-card", str(card)]) != 0
    err = capsys.readouterr().err
    assert "mmd_wieght" in err and "mmd_weight" in err
    card.write_text("job: generate\nname: x\nmodel: {representation: cartesian}\n")
    assert main(["check-card", str(card)]) != 0
    err = capsys.readouterr().err
    assert "representation" in err and "logpt" in err
    card.write_text("job: generate\nname: x\ndata: {source: lhe}\n")
    assert main(["check-card", str(card)]) != 0
    assert "files" in capsys.readouterr().err


def test_mmd_weight_warms_up_and_survives_a_checkpoint():
    gan = MMDGAN(TopQuarkRepresentation(), width=8, layers=1, mmd_weight=2.0, mmd_start_step=2, mmd_ramp_steps=4)
    quarks = on_shell(torch.randn(32, 6, 4, dtype=torch.float64) * 40)
    weights = [float(gan.loss((quarks,))["mmd_weight"]) for _ in range(7)]
    assert weights == [0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    restored = MMDGAN(TopQuarkRepresentation(), width=8, layers=1, mmd_weight=2.0, mmd_start_step=2, mmd_ramp_steps=4)
    restored.load_state_dict(gan.state_dict())
    assert int(restored.steps_seen) == 7 and restored.current_mmd_weight() == 2.0
    with torch.no_grad():  # evaluation neither counts steps nor uses the schedule
        assert float(restored.loss((quarks,))["mmd_weight"]) == 2.0 and int(restored.steps_seen) == 7


@pytest.mark.parametrize("make_gan", [
    lambda **kw: MMDGAN(TopQuarkRepresentation(), width=8, layers=1, **kw),
    lambda **kw: WeightedGAN(nn.Identity(), dim=3, latent_dim=2, width=8, layers=1, **kw),
], ids=["mmd_gan", "weighted_gan"])
def test_discriminator_learns_at_its_own_rate(tmp_path, make_gan):
    """Two time-scale updates: the training loop gives the discriminator's parameters
    lr × discriminator_lr_factor and the generator's lr. With the loss Σ of all
    parameters every gradient is 1, so one SGD step moves each by its group's rate."""
    from partonic.cards import TrainingSection
    from partonic.train import train

    gan = make_gan(discriminator_lr_factor=4.0)
    before = {k: v.detach().clone() for k, v in gan.named_parameters()}
    cfg = TrainingSection(batch_size=4, max_steps=1, optimizer={"name": "sgd", "lr": 0.01}, schedule={"name": "constant"}, grad_clip=None,
                          checkpoint_every=10**9, validation_fraction=0)
    train(gan, lambda mod, batch: sum(p.sum() for p in mod.parameters()), (torch.zeros(4, 1),), cfg, tmp_path, seed=1, progress=False)
    names = [name for name, _ in gan.named_parameters()]
    assert any(n.startswith("discriminator") for n in names) and any(n.startswith("generator") for n in names)
    for name, p in gan.named_parameters():
        step = 0.04 if name.startswith("discriminator") else 0.01
        assert torch.allclose(before[name] - p.detach(), torch.full_like(p, step)), name


def test_generator_weight_average_is_kept_and_sampled():
    """With ema_decay the model keeps ā ← d ā + (1 − d) a of the generator's weights at
    every training step and samples from the average; evaluation does not update it."""
    gan = MMDGAN(TopQuarkRepresentation(), width=8, layers=1, mmd_weight=0.0, ema_decay=0.9)
    quarks = on_shell(torch.randn(32, 6, 4, dtype=torch.float64) * 40)
    opt = torch.optim.SGD(gan.optimizer_groups(), lr=0.1)
    expected = [p.detach().clone() for p in gan.generator.parameters()]
    for _ in range(3):
        expected = [0.9 * e + 0.1 * p.detach() for e, p in zip(expected, gan.generator.parameters())]
        out = gan.loss((quarks,))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    for e, avg, live in zip(expected, gan.generator_ema.parameters(), gan.generator.parameters()):
        torch.testing.assert_close(avg, e)
        assert not avg.requires_grad and not torch.equal(avg, live)
    assert all(not any(p is q for q in gan.generator_ema.parameters()) for g in gan.optimizer_groups() for p in g["params"])
    with torch.no_grad():
        gan.loss((quarks,))
    for e, avg in zip(expected, gan.generator_ema.parameters()):
        torch.testing.assert_close(avg, e)
    z = torch.randn(5, 18, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    torch.testing.assert_close(gan.sample(5, generator=torch.Generator().manual_seed(3)), gan.representation.inverse(gan.generator_ema(z).double()))


def test_quantile_marginals_give_a_residual_generator_the_truth_marginals(pythia_ttbar):
    """With marginals = "quantile" the decay coordinates of Pythia8 events are standard
    normal, the round trip stays exact, and standard normal noise (a residual generator
    at its start) gives the top's pT spectrum of the truth: over the truth's deciles
    χ² < 27.9 (p = 10⁻³ for 9 degrees of freedom; the errors count both samples, which
    overstates them for a map fitted to these events). The plain standardisation gives
    χ² ≈ 50–65 here."""
    quarks = pythia_ttbar["on_shell"]
    rep = TopQuarkRepresentation("decay", angles="helicity", marginals="quantile").fit(quarks)
    u = rep(quarks)
    n = len(quarks)
    assert u.mean(0).abs().max() < 5 / math.sqrt(n) and (u.std(0) - 1).abs().max() < 0.05
    assert torch.allclose(rep.inverse(u), quarks, rtol=1e-9, atol=1e-7)
    m = 20_000
    back = rep.inverse(torch.randn(m, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6)))
    edges = np.quantile(kin.pt(quarks[:, :3].sum(1)).numpy(), np.linspace(0, 1, 11))
    edges[0], edges[-1] = 0.0, np.inf
    counts = np.histogram(kin.pt(back[:, :3].sum(1)).numpy(), edges)[0]
    # the truth's deciles carry their own sampling error (n events) besides the m draws
    se = math.sqrt(0.1 * 0.9 * (1 / m + 1 / n))
    assert (((counts / m - 0.1) / se) ** 2).sum() < 27.9
    with pytest.raises(CardError, match="marginals"):
        parse_card({"job": "generate", "name": "x", "model": {"marginals": "gauss"}})


def test_beam_swap_is_a_rotation_and_symmetrises_the_output(pythia_ttbar):
    """swap_beams rotates by π about x: masses, pT and the decay chain's helicity polar
    angles are unchanged event by event, rapidities change sign, twice is the identity.
    A generator biased forward (its correction pushes the top's rapidity up) gives
    ⟨y_t⟩ ≫ 0; with symmetrise = True its sampled ⟨y_t⟩ is 0 within 4 standard errors."""
    from partonic.models.mmd_gan import decay_coordinates

    quarks = pythia_ttbar["on_shell"]
    mask = torch.arange(len(quarks)) % 2 == 0
    rotated = swap_beams(quarks, mask)
    torch.testing.assert_close(swap_beams(rotated, mask), quarks)
    torch.testing.assert_close(kin.mass(rotated), kin.mass(quarks))
    torch.testing.assert_close(kin.pt(rotated), kin.pt(quarks))
    torch.testing.assert_close(kin.eta(rotated[mask]), -kin.eta(quarks[mask]))
    rep = TopQuarkRepresentation("decay", angles="helicity").fit(quarks)
    a, b = decay_coordinates(quarks, rep.windows, angles="helicity"), decay_coordinates(rotated, rep.windows, angles="helicity")
    keep = [0, 4, 5, 7, 8, 10, 11, 13, 14]  # log pT, masses, polar angles
    torch.testing.assert_close(a[:, keep], b[:, keep], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a[mask][:, [1, 3]], -b[mask][:, [1, 3]], rtol=1e-9, atol=1e-9)
    n = 20_000
    means = {}
    for symmetrise in (False, True):
        torch.manual_seed(0)
        gan = MMDGAN(rep, latent_dim=16, width=32, layers=2, generator="residual", symmetrise=symmetrise).double()
        with torch.no_grad():
            gan.generator.correction[-1].bias[1] = 1.0  # the top's rapidity coordinate, one standard deviation forward
        y_t = kin.rapidity(gan.sample(n, generator=torch.Generator().manual_seed(1))[:, :3].sum(1))
        means[symmetrise] = (float(y_t.mean()), float(y_t.std()) / math.sqrt(n))
    assert means[False][0] > 20 * means[False][1]
    assert abs(means[True][0]) < 4 * means[True][1]


@pytest.mark.parametrize("representation, angles, marginals", [
    ("decay", "helicity", "quantile"), ("decay", "lab", "standard"), ("momenta", "lab", "quantile"), ("momenta", "lab", "standard"),
])
def test_beam_swap_and_masses_in_coordinates_match_the_momenta(pythia_ttbar, representation, angles, marginals):
    """The coordinate-space beam exchange equals the representation of the rotated
    momenta, and the masses read off the coordinates equal those of the momenta the
    inverse builds, for the truth and for off-distribution (generated-like) coordinates."""
    quarks = pythia_ttbar["on_shell"]
    rep = TopQuarkRepresentation(representation, angles=angles, marginals=marginals).fit(quarks)
    assert rep.coordinate_training
    mask = torch.arange(len(quarks)) % 3 != 0
    u = rep(quarks)
    torch.testing.assert_close(rep.swap_beams(u, mask), rep(swap_beams(quarks, mask)), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(rep.swap_beams(rep.swap_beams(u, mask), mask), u, rtol=1e-7, atol=1e-7)
    noise = 1.3 * torch.randn(500, rep.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    events = rep.inverse(noise)
    torch.testing.assert_close(rep.resonance_masses(noise), resonance_masses(events), rtol=1e-7, atol=1e-6)
    # where the inverse is inside its bounds (it clamps y_t to ±5 and m_W below m_t − m_b),
    # the round trip is the identity and the exchange in coordinates is the same
    inside = ((rep(events) - noise).abs() < 1e-6).all(1)
    assert int(inside.sum()) > 490
    keep = torch.ones(500, dtype=torch.bool)
    torch.testing.assert_close(rep.swap_beams(noise, keep)[inside], rep(swap_beams(events, keep))[inside], rtol=1e-6, atol=1e-6)
    assert not TopQuarkRepresentation("logpt").fit(quarks).coordinate_training


def test_coordinate_training_takes_precomputed_truth(pythia_ttbar):
    """loss((quarks,)) and loss(training_inputs(quarks)) are the same numbers; both
    networks get gradients, and the MMD's masses come from the generator's coordinates."""
    quarks = pythia_ttbar["on_shell"][:256]
    rep = TopQuarkRepresentation("decay", angles="helicity", marginals="quantile").fit(pythia_ttbar["on_shell"])
    torch.manual_seed(0)
    gan = MMDGAN(rep, width=32, layers=2, generator="residual", symmetrise=True, discriminator_masses=True, batch_statistics=True)
    inputs = gan.training_inputs(quarks)
    assert [t.shape for t in inputs] == [(256, 16), (256, 4)] and inputs[0].dtype == torch.float32
    outs = []
    for batch in ((quarks,), inputs):
        torch.manual_seed(5)
        outs.append(gan.loss(batch))
    # MMD² = <k_xx> + <k_yy> − 2<k_xy>: a cancellation of means of 256² float32 kernel
    # values ≤ 1, so the two paths' rounding differs by up to ~√(256²)·ε₃₂ ≈ 3e-5 there
    # (measured 1.1e-6); a mass from the wrong coordinates moves it by its own size (~2e-3)
    for key in ("loss_d", "loss_g", "mmd"):
        torch.testing.assert_close(outs[0][key], outs[1][key], rtol=1e-5, atol=3e-5 if key == "mmd" else 1e-6)
    outs[1]["loss"].backward()
    for net in (gan.generator, gan.discriminator):
        assert any(float(p.grad.abs().sum()) > 0 for p in net.parameters())
    with pytest.raises(ValueError, match="momenta"):
        MMDGAN(TopQuarkRepresentation("logpt").fit(quarks), width=8, layers=1).training_inputs(quarks)


def test_marginal_distance_is_the_sorted_squared_difference_and_enters_the_generator_loss(pythia_ttbar):
    """Σ_k W₂² of two batches: a shift by d in one coordinate gives d² there, equal
    batches give 0, and the gradient moves each generated value towards the true value
    of the same rank. In the GAN the term adds λ · W₂² to the loss and reaches the
    generator only."""
    from partonic.models.weighted_gan import marginal_distance

    g = torch.Generator().manual_seed(3)
    real = torch.randn(500, 3, generator=g, dtype=torch.float64)
    assert float(marginal_distance(real, real)) == 0.0
    shifted = real.clone()
    shifted[:, 1] += 0.3
    assert float(marginal_distance(shifted, real)) == pytest.approx(0.09, rel=1e-12)
    fake = torch.randn(500, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    marginal_distance(fake, real).backward()
    order_f, order_r = fake.detach().sort(0), real.sort(0)
    expected = torch.empty_like(real)
    expected.scatter_(0, order_f.indices, 2 * (order_f.values - order_r.values) / 500)
    torch.testing.assert_close(fake.grad, expected)
    with pytest.raises(ValueError, match="equal size"):
        marginal_distance(fake[:10], real)
    # weights: equal ones change nothing; true values 0 and 1 (half each) with weights 1
    # and 3 have their weighted quantile 0 below level 1/4 and 1 above, so a batch a
    # quarter 0 is at distance 0 and a batch half 0 at 1/4 (a quarter of the ranks off by 1)
    torch.testing.assert_close(marginal_distance(fake.detach(), real, torch.ones(500, dtype=torch.float64)), marginal_distance(fake.detach(), real))
    two = torch.cat([torch.zeros(200, 1), torch.ones(200, 1)]).double()
    w = torch.cat([torch.ones(200), torch.full((200,), 3.0)]).double()
    quarter = torch.cat([torch.zeros(100, 1), torch.ones(300, 1)]).double()
    assert float(marginal_distance(quarter, two, w)) == pytest.approx(0.0, abs=1e-12)
    assert float(marginal_distance(two, two, w)) == pytest.approx(0.25, rel=1e-12)

    quarks = pythia_ttbar["on_shell"][:256]
    rep = TopQuarkRepresentation("decay", angles="helicity", marginals="quantile").fit(pythia_ttbar["on_shell"])
    outs = []
    for weight in (0.0, 2.5):
        torch.manual_seed(0)
        gan = MMDGAN(rep, width=32, layers=2, generator="residual", mmd_weight=0.0, marginal_weight=weight)
        inputs = gan.training_inputs(quarks)
        torch.manual_seed(5)
        outs.append(gan.loss(inputs))
    assert "marginal_w2" not in outs[0] and float(outs[1]["marginal_w2"]) > 0
    torch.testing.assert_close(outs[1]["loss"], outs[0]["loss"] + 2.5 * outs[1]["marginal_w2"])
