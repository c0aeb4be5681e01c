"""cINN unfolding: the invertible network, representations, calibration, detector response,
Pythia8 pp → ZW, and the `unfold` job end to end."""

import copy
import json
import math

import numpy as np
import pytest
import torch

from partonic.cards import CINNModel, DetectorSection
from partonic.cli import main
from partonic.jobs.unfold import lepton_veto_cuts
from partonic.evaluate.calibration import calibration, coverage_curve, noise_floor, quantile_ranks
from partonic.io.lhe import read_lhe
from partonic.models import cinn
from partonic.models.cinn import ConditionalINN, PartonRepresentation, Unfolder, parton_event_ids, parton_observables
from partonic.physics import kinematics as kin
from partonic.simulate.detector import DetectorEvents, apply_detector, jet_energy_resolution
from partonic.simulate.pythia import shower_lhe, simulate_zw


# ----------------------------------------------------------------- the network
@pytest.mark.parametrize("coupling", ["affine", "spline"])
def test_cinn_is_invertible_and_its_log_det_matches_autograd(coupling):
    torch.manual_seed(0)
    inn = ConditionalINN(4, 3, blocks=3, subnet_layers=2, subnet_width=16, condition_layers=1, condition_width=8, condition_dim=5, coupling=coupling, spline_bins=6, spline_bound=3.0).double()
    # Away from the identity start, so the check is not trivial.
    with torch.no_grad():
        for p in inn.parameters():
            if p.requires_grad:  # the fixed permutations and their inverses stay paired
                p.add_(0.3 * torch.randn_like(p))
    x, c = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    x[0, 0] = 4.0  # one coordinate beyond a spline's interval, where it is the identity
    z, log_jac = inn(x, c)
    assert log_jac.abs().min() > 0.01  # the perturbed blocks are not the identity
    back, log_jac_inv = inn.inverse(z, c)
    assert torch.allclose(back, x, atol=1e-10)
    assert torch.allclose(log_jac, -log_jac_inv, atol=1e-10)
    for i in range(len(x)):
        jac = torch.autograd.functional.jacobian(lambda v: inn(v[None], c[i : i + 1])[0][0], x[i])
        # FrEIA draws its soft permutations in float32 and counts their log-det as 0;
        # after .double() they are orthogonal only to ~1e-8, hence the tolerance.
        assert float(torch.linalg.slogdet(jac.detach())[1]) == pytest.approx(float(log_jac[i].detach()), abs=1e-6)


def test_cinn_is_fixed_by_the_torch_seed():
    nets = []
    for _ in range(2):
        np.random.seed(None)  # FrEIA's permutations must not depend on NumPy's global state
        torch.manual_seed(3)
        nets.append(ConditionalINN(4, 3, blocks=2, subnet_width=8, condition_width=8, condition_dim=4))
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()):
        assert torch.equal(a, b)


def _balanced_events(n, seed=0):
    """Massless ℓ⁻ ℓ⁺ q q̄ with Σ pT = 0: a random Z system and W = −Z in the transverse
    plane, each decayed isotropically (built independently of the representation)."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    pt = 200 * u(n)
    phi = 2 * math.pi * u(n) - math.pi

    def system(m, y, sign):
        mt = torch.sqrt(m**2 + pt**2)
        return torch.stack([mt * torch.cosh(y), sign * pt * torch.cos(phi), sign * pt * torch.sin(phi), mt * torch.sinh(y)], -1)

    def decay(p, m):
        cos, az = 2 * u(n) - 1, 2 * math.pi * u(n)
        sin = torch.sqrt(1 - cos**2)
        rest = torch.stack([m / 2, m / 2 * sin * torch.cos(az), m / 2 * sin * torch.sin(az), m / 2 * cos], -1)
        a = kin.boost(rest, p[:, 1:] / p[:, :1])
        return a, p - a

    mz, mw = 91.2 + 3 * torch.randn(n, generator=g, dtype=torch.float64), 80.4 + 3 * torch.randn(n, generator=g, dtype=torch.float64)
    z, w = system(mz, 2 * u(n) - 1, 1.0), system(mw, 2 * u(n) - 1, -1.0)
    return torch.stack([*decay(z, mz), *decay(w, mw)], 1)


@pytest.mark.parametrize("azimuth,quark_label,leptons,decay_angle", [
    ("interval", "energy", "momenta", "atanh"), ("plane", "energy", "momenta", "atanh"), ("plane", "jet", "momenta", "atanh"),
    ("plane", "jet", "system", "atanh"), ("interval", "energy", "momenta", "probit"), ("plane", "jet", "system", "probit"),
])
@pytest.mark.parametrize("references", [1, 2, 5])
def test_parton_representation_round_trip_and_momentum_balance(references, azimuth, quark_label, leptons, decay_angle):
    """With one reference (the ℓ⁻ azimuth), two (and the jets' decay azimuth) or all
    five (and the jets' cos θ, the lepton pair's φ and decay azimuth); the decay
    azimuth as an interval or as a unit vector on the plane; the decay axis from
    the harder quark or from the jets; the leptons as momenta or as the Z system;
    cos θ through atanh or the probit."""
    p = _balanced_events(500)
    phi_ref = 2 * math.pi * torch.rand(500, references, dtype=torch.float64).squeeze(1) - math.pi
    if references == 5:
        phi_ref[:, 2] = torch.rand(500, dtype=torch.float64)
    rep = PartonRepresentation(azimuth=azimuth, quark_label=quark_label, leptons=leptons, decay_angle=decay_angle).double().fit(p, phi_ref)
    f = rep(p, phi_ref)
    dim = 11 if azimuth == "plane" else 10
    assert f.shape == (500, dim)
    assert torch.allclose(f[:, :9].mean(0), torch.zeros(9, dtype=torch.float64), atol=1e-9)
    if azimuth == "plane":
        # the unit vector is left unstandardised, and its length does not matter
        assert torch.allclose(f[:, 9:].norm(dim=-1), torch.ones(500, dtype=torch.float64))
        scaled = torch.cat([f[:, :9], 0.3 * f[:, 9:]], -1)
        assert torch.allclose(rep.inverse(scaled, phi_ref), rep.inverse(f, phi_ref))
    back = rep.inverse(f, phi_ref)
    # the quarks come back ordered by energy (with the energy label; put in that order otherwise)
    p = p.clone()
    for q in (p, back) if quark_label == "jet" else (p,):
        swap = q[:, 3, 0] > q[:, 2, 0]
        q[swap, 2], q[swap, 3] = q[swap, 3].clone(), q[swap, 2].clone()
    assert torch.allclose(back, p, atol=1e-7 * p.abs().max())
    # any feature vector maps to a physical, balanced, massless event
    rand = rep.inverse(3 * torch.randn(500, dim, dtype=torch.float64), phi_ref)
    assert torch.allclose(rand[:, :, 1:3].sum(1), torch.zeros(500, 2, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(kin.mass2(rand), torch.zeros(500, 4, dtype=torch.float64), atol=1e-5 * rand[..., 0].max() ** 2)
    # network outliers far in the tails still give finite momenta
    wild = rep.inverse(30 * torch.randn(2000, dim, dtype=torch.float64), phi_ref.repeat(4, *([1] * (phi_ref.dim() - 1))))
    assert torch.isfinite(wild).all()
    obs = parton_observables(back)
    assert torch.allclose(obs["m_jj"], kin.mass(p[:, 2] + p[:, 3]), rtol=1e-9)
    if leptons == "system":
        # m_ℓℓ is the first coordinate, through the Z Breit–Wigner's CDF
        m_z, gamma_z = float(rep.m_z), float(rep.gamma_z)  # 91.188, 2.4414 GeV, as stored (float32)
        u = torch.atan((kin.mass2(p[:, 0] + p[:, 1]) - m_z**2) / (m_z * gamma_z)) / math.pi + 0.5
        assert torch.allclose(rep.raw(p, phi_ref)[:, 0], torch.log(u / (1 - u)), atol=1e-7)


@pytest.mark.parametrize("quark_label,leptons", [("energy", "system"), ("jet", "system")])
def test_probit_decay_angle_is_the_normal_quantile_of_the_same_cos_theta(quark_label, leptons):
    """decay_angle="probit" changes only the coordinate of both cos θ: Φ⁻¹((1 + cos θ)/2)
    of the same cos θ that atanh sees (an independent evaluation through scipy's
    normal quantile), every other coordinate unchanged; an unknown name is refused."""
    from scipy.stats import norm

    p = _balanced_events(300)
    ref = torch.stack([2 * math.pi * torch.rand(300, dtype=torch.float64) - math.pi, torch.zeros(300, dtype=torch.float64),
                       torch.rand(300, dtype=torch.float64), torch.zeros(300, dtype=torch.float64), torch.zeros(300, dtype=torch.float64)], -1)
    a = PartonRepresentation(azimuth="plane", quark_label=quark_label, leptons=leptons).double().raw(p, ref)
    b = PartonRepresentation(azimuth="plane", quark_label=quark_label, leptons=leptons, decay_angle="probit").double().raw(p, ref)
    angles = [4, 8]  # the ℓ⁻'s cos θ in the Z frame, the quark's in the W frame
    for k in angles:
        expected = norm.ppf(0.5 * (1 + np.tanh(a[:, k].numpy())))
        np.testing.assert_allclose(b[:, k].numpy(), expected, atol=1e-6)
    others = [k for k in range(a.shape[1]) if k not in angles]
    assert torch.equal(a[:, others], b[:, others])
    with pytest.raises(ValueError, match="decay_angle must be 'atanh' or 'probit'"):
        PartonRepresentation(decay_angle="logit")


def test_jet_label_takes_the_quark_nearer_the_jets_decay_axis():
    """With the jets' axis along the harder quark the jet label is the energy label;
    with the axis reversed it takes the other quark: cos θ changes sign and the
    azimuth, measured from the reversed axis, stays 0 instead of jumping to π."""
    p = _balanced_events(400)
    phi = 2 * math.pi * torch.rand(400, dtype=torch.float64) - math.pi
    zero = torch.zeros_like(phi)
    energy = PartonRepresentation().double().raw(p, torch.stack([phi, zero], -1))
    cos, az = torch.tanh(energy[:, 8]), energy[:, 9]
    jet = PartonRepresentation(quark_label="jet").double()
    same = jet.raw(p, torch.stack([phi, az, cos], -1))
    assert torch.allclose(same[:, 8], energy[:, 8], atol=1e-9)
    assert torch.allclose(same[:, 9], zero, atol=1e-9)
    reversed_axis = jet.raw(p, torch.stack([phi, az + math.pi, -cos], -1))
    assert torch.allclose(reversed_axis[:, 8], -energy[:, 8], atol=1e-9)
    assert torch.allclose(torch.cos(reversed_axis[:, 9]), torch.ones_like(phi), atol=1e-9)
    # a quarter turn from the axis is where the label changes: the feature stays continuous in cos θ
    assert torch.allclose(jet.raw(p, torch.stack([phi, az, zero], -1))[:, :8], energy[:, :8])


def test_w_candidate_is_the_present_jet_pair_closest_to_the_w_mass():
    def jet(pt, eta, phi, m=5.0):
        mt = math.hypot(pt, m)
        return [mt * math.cosh(eta), pt * math.cos(phi), pt * math.sin(phi), mt * math.sinh(eta)]

    # pair masses: 1+3 80.5, 2+3 77.7, 1+2 85.1 GeV, pairs with jet 0 above 119 GeV;
    # slot 3 is empty in the second event
    jets = [jet(120, 0.0, 0.0), jet(45, 0.3, 2.0), jet(30, -1.0, -2.0), jet(40, 0.9, -2.09)]
    jets = torch.tensor([jets, jets[:3] + [[0.0] * 4]], dtype=torch.float64)
    a, b = cinn._w_candidate(jets, jets[..., 0] > 0)
    assert torch.equal(a[0], jets[0, 1]) and torch.equal(b[0], jets[0, 3])
    assert torch.equal(a[1], jets[1, 1]) and torch.equal(b[1], jets[1, 2])


# ------------------------------------------------------------------ calibration
def test_calibration_of_exact_posteriors_and_a_too_narrow_one():
    rng = np.random.default_rng(4)
    n, s = 4000, 200
    mean, sd = rng.normal(size=n), rng.uniform(0.5, 2.0, n)
    truth = mean + sd * rng.normal(size=n)
    exact = mean[:, None] + sd[:, None] * rng.normal(size=(n, s))
    cal = calibration(exact, truth)
    # binomial error of a coverage fraction (≤ 0.5/√n) at 4σ; the curve has no discreteness offset
    tol = 4 * 0.5 / math.sqrt(n)
    assert cal.max_deviation < tol
    assert cal.coverage_68 == pytest.approx(0.68, abs=4 * math.sqrt(0.68 * 0.32 / n))
    assert cal.coverage_95 == pytest.approx(0.95, abs=4 * math.sqrt(0.95 * 0.05 / n))
    narrow = mean[:, None] + 0.5 * sd[:, None] * rng.normal(size=(n, s))
    # analytically max_q |Φ(2 Φ⁻¹(q)) − q| = 0.16 for a posterior half as wide as it should be
    assert calibration(narrow, truth).max_deviation > 3 * tol
    ranks = quantile_ranks(np.array([[1.0, 2.0, 3.0]]), np.array([2.5]))
    assert ranks[0] == pytest.approx((2 + 0.5) / 4)


def test_coverage_curve_of_perfectly_uniform_ranks_is_the_diagonal():
    """S + 1 events whose truths have 0, 1, …, S samples below them: the ranks are as
    uniform as S samples allow, so the coverage must be q at every q, not only on the
    rank levels (the step function "rank ≤ q" is off by up to ½/(S + 1))."""
    s = 100
    samples = np.tile(np.arange(s, dtype=np.float64), (s + 1, 1))
    truth = np.arange(s + 1) - 0.5  # event k: exactly k samples below
    q = np.linspace(0.0, 1.0, 21)
    np.testing.assert_allclose(coverage_curve(samples, truth, q), q, atol=1e-12)
    step = (quantile_ranks(samples, truth)[None, :] <= q[:, None]).mean(1)
    assert np.abs(step - q).max() == pytest.approx(0.5 / (s + 1), rel=0.1)
    # a truth equal to a sample: one sample of three below, one tied, so the randomised
    # rank is 1 or 2 with equal chance and the PIT is uniform on [1/4, 3/4]
    tied = coverage_curve(np.array([[1.0, 2.0, 3.0]]), np.array([2.0]), np.array([0.25, 0.5, 0.625]))
    np.testing.assert_allclose(tied, [0.0, 0.5, 0.75])
    # a truth equal to all its samples (e.g. a clamped value) says nothing: the PIT is uniform
    q = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(coverage_curve(np.full((1, 10), 8.0), np.array([8.0]), q), q, atol=1e-12)


def test_interval_coverage_has_no_offset_from_the_number_of_samples():
    """With S = 100 samples per exact posterior, the central intervals read off the
    samples by np.quantile hold only level·(S − 1)/(S + 1) of the truths (0.667, 0.931);
    the PIT's mass between the levels holds the level itself."""
    rng = np.random.default_rng(11)
    n, s = 40000, 100
    cal = calibration(rng.normal(size=(n, s)), rng.normal(size=n))
    for level, value in ((0.68, cal.coverage_68), (0.95, cal.coverage_95)):
        error = math.sqrt(level * (1 - level) / n)
        assert value == pytest.approx(level, abs=4 * error)
    # the order-statistic estimate, as before 2026-12-06, misses by level·2/(S + 1): more
    # than 4 standard errors at both levels, so this test tells the two apart
    samples, truth = rng.normal(size=(n, s)), rng.normal(size=n)
    for level in (0.68, 0.95):
        lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=1)
        old = np.mean((truth >= lo) & (truth <= hi))
        assert level - old > 4 * math.sqrt(level * (1 - level) / n)
        assert getattr(calibration(samples, truth), f"coverage_{round(100 * level)}") == pytest.approx(level, abs=4 * math.sqrt(level * (1 - level) / n))


def test_calibration_noise_floor_is_the_95_percent_point_for_calibrated_posteriors():
    q = np.linspace(0.0, 1.0, 21)
    # many events, many samples, 21-point grid: close to (below) the Kolmogorov 95% point 1.358/√n
    big = noise_floor(40000, 1000, q)
    assert 0.85 * 1.358 / 200 < big < 1.358 / 200
    assert noise_floor(10000, 1000, q) == pytest.approx(2 * big, rel=0.06)  # ∝ 1/√n
    # exceeded by about 5% of independent, exactly calibrated test sets (binomial: 10 ± 3 of 200)
    rng = np.random.default_rng(7)
    n, s = 500, 50
    floor = calibration(rng.normal(size=(n, s)), rng.normal(size=n)).noise_floor
    exceed = sum(calibration(rng.normal(size=(n, s)), rng.normal(size=n)).max_deviation > floor for _ in range(200))
    assert 1 <= exceed <= 20


def _train_toy_inn(inn, x, c, epochs=12, batch=256, lr=2e-3):
    """Maximum likelihood for a toy cINN: Adam with a cosine schedule, shuffled batches."""
    n = len(x)
    opt = torch.optim.Adam(inn.parameters(), lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(n / batch))
    for _ in range(epochs):
        perm = torch.randperm(n)
        for i in range(0, n, batch):
            idx = perm[i : i + batch]
            z, lj = inn(x[idx], c[idx])
            loss = (0.5 * (z**2).sum(-1) - lj).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()


def test_cinn_learns_a_known_gaussian_posterior_and_is_calibrated():
    """Detector = parton + Gaussian noise: x ~ N(0, 1), c = x + N(0, σ²) per component,
    so the posterior is N(c/(1 + σ²), σ²/(1 + σ²)) exactly."""
    torch.manual_seed(1)
    n, sigma = 10000, 0.6
    x = torch.randn(n, 2)
    c = x + sigma * torch.randn(n, 2)
    inn = ConditionalINN(2, 2, blocks=4, subnet_layers=2, subnet_width=32, condition_layers=2, condition_width=32, condition_dim=8)
    _train_toy_inn(inn, x, c)
    n_test, s = 2000, 200
    x_t = torch.randn(n_test, 2)
    c_t = x_t + sigma * torch.randn(n_test, 2)
    with torch.no_grad():
        samples, _ = inn.inverse(torch.randn(n_test * s, 2), c_t.repeat_interleave(s, 0))
    samples = samples.view(n_test, s, 2)
    post_mean, post_sd = c_t / (1 + sigma**2), sigma / math.sqrt(1 + sigma**2)
    # posterior moments per event against the closed form: the sample mean of 200 draws
    # alone is off by E|·| = √(2/π) σ_post/√200 = 0.029; twice that leaves room for training
    assert (samples.mean(1) - post_mean).abs().mean() < 2 * math.sqrt(2 / math.pi) * post_sd / math.sqrt(s)
    assert samples.std(1).mean() == pytest.approx(post_sd, rel=0.05)
    for k in range(2):
        cal = calibration(samples[:, :, k], x_t[:, k])
        # binomial error of a coverage point at 4σ
        assert cal.max_deviation < 4 * 0.5 / math.sqrt(n_test)


def test_spline_cinn_learns_a_two_mode_posterior():
    """Detector = |parton| + noise in the first coordinate: c₁ = |x₁| + N(0, σ²), x ~ N(0, 1).
    The posterior of x₁ has two mirror modes, ±|x₁| with |x₁| a normal of mean c₁/(1 + σ²)
    and variance σ²/(1 + σ²) truncated at 0 (the jet-pairing ambiguity in miniature).
    Four spline blocks split the probability between the modes (four affine blocks of
    the same size do not: max |coverage − q| 0.08, the mean of |x₁| off by 0.35)."""
    from scipy.stats import norm

    torch.manual_seed(1)
    n, sigma = 10000, 0.3

    def data(n):
        x = torch.randn(n, 2)
        return x, torch.stack([x[:, 0].abs(), x[:, 1]], 1) + sigma * torch.randn(n, 2)

    x, c = data(n)
    inn = ConditionalINN(2, 2, blocks=4, subnet_layers=2, subnet_width=32, condition_layers=2, condition_width=32, condition_dim=8, coupling="spline", spline_bins=8, spline_bound=4.0)
    _train_toy_inn(inn, x, c)
    n_test, s = 2000, 200
    x_t, c_t = data(n_test)
    with torch.no_grad():
        samples, _ = inn.inverse(torch.randn(n_test * s, 2), c_t.repeat_interleave(s, 0))
    samples = samples.view(n_test, s, 2)
    tolerance = 4 * 0.5 / math.sqrt(n_test) + 0.5 / (s + 1)  # as in the Gaussian test above
    assert calibration(samples[:, :, 0], x_t[:, 0]).max_deviation < tolerance
    assert calibration(samples[:, :, 0].abs(), x_t[:, 0].abs()).max_deviation < tolerance
    # where the modes are apart, the mean of |x₁| per event against the truncated normal's:
    # 200 draws alone give E|·| = √(2/π) sd/√200; twice that leaves room for training
    apart = c_t[:, 0] > 1.0
    mu, sd = c_t[apart, 0] / (1 + sigma**2), sigma / math.sqrt(1 + sigma**2)
    a = (mu / sd).numpy()
    mean_abs = mu + sd * torch.from_numpy(norm.pdf(a) / norm.cdf(a)).float()
    assert (samples[apart, :, 0].abs().mean(1) - mean_abs).abs().mean() < 2 * math.sqrt(2 / math.pi) * sd / math.sqrt(s)
    # and each event's samples are split evenly between the modes (binomial spread)
    positive = (samples[apart, :, 0] > 0).double().mean(1)
    assert (positive - 0.5).abs().mean() < 2 * math.sqrt(2 / math.pi) * 0.5 / math.sqrt(s)


# -------------------------------------------------------------------- detector
def _two_jet_events(n, energy, eta, seed=0):
    rng = np.random.default_rng(seed)
    phi = rng.uniform(-math.pi, math.pi, n)
    pt = np.full(n, energy / np.cosh(eta))

    def vec(pt, eta, phi):
        return np.stack([pt * np.cosh(eta), pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)], -1)

    leptons = np.stack([vec(np.full(n, 50.0), 0.3, phi), vec(np.full(n, 50.0), -0.3, phi + 2.0)], 1)
    jets = np.zeros((n, 8, 4))
    jets[:, 0] = vec(pt, eta, phi + 1.0)
    jets[:, 1] = vec(pt, -eta, phi - 1.0)
    ids = np.zeros((n, 4), dtype=np.int64)
    ids[:, 0], ids[:, 1] = 13, -13
    return np.concatenate([leptons, np.zeros((n, 2, 4))], 1), ids, jets


@pytest.mark.parametrize("eta", [0.5, 2.0])
def test_jet_resolution_and_lepton_efficiency_are_recovered_from_smeared_samples(eta):
    n, energy = 40000, 150.0
    d = DetectorSection(jet_angle_resolution=0.0)
    leptons, ids, jets = _two_jet_events(n, energy, eta)
    ev = apply_detector(leptons, ids, jets, d, np.random.default_rng(7))
    expected = jet_energy_resolution(np.array(energy), np.array(eta), d.jet_resolution_central, d.jet_resolution_forward, d.jet_forward_eta) / energy
    response = ev.jets[:, :2, 0].reshape(-1) / energy
    # standard error of a standard deviation: σ/√(2N)
    assert response.std() == pytest.approx(float(expected), abs=4 * float(expected) / math.sqrt(2 * response.size))
    assert response.mean() == pytest.approx(1.0, abs=4 * float(expected) / math.sqrt(response.size))
    eff = d.lepton_efficiency_barrel  # both leptons at |η| = 0.3
    frac, err = len(ev) / n, math.sqrt(eff**2 * (1 - eff**2) / n)
    assert frac == pytest.approx(eff**2, abs=4 * err)
    assert ev.cutflow == {"generated": n, "sfos_leptons": len(ev), "two_jets": len(ev)}
    assert np.all(ev.n_jets == 2) and np.all(ev.jets[:, 2:] == 0)


def test_selection_needs_same_flavour_opposite_sign_leptons():
    leptons, ids, jets = _two_jet_events(4, 150.0, 0.5)
    ids[1] = [13, 13, 0, 0]  # same sign
    ids[2] = [13, -11, 0, 0]  # different flavour
    d = DetectorSection(lepton_efficiency_barrel=1.0, lepton_efficiency_endcap=1.0)
    ev = apply_detector(leptons, ids, jets, d, np.random.default_rng(1), partons=np.arange(64.0).reshape(4, 4, 4))
    assert len(ev) == 2 and ev.cutflow["sfos_leptons"] == 2
    assert np.array_equal(ev.partons[:, 0, 0], [0.0, 48.0])
    assert np.all(ev.lepton_flavour == 13)


def test_resmeared_events_redraw_the_detector_and_leave_out_the_held_out_rows():
    from partonic.jobs.unfold import resmeared_events

    n = 2000
    leptons, ids, jets = _two_jet_events(n, 150.0, 0.5)  # jets far above the pT cut
    partons = np.zeros((n, 4, 4))
    partons[:, 0, 0] = np.arange(n)  # each event carries its own row number
    arrays = {"leptons": leptons, "lepton_ids": ids, "jets": jets, "partons": partons, "parton_ids": np.ones((n, 4), np.int64)}
    d = DetectorSection()
    first, rows0 = apply_detector(leptons, ids, jets, d, np.random.default_rng([5, 17]), partons=partons, return_rows=True)
    assert np.array_equal(first.partons[:, 0, 0], rows0)
    held_out = rows0[:300]
    extra, rows = resmeared_events(arrays, d, 5, 3, exclude=held_out)
    assert np.array_equal(extra.partons[:, 0, 0], rows)  # truth travels with its detector events
    assert not np.isin(rows, held_out).any()
    # three realisations of the 1700 remaining events, each selected with efficiency ε²
    eff = d.lepton_efficiency_barrel**2  # both leptons at |η| = 0.3
    expected = 3 * (n - 300) * eff
    assert len(extra) == pytest.approx(expected, abs=4 * math.sqrt(expected * (1 - eff)))
    again, _ = resmeared_events(arrays, d, 5, 3, exclude=held_out)
    assert np.array_equal(again.jets, extra.jets)  # reproducible from the seed
    # new detector noise: the same particle-level event gives different jets each time
    both, i_first, i_extra = np.intersect1d(rows0, rows, return_indices=True)  # first occurrences
    assert len(both) > 1000
    assert np.all(first.jets[i_first, :, 0].sum(1) != extra.jets[i_extra, :, 0].sum(1))


def test_pair_features_hold_every_jet_pair_and_zero_for_absent_jets():
    """With model.pair_features the condition gains 5 decay coordinates for each of the
    6 pairs of 4 jet slots; the pair (0, 1) repeats the leading-pair columns, absent jets
    give zeros (not NaN), and the rest of the condition is unchanged."""
    p = _balanced_events(200, seed=3)
    g = torch.Generator().manual_seed(4)
    extra = p[:, 2:] * (0.3 + 0.4 * torch.rand(200, 2, 1, generator=g, dtype=torch.float64))  # two softer massive jets
    extra[:, :, 0] += 5.0
    jets = torch.cat([p[:, 2:], extra], 1).numpy()
    n_jets = np.where(np.arange(200) % 3 == 0, 2, np.where(np.arange(200) % 3 == 1, 3, 4))
    jets[n_jets < 4, 3] = 0.0
    jets[n_jets < 3, 2] = 0.0
    ev = DetectorEvents(p[:, :2].numpy(), np.full(200, 11), jets, n_jets, partons=p.numpy())
    plain = Unfolder(4, CINNModel(blocks=2, subnet_width=8, condition_width=8, condition_dim=4)).fit(ev)
    pairs = Unfolder(4, CINNModel(blocks=2, subnet_width=8, condition_width=8, condition_dim=4, pair_features=True)).fit(ev)
    c0, _, ref0 = plain.features(ev)
    c1, _, ref1 = pairs.features(ev)
    n = plain.detector.n_continuous
    assert c1.shape[1] == c0.shape[1] + 30 and torch.isfinite(c1).all()
    assert torch.equal(c1[:, :n], c0[:, :n]) and torch.equal(c1[:, -4:], c0[:, -4:]) and torch.equal(ref0, ref1)
    t = pairs.tensors(ev)
    raw, mask, _ = pairs.detector.double().raw(t["leptons"], t["jets"], t["n_jets"], t["flavour"])
    lead = slice(6 + 20, 6 + 25)  # the leading pair's decay coordinates
    assert torch.allclose(raw[:, n : n + 5], raw[:, lead])
    # pair (2, 3) exists only with 4 jets; (0, 2) with 3 or more
    block = {pr: slice(n + 5 * k, n + 5 * k + 5) for k, pr in enumerate(pairs.detector.pairs)}
    assert bool((c1[n_jets < 4][:, block[(2, 3)]] == 0).all()) and bool((c1[n_jets == 4][:, block[(2, 3)]] != 0).any(1).all())
    assert bool((c1[n_jets < 3][:, block[(0, 2)]] == 0).all()) and bool((mask[n_jets >= 3][:, block[(0, 2)]] == 1).all())


def _events_with_isr_jets(n, seed=0):
    """Balanced parton events whose jets are the two quarks (exactly) and 0–2 softer
    extra jets, in slots shuffled per event: (events, n_jets, slots of q and q̄)."""
    p = _balanced_events(n, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    extra = p[:, [3, 2]].clone()
    extra[..., 1:] = extra[..., 1:] * (0.3 + 0.5 * torch.rand(n, 2, 1, generator=g, dtype=torch.float64))
    extra[..., 1] += 20.0 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    extra[..., 0] = extra[..., 1:].norm(dim=-1) + 3.0
    n_jets = 2 + torch.randint(0, 3, (n,), generator=g)
    jets = torch.zeros(n, 4, 4, dtype=torch.float64)
    slots = torch.zeros(n, 2, dtype=torch.long)
    for e in range(n):
        order = torch.randperm(int(n_jets[e]), generator=g)
        objects = [p[e, 2], p[e, 3], extra[e, 0], extra[e, 1]]
        for k, slot in enumerate(order.tolist()):
            jets[e, slot] = objects[k]
        slots[e] = order[:2]
    ev = DetectorEvents(p[:, :2].numpy(), np.full(n, 13), jets.numpy(), n_jets.numpy(), partons=p.numpy())
    return ev, n_jets, slots


def test_balance_reference_is_the_hard_z_azimuth_and_each_hypothesis_has_its_own():
    """model.z_azimuth = balance: the Z azimuth's reference is φ(p_ℓℓ − p_jj), for the
    W candidate in the detector's references and for each pair in its hypothesis's. In
    a hard process (p_W = −p_Z) with the quarks as jets the truth's pair gives the Z's
    azimuth itself; every other present pair its own p_ℓℓ − p_jj; absent pairs keep
    the candidate's; the lepton pair's azimuth stays the reference otherwise."""
    ev, _, _ = _events_with_isr_jets(200, seed=11)
    t = Unfolder.tensors(ev)
    z = t["leptons"][:, 0] + t["leptons"][:, 1]
    parton_z = t["partons"][:, 0] + t["partons"][:, 1]
    torch.testing.assert_close(cinn.z_balance_azimuth(parton_z, t["partons"][:, 2] + t["partons"][:, 3]), kin.phi(parton_z), rtol=0, atol=1e-9)
    by = {}
    for option in ("leptons", "balance"):
        unfolder = Unfolder(4, CINNModel(blocks=1, subnet_width=8, condition_width=8, condition_dim=4, pairing="classifier", z_azimuth=option)).fit(ev)
        det = unfolder.detector.double()
        _, ref = det(t["leptons"], t["jets"], t["n_jets"], t["flavour"])
        refs, valid, label = unfolder._hypotheses(t, ref)
        by[option] = (ref, refs, valid, label)
    ref, refs, valid, label = by["balance"]
    a, b = cinn._w_candidate(t["jets"], t["jets"][..., 0] > 0)
    torch.testing.assert_close(ref[:, 3], cinn.z_balance_azimuth(z, a + b), rtol=0, atol=1e-12)
    torch.testing.assert_close(by["leptons"][0][:, 3], kin.phi(z), rtol=0, atol=1e-12)
    truth_pair = refs[torch.arange(len(label)), label, 3]
    assert float(cinn._wrap(truth_pair - kin.phi(parton_z)).abs().max()) < 1e-9
    for k, (i, j) in enumerate(cinn.jet_pairs(4)):
        want = torch.where(valid[:, k], cinn.z_balance_azimuth(z, t["jets"][:, i] + t["jets"][:, j]), ref[:, 3])
        torch.testing.assert_close(refs[:, k, 3], want, rtol=0, atol=1e-12)
        # the other references are the leptons-option's
        torch.testing.assert_close(refs[:, k, [0, 1, 2, 4]], by["leptons"][1][:, k, [0, 1, 2, 4]])
    assert bool((~valid).any()) and bool((refs[..., 3] != by["leptons"][1][..., 3]).all(1).any())


def _jets_near_quarks(p, seed, spread=0.05):
    """References (N, 11) whose columns 5–10 are two jets near the quarks (pT and
    direction smeared; which quark makes the harder jet varies), the rest random."""
    g = torch.Generator().manual_seed(seed)
    n = len(p)
    ref = 2 * math.pi * torch.rand(n, 11, generator=g, dtype=torch.float64) - math.pi
    pt, eta, phi = cinn._pt_eta_phi(p[:, 2:4])
    pt = pt * torch.exp(0.15 * torch.randn(n, 2, generator=g, dtype=torch.float64))
    eta = eta + spread * torch.randn(n, 2, generator=g, dtype=torch.float64)
    phi = phi + spread * torch.randn(n, 2, generator=g, dtype=torch.float64)
    hard = (pt[:, 1] > pt[:, 0]).long()[:, None]
    for k, cols in ((hard, slice(5, 8)), (1 - hard, slice(8, 11))):
        ref[:, cols] = torch.stack([v.gather(1, k)[:, 0] for v in (pt, eta, phi)], -1)
    return ref, hard[:, 0]


def test_jet_relative_w_coordinates_round_trip_balance_and_the_quark_nearer_jet_a():
    """w_coordinates = jets: features of the truth → the same partons, the quark nearer
    the harder jet of the hypothesis first; its coordinates are its log pT ratio, Δη,
    Δφ to that jet, then the other quark's opening angle to it (relative to jet b's)
    and azimuth about it (from jet b's), then m_jj through
    the Breit–Wigner logit (each checked against a direct evaluation); any feature
    vector gives massless partons in balance with m_jj the coordinate's; wild
    features stay finite; the option's errors."""
    p = _balanced_events(600, seed=4)
    ref, hard = _jets_near_quarks(p, seed=5)
    rep = PartonRepresentation(leptons="system", w_coordinates="jets").double().fit(p, ref)
    assert rep.dim == 10 and not rep.plane
    f = rep(p, ref)
    back = rep.inverse(f, ref)
    want = p.clone()
    swap = hard == 1  # the jets are so close that the nearer-jet assignment is the smearing's
    want[swap, 2], want[swap, 3] = p[swap, 3], p[swap, 2]
    torch.testing.assert_close(back, want, rtol=0, atol=1e-8 * float(p.abs().max()))
    raw = rep.raw(p, ref)
    qpt, qeta, qphi = cinn._pt_eta_phi(want[:, 2:4])
    torch.testing.assert_close(raw[:, 4], torch.log(qpt[:, 0] / ref[:, 5]))
    torch.testing.assert_close(raw[:, 5:7], torch.stack([qeta[:, 0] - ref[:, 6], cinn._wrap(qphi[:, 0] - ref[:, 7])], -1))
    # quark b from quark a: the opening angles' log tan(θ/2) ratio, and its azimuth ψ about
    # a from jet b's, checked by the spherical law of cosines and the orientation of a × jet b
    unit = lambda p3: p3 / p3.norm(dim=-1, keepdim=True)  # noqa: E731
    n_a, n_b = unit(want[:, 2, 1:]), unit(want[:, 3, 1:])
    n_j = unit(cinn._massless(torch.ones(600, dtype=torch.float64), ref[:, 9], ref[:, 10])[:, 1:])
    th_ab, th_ref = torch.arccos((n_a * n_b).sum(-1).clamp(-1, 1)), torch.arccos((n_a * n_j).sum(-1).clamp(-1, 1))
    torch.testing.assert_close(raw[:, 7], torch.log(torch.tan(th_ab / 2) / torch.tan(th_ref / 2)), rtol=0, atol=1e-6)
    psi = raw[:, 8]
    torch.testing.assert_close((n_b * n_j).sum(-1), torch.cos(th_ab) * torch.cos(th_ref) + torch.sin(th_ab) * torch.sin(th_ref) * torch.cos(psi), rtol=0, atol=1e-9)
    side = (torch.linalg.cross(n_a, n_j) * n_b).sum(-1)
    assert bool(((torch.sin(psi) * side) >= -1e-12).all())
    assert float(raw[:, 5:7].abs().max()) < 0.5 and float(torch.quantile(raw[:, 7:9].abs(), 0.9)) < 0.5
    m_w, g_w = float(rep.m_w), float(rep.gamma_w)
    u = torch.atan((kin.mass2(p[:, 2] + p[:, 3]) - m_w**2) / (m_w * g_w)) / math.pi + 0.5
    torch.testing.assert_close(raw[:, 9], torch.log(u / (1 - u)), rtol=0, atol=1e-6)
    rand_f = 2 * torch.randn(600, 10, dtype=torch.float64)
    rand = rep.inverse(rand_f, ref)
    torch.testing.assert_close(rand[:, :, 1:3].sum(1), torch.zeros(600, 2, dtype=torch.float64), rtol=0, atol=1e-6 * float(rand[..., 0].max()))
    assert torch.allclose(kin.mass2(rand), torch.zeros(600, 4, dtype=torch.float64), atol=1e-6 * float(rand[..., 0].max()) ** 2)
    torch.testing.assert_close(kin.mass(rand[:, 2] + rand[:, 3]), rep._xi_to_mass(rep.standardise.inverse(rand_f)[0][:, 9]), rtol=1e-6, atol=0)
    wild = rep.inverse(30 * torch.randn(600, 10, dtype=torch.float64), ref)
    assert torch.isfinite(wild).all()
    with pytest.raises(ValueError, match="needs leptons = system, not 'momenta'"):
        PartonRepresentation(w_coordinates="jets")
    with pytest.raises(ValueError, match="references need 11 columns"):
        rep(p, ref[:, :5])


@pytest.mark.parametrize("azimuth", ["plane", "interval"])
def test_w_system_pt_from_the_jet_pair_round_trip_and_balance(azimuth):
    """system_pt = w: the W's pT and azimuth are coordinates, log(pT_W/pT_jj) and
    φ_W − φ_jj of the hypothesis's jet pair (checked against the pair's summed
    transverse momenta), the Z's follow by balance; the round trip returns the
    partons (quarks in the jet-label order); random features give balanced massless
    events; wild ones stay finite; the option's errors."""
    p = _balanced_events(500, seed=6)
    ref, _ = _jets_near_quarks(p, seed=7)
    ref[:, 2] = 2 * torch.rand(500, dtype=torch.float64) - 1  # the jets' cos θ
    rep = PartonRepresentation(azimuth=azimuth, quark_label="jet", leptons="system", system_pt="w").double().fit(p, ref)
    dim = 11 if azimuth == "plane" else 10
    f = rep(p, ref)
    assert f.shape == (500, dim)
    raw = rep.raw(p, ref)
    w = p[:, 2] + p[:, 3]
    px = ref[:, 5] * torch.cos(ref[:, 7]) + ref[:, 8] * torch.cos(ref[:, 10])
    py = ref[:, 5] * torch.sin(ref[:, 7]) + ref[:, 8] * torch.sin(ref[:, 10])
    torch.testing.assert_close(raw[:, 6], torch.log(kin.pt(w) / torch.hypot(px, py)))
    torch.testing.assert_close(raw[:, 7], cinn._wrap(kin.phi(w) - torch.atan2(py, px)))
    back = rep.inverse(f, ref)
    want = p.clone()
    for q in (want, back):
        swap = q[:, 3, 0] > q[:, 2, 0]
        q[swap, 2], q[swap, 3] = q[swap, 3].clone(), q[swap, 2].clone()
    torch.testing.assert_close(back, want, rtol=0, atol=1e-7 * float(p.abs().max()))
    rand = rep.inverse(3 * torch.randn(500, dim, dtype=torch.float64), ref)
    torch.testing.assert_close(rand[:, :, 1:3].sum(1), torch.zeros(500, 2, dtype=torch.float64), rtol=0, atol=1e-6 * float(rand[..., 0].max()))
    assert torch.allclose(kin.mass2(rand), torch.zeros(500, 4, dtype=torch.float64), atol=1e-5 * float(rand[..., 0].max()) ** 2)
    assert torch.isfinite(rep.inverse(30 * torch.randn(500, dim, dtype=torch.float64), ref)).all()
    with pytest.raises(ValueError, match="system_pt = w .* needs leptons = system and w_coordinates = decay"):
        PartonRepresentation(leptons="system", w_coordinates="jets", system_pt="w")
    with pytest.raises(ValueError, match="system_pt must be 'z' or 'w'"):
        PartonRepresentation(leptons="system", system_pt="zw")


def test_hypothesis_references_hold_the_pairs_jets_and_jet_coordinates_unfold():
    """Every hypothesis's references carry its own two jets (pT, η, φ, the harder slot
    first), the detector's the W candidate's; with w_coordinates = jets the truth's
    features round-trip through its hypothesis, and a tiny model unfolds finite,
    balanced events whose quarks lie by the jets."""
    ev, _, _ = _events_with_isr_jets(300, seed=12)
    t = Unfolder.tensors(ev)
    model = CINNModel(blocks=2, subnet_width=16, condition_width=16, condition_dim=8, pairing="classifier", leptons="system", w_coordinates="jets")
    unfolder = Unfolder(4, model).fit(ev)
    w_pt = Unfolder(4, model.model_copy(update={"w_coordinates": "decay", "system_pt": "w"})).fit(ev)
    assert torch.isfinite(w_pt.unfold(ev, n_samples=2, seed=1)).all()
    det = unfolder.detector.double()
    _, ref = det(t["leptons"], t["jets"], t["n_jets"], t["flavour"])
    a, b = cinn._w_candidate(t["jets"], t["jets"][..., 0] > 0)
    torch.testing.assert_close(ref[:, 5:], torch.stack([*cinn._pt_eta_phi(a), *cinn._pt_eta_phi(b)], -1))
    refs, valid, label = unfolder._hypotheses(t, ref)
    for k, (i, j) in enumerate(cinn.jet_pairs(4)):
        torch.testing.assert_close(refs[:, k, 5:], torch.stack([*cinn._pt_eta_phi(t["jets"][:, i]), *cinn._pt_eta_phi(t["jets"][:, j])], -1))
    _, x, truth_ref = unfolder.features(ev)
    back = unfolder.to_partons(x[:, None].double(), truth_ref)[:, 0]
    torch.testing.assert_close(cinn.order_quarks(back), cinn.order_quarks(t["partons"]), rtol=0, atol=1e-3)
    samples = unfolder.unfold(ev, n_samples=4, seed=1)
    assert samples.shape == (300, 4, 4, 4) and torch.isfinite(samples).all()
    torch.testing.assert_close(samples[..., 1:3].sum(2), torch.zeros(300, 4, 2, dtype=samples.dtype), rtol=0, atol=1e-6 * float(samples[..., 0].max()))


def test_quark_jet_distances_are_the_nearest_present_jet_of_each_pt_ordered_quark():
    """Against a loop over events, samples and jets; absent jet slots (zero momenta) are
    never the nearest; samples (N, S, 4, 4) and truth (N, 4, 4) give the same per row."""
    ev, n_jets, _ = _events_with_isr_jets(40, seed=3)
    jets = torch.as_tensor(ev.jets)
    g = torch.Generator().manual_seed(1)
    samples = torch.as_tensor(ev.partons)[:, None].repeat(1, 3, 1, 1)
    samples[..., 2:4, 1:] += 5.0 * torch.randn(40, 3, 2, 3, generator=g, dtype=torch.float64)
    samples[..., 0] = samples[..., 1:].norm(dim=-1)
    got = cinn.quark_jet_distances(samples, jets, chunk=7)
    for e in range(40):
        for s in range(3):
            q = samples[e, s, 2:4]
            pts = torch.hypot(q[:, 1], q[:, 2])
            order = [0, 1] if pts[0] >= pts[1] else [1, 0]
            for name, k in zip(("dr_q1_jet", "dr_q2_jet"), order):
                eta, phi = torch.asinh(q[k, 3] / pts[k]), torch.atan2(q[k, 2], q[k, 1])
                best = min(math.hypot(float(eta - torch.asinh(j[3] / torch.hypot(j[1], j[2]))), float(cinn._wrap(phi - torch.atan2(j[2], j[1]))))
                           for j in jets[e, : int(n_jets[e])])
                assert math.isclose(float(got[name][e, s]), best, rel_tol=1e-9, abs_tol=1e-12)
    truth = cinn.quark_jet_distances(samples[:, 1], jets)
    assert truth["dr_q1_jet"].shape == (40,)
    torch.testing.assert_close(truth["dr_q2_jet"], got["dr_q2_jet"][:, 1], rtol=0, atol=0)
    # the quarks are jets of their own events here: zero distance to the nearest
    exact = cinn.quark_jet_distances(torch.as_tensor(ev.partons), jets)
    assert float(exact["dr_q1_jet"].abs().max()) < 1e-9 and float(exact["dr_q2_jet"].abs().max()) < 1e-9


def test_pairing_labels_are_the_slots_of_the_quark_jets():
    """When two jets are the quarks themselves, the hypothesis nearest the quarks is
    their pair, whatever slots they sit in and however many other jets there are."""
    ev, n_jets, slots = _events_with_isr_jets(300, seed=7)
    pairs = cinn.jet_pairs(4)
    jets, partons = torch.as_tensor(ev.jets), torch.as_tensor(ev.partons)
    phi, cos, valid = cinn.pair_axes(jets, pairs)
    assert valid.sum(1).tolist() == [{2: 1, 3: 3, 4: 6}[int(k)] for k in n_jets]
    label = cinn.pairing_labels(partons, jets, valid, pairs)
    expected = [pairs.index(tuple(sorted(s))) for s in slots.tolist()]
    assert label.tolist() == expected
    # the label's own axis: the decay angles of the quarks relative to it vanish
    rows = torch.arange(len(label))
    ref = torch.stack([torch.zeros(len(label), dtype=torch.float64), phi[rows, label], cos[rows, label]], -1)
    raw = PartonRepresentation(quark_label="jet").double().raw(partons, ref)
    assert torch.allclose(raw[:, 9], torch.zeros_like(raw[:, 9]), atol=1e-6)


def test_pairing_classifier_loss_is_the_mixture_nll_and_samples_present_pairs():
    """With pairing: classifier the loss is −log p(k | d) − log q(x | d, k) per coordinate,
    the cINN's condition holds one-hot k and pair k's decay coordinates, and unfolding
    draws only hypotheses whose jets exist, also for events without truth."""
    ev, n_jets, slots = _events_with_isr_jets(240, seed=3)
    torch.manual_seed(2)
    model = CINNModel(blocks=2, subnet_width=16, condition_width=16, condition_dim=4, pairing="classifier", azimuth="interval", quark_label="jet", leptons="system")
    unfolder = Unfolder(4, model).fit(ev)
    x, cond, label, valid = unfolder.training_data(ev)
    pairs = cinn.jet_pairs(4)
    assert label.tolist() == [pairs.index(tuple(sorted(s))) for s in slots.tolist()]
    out = unfolder.loss((x, cond, label, valid))
    # the same by hand: pair k's five standardised columns follow the pair features' layout
    n = unfolder.detector.n_continuous
    block = {pr: slice(n - 30 + 5 * k, n - 30 + 5 * k + 5) for k, pr in enumerate(unfolder.detector.pairs)}
    own = torch.stack([cond[e, block[pairs[int(k)]]] for e, k in enumerate(label)])
    hyp = torch.cat([cond, torch.nn.functional.one_hot(label, 6).to(cond.dtype), own], -1)
    z, log_jac = unfolder.cinn(x, hyp)
    logits = unfolder.classifier(cond).detach()
    logits = torch.where(valid, logits, torch.tensor(-1e30))
    ce = -torch.log_softmax(logits, -1).gather(1, label[:, None])[:, 0]
    expected = (0.5 * (z**2).sum(-1) - log_jac + ce).mean() / 10
    torch.testing.assert_close(out["nll"], expected)
    torch.testing.assert_close(out["pairing_ce"], ce.mean())
    assert float(ce.detach()[n_jets == 2].abs().max()) < 1e-6  # one hypothesis: no choice to make
    unfolder.eval()
    _, k = unfolder.sample_features(cond, 20, generator=torch.Generator().manual_seed(1), valid=valid)
    assert bool(valid.gather(1, k).all()) and bool((k[n_jets == 2] == 0).all())
    assert len(set(k[n_jets == 4].flatten().tolist())) == 6
    summary = unfolder.pairing_summary(ev)
    assert [summary[c]["events"] for c in ("inclusive", "2j", "3j", "4j")] == [240] + [int((n_jets == c).sum()) for c in (2, 3, 4)]
    assert summary["2j"]["accuracy"] == summary["2j"]["candidate_accuracy"] == summary["2j"]["mean_top_probability"] == 1.0
    assert summary["2j"]["cross_entropy"] < 1e-6 and 1 / 6 <= summary["4j"]["mean_top_probability"] < 1.0
    # the quark pair is at m_W ± 3 GeV, so the candidate is mostly right, the untrained classifier not
    assert summary["4j"]["candidate_accuracy"] > 0.6 > summary["4j"]["accuracy"]
    blind = DetectorEvents(ev.leptons, ev.lepton_flavour, ev.jets, ev.n_jets)
    with pytest.raises(ValueError, match="parton truth"):
        unfolder.pairing_summary(blind)
    samples = unfolder.unfold(blind, 5, seed=3)
    assert samples.shape == (240, 5, 4, 4) and bool(torch.isfinite(samples).all())
    assert torch.allclose(samples[..., 1:3].sum(2), torch.zeros(240, 5, 2, dtype=torch.float64), atol=1e-6)


def test_quark_regions_label_the_truth_and_samples_stay_in_their_region():
    """model.quark_regions: the region of the truth's quarks (forward, central soft, central
    hard) joins the W hypothesis in the label; the loss is −log p(k, t | d) − log q(x | d, k, t)
    with the region one-hot in the cINN's condition; unfolding draws (k, t) from the
    classifier and reports the share of samples outside their region."""
    # the regions of hand-made quark pairs
    def quark(pt, eta):
        return [pt * math.cosh(eta), pt, 0.0, pt * math.sinh(eta)]
    lep = [[50.0, 0.0, 50.0, 0.0], [50.0, 0.0, -50.0, 0.0]]
    partons = torch.tensor([lep + [quark(40, 0.5), quark(30, -2.0)],   # both central and hard
                            lep + [quark(40, 0.5), quark(10, 1.0)],    # a central soft quark
                            lep + [quark(40, 2.7), quark(10, 1.0)],    # a forward quark (and a soft one)
                            lep + [quark(40, -3.0), quark(60, 0.1)]], dtype=torch.float64)
    assert cinn.quark_regions(partons, "forward_soft").tolist() == [0, 1, 2, 2]
    assert cinn.quark_regions(partons, "forward").tolist() == [0, 0, 1, 1]
    assert cinn.quark_regions(partons, "none").tolist() == [0, 0, 0, 0]

    ev, n_jets, slots = _events_with_isr_jets(240, seed=3)
    torch.manual_seed(2)
    model = CINNModel(blocks=2, subnet_width=16, condition_width=16, condition_dim=4, pairing="classifier", quark_regions="forward_soft", azimuth="interval")
    unfolder = Unfolder(4, model).fit(ev)
    x, cond, label, valid = unfolder.training_data(ev)
    pairs = cinn.jet_pairs(4)
    truth_regions = cinn.quark_regions(torch.as_tensor(ev.partons), "forward_soft")
    assert len(set(truth_regions.tolist())) == 3  # the toy events fill every region
    assert label.tolist() == [3 * pairs.index(tuple(sorted(s))) + int(r) for s, r in zip(slots.tolist(), truth_regions)]
    assert valid.shape == (240, 18) and torch.equal(valid[:, ::3], valid[:, 2::3])
    out = unfolder.loss((x, cond, label, valid))
    n = unfolder.detector.n_continuous
    block = {pr: slice(n - 30 + 5 * k, n - 30 + 5 * k + 5) for k, pr in enumerate(unfolder.detector.pairs)}
    own = torch.stack([cond[e, block[pairs[int(k) // 3]]] for e, k in enumerate(label)])
    one_hot = torch.nn.functional.one_hot
    hyp = torch.cat([cond, one_hot(label // 3, 6).to(cond.dtype), own, one_hot(label % 3, 3).to(cond.dtype)], -1)
    z, log_jac = unfolder.cinn(x, hyp)
    logits = torch.where(valid, unfolder.classifier(cond).detach(), torch.tensor(-1e30))
    ce = -torch.log_softmax(logits, -1).gather(1, label[:, None])[:, 0]
    torch.testing.assert_close(out["nll"], (0.5 * (z**2).sum(-1) - log_jac + ce).mean() / 10)
    summary = unfolder.pairing_summary(ev)["inclusive"]
    assert summary["region_fractions"] == pytest.approx(torch.bincount(truth_regions, minlength=3).div(240).tolist())
    assert sum(summary["region_predicted"]) == pytest.approx(1.0) and summary["pair_accuracy"] >= summary["accuracy"]

    # a classifier that names only region t: every sample carries region t's one-hot, and
    # the report's share outside it is that of the samples (the untrained flow's leak)
    unfolder.eval()
    blind = DetectorEvents(ev.leptons, ev.lepton_flavour, ev.jets, ev.n_jets)
    for t in range(3):
        def logits_of_region(c, v, t=t):
            only = torch.zeros(18, dtype=torch.bool)
            only[t::3] = True
            return unfolder.classifier(c).masked_fill(~(v & only), -math.inf)
        unfolder.pairing_logits = logits_of_region
        _, labels = unfolder.sample_features(cond, 7, generator=torch.Generator().manual_seed(t), valid=valid)
        assert bool((labels % 3 == t).all()) and bool(valid.gather(1, labels).all())
        samples = unfolder.unfold(blind, 6, seed=t)
        inside = cinn.quark_regions(samples, "forward_soft") == t
        assert unfolder.region_stats["outside"] == pytest.approx(float(1 - inside.double().mean()))
        assert torch.allclose(samples[..., 1:3].sum(2), torch.zeros(240, 6, 2, dtype=torch.float64), atol=1e-6)
    with pytest.raises(ValueError, match="pairing = 'classifier'"):
        Unfolder(4, CINNModel(blocks=1, quark_regions="forward"))


@pytest.mark.parametrize("pairing", ["candidate", "classifier"])
def test_sampling_with_the_condition_network_once_per_event_equals_the_direct_inverse(pairing, monkeypatch):
    """sample_features runs the condition network once per event (and W hypothesis) and
    the inverse in passes of CPU_PASS samples; its samples equal the cINN's inverse given
    each sample's full condition, drawn from the same random numbers."""
    ev, _, _ = _events_with_isr_jets(60, seed=5)
    torch.manual_seed(4)
    model = CINNModel(blocks=2, subnet_width=16, condition_width=16, condition_dim=4, pairing=pairing, coupling="spline")
    unfolder = Unfolder(4, model).fit(ev).eval()
    for p in unfolder.parameters():  # away from the identity the blocks start as
        if p.is_floating_point():
            p.data.add_(0.3 * torch.randn_like(p))
    data = unfolder.training_data(ev)
    cond, valid = data[1], (data[3] if pairing == "classifier" else None)
    monkeypatch.setattr(Unfolder, "CPU_PASS", 7)  # passes that split events' samples
    x, k = unfolder.sample_features(cond, 9, batch_size=90, generator=torch.Generator().manual_seed(8), valid=valid)
    gen = torch.Generator().manual_seed(8)
    expected = []
    for lo in range(0, 60, 10):  # batch_size // samples events at a time, as sample_features
        c = cond[lo : lo + 10].repeat_interleave(9, 0)
        if pairing == "classifier":
            probs = torch.softmax(unfolder.pairing_logits(cond[lo : lo + 10], valid[lo : lo + 10]), -1)
            kk = torch.multinomial(probs, 9, replacement=True, generator=gen)
            assert torch.equal(kk, k[lo : lo + 10])
            c = unfolder._hypothesis_condition(c, kk.reshape(-1))
        z = torch.randn(len(c), unfolder.cinn.dim, generator=gen)
        expected.append(unfolder.cinn.inverse(z, c)[0].detach().view(10, 9, -1))
    # float32 rounding, which the steep random splines amplify; a wrong condition moves samples by O(1)
    torch.testing.assert_close(x, torch.cat(expected), rtol=1e-3, atol=5e-4)
    assert (k is None) == (pairing == "candidate")


def test_pairing_classifier_fit_learns_the_pair_at_the_w_mass_and_keeps_its_best_epoch():
    """The quark pair sits at m_W ± 3 GeV, the other pairs anywhere: fitted alone, the
    classifier names it in most 3- and 4-jet events, with calibrated confidence. With a
    third of the training labels scrambled it overfits them, and the parameters kept
    are those of the epoch with the lowest validation cross-entropy."""
    ev, n_jets, _ = _events_with_isr_jets(3000, seed=11)
    torch.manual_seed(3)
    unfolder = Unfolder(4, CINNModel(blocks=1, subnet_width=8, condition_width=8, condition_dim=4, pairing="classifier", pairing_width=64)).fit(ev.subset(slice(0, 2000)))
    data, val = unfolder.training_data(ev.subset(slice(0, 2000))), unfolder.training_data(ev.subset(slice(2000, 2500)))
    fit = unfolder.fit_pairing(data, val, epochs=40, dropout=0.1, batch_size=128, seed=1, progress=False)
    assert len(fit["val_cross_entropy"]) == 40 and fit["events"] == int((n_jets[:2000] > 2).sum())
    test = unfolder.pairing_summary(ev.subset(slice(2500, 3000)))
    for c in ("3j", "4j"):
        n = test[c]["events"]
        assert test[c]["accuracy"] > 0.9
        # confidence matches accuracy within 3 binomial standard errors
        assert abs(test[c]["accuracy"] - test[c]["mean_top_probability"]) < 3 * math.sqrt(0.1 / n)

    x, cond, label, valid = data
    g = torch.Generator().manual_seed(5)
    scramble = (torch.rand(len(label), generator=g) < 0.35) & (valid.sum(1) > 1)
    noisy = torch.multinomial(valid.double(), 1, generator=g)[:, 0]
    label = torch.where(scramble, noisy, label)
    wide = Unfolder(4, CINNModel(blocks=1, subnet_width=8, condition_width=8, condition_dim=4, pairing="classifier", pairing_width=256, pairing_layers=3))
    wide.detector, wide.parton = unfolder.detector, unfolder.parton
    fit = wide.fit_pairing((x, cond, label, valid), val, epochs=40, dropout=0.0, batch_size=64, seed=1, progress=False)
    history = fit["val_cross_entropy"]
    assert history[-1] > 1.5 * min(history) and fit["best_epoch"] < 40  # it overfits the scrambled labels
    _, v_cond, v_label, v_valid = val
    multi = v_valid.sum(1) > 1
    kept = torch.nn.functional.cross_entropy(wide.pairing_logits(v_cond, v_valid)[multi], v_label[multi]).item()
    assert kept == pytest.approx(min(history), rel=1e-5) and fit["best_epoch"] == 1 + int(np.argmin(history))


def test_pairing_classifier_model_saves_and_loads(tmp_path):
    from partonic.cards import card_to_dict, parse_card
    from partonic.jobs.unfold import load_model

    card = parse_card({"job": "unfold", "name": "pairs", "model": {"blocks": 2, "subnet_width": 16, "condition_width": 16, "condition_dim": 4, "pairing": "classifier"}})
    torch.manual_seed(4)
    saved = Unfolder(4, card.model)
    torch.save({"kind": "partonic-unfold-cinn", "state_dict": saved.state_dict(), "card": card_to_dict(card)}, tmp_path / "model.pt")
    loaded, trained = load_model(tmp_path / "model.pt", torch.device("cpu"))
    assert trained.model.pairing == "classifier" and loaded.pairs == cinn.jet_pairs(4)
    c = torch.randn(8, saved.detector.dim)
    assert torch.equal(loaded.classifier(c), saved.classifier(c))
    assert saved.cinn.condition_net[0].in_features == saved.detector.dim + 6 + 5
    with pytest.raises(ValueError, match="validation_fraction"):
        parse_card({"job": "unfold", "name": "pairs", "model": {"pairing": "classifier"}, "training": {"validation_fraction": 0}})
    with pytest.raises(Exception, match="model.quark_regions = 'forward' .* needs model.pairing = classifier"):
        parse_card({"job": "unfold", "name": "regions", "model": {"quark_regions": "forward"}})
    with pytest.raises(Exception, match="quark_regions"):
        parse_card({"job": "unfold", "name": "regions", "model": {"pairing": "classifier", "quark_regions": "forwards"}})


@pytest.fixture(scope="module")
def zw_final_states():
    """The visible final states (E, px, py, pz, id) of 40 Pythia8 ZW events."""
    import pythia8mc

    from partonic.simulate.pythia import capture_c_stdout, zw_settings

    events = []
    with capture_c_stdout():
        py = pythia8mc.Pythia("", False)
        for line in zw_settings(11):
            py.readString(line)
        assert py.init()
        while len(events) < 40:
            if py.next():
                events.append(np.asarray([(p.e(), p.px(), p.py(), p.pz(), p.id()) for p in py.event if p.isFinal() and p.isVisible()]).reshape(-1, 5))
    return events


def test_jets_of_many_events_in_one_fastjet_call_equal_the_per_event_jets(zw_final_states):
    """cluster_jets_many (FastJet's array interface, what zw_chunk uses) gives every
    event the jets of cluster_jets (one ClusterSequence of PseudoJets per event): on
    the visible final states of Pythia8 ZW events (isolated leptons left out, as in the
    simulation), and on events with no particles or no jet above threshold."""
    from partonic.simulate.detector import cluster_jets, cluster_jets_many, isolated_leptons

    events = [arr[~isolated_leptons(arr[:, :4], arr[:, 4].astype(np.int64))[2], :4] for arr in zw_final_states]
    events.insert(3, np.zeros((0, 4)))
    events.insert(7, events[5][:2] * 1e-3)  # two soft particles: no jet
    counts = np.array([len(e) for e in events])
    many = cluster_jets_many(np.concatenate(events), counts, 0.4, 10.0, 6)
    single = np.stack([cluster_jets(e, 0.4, 10.0, 6) for e in events])
    np.testing.assert_allclose(many, single, rtol=1e-12, atol=1e-9)
    assert (single[:, 0, 0] > 0).sum() >= 35 and (single[:, 3:, 0] > 0).any()  # real multi-jet events were compared
    assert not many[3].any() and not many[7].any()
    with pytest.raises(ValueError, match="counts"):
        cluster_jets_many(np.concatenate(events), counts + 1, 0.4, 10.0, 6)


def test_isolated_leptons_of_many_events_at_once_equal_the_per_event_ones(zw_final_states):
    """isolated_leptons_many (what zw_chunk uses) finds the leptons, ids and isolation
    mask of isolated_leptons event by event: on Pythia8 ZW final states, an empty
    event, and made-up events with a lepton inside a jet, two leptons in one cone and
    more leptons than slots."""
    from partonic.simulate.detector import isolated_leptons, isolated_leptons_many

    rng = np.random.default_rng(4)

    def particle(pid, pt, eta, phi):
        return [pt * np.cosh(eta), pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta), pid]

    made_up = [
        np.array([particle(13, 40.0, 0.1, 0.2), particle(211, 30.0, 0.2, 0.3), particle(-13, 35.0, -1.0, 2.5)]),  # μ⁻ in a jet
        np.array([particle(11, 50.0, 0.0, 0.0), particle(-11, 45.0, 0.2, 0.1), particle(22, 1.0, 0.1, 0.0)]),  # e⁺e⁻ in one cone
        np.array([particle(rng.choice([11, -11, 13, -13]), 20.0 + 10 * k, rng.uniform(-2, 2), k * 1.0) for k in range(6)]),
    ]
    events = list(zw_final_states[:20]) + [np.zeros((0, 5))] + made_up + list(zw_final_states[20:])
    counts = np.array([len(e) for e in events])
    final = np.concatenate(events)
    leptons, ids, isolated = isolated_leptons_many(final[:, :4], final[:, 4].astype(np.int64), counts, max_leptons=4)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    found = 0
    for k, e in enumerate(events):
        lep, lid, iso = isolated_leptons(e[:, :4], e[:, 4].astype(np.int64), max_leptons=4)
        assert np.array_equal(leptons[k], lep) and np.array_equal(ids[k], lid)
        assert np.array_equal(isolated[offsets[k]:offsets[k + 1]], iso)
        found += int((lid != 0).sum())
    assert found >= 40 and (ids[21] != 0).sum() == 1 and (ids[22] == 0).all() and (ids[23] != 0).all()
    with pytest.raises(ValueError, match="counts"):
        isolated_leptons_many(final[:, :4], final[:, 4].astype(np.int64), counts + 1)


def test_detector_events_hdf5_round_trip_and_errors(tmp_path):
    leptons, ids, jets = _two_jet_events(50, 150.0, 0.5)
    ev = apply_detector(leptons, ids, jets, DetectorSection(), np.random.default_rng(1), partons=np.ones((50, 4, 4)), parton_ids=np.ones((50, 4), np.int64))
    back = DetectorEvents.from_hdf5(ev.to_hdf5(tmp_path / "ev.h5"))
    assert np.array_equal(back.jets, ev.jets) and np.array_equal(back.partons, ev.partons)
    import h5py

    with h5py.File(tmp_path / "bad.h5", "w") as fh:
        fh["leptons"] = ev.leptons
    with pytest.raises(ValueError, match="missing datasets.*jets"):
        DetectorEvents.from_hdf5(tmp_path / "bad.h5")


def test_rotated_events_flip_eta_and_phi_and_keep_the_rest():
    rng = np.random.default_rng(4)
    n = 50

    def momenta(k):
        p3 = rng.normal(0, 60, (n, k, 3))
        return np.concatenate([np.sqrt((p3**2).sum(-1, keepdims=True) + 25.0), p3], -1)

    jets = momenta(4)
    jets[:, 3] = 0.0  # an empty slot stays empty
    ev = DetectorEvents(momenta(2), np.full(n, 13), jets, np.full(n, 3), momenta(4), np.tile([13, -13, 2, -1], (n, 1)))
    rot = ev.rotated()
    for a, b in ((ev.leptons, rot.leptons), (ev.jets[:, :3], rot.jets[:, :3]), (ev.partons, rot.partons)):
        t_a, t_b = torch.from_numpy(a), torch.from_numpy(b)
        assert torch.allclose(kin.eta(t_b), -kin.eta(t_a)) and torch.allclose(kin.phi(t_b), -kin.phi(t_a))
        assert torch.allclose(kin.pt(t_b), kin.pt(t_a)) and torch.allclose(kin.mass2(t_b.sum(1)), kin.mass2(t_a.sum(1)))
    assert np.all(rot.jets[:, 3] == 0.0)
    assert np.array_equal(rot.rotated().partons, ev.partons) and np.array_equal(rot.n_jets, ev.n_jets)


# ---------------------------------------------------------------------- Pythia8
@pytest.fixture(scope="module")
def zw_particle_level(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("zw")
    arrays, summary = simulate_zw(600, 5, {"sqrt_s": 13000.0}, {"radius": 0.4}, workers=1, chunk_size=300, progress=False, scratch=scratch)
    return arrays, summary, scratch


def test_pythia_zw_hard_process(zw_particle_level):
    arrays, summary, _ = zw_particle_level
    p, ids = arrays["partons"], arrays["parton_ids"]
    assert summary["errors"] == {} and summary["sigma_pb"] > 0
    assert np.all(np.isin(ids[:, 0], (11, 13))) and np.all(ids[:, 1] == -ids[:, 0])
    assert np.all((ids[:, 2] > 0) & (ids[:, 2] <= 4)) and np.all((ids[:, 3] < 0) & (ids[:, 3] >= -4))
    # hard process before the shower: balanced in pT, resonance masses from the decays
    assert np.abs(p[:, :, 1:3].sum(1)).max() < 1e-6
    m = lambda v: np.sqrt(np.maximum(v[:, 0] ** 2 - (v[:, 1:] ** 2).sum(-1), 0))  # noqa: E731
    assert np.median(m(p[:, 0] + p[:, 1])) == pytest.approx(91.19, abs=1.0)
    assert np.median(m(p[:, 2] + p[:, 3])) == pytest.approx(80.4, abs=1.0)
    # pp is forward-backward symmetric (what data.symmetrise relies on): the mean
    # rapidity of each hard parton is 0 within 4 standard errors
    y = 0.5 * np.log((p[..., 0] + p[..., 3]) / (p[..., 0] - p[..., 3]))
    assert np.all(np.abs(y.mean(0)) < 4 * y.std(0) / np.sqrt(len(y)))
    # the Z's leptons are found as isolated leptons most of the time
    lead = arrays["lepton_ids"][:, :2]
    assert np.mean(np.sort(np.abs(lead), 1)[:, 0] == np.abs(ids[:, 0])) > 0.5


def test_pythia_zw_resumes_from_finished_chunks(zw_particle_level):
    arrays, _, scratch = zw_particle_level
    assert len(list(scratch.glob("chunk_*.npz"))) == 2
    again, _ = simulate_zw(600, 5, {"sqrt_s": 13000.0}, {"radius": 0.4}, workers=1, chunk_size=300, progress=False, scratch=scratch)
    assert np.array_equal(again["partons"], arrays["partons"]) and np.array_equal(again["jets"], arrays["jets"])


def test_an_interrupted_parallel_simulation_stops_its_workers_at_once():
    """Ctrl-C or SIGTERM during a parallel run: the workers are stopped and the chunks not
    started dropped, not run to the end (leaving the executor's block would wait for all
    of them: here 4 chunks of 20 s on 2 workers, 40 s)."""
    import multiprocessing as mp
    import os
    import signal
    import threading
    import time

    from partonic.simulate.pythia import run_chunks

    timer = threading.Timer(2.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        # time.sleep as the chunk: picklable for the spawned workers, and 20 s each
        run_chunks(time.sleep, lambda i, n: 20, n_events=8, workers=2, chunk_size=2, progress=False)
    waited = time.perf_counter() - t0
    timer.join()
    assert waited < 15.0, f"the interrupted run waited {waited:.0f} s for its workers"
    # and no worker is left running the chunks
    survivors = [p.pid for p in mp.active_children()]
    deadline = time.time() + 10
    while survivors and time.time() < deadline:
        time.sleep(0.2)
        survivors = [pid for pid in survivors if _running(pid)]
    assert not survivors, f"workers {survivors} still run"


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_lepton_veto_keeps_every_event_the_detector_can_select(zw_particle_level, tmp_path):
    """data.lepton_veto drops the particle-level objects of events whose Z leptons fail
    the lepton cuts: the events it keeps are bit for bit those of the run without it
    (the veto acts after Pythia's event, so the random sequence is unchanged), and no
    vetoed event of this sample is selected by the detector of the run without it (in
    the card's 4 × 10⁵ events one is: a lepton from a hadron decay stood in for a Z
    lepton outside the acceptance; docs/results.md)."""
    arrays, _, _ = zw_particle_level
    detector = DetectorSection()
    cuts = lepton_veto_cuts(detector)
    assert 0.8 * detector.lepton_pt_min < cuts["pt_min"] < detector.lepton_pt_min and cuts["eta_max"] == detector.lepton_eta_max
    vetoed, _ = simulate_zw(600, 5, {"sqrt_s": 13000.0}, {"radius": 0.4, "lepton_veto": cuts}, workers=1, chunk_size=300, progress=False, scratch=tmp_path)
    keep = ~vetoed["vetoed"]
    assert not arrays["vetoed"].any() and 0.3 < vetoed["vetoed"].mean() < 0.7
    for name in ("partons", "parton_ids", "leptons", "lepton_ids", "jets"):
        assert np.array_equal(vetoed[name][keep], arrays[name][keep])
    assert np.array_equal(vetoed["partons"], arrays["partons"])
    assert not vetoed["leptons"][~keep].any() and not vetoed["jets"][~keep].any()
    selected = 0
    for s in range(10):
        _, rows = apply_detector(arrays["leptons"], arrays["lepton_ids"], arrays["jets"], detector, np.random.default_rng([s, 17]), return_rows=True)
        selected += len(rows)
        assert keep[rows].all()
    assert selected > 500


# ---------------------------------------------------------------- the job
TINY = """
job: unfold
name: zw_tiny
seed: 2
device: cpu
data: {{n_events: {n}, workers: 1, test_fraction: 0.3, channel_balance: 1.0, resmear: 1}}
model: {{coupling: spline, blocks: 3, subnet_width: 24, condition_width: 24, condition_dim: 8, pairing: classifier, pairing_width: 16, pairing_epochs: 3,
        quark_regions: forward_soft, refine: {{method: classifier, epochs: 2, width: 16, layers: 2, independent_events: 1200}}}}
training: {{batch_size: 64, epochs: 2, checkpoint_every: 1000}}
evaluation: {{samples_per_event: 16, bins: 8, bootstrap: 20}}
"""


# the runs on the tiny model that test something other than the plots leave them out:
# each plot takes about half a second (test_unfold_job_end_to_end checks them)
NO_PLOTS = ["--set", "evaluation.plots=false"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("unfold")
    card = root / "tiny.yaml"
    card.write_text(TINY.format(n=2400))
    mp = pytest.MonkeyPatch()
    mp.setenv("PARTONIC_CACHE", str(root / "cache"))
    try:
        assert main(["unfold", "--card", str(card), "--output", str(root / "run")]) == 0
    finally:
        mp.undo()
    return root, card


def test_unfold_job_end_to_end(tiny_run):
    root, _ = tiny_run
    run = root / "run"
    report = json.loads((run / "report.json").read_text())
    for key in ("partonic_version", "card", "device", "seed", "created", "outputs", "timing"):
        assert key in report
    assert report["timing"]["unfold_samples_per_s"] > 0
    cal = report["calibration"]["inclusive"]
    for obs in ("pt_q1", "pt_q2", "eta_q1", "m_jj", "pt_l1"):
        entry = cal[obs]
        assert set(entry) >= {"max_deviation", "coverage_68", "coverage_95", "q", "coverage", "noise_floor"}
        assert len(entry["q"]) == len(entry["coverage"])
        assert entry["noise_floor"] == report["calibration_noise_floor"]["inclusive"]
        # the floor of the largest of five observables' deviations lies above one's
        assert entry["noise_floor"] < report["calibration_noise_floor_of_max"]["inclusive"] < 1.4 * entry["noise_floor"]
        # near (below) the Kolmogorov 95% point 1.36/√n, lowered by the 21-point q grid
        assert 0.9 < entry["noise_floor"] * math.sqrt(entry["n_events"]) < 1.36
        ratio = report["ratio_to_truth"]["inclusive"][obs]
        assert set(ratio) >= {"max_bulk_deviation", "max_bulk_deviation_error", "max_bulk_pull", "ratio", "ratio_error", "edges"}
        assert len(ratio["ratio_error"]) == len(ratio["ratio"]) == len(ratio["edges"]) - 1
        if ratio["max_bulk_deviation"] is not None:  # strict JSON: an undefined figure is null
            worst = [k for k, r in enumerate(ratio["ratio"]) if r is not None and math.isclose(abs(r - 1), ratio["max_bulk_deviation"])]
            assert worst and any(ratio["ratio_error"][k] == ratio["max_bulk_deviation_error"] or
                                 math.isclose(ratio["ratio_error"][k], ratio["max_bulk_deviation_error"]) for k in worst)
    # the quarks' distance to the nearest jet: calibration only, in every channel's report
    for channel, worst in report["max_jet_distance_calibration_deviation"].items():
        entries = [report["calibration"][channel][obs] for obs in ("dr_q1_jet", "dr_q2_jet")]
        assert worst == max(e["max_deviation"] for e in entries) and all(len(e["q"]) == len(e["coverage"]) for e in entries)
    assert "dr_q1_jet" not in report["ratio_to_truth"]["inclusive"]
    for obs in ("m_jj", "pt_q1"):
        ibu = report["ibu_comparison"][obs]
        assert set(ibu) >= {"cinn_chi2_ndf", "ibu_chi2_ndf", "chi2_ndf_difference", "chi2_ndf_difference_error"}
        assert ibu["bootstrap_replicas"] == 20 and math.isclose(ibu["chi2_ndf_difference"], ibu["cinn_chi2_ndf"] - ibu["ibu_chi2_ndf"])
        # null (undetermined by the tiny run's bootstraps) or a finite error, never a false 0
        assert ibu["chi2_ndf_difference_error"] is None or 0 < ibu["chi2_ndf_difference_error"] < 10
        assert 0 < ibu["chi2_ndf_difference_error_uncorrected"] < 10
    for peak in ("m_jj_peak", "m_ll_peak"):
        assert set(report[peak]) >= {"truth_fwhm", "unfolded_fwhm", "width_ratio", "detector_fwhm"}
    # pairing: classifier, fitted for its 3 epochs before the cINN, and scored on the test events
    pairing = report["pairing"]
    assert len(pairing["fit"]["val_cross_entropy"]) == 3 and 1 <= pairing["fit"]["best_epoch"] <= 3
    assert pairing["test"]["inclusive"]["events"] == report["test_events"] and pairing["test"]["2j"]["pair_accuracy"] == 1.0
    # quark_regions: forward_soft, the cards' setting: the label's second part, and the samples' leak out of it
    for entry in pairing["test"].values():
        assert len(entry["region_fractions"]) == len(entry["region_predicted"]) == 3 and sum(entry["region_fractions"]) == pytest.approx(1.0)
        assert entry["accuracy"] <= min(entry["pair_accuracy"], entry["region_accuracy"])
    assert report["quark_regions"]["kind"] == "forward_soft" and 0.0 <= report["quark_regions"]["outside"] < 1.0
    assert report["timing"]["pairing_fit_s"] > 0
    # refine: classifier, fitted for its 2 epochs on the training events (2 cINN samples each),
    # the test posteriors resampled, and the figures before resampling reported
    refine = report["refine"]
    assert len(refine["fit"]["val_loss"]) == 2 and refine["fit"]["generated_events"] == 2 * refine["fit"]["data_events"]
    # ... on refine.independent_events: 1200 more generated events of seed 2 + 10⁶, twice through the detector
    events = refine["events"]
    assert events["source"] == "independent" and events["seed"] == 1_000_002 and events["generated"] == 1200 and events["realisations"] == 2
    assert refine["fit"]["data_events"] == events["events"] and 0.2 * 1200 < events["events"] < 2 * 0.3 * 1200
    assert report["timing"]["refine_simulate_s"] > 0
    assert 1.0 <= refine["test"]["effective_samples_min"] <= refine["test"]["effective_samples_mean"] <= 16.0
    unrefined = refine["unrefined"]["inclusive"]
    assert set(unrefined["max_bulk_deviation"]) == {"pt_q1", "pt_q2", "m_jj"} and set(unrefined["coverage_68"]) == {"pt_q1", "pt_q2", "eta_q1", "m_jj", "pt_l1"}
    assert 0.0 <= unrefined["max_calibration_deviation"] <= 1.0
    assert report["timing"]["refine_fit_s"] > 0 and report["timing"]["refine_s"] > 0
    # channel_balance 1: each jet channel drawn equally often in training
    assert report["training_channel_share"] == pytest.approx({"2j": 1 / 3, "3j": 1 / 3, "4j": 1 / 3}, abs=1e-12)
    # one more detector realisation of the events outside the validation and test sets
    assert 0.5 * report["training_events"] < report["training_events_resmeared"] < 2.0 * report["training_events"]
    sel = report["selection"]
    assert sel["generated"] == 2400 and sel["selected"] == report["training_events"] + report["validation_events"] + report["test_events"]
    # every observable's ratio plot and the calibration curves in each channel, the IBU plots: PDF and PNG
    from partonic.jobs.unfold import IBU_OBSERVABLES, OBSERVABLES

    assert len(report["outputs"]["plots"]) == 2 * (len(report["calibration"]) * (len(OBSERVABLES) + 1) + len(IBU_OBSERVABLES))
    for path in report["outputs"]["plots"]:
        assert (run / path).is_file()
    assert 0 < report["timing"]["plots_s"] < report["timing"]["evaluate_s"]
    assert (run / "model.pt").is_file() and (run / "unfolded.h5").is_file()
    init, events = read_lhe(run / report["outputs"]["lhe"])
    assert len(events.pid) == report["lhe"]["events"] == report["test_events"] - report["lhe"]["dropped_unphysical"]
    mom = events.momenta
    assert float(mom[:, :2, 0].max()) <= 6500.0 * (1 + 1e-12)
    # leptons on their mass shells (the mass from E and p is only good to 10⁻² GeV after the text round trip)
    m_lep = events.mass[:, 4:6]
    assert torch.all(((m_lep - 0.000511).abs() < 1e-6) | ((m_lep - 0.105658).abs() < 1e-6))
    assert torch.allclose(kin.mass(mom[:, 4:6]), m_lep, atol=1e-2)
    incoming, outgoing = mom[:, :2].sum(1), mom[:, 4:].sum(1)
    assert torch.allclose(incoming, outgoing, atol=1e-3 * float(incoming[:, 0].max()))
    assert torch.allclose(kin.mass(mom[:, 4] + mom[:, 5]), events.mass[:, 2], atol=1e-3)
    assert init.processes[0].cross_section == pytest.approx(report["fiducial_cross_section_pb"], rel=1e-6)
    # Pythia8 reads, showers and hadronises every unfolded event without an error or a warning
    shower = shower_lhe(run / report["outputs"]["lhe"])
    assert shower.n_accepted == len(events.pid) > 50 and shower.n_failed == 0 and shower.errors == {} and shower.warnings == {}


def test_channel_weights_follow_the_channel_fractions():
    from partonic.jobs.unfold import channel_weights

    n_jets = np.array([2] * 60 + [3] * 30 + [4] * 8 + [5] * 2)  # 60%, 30%, 10% (≥ 4 jets)
    assert channel_weights(n_jets, 0.0) is None
    w = channel_weights(n_jets, 0.5).numpy()
    np.testing.assert_allclose(w[[0, 60, 90, 98]], [0.6**-0.5, 0.3**-0.5, 0.1**-0.5, 0.1**-0.5])
    share = {c: w[np.clip(n_jets, 2, 4) == c].sum() / w.sum() for c in (2, 3, 4)}
    total = 0.6**0.5 + 0.3**0.5 + 0.1**0.5  # shares ∝ f^(1 − 0.5)
    assert share == pytest.approx({2: 0.6**0.5 / total, 3: 0.3**0.5 / total, 4: 0.1**0.5 / total})


def test_lhe_takes_the_first_posterior_sample_inside_the_beams():
    from partonic.jobs.unfold import physical_samples

    def event(pz):  # two back-to-back 100 GeV pT systems with the given total p_z
        p = torch.zeros(4, 4, dtype=torch.float64)
        p[:, 1] = torch.tensor([50.0, -50.0, 50.0, -50.0])
        p[:, 3] = pz / 4
        p[:, 0] = torch.sqrt(p[:, 1] ** 2 + p[:, 3] ** 2)
        return p

    far, near = event(14_000.0), event(100.0)  # x₁ > 1, and well inside
    samples = torch.stack([torch.stack([far, near, far]), torch.stack([far, far, far]), torch.stack([near, far, far])])
    chosen, ok = physical_samples(samples, 13_000.0)
    assert ok.tolist() == [True, False, True]
    assert torch.equal(chosen[0], near) and torch.equal(chosen[2], near)


def test_lhe_record_of_float32_samples_is_on_shell_and_balanced():
    """Samples kept in float32 (an input unfolded in chunks): every outgoing particle's
    E² − p² is its written mass² (quarks massless) to double precision, the Z and W are
    their daughters' sums, and the incoming partons balance the final state."""
    from partonic.jobs.unfold import lhe_events

    gen = torch.Generator().manual_seed(3)
    n = 200
    p = torch.zeros(n, 4, 4, dtype=torch.float64)
    p[..., 1:] = 400.0 * torch.randn(n, 4, 3, generator=gen, dtype=torch.float64)
    p[:, 3, 1:3] = -p[:, :3, 1:3].sum(1)  # ΣpT = 0, as the network's partons
    p[..., 0] = p[..., 1:].norm(dim=-1)
    ev = lhe_events(p.float(), np.array([11, 13] * (n // 2)), 1.0)
    mom, mass = ev.momenta, ev.mass
    m2 = mom[..., 0] ** 2 - (mom[..., 1:] ** 2).sum(-1)
    out = slice(4, 8)
    assert torch.allclose(m2[:, out], mass[:, out] ** 2, atol=1e-6 * mom[:, out, 0].max().item())
    assert torch.allclose(mom[:, 2], mom[:, 4] + mom[:, 5]) and torch.allclose(mom[:, 3], mom[:, 6] + mom[:, 7])
    balance = mom[:, 0] + mom[:, 1] - mom[:, 4:].sum(1)
    assert balance[:, [0, 3]].abs().max() < 1e-9  # E and p_z exactly; pT to the float32 input's rounding
    assert balance[:, 1:3].abs().max() < 1e-6 * mom[:, 4:, 0].max()
    # AQEDUP and AQCDUP: the card's α_em and its running α_s at the event's scale
    from partonic.physics.pdf import AlphaS

    torch.testing.assert_close(ev.aqcd, AlphaS(0.130, order=1)(ev.scale**2).double())
    # what the job passes: the card's α_s, here a two-loop one of another value
    other = lhe_events(p.float(), np.array([11, 13] * (n // 2)), 1.0, 1 / 128.0, AlphaS(0.118, order=2))
    torch.testing.assert_close(other.aqcd, AlphaS(0.118, order=2)(other.scale**2).double())
    assert not torch.allclose(other.aqcd, ev.aqcd) and torch.all(other.aqed == 1 / 128.0)
    assert torch.all(ev.aqed == 1 / 132.507)


def test_unfold_new_data_with_a_trained_model(tiny_run, tmp_path, capsys):
    """--input as partonic HDF5 and as Delphes ROOT (with and without the generator record):
    the same events give the same posterior samples, whichever file they come in."""
    import h5py
    from delphes_files import delphes_records, write_delphes

    root, card = tiny_run
    model = str(root / "run" / "model.pt")
    with h5py.File(root / "run" / "unfolded.h5") as fh:
        det = {k: fh["detector"][k][()] for k in fh["detector"].keys()}
    events = DetectorEvents(**det).subset(slice(0, 40))
    events.to_hdf5(tmp_path / "new.h5")
    write_delphes(tmp_path / "delphes.root", delphes_records(events))
    write_delphes(tmp_path / "data.root", delphes_records(events, truth=False), collections=("Jet", "Electron", "Muon"))
    # the CMS card's PUPPI jets, named in the card
    write_delphes(tmp_path / "puppi.root", delphes_records(events), rename={"Jet": "JetPUPPI"}, nested=True)
    puppi = ["--set", "data.delphes.jets=JetPUPPI"]

    outputs = {}
    for name in ("new.h5", "delphes.root", "data.root", "puppi.root"):
        out = tmp_path / f"applied_{name.replace('.', '_')}"
        extra = NO_PLOTS + (puppi if name == "puppi.root" else [])
        assert main(["unfold", "--card", str(card), "--model", model, "--input", str(tmp_path / name), "--output", str(out)] + extra) == 0
        report = json.loads((out / "report.json").read_text())
        with h5py.File(out / "unfolded.h5") as fh:
            outputs[name] = report, fh["samples"][()], {k: fh["detector"][k][()] for k in fh["detector"].keys()}
        assert report["test_events"] == 40 and outputs[name][1].shape == (40, 16, 4, 4)
        assert report["input_has_truth"] == (name != "data.root")
        assert ("calibration" in report) == (name != "data.root")
        # the saved refiner resamples the new events' posteriors too
        assert ("unrefined" in report["refine"]) == (name != "data.root") and report["refine"]["test"]["samples_per_event"] == 16
        assert (out / report["outputs"]["lhe"]).is_file()

    reference = outputs["new.h5"]
    for name in ("delphes.root", "data.root", "puppi.root"):
        _, samples, detector = outputs[name]
        # Delphes stores float32 (pT, η, φ, m): detector objects agree to float32 precision...
        for key in ("leptons", "jets"):
            np.testing.assert_allclose(detector[key], reference[2][key], rtol=1e-5, atol=1e-3)
        np.testing.assert_array_equal(detector["lepton_flavour"], reference[2]["lepton_flavour"])
        np.testing.assert_array_equal(detector["n_jets"], np.minimum(reference[2]["n_jets"], 4))
        # ...and the seeded posterior samples follow them (a 10 GeV-wide posterior; a wrong
        # lepton charge, flavour or jet order would move the samples by that much).
        np.testing.assert_allclose(samples, reference[1], rtol=1e-3, atol=0.05)
    np.testing.assert_allclose(outputs["delphes.root"][2]["partons"], reference[2]["partons"], rtol=1e-5, atol=1e-3)
    # several input files are read in order: the 40 events split over an HDF5 and a Delphes file unfold as one file
    events.subset(slice(0, 15)).to_hdf5(tmp_path / "first.h5")
    write_delphes(tmp_path / "rest.root", delphes_records(events.subset(slice(15, None))))
    two = tmp_path / "two_files"
    assert main(["unfold", "--card", str(card), "--model", model, "--input", str(tmp_path / "first.h5"), str(tmp_path / "rest.root"),
                 "--output", str(two)] + NO_PLOTS) == 0
    with h5py.File(two / "unfolded.h5") as fh:
        np.testing.assert_allclose(fh["samples"][()], reference[1], rtol=1e-3, atol=0.05)
    assert json.loads((two / "report.json").read_text())["input"] == [str(tmp_path / "first.h5"), str(tmp_path / "rest.root")]
    # a file without truth among files with it: all are unfolded as data, with a warning naming it
    with pytest.warns(UserWarning, match="data.root holds no parton truth, the other input files do"):
        assert main(["unfold", "--card", str(card), "--model", model, "--input", str(tmp_path / "new.h5"), "--input", str(tmp_path / "data.root"),
                     "--output", str(tmp_path / "mixed")] + NO_PLOTS) == 0
    mixed = json.loads((tmp_path / "mixed" / "report.json").read_text())
    assert mixed["test_events"] == 80 and mixed["input_has_truth"] is False
    # without the name the job stops on the missing collection; a name that is no collection name is refused by the card
    assert main(["unfold", "--card", str(card), "--model", model, "--input", str(tmp_path / "puppi.root"), "--output", str(tmp_path / "x")]) != 0
    assert "no collection Jet; the tree's collections are Electron, JetPUPPI, Muon, Particle" in capsys.readouterr().err
    assert main(["unfold", "--card", str(card), "--model", model, "--input", str(tmp_path / "puppi.root"), "--set", "data.delphes.jets=Jet.PT"]) != 0
    assert "data.delphes.jets" in capsys.readouterr().err


def test_resume_with_other_refiner_settings_refits_the_refiner_on_the_trained_cinn(tiny_run, tmp_path, capsys, monkeypatch):
    """--resume of a finished run with other model.refine samples and epochs keeps the
    cINN (no training step) and refits the refiner: the same figures as a run of that
    card from scratch. A refiner of another width changes the model's shape: refused,
    naming the entry."""
    import shutil

    root, card = tiny_run
    monkeypatch.setenv("PARTONIC_CACHE", str(root / "cache"))  # the tiny run's events and independent events
    sets = ["--set", "model.refine.samples=3", "--set", "model.refine.epochs=3"] + NO_PLOTS
    resumed, fresh = tmp_path / "resumed", tmp_path / "fresh"
    shutil.copytree(root / "run", resumed)
    assert main(["unfold", "--card", str(card), "--output", str(resumed), "--resume"] + sets) == 0
    assert main(["unfold", "--card", str(card), "--output", str(fresh)] + sets) == 0
    first, again, scratch = (json.loads((d / "report.json").read_text()) for d in (root / "run", resumed, fresh))
    fit = again["refine"]["fit"]
    assert fit["epochs"] == 3 and fit["generated_events"] == 3 * fit["data_events"] and first["refine"]["fit"]["epochs"] == 2
    assert again["training"]["steps"] == first["training"]["steps"] and again["training"]["resumed_from"] == first["training"]["steps"]
    # no step trained: the losses are the checkpoint's, not NaN
    assert again["training"]["final_loss"] == first["training"]["final_loss"] and again["training"]["val_loss"] == first["training"]["val_loss"]
    assert fit["val_loss"] == pytest.approx(scratch["refine"]["fit"]["val_loss"], rel=1e-6)
    assert again["max_calibration_deviation"] == pytest.approx(scratch["max_calibration_deviation"], abs=1e-9)
    cinn_state = lambda d: {k: v for k, v in torch.load(d / "model.pt", map_location="cpu", weights_only=False)["state_dict"].items() if not k.startswith("refine")}
    before = cinn_state(root / "run")
    assert all(torch.equal(v, before[k]) for k, v in cinn_state(resumed).items())

    capsys.readouterr()
    assert main(["unfold", "--card", str(card), "--output", str(resumed), "--resume", "--set", "model.refine.width=20"]) != 0
    assert "'model' section differs" in (err := capsys.readouterr().err) and "model.refine.width: 16 → 20" in err


def test_an_ensemble_of_models_mixes_their_posteriors(tiny_run, tmp_path, capsys):
    """Two --model: each draws half the samples per event, member k with the card's seed
    + 7919 k, so every event's samples are, as a set, those of the two single-model runs
    with those seeds; a model trained with another detector is refused."""
    import h5py

    root, card = tiny_run
    model = str(root / "run" / "model.pt")
    with h5py.File(root / "run" / "unfolded.h5") as fh:
        det = {k: fh["detector"][k][()] for k in fh["detector"].keys()}
    DetectorEvents(**det).subset(slice(0, 30)).to_hdf5(tmp_path / "new.h5")
    seed = 2  # the TINY card's
    runs = {}
    for name, models, sets in (("ensemble", [model, model], []),
                               ("first", [model], ["evaluation.samples_per_event=8"]),
                               ("second", [model], ["evaluation.samples_per_event=8", f"seed={seed + 7919}"])):
        args = ["unfold", "--card", str(card), "--input", str(tmp_path / "new.h5"), "--output", str(tmp_path / name)]
        args += [a for m in models for a in ("--model", m)] + [a for x in sets for a in ("--set", x)] + NO_PLOTS
        assert main(args) == 0
        with h5py.File(tmp_path / name / "unfolded.h5") as fh:
            runs[name] = fh["samples"][()]
    report = json.loads((tmp_path / "ensemble" / "report.json").read_text())
    assert report["model"] == [model, model] and runs["ensemble"].shape == (30, 16, 4, 4)
    # evaluation.plots = false: no plot written, every figure still in the report
    assert report["outputs"]["plots"] == [] and not (tmp_path / "ensemble" / "plots").exists() and report["timing"]["plots_s"] == 0
    assert "inclusive" in report["calibration"] and "inclusive" in report["ratio_to_truth"]
    members = report["ensemble"]["members"]
    assert [m["samples_per_event"] for m in members] == [8, 8] and all("inclusive" in m["summary"] for m in members)
    assert set(members[0]["summary"]["inclusive"]["ratio"]) == {"pt_q1", "pt_q2", "m_jj"}
    both = np.concatenate([runs["first"], runs["second"]], 1).reshape(30, 16, -1)
    mixed = runs["ensemble"].reshape(30, 16, -1)
    key = lambda a: np.sort(a[..., 0] + 1e-3 * a[..., 5], axis=1)
    np.testing.assert_allclose(key(mixed), key(both), rtol=1e-6)
    assert not np.allclose(runs["first"], runs["second"])
    # the members' samples are shuffled within each event, not in blocks
    first_half = np.isin(mixed[..., 0], runs["first"].reshape(30, 8, -1)[..., 0])
    assert 0 < first_half[:, :8].mean() < 1

    assert main(["unfold", "--card", str(card), "--model", model, "--model", model, "--input", str(tmp_path / "new.h5"),
                 "--set", "evaluation.samples_per_event=1", "--output", str(tmp_path / "few")]) != 0
    assert "samples_per_event ≥ 2" in capsys.readouterr().err
    state = torch.load(model, map_location="cpu", weights_only=False)
    state["card"]["data"].setdefault("detector", {})["jet_radius"] = 0.6
    torch.save(state, tmp_path / "other.pt")
    assert main(["unfold", "--card", str(card), "--model", model, "--model", str(tmp_path / "other.pt"), "--input", str(tmp_path / "new.h5"),
                 "--output", str(tmp_path / "other")]) != 0
    assert "another detector section" in capsys.readouterr().err


def test_an_ensemble_refined_as_a_mixture(tiny_run, tmp_path, capsys, monkeypatch):
    """evaluation.ensemble_refine = mixture: one classifier between truth and the members'
    samples before their own refiners, learnt on newly simulated events; every event's
    samples are then drawn from the members' unrefined samples; a card that cannot
    teach it (no classifier, no independent events) is refused by name."""
    import h5py

    from partonic.jobs.unfold import load_model, read_detector_files

    root, card = tiny_run
    monkeypatch.setenv("PARTONIC_CACHE", str(root / "cache"))  # the tiny run's independent events
    model = str(root / "run" / "model.pt")
    with h5py.File(root / "run" / "unfolded.h5") as fh:
        det = {k: fh["detector"][k][()] for k in fh["detector"].keys()}
    DetectorEvents(**det).subset(slice(0, 30)).to_hdf5(tmp_path / "new.h5")
    args = ["unfold", "--card", str(card), "--model", model, "--model", model, "--input", str(tmp_path / "new.h5"),
            "--set", "evaluation.ensemble_refine=mixture"] + NO_PLOTS
    assert main(args + ["--output", str(tmp_path / "mix")]) == 0
    assert "before the mixture's refiner" in capsys.readouterr().out
    report = json.loads((tmp_path / "mix" / "report.json").read_text())
    assert report["ensemble"]["refine"] == "mixture"
    assert report["refine"]["events"]["source"] == "independent" and report["refine"]["events"]["seed"] == 2 + 1_000_000
    fit = report["refine"]["fit"]
    assert fit["data_events"] == report["refine"]["events"]["events"] and fit["generated_events"] == 2 * fit["data_events"]
    assert report["refine"]["test"]["samples_per_event"] == 16 and "inclusive" in report["refine"]["unrefined"]
    with h5py.File(tmp_path / "mix" / "unfolded.h5") as fh:
        mixed = fh["samples"][()].reshape(30, 16, -1)
    # the mixture's refiner starts from seeded weights: a second run gives the same events
    assert main(args + ["--output", str(tmp_path / "mix_again")]) == 0
    with h5py.File(tmp_path / "mix_again" / "unfolded.h5") as fh:
        np.testing.assert_array_equal(fh["samples"][()].reshape(30, 16, -1), mixed)
    again = json.loads((tmp_path / "mix_again" / "report.json").read_text())["refine"]["fit"]
    assert again["val_loss"] == fit["val_loss"] and again["r_std"] == fit["r_std"]
    # the members drew without their refiners, with the seeds of _unfold (card seed + 101 + 7919 k)
    unfolder, trained = load_model(model, torch.device("cpu"))
    events = read_detector_files([tmp_path / "new.h5"], trained.data.detector, truth=None).with_jet_slots(trained.data.detector.max_jets)
    raw = torch.cat([unfolder.unfold(events, 8, seed=2 + 101 + 7919 * k, refine=False) for k in range(2)], 1).reshape(30, 16, -1).numpy()
    key = lambda a: a[..., 0] + 1e-3 * a[..., 5]
    for i in range(30):  # the file holds float32
        assert (np.abs(key(mixed[i])[:, None] - key(raw[i])[None, :]).min(1) < 1e-5 * (1 + np.abs(key(mixed[i])))).all()

    # a refiner that also sees the quarks' distances to the jets and the detector event, and
    # three times the samples resampled down to 16: the kept samples are the members' raw draws
    capsys.readouterr()
    assert main(args + ["--set", "model.refine.inputs=jets", "--set", "evaluation.refine_oversample=3", "--output", str(tmp_path / "over")]) == 0
    refinement_line = next(line for line in capsys.readouterr().out.splitlines() if "refinement:" in line)
    assert "of 48 per event" in refinement_line and "resampled to 16" in refinement_line, refinement_line
    over = json.loads((tmp_path / "over" / "report.json").read_text())
    assert over["refine"]["test"]["samples_per_event"] == 48 and over["refine"]["test"]["kept_per_event"] == 16
    assert [m["samples_per_event"] for m in over["ensemble"]["members"]] == [24, 24]
    assert over["refine"]["fit"]["val_loss"] != fit["val_loss"]  # another classifier
    with h5py.File(tmp_path / "over" / "unfolded.h5") as fh:
        kept = fh["samples"][()].reshape(30, 16, -1)
    raw = torch.cat([unfolder.unfold(events, 24, seed=2 + 101 + 7919 * k, refine=False) for k in range(2)], 1).reshape(30, 48, -1).numpy()
    for i in range(30):
        assert (np.abs(key(kept[i])[:, None] - key(raw[i])[None, :]).min(1) < 1e-5 * (1 + np.abs(key(kept[i])))).all()

    # two refiner stages for the mixture: both fits in the report
    assert main(args + ["--set", "model.refine.inputs=partons_then_jets", "--set", "evaluation.refine_oversample=2", "--output", str(tmp_path / "two")]) == 0
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["refine"]["fit"]["second_stage"]["data_events"] == two["refine"]["fit"]["data_events"]
    assert two["refine"]["test"]["samples_per_event"] == 32 and two["refine"]["test"]["kept_per_event"] == 16

    # one model with its own refiner, oversampled: 8 kept of 24 drawn, all among those draws
    assert unfolder.refined
    kept = unfolder.unfold(events, 8, seed=5, oversample=3).reshape(30, 8, -1).numpy()
    raw = unfolder.unfold(events, 24, seed=5, refine=False).reshape(30, 24, -1).numpy()
    for i in range(30):
        assert (np.abs(key(kept[i])[:, None] - key(raw[i])[None, :]).min(1) < 1e-9 * (1 + np.abs(key(kept[i])))).all()

    for sets, message in ((["model.refine.method=none", "model.refine.independent_events=0"], "model.refine.method = classifier"),
                          (["model.refine.independent_events=0"], "model.refine.independent_events > 0")):
        assert main(args + [a for x in sets for a in ("--set", x)] + ["--output", str(tmp_path / "bad")]) != 0
        err = capsys.readouterr().err
        assert message in err and "evaluation.ensemble_refine = members" in err


def test_an_ensemble_trained_in_one_run(tiny_run, tmp_path, capsys, monkeypatch):
    """model.ensemble = 2 with the mixture's refiner: member 0 is the single-model run's
    cINN (same seed, same data), member 1 another (seed + 7919); model.pt holds both and
    the fitted mixture refiner, so unfolding the run's test events with it again gives
    the run's samples without refitting; without a classifier the card is refused."""
    import h5py

    from partonic.jobs.unfold import ENSEMBLE_KIND, load_model, load_models

    root, card = tiny_run
    monkeypatch.setenv("PARTONIC_CACHE", str(root / "cache"))  # the tiny run's events and independent events
    sets = ["--set", "model.ensemble=2", "--set", "evaluation.ensemble_refine=mixture"] + NO_PLOTS
    out = tmp_path / "ens"
    assert main(["unfold", "--card", str(card), "--output", str(out)] + sets) == 0
    assert "member1 (8 samples/event) alone, before the mixture's refiner" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    single = json.loads((root / "run" / "report.json").read_text())
    members = report["ensemble"]["members"]
    assert report["ensemble"]["refine"] == "mixture" and [m["seed"] for m in members] == [2, 2 + 7919]
    assert all(m["training"]["steps"] > 0 and "inclusive" in m["summary"] for m in members)
    assert report["training"] == members[0]["training"] and report["training"]["final_loss"] == single["training"]["final_loss"]
    assert report["timing"]["train_s"] == pytest.approx(sum(m["train_s"] for m in members))
    assert {**report["refine"]["events"], "cached": True} == {**single["refine"]["events"], "cached": True} and "refine" not in members[0]  # one refiner, for the mixture
    assert (out / "member1" / "checkpoint.pt").is_file()  # member 1 checkpoints apart: --resume keeps both

    state = torch.load(out / "model.pt", map_location="cpu", weights_only=False)
    assert state["kind"] == ENSEMBLE_KIND and len(state["members"]) == 2 and state["mixture"] is not None
    units, _, mixture = load_models(out / "model.pt", torch.device("cpu"))
    alone, _ = load_model(root / "run" / "model.pt", torch.device("cpu"))
    cinn = lambda u: {k: v for k, v in u.state_dict().items() if not k.startswith("refine")}
    reference = cinn(alone)
    assert all(torch.equal(v, reference[k]) for k, v in cinn(units[0]).items())
    assert not all(torch.equal(v, reference[k]) for k, v in cinn(units[1]).items())
    assert mixture.refined and not units[0].refined and not units[1].refined
    with pytest.raises(Exception, match="ensemble of 2"):
        load_model(out / "model.pt", torch.device("cpu"))

    # the saved ensemble unfolds its own test events into the same samples, with the stored refiner
    again = tmp_path / "again"
    with h5py.File(out / "unfolded.h5") as fh:
        DetectorEvents(**{k: fh["detector"][k][()] for k in fh["detector"].keys()}).to_hdf5(tmp_path / "test_events.h5")
    assert main(["unfold", "--card", str(card), "--model", str(out / "model.pt"), "--input", str(tmp_path / "test_events.h5"), "--output", str(again)] + sets) == 0
    applied = json.loads((again / "report.json").read_text())
    assert [m["model"] for m in applied["ensemble"]["members"]] == [f"{out / 'model.pt'}#0", f"{out / 'model.pt'}#1"]
    assert "refine_fit_s" not in applied["timing"] and "refine_simulate_s" not in applied["timing"]
    with h5py.File(out / "unfolded.h5") as fa, h5py.File(again / "unfolded.h5") as fb:
        np.testing.assert_array_equal(fa["samples"][()], fb["samples"][()])
    assert applied["max_calibration_deviation"] == report["max_calibration_deviation"]
    # refined by its members instead, the ensemble's unrefined members are named in a warning
    with pytest.warns(UserWarning, match="no refiners of their own"):
        assert main(["unfold", "--card", str(card), "--model", str(out / "model.pt"), "--input", str(tmp_path / "test_events.h5"),
                     "--output", str(tmp_path / "members"), "--set", "evaluation.ensemble_refine=members"] + NO_PLOTS) == 0

    assert main(["unfold", "--card", str(card), "--output", str(tmp_path / "bad"), "--set", "model.ensemble=2", "--set",
                 "evaluation.ensemble_refine=mixture", "--set", "model.refine.method=none", "--set", "model.refine.independent_events=0"]) != 0
    assert "model.ensemble = 2 with evaluation.ensemble_refine = mixture" in capsys.readouterr().err


def test_new_data_in_chunks_resumes_where_it_was_interrupted(tiny_run, tmp_path, capsys, monkeypatch):
    """evaluation.chunk_events: --input unfolded a chunk at a time, each finished chunk kept;
    ended by SIGTERM in its second chunk and resumed, the run unfolds only the chunks left
    and gives what an uninterrupted run gives; chunks made with other settings are redone."""
    import os
    import signal

    import h5py

    import partonic.jobs.unfold as job

    root, card = tiny_run
    model = str(root / "run" / "model.pt")
    with h5py.File(root / "run" / "unfolded.h5") as fh:
        det = {k: fh["detector"][k][()] for k in fh["detector"].keys()}
    DetectorEvents(**det).subset(slice(0, 40)).to_hdf5(tmp_path / "new.h5")
    base = ["unfold", "--card", str(card), "--model", model, "--input", str(tmp_path / "new.h5"), "--set", "evaluation.chunk_events=15"] + NO_PLOTS

    def outputs(out):
        with h5py.File(out / "unfolded.h5") as fh:
            return json.loads((out / "report.json").read_text()), fh["samples"][()], fh["detector"]["jets"][()]

    assert main(base + ["--output", str(tmp_path / "whole")]) == 0
    report, samples, jets = outputs(tmp_path / "whole")
    assert report["chunks"] == {"events_per_chunk": 15, "chunks": 3, "kept_from_before": 0}
    assert samples.shape == (40, 16, 4, 4) and np.array_equal(jets, det["jets"][:40])
    assert not (tmp_path / "whole" / "chunks").exists()  # gone once unfolded.h5 and the report are written
    # the chunks' figures are merged: times add up, the weights' spread is over all events,
    # and the diagnostics before refinement are of all 40 events
    assert report["refine"]["test"]["samples_per_event"] == 16 and 0 < report["refine"]["test"]["effective_samples_min"] <= 16
    assert "inclusive" in report["refine"]["unrefined"] and "inclusive" in report["calibration"]
    lhe_events = read_lhe(tmp_path / "whole" / report["outputs"]["lhe"])[1]
    assert len(lhe_events.pid) == report["lhe"]["events"] == 40 - report["lhe"]["dropped_unphysical"]

    calls = []
    real = job._unfold

    def interrupted(*args, **kwargs):
        calls.append(kwargs.get("seed"))
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as a batch system ends a job
            raise AssertionError("SIGTERM did not interrupt the job")
        return real(*args, **kwargs)

    monkeypatch.setattr(job, "_unfold", interrupted)
    assert main(base + ["--output", str(tmp_path / "cut")]) == 143
    assert "terminated (SIGTERM)" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the job's handler is gone with it
    assert sorted(p.name for p in (tmp_path / "cut" / "chunks").iterdir()) == ["chunk_00000.pt"]
    calls.clear()
    monkeypatch.setattr(job, "_unfold", lambda *a, **k: calls.append(k.get("seed")) or real(*a, **k))
    assert main(base + ["--output", str(tmp_path / "cut"), "--resume"]) == 0
    assert calls == [2 + job.CHUNK_SEED_STEP, 2 + 2 * job.CHUNK_SEED_STEP]  # chunks 2 and 3 only
    assert "chunk 1/3 (15 events) kept from before" in capsys.readouterr().out
    resumed, again, _ = outputs(tmp_path / "cut")
    assert resumed["chunks"]["kept_from_before"] == 1
    np.testing.assert_array_equal(again, samples)
    assert resumed["calibration"] == report["calibration"] and resumed["refine"]["test"] == report["refine"]["test"]

    # a kept chunk of other settings (here: samples per event) is unfolded again
    def ctrl_c(*args, **kwargs):
        calls.append(kwargs.get("seed"))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(job, "_unfold", ctrl_c)
    calls.clear()
    assert main(base + ["--output", str(tmp_path / "other")]) == 130
    monkeypatch.setattr(job, "_unfold", real)
    assert main(base + ["--output", str(tmp_path / "other"), "--resume", "--set", "evaluation.samples_per_event=8"]) == 0
    other, eight, _ = outputs(tmp_path / "other")
    assert other["chunks"]["kept_from_before"] == 0 and eight.shape == (40, 8, 4, 4)


def test_chunk_reports_merge_by_what_each_figure_is():
    from partonic.jobs.unfold import merge_chunk_reports

    rng = np.random.default_rng(3)
    a, b = rng.normal(0.2, 1.0, 300), rng.normal(-0.5, 2.0, 100)
    part = lambda x, t: {"timing": {"sample_s": t, "unfold_samples_per_s": len(x) * 10 / t},
                         "refine": {"test": {"effective_samples_mean": float(len(x)), "effective_samples_min": float(x.min()),
                                             "log_ratio_mean": float(x.mean()), "log_ratio_std": float(x.std()), "samples_per_event": 10}},
                         "quark_regions": {"kind": "forward_soft", "outside": 0.1 if len(x) == 300 else 0.3}}
    merged = merge_chunk_reports([part(a, 2.0), part(b, 6.0)], [300, 100])
    both = np.concatenate([a, b])
    assert merged["timing"]["sample_s"] == 8.0 and merged["timing"]["unfold_samples_per_s"] == pytest.approx((300 + 100) * 10 / 8.0)
    t = merged["refine"]["test"]
    assert t["log_ratio_mean"] == pytest.approx(both.mean()) and t["log_ratio_std"] == pytest.approx(both.std())
    assert t["effective_samples_min"] == pytest.approx(both.min()) and t["samples_per_event"] == 10
    assert t["effective_samples_mean"] == pytest.approx((300 * 300 + 100 * 100) / 400)
    assert merged["quark_regions"] == {"kind": "forward_soft", "outside": pytest.approx(0.15)}


def test_unfold_bad_inputs_give_clear_errors(tiny_run, tmp_path, capsys):
    import h5py

    root, card = tiny_run
    model = str(root / "run" / "model.pt")
    (tmp_path / "x.txt").write_text("not events")
    assert main(["unfold", "--card", str(card), "--model", model, "--input", str(tmp_path / "x.txt"), "--output", str(tmp_path / "a")]) != 0
    assert "unknown detector-event format" in capsys.readouterr().err
    assert main(["unfold", "--card", str(card), "--model", str(tmp_path / "none.pt"), "--input", str(tmp_path / "x.txt"), "--output", str(tmp_path / "b")]) != 0
    assert "no such file" in capsys.readouterr().err
    assert main(["unfold", "--card", str(card), "--input", str(tmp_path / "x.txt"), "--output", str(tmp_path / "c")]) != 0
    assert "--model" in capsys.readouterr().err
    # several inputs: a missing or misnamed later file is named before the first is read, and no run folder is left
    with h5py.File(root / "run" / "unfolded.h5") as fh:
        DetectorEvents(**{k: fh["detector"][k][()] for k in fh["detector"].keys()}).to_hdf5(tmp_path / "good.h5")
    for later, message in (("missing.h5", "missing.h5: no such file"), ("x.txt", "x.txt: unknown detector-event format")):
        assert main(["unfold", "--card", str(card), "--model", model, "--input", str(tmp_path / "good.h5"), str(tmp_path / later),
                     "--output", str(tmp_path / "d")]) != 0
        assert message in capsys.readouterr().err and not (tmp_path / "d").exists()
    # an input written with fewer jet slots than the model's, whose events count more jets
    with h5py.File(root / "run" / "unfolded.h5") as fh:
        arrays = {k: fh["detector"][k][()] for k in fh["detector"].keys()}
    arrays["jets"] = arrays["jets"][:, :2]
    DetectorEvents(**arrays).to_hdf5(tmp_path / "two_slots.h5")
    assert main(["unfold", "--card", str(card), "--model", model, "--input", str(tmp_path / "two_slots.h5"), "--output", str(tmp_path / "e")]) != 0
    err = capsys.readouterr().err
    assert "than the input's 2 jet slots" in err and "trained with 4" in err and not (tmp_path / "e").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.format(n=100).replace("workers: 1", "workers: 1, detector: {jet_radious: 0.4}"))
    assert main(["unfold", "--card", str(bad), "--output", str(tmp_path / "d")]) != 0
    err = capsys.readouterr().err
    assert "data.detector.jet_radious" in err and "jet_radius" in err


def test_mmd_against_closed_forms_and_the_unfolder_mmd_term():
    from partonic.models.mmd import kernel, mmd2

    x, y = torch.tensor([0.0, 1.0]), torch.tensor([3.0, 5.0])
    # Breit–Wigner kernel 1/(1 + 4d²/Γ²), Γ = 2: k(0,3) = 1/10, k(0,5) = 1/26, k(1,3) = 1/5, k(1,5) = 1/17
    assert torch.allclose(kernel(x, y, [2.0], "breit_wigner"), torch.tensor([[1 / 10, 1 / 26], [1 / 5, 1 / 17]]))
    # two points each: MMD² = k(x0,x1) + k(y0,y1) − 2 mean k(x,y)
    expected = 1 / 2 + 1 / 5 - 2 * (1 / 10 + 1 / 26 + 1 / 5 + 1 / 17) / 4
    assert float(mmd2(x, y, [2.0], "breit_wigner")) == pytest.approx(expected, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    same = [float(mmd2(torch.randn(400, generator=g), torch.randn(400, generator=g), [0.5, 2.0])) for _ in range(20)]
    shifted = float(mmd2(torch.randn(400, generator=g), 0.5 + torch.randn(400, generator=g), [0.5, 2.0]))
    # unbiased: same-distribution estimates scatter around 0; a 0.5σ shift stands far above them
    assert abs(np.mean(same)) < 3 * np.std(same) / math.sqrt(len(same))
    assert shifted > 5 * np.std(same)
    # the optional m_jj term of the unfolding loss is finite and has gradients
    torch.manual_seed(0)
    p = _balanced_events(64)
    leptons, jets = p[:, :2].numpy(), np.concatenate([p[:, 2:].numpy(), np.zeros((64, 2, 4))], 1)
    ev = DetectorEvents(leptons, np.full(64, 13), jets, np.full(64, 2), partons=p.numpy())
    unfolder = Unfolder(4, CINNModel(blocks=2, subnet_width=8, condition_width=8, condition_dim=4, mmd={"weight": 1.0})).fit(ev)
    cond, x_f, _ = unfolder.features(ev)
    out = unfolder.loss((x_f, cond))
    out["loss"].backward()
    assert torch.isfinite(out["mmd"]) and all(torch.isfinite(q.grad).all() for q in unfolder.cinn.parameters() if q.grad is not None)


def test_plane_azimuth_loss_is_the_nll_of_the_physical_coordinates():
    """The azimuth on the plane is scaled by a random Rayleigh radius r; the loss takes
    r²/2 off, so that it is the NLL of the ten physical coordinates. A network at
    its start is a rotation (log-det 0), under which the plane's part of the NLL,
    r²/2, cancels exactly: whatever r is drawn, the loss is that of the other nine."""
    torch.manual_seed(3)
    model = CINNModel(blocks=3, subnet_width=16, condition_width=16, condition_dim=4, azimuth="plane")
    unfolder = Unfolder(4, model)
    assert unfolder.parton.dim == 11 and unfolder.cinn.dim == 11
    x = torch.randn(256, 11)
    x[:, 9:] /= x[:, 9:].norm(dim=-1, keepdim=True)
    cond = torch.randn(256, unfolder.detector.dim)
    expected = 0.5 * (x[:, :9] ** 2).sum(-1).mean() / 10
    losses = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        losses.append(unfolder.loss((x, cond))["nll"].item())
    assert losses[0] == pytest.approx(float(expected), rel=1e-5)
    assert losses[1] == pytest.approx(float(expected), rel=1e-5)
    # without the correction the loss would carry E[r²/2]/10 = 0.1 more, and scatter with r
    trained = copy.deepcopy(unfolder)
    with torch.no_grad():
        for prm in trained.cinn.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    torch.manual_seed(0)
    a = trained.loss((x, cond))["nll"].item()
    torch.manual_seed(1)
    b = trained.loss((x, cond))["nll"].item()
    assert a != b  # the radius is drawn afresh: a trained flow sees it


def test_models_saved_before_the_representation_options_still_load(tmp_path):
    """A model.pt whose card predates model.azimuth/quark_label/leptons was trained
    with the first representation (10 features, lepton momenta), whatever the
    defaults are now."""
    from partonic.cards import card_to_dict, parse_card
    from partonic.jobs.unfold import load_model

    card = parse_card({"job": "unfold", "name": "old", "model": {"blocks": 2, "subnet_width": 16, "condition_width": 16, "condition_dim": 4,
                                                               "azimuth": "interval", "quark_label": "energy", "leptons": "momenta"}})
    old = Unfolder(4, card.model)
    saved = card_to_dict(card)
    for key in ("azimuth", "quark_label", "leptons"):
        del saved["model"][key]
    torch.save({"kind": "partonic-unfold-cinn", "state_dict": old.state_dict(), "card": saved}, tmp_path / "model.pt")
    unfolder, trained = load_model(tmp_path / "model.pt", torch.device("cpu"))
    assert (trained.model.azimuth, trained.model.quark_label, trained.model.leptons) == ("interval", "energy", "momenta")
    assert unfolder.parton.dim == 10 and not unfolder.parton.z_system
    # the current defaults: 11 features, the Z system
    assert Unfolder(4, parse_card({"job": "unfold", "name": "new"}).model).parton.dim == 11


def test_spline_model_saves_and_loads_with_its_coupling(tmp_path):
    """model.coupling: spline is rebuilt from the card in model.pt, with the same
    permutations and weights: the loaded network maps every point as the saved one."""
    from partonic.cards import card_to_dict, parse_card
    from partonic.jobs.unfold import load_model

    card = parse_card({"job": "unfold", "name": "spline", "model": {"blocks": 3, "subnet_width": 16, "condition_width": 16, "condition_dim": 4,
                                                                  "coupling": "spline", "spline_bins": 6}})
    torch.manual_seed(4)
    saved = Unfolder(4, card.model)
    with torch.no_grad():
        for p in saved.cinn.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    torch.save({"kind": "partonic-unfold-cinn", "state_dict": saved.state_dict(), "card": card_to_dict(card)}, tmp_path / "model.pt")
    torch.manual_seed(5)  # other permutations if the load drew its own
    loaded, trained = load_model(tmp_path / "model.pt", torch.device("cpu"))
    assert trained.model.coupling == "spline"
    x, c = torch.randn(8, saved.cinn.dim), torch.randn(8, saved.detector.dim)
    assert torch.equal(loaded.cinn(x, c)[0], saved.cinn(x, c)[0])


@pytest.mark.parametrize("coupling", ["affine", "spline"])
def test_cinn_weight_average_follows_the_training_steps_and_unfolds(coupling):
    """model.ema_decay = d: after each training step the average is d·ā + (1 − d)·a of the
    weights that step started from (checked against the recurrence done by hand over
    three Adam steps); sampling uses the average, not the last iterate; validation
    (no gradients) leaves it alone. The spline network's integer permutations are
    copied, not averaged."""
    torch.manual_seed(4)
    unfolder = Unfolder(4, CINNModel(blocks=2, subnet_width=16, condition_width=16, condition_dim=4, ema_decay=0.5, coupling=coupling))
    assert unfolder.cinn_ema is not None
    x, cond = torch.randn(64, unfolder.cinn.dim), torch.randn(64, unfolder.detector.dim)
    opt = torch.optim.Adam([p for p in unfolder.parameters() if p.requires_grad], lr=1e-2)
    expected = [p.detach().clone() for p in unfolder.cinn.parameters()]
    for _ in range(3):
        live = [p.detach().clone() for p in unfolder.cinn.parameters()]
        opt.zero_grad()
        unfolder.loss((x, cond))["loss"].backward()
        opt.step()
        expected = [0.5 * e + 0.5 * a if e.is_floating_point() else a for e, a in zip(expected, live)]
    for e, a in zip(expected, unfolder.cinn_ema.parameters()):
        torch.testing.assert_close(a, e)
    with torch.no_grad():
        unfolder.loss((x, cond))
    for e, a in zip(expected, unfolder.cinn_ema.parameters()):
        torch.testing.assert_close(a, e)
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    averaged, _ = unfolder.sample_features(cond[:5], 3, generator=gen())
    z = torch.randn(15, unfolder.cinn.dim, generator=gen())
    torch.testing.assert_close(averaged.reshape(15, -1), unfolder.cinn_ema.inverse(z, cond[:5].repeat_interleave(3, 0))[0].detach())
    assert not torch.allclose(averaged.reshape(15, -1), unfolder.cinn.inverse(z, cond[:5].repeat_interleave(3, 0))[0].detach())
    assert Unfolder(4, CINNModel(blocks=2, subnet_width=16, condition_width=16, condition_dim=4)).cinn_ema is None


def test_systematic_resampling_keeps_equal_weights_and_follows_the_weights():
    from partonic.models.refine import systematic_resample

    gen = torch.Generator().manual_seed(4)
    # equal weights: every draw exactly once
    idx = systematic_resample(torch.zeros(50, 16), gen)
    assert torch.equal(idx.sort(1).values, torch.arange(16).expand(50, -1))
    # draw k kept ⌊S w_k⌋ or ⌈S w_k⌉ times
    log_w = torch.randn(200, 16, generator=gen, dtype=torch.float64)
    counts = torch.nn.functional.one_hot(systematic_resample(log_w, gen), 16).sum(1).double()
    expected = 16 * torch.softmax(log_w, 1)
    assert bool(((counts >= expected.floor()) & (counts <= expected.ceil())).all())
    # N(0, 1) draws weighted by N(μ, 1)/N(0, 1): the resampled mean is the weighted mean up
    # to the resampling noise (below 1/√(N S)), and near μ up to the self-normalised
    # estimate's bias −μ e^(μ²)/S and its error √(e^(μ²)/(N S))
    n, s, mu = 1000, 200, 0.5
    x = torch.randn(n, s, generator=gen, dtype=torch.float64)
    log_w = mu * x - 0.5 * mu**2
    resampled = x.gather(1, systematic_resample(log_w, gen))
    weighted = float((torch.softmax(log_w, 1) * x).sum(1).mean())
    assert abs(float(resampled.mean()) - weighted) < 4 / math.sqrt(n * s)
    assert abs(weighted - (mu - mu * math.exp(mu**2) / s)) < 4 * math.sqrt(math.exp(mu**2) / (n * s))
    # oversampled: S = 800 weighted draws resampled into 100, draw k kept ⌊100 w_k⌋ or ⌈100 w_k⌉ times
    x = torch.randn(n, 800, generator=gen, dtype=torch.float64)
    log_w = mu * x - 0.5 * mu**2
    idx = systematic_resample(log_w, gen, 100)
    assert idx.shape == (n, 100)
    counts = torch.zeros(n, 800, dtype=torch.float64).scatter_add_(1, idx, torch.ones(n, 100, dtype=torch.float64))
    expected = 100 * torch.softmax(log_w, 1)
    assert bool(((counts >= expected.floor()) & (counts <= expected.ceil())).all())
    weighted = float((torch.softmax(log_w, 1) * x).sum(1).mean())
    assert abs(float(x.gather(1, idx).mean()) - weighted) < 4 / math.sqrt(n * 100)
    with pytest.raises(ValueError, match="n_out must be at least 1"):
        systematic_resample(log_w, gen, 0)


def test_two_refiner_stages(tiny_run):
    """model.refine.inputs = partons_then_jets: a partons classifier, then a jets one fitted
    against the samples weighted by the first's ratio; resampling uses the sum of both
    log-ratios (checked against the stages evaluated by hand), and the checkpoint holds
    both stages (a model built from such a card loads it strictly). Unknown inputs are
    refused by name."""
    import h5py

    from partonic.jobs.unfold import load_model
    from partonic.models.refine import systematic_resample

    root, _ = tiny_run
    with h5py.File(root / "run" / "unfolded.h5") as fh:
        events = DetectorEvents(**{k: fh["detector"][k][()] for k in fh["detector"].keys()})
    unfolder, trained = load_model(str(root / "run" / "model.pt"), torch.device("cpu"))
    unfolder.new_refiner(16, 2, "partons_then_jets")
    assert [k for k, _, _ in unfolder._refine_stages()] == ["partons", "jets"]
    info = unfolder.fit_refiner(events, 2, 2, seed=4, progress=False)
    second = info["second_stage"]
    assert second["data_events"] == info["data_events"] == len(events) and second["generated_events"] == 2 * len(events)
    # validation by parton event: the realisations of one parton event share an id
    assert info["validation"] == second["validation"] == "groups"
    partons = Unfolder.tensors(events)["partons"]
    ids = parton_event_ids(torch.cat([partons, partons[:5]]))
    assert (ids[-5:] == ids[:5]).all() and len(set(ids[: len(events)].tolist())) == len(np.unique(partons.reshape(len(events), -1).numpy(), axis=0))
    with pytest.raises(ValueError, match="'events' or 'rows'"):
        unfolder.fit_refiner(events, 2, 2, seed=4, progress=False, validation="parton")
    assert unfolder.refined and unfolder.refiner_jets is not None
    # the two stages see different inputs: the second the quark-jet distances and the detector
    assert unfolder.refiner_jets.net[0].in_features > unfolder.refiner.net[0].in_features

    raw = unfolder.unfold(events, 12, seed=8, refine=False)
    kept, weights = unfolder.refine_samples(events, raw, seed=9, n_out=4)
    n, s = raw.shape[:2]
    log_r = torch.zeros(n * s, dtype=torch.float64)
    for k, ((_, refiner, _), (ref, tail)) in enumerate(zip(unfolder._refine_stages(), unfolder._refine_inputs_all(events))):
        log_r += refiner.log_ratio(unfolder.refine_features(raw.reshape(-1, 4, 4), ref.repeat_interleave(s, 0), tail.repeat_interleave(s, 0), stage=k))
    idx = systematic_resample(log_r.view(n, s), torch.Generator().manual_seed(9), 4)
    torch.testing.assert_close(kept, raw.gather(1, idx[:, :, None, None].expand(-1, -1, 4, 4)))
    assert math.isclose(weights["log_ratio_std"], float(log_r.std()), rel_tol=1e-9)

    card = trained.model.model_copy(update={"refine": trained.model.refine.model_copy(update={"method": "classifier", "inputs": "partons_then_jets", "width": 16, "layers": 2})})
    again = Unfolder(trained.data.detector.max_jets, card)
    again.load_state_dict(unfolder.state_dict())  # strict: both stages' keys
    assert again.refined and any(k.startswith("refiner_jets.") for k in again.state_dict())
    with pytest.raises(ValueError, match="refiner inputs must be one of 'partons', 'jets', 'partons_then_jets', not 'detector'"):
        unfolder.new_refiner(16, 2, "detector")


def test_classifier_refinement_moves_a_shifted_posterior_onto_the_true_one():
    """The refinement of model.refine on a known problem: truth x ~ N(d, 1) for a
    condition d, a 'network' whose samples are N(d + 0.5, 1). A classifier on (x, d)
    between truth and samples gives r = p/q = exp(−0.5 (x − d) + 0.125); resampling each
    event's S samples by it moves their mean from d + 0.5 to d, up to the
    self-normalised estimate's bias 0.5 e^0.25 / S = 0.02 and the classifier's error."""
    from partonic.models.refine import ClassifierRefiner, systematic_resample

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    n, s, shift = 20_000, 32, 0.5
    d = 2 * torch.randn(n, generator=gen)
    truth = d + torch.randn(n, generator=gen)
    samples = d[:, None] + shift + torch.randn(n, 2, generator=gen)
    refiner = ClassifierRefiner(2, width=32, layers=2)
    info = refiner.fit(torch.stack([truth, d], 1), torch.ones(n), torch.stack([samples.reshape(-1), d.repeat_interleave(2)], 1), epochs=10, batch_size=1024, seed=2)
    assert info["best_val_loss"] < info["val_loss_before_training"]
    m = 2000
    d_new = 2 * torch.randn(m, generator=gen)
    x = d_new[:, None] + shift + torch.randn(m, s, generator=gen)
    log_r = refiner.log_ratio(torch.stack([x.reshape(-1), d_new.repeat_interleave(s)], 1)).view(m, s)
    refined = x.gather(1, systematic_resample(log_r, gen))
    before, after = float((x - d_new[:, None]).mean()), float((refined - d_new[:, None]).mean())
    assert abs(before - shift) < 4 / math.sqrt(m * s)
    assert abs(after) < 0.1


def test_a_refiner_of_several_fits_averages_their_log_ratios():
    """model.refine.fits = 3 on the problem above: each classifier is fitted with its own
    seed (another validation split and batch order), ln r is the mean of the three, the
    first fit is the single refiner of the same seed, and the bag moves the samples
    onto the truth as one fit does. A single refiner's saved state has no extra keys."""
    from partonic.models.refine import ClassifierRefiner, systematic_resample

    gen = torch.Generator().manual_seed(1)
    n, shift = 20_000, 0.5
    d = 2 * torch.randn(n, generator=gen)
    truth = torch.stack([d + torch.randn(n, generator=gen), d], 1)
    generated = torch.stack([(d[:, None] + shift + torch.randn(n, 2, generator=gen)).reshape(-1), d.repeat_interleave(2)], 1)
    fitted = {}
    for fits in (1, 3):
        torch.manual_seed(0)
        refiner = ClassifierRefiner(2, width=32, layers=2, fits=fits)
        fitted[fits] = refiner, refiner.fit(truth, torch.ones(n), generated, epochs=6, batch_size=1024, seed=2)
    single, one = fitted[1]
    bag, info = fitted[3]
    assert not any(k.startswith("more.") for k in single.state_dict()) and {k.split(".")[1] for k in bag.state_dict() if k.startswith("more.")} == {"0", "1"}
    assert "members" not in one and info["fits"] == 3 and len(info["members"]) == 3
    # the first fit is the single refiner's: same initial weights, seed, split and batches
    assert info["members"][0]["val_loss"] == one["val_loss"]
    assert all(torch.equal(a, b) for a, b in zip(bag.net.parameters(), single.net.parameters()))
    # the others learn the same ratio from other starts and splits
    assert len({m["best_val_loss"] for m in info["members"]}) == 3
    assert all(m["best_val_loss"] < m["val_loss_before_training"] for m in info["members"])
    x = torch.stack([torch.linspace(-3, 3, 200), torch.zeros(200)], 1)
    with torch.no_grad():
        each = torch.stack([net(x)[:, 0].double() for net in bag.nets])
    torch.testing.assert_close(bag.log_ratio(x), each.mean(0))
    assert float((each[1] - each[0]).abs().max()) > 1e-3
    assert info["r_max"] == pytest.approx(float(bag.r_max)) and info["r_max"] > 1
    # resampled by the bag's ratio, new events' samples move from d + 0.5 onto d (as in the test above)
    m, s = 2000, 32
    d_new = 2 * torch.randn(m, generator=gen)
    x = d_new[:, None] + shift + torch.randn(m, s, generator=gen)
    log_r = bag.log_ratio(torch.stack([x.reshape(-1), d_new.repeat_interleave(s)], 1)).view(m, s)
    refined = x.gather(1, systematic_resample(log_r, gen))
    assert abs(float((refined - d_new[:, None]).mean())) < 0.1


def test_a_run_with_a_refiner_of_two_fits(tiny_run, tmp_path, monkeypatch, capsys):
    """model.refine.fits = 2 in a run: the cINN and the first fit are the single-fit run's
    (the extra classifier draws nothing from the global random state), the report holds
    both fits, and the saved model unfolds the run's test events into the run's samples."""
    import h5py

    root, card = tiny_run
    monkeypatch.setenv("PARTONIC_CACHE", str(root / "cache"))  # the tiny run's events and independent events
    out = tmp_path / "two_fits"
    assert main(["unfold", "--card", str(card), "--output", str(out), "--set", "model.refine.fits=2"] + NO_PLOTS) == 0
    assert "by 2 classifiers, ln r averaged" in capsys.readouterr().out
    report, single = (json.loads((d / "report.json").read_text()) for d in (out, root / "run"))
    fit = report["refine"]["fit"]
    assert fit["fits"] == 2 and [len(m["val_loss"]) for m in fit["members"]] == [2, 2]
    assert report["training"]["final_loss"] == single["training"]["final_loss"]
    assert fit["members"][0]["val_loss"] == single["refine"]["fit"]["val_loss"] != fit["members"][1]["val_loss"]
    with h5py.File(out / "unfolded.h5") as fh:
        samples = fh["samples"][()]
        DetectorEvents(**{k: fh["detector"][k][()] for k in fh["detector"].keys()}).to_hdf5(tmp_path / "test_events.h5")
    again = tmp_path / "again"
    assert main(["unfold", "--card", str(card), "--model", str(out / "model.pt"), "--input", str(tmp_path / "test_events.h5"), "--output", str(again)] + NO_PLOTS) == 0
    with h5py.File(again / "unfolded.h5") as fh:
        np.testing.assert_array_equal(fh["samples"][()], samples)


def test_training_on_delphes_files_with_named_collections(tiny_run, tmp_path):
    """data.source = delphes: the job trains on Delphes ROOT files (here the tiny run's
    events, its PUPPI jets named in data.delphes), selects with the card's cuts and
    counts every event of the files; the model's own test events are unfolded."""
    import h5py
    from delphes_files import delphes_records, write_delphes

    from partonic.cards import load_card
    from partonic.simulate.detector import DetectorInputError

    root, card = tiny_run
    with h5py.File(root / "run" / "unfolded.h5") as fh:
        events = DetectorEvents(**{k: fh["detector"][k][()] for k in fh["detector"].keys()})
    half = len(events) // 2
    files = [write_delphes(tmp_path / f"part{k}.root", delphes_records(events.subset(part)), rename={"Jet": "JetPUPPI"}, nested=True)
             for k, part in enumerate((slice(0, half), slice(half, None)))]
    sets = ["data.source=delphes", f"data.files=[{files[0]},{files[1]}]", "data.delphes.jets=JetPUPPI", "data.resmear=0",
            "model.refine.independent_events=0", "lhe.write=false", "evaluation.plots=false"]
    out = tmp_path / "from_delphes"
    assert main(["unfold", "--card", str(card), "--output", str(out)] + [a for x in sets for a in ("--set", x)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["selection"]["selected"] == len(events) == report["training_events"] + report["validation_events"] + report["test_events"]
    assert report["data"]["files"] == [str(f) for f in files] and report["training"]["steps"] > 0
    assert report["refine"]["events"] == {"source": "training", "events": report["training_events"]}
    assert "inclusive" in report["calibration"] and (out / "model.pt").is_file() and report["outputs"]["lhe"] is None
    # training needs the truth in every file: one without it is named
    from partonic.jobs.unfold import read_detector_files

    no_truth = DetectorEvents(**{k: v for k, v in events.arrays().items() if k not in ("partons", "parton_ids")})
    no_truth.to_hdf5(tmp_path / "no_truth.h5")
    with pytest.raises(DetectorInputError, match="no_truth.h5: no parton truth, which the other files have"):
        read_detector_files([files[0], tmp_path / "no_truth.h5"], DetectorSection(), delphes=load_card(str(card), ["data.delphes.jets=JetPUPPI"]).data.delphes)
