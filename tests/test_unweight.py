"""Weighted flows and GANs, exact unweighting, and the `partonic unweight` job."""

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from partonic.cards import CardError, TrainingSection, parse_card
from partonic.cli import main
from partonic.evaluate.metrics import compare_histograms, compare_to_expected
from partonic.io.lhe import LHEInit, LHEProcess, read_lhe, write_lhe
from partonic.jobs.unweight import kinematics_from_leptons, leptons_from_kinematics, training_weights, unweight_with_copies
from partonic.models.refine import ClassifierRefiner, validation_split
from partonic.models.weighted_flow import DrellYanPreprocessing, QuantileStandardise, Standardise, WeightedFlow
from partonic.models.weighted_gan import MarginalMap, WeightedGAN
from partonic.simulate.pythia import shower_lhe
from partonic.train import _batch_order, train

# camel back: 0.5 N(−1.5, 0.5) + 0.5 N(1.0, 0.3)
MODES = ((0.5, -1.5, 0.5), (0.5, 1.0, 0.3))


def camel_pdf(x):
    return sum(a * stats.norm.pdf(x, mu, s) for a, mu, s in MODES)


def camel_cdf(x):
    return sum(a * stats.norm.cdf(x, mu, s) for a, mu, s in MODES)


def weighted_camel(n, seed, negative_fraction=0.0):
    """Uniform points on [−4, 3] weighted by the camel density; with
    negative_fraction = a, positive weights carry (1 + a) f and negative ones a f."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-4, 3, n)
    w = camel_pdf(x) * 7.0
    if negative_fraction:
        a = negative_fraction
        neg = rng.uniform(size=n) < a / (1 + 2 * a)
        w = np.where(neg, -w, w) * (1 + 2 * a)
    return torch.from_numpy(x)[:, None], torch.from_numpy(w)


def bin_truth(edges):
    return np.diff(camel_cdf(edges))


def check_against_camel(samples, train_x, train_w, edges, max_pull):
    """Histogram of the samples against the exact bin probabilities; the tolerance per bin
    is the training sample's own statistical precision there (a model cannot know more)."""
    h, _ = np.histogram(samples, edges)
    p_model = h / len(samples)
    p_true = bin_truth(edges) / bin_truth(edges).sum()
    tw, _ = np.histogram(train_x, edges, weights=train_w)
    tw2, _ = np.histogram(train_x, edges, weights=train_w**2)
    sigma_train = np.sqrt(tw2) / tw.sum()
    sigma = np.sqrt(sigma_train**2 + p_model / len(samples))
    bulk = p_true > 0.01
    pulls = (p_model - p_true)[bulk] / sigma[bulk]
    assert np.abs(pulls).max() < max_pull, np.round(pulls, 2)
    return pulls


@pytest.mark.parametrize("negative_fraction, batch_weights", [(0.0, "loss"), (0.5, "loss"), (0.5, "resample")])
def test_weighted_flow_reproduces_camel(negative_fraction, batch_weights, tmp_path):
    x, w = weighted_camel(60_000, seed=1, negative_fraction=negative_fraction)
    if negative_fraction:
        assert (w < 0).double().mean() > 0.2
    torch.manual_seed(0)
    model = WeightedFlow(Standardise(1).fit(x, w.clamp(min=0)), dim=1, bins=16, blocks=4)
    cfg = TrainingSection(batch_size=2048, epochs=60, optimizer={"lr": 1e-2}, log_every=100)
    w_fit, draw = training_weights(w, batch_weights)
    train(model, lambda m, b: m.loss(b), (x, w_fit), cfg, tmp_path, seed=1, progress=False, sample_weights=draw)
    samples, _ = model.sample(400_000, generator=torch.Generator().manual_seed(2))
    edges = np.linspace(-3.0, 2.0, 26)
    # 17 bulk bins: 4.5 standard errors
    check_against_camel(samples[:, 0].numpy(), x[:, 0].numpy(), w.numpy(), edges, max_pull=4.5)


def test_resampled_batches_have_the_weighted_expectation_and_full_effective_size():
    """Batches drawn in proportion to |w| with sign(w) in the loss estimate the weighted
    mean of any function, negative weights included, and each batch event counts fully."""
    x, w = weighted_camel(200_000, seed=5, negative_fraction=0.5)
    s, draw = training_weights(w, "resample")
    assert torch.equal(s.abs(), torch.ones_like(s)) and torch.equal(draw, w.abs())
    assert training_weights(w, "loss") == (w, None)
    with pytest.raises(ValueError, match="resample"):
        training_weights(w, "sample")
    idx = _batch_order(len(w), 0, seed=1, epoch=0, weights=draw)  # the trainer's draws: one epoch of n
    edges = np.linspace(-3.0, 2.0, 11)
    f = torch.from_numpy(np.digitize(x[:, 0].numpy(), edges))
    bins = range(1, len(edges))
    weighted = np.array([float((w * (f == b)).sum() / w.sum()) for b in bins])
    xi, si = f[idx], s[idx]
    resampled = np.array([float((si * (xi == b)).sum() / si.sum()) for b in bins])
    # error of the resampled estimate: multinomial draws of ±1 ratios, n = 2·10⁵
    n = len(idx)
    pos = np.array([float(((si > 0) & (xi == b)).double().mean()) for b in bins])
    neg = np.array([float(((si < 0) & (xi == b)).double().mean()) for b in bins])
    norm = float(si.double().mean())
    err = np.sqrt((pos + neg) / n) / norm
    assert np.all(np.abs(resampled - weighted) < 4 * err), np.round((resampled - weighted) / err, 2)
    # the weighted input's effective size is a fraction of n; a resampled batch has no zero weights
    ess = float(w.sum()) ** 2 / float((w**2).sum()) / len(w)
    assert ess < 0.5


def test_weighted_gan_reproduces_camel_modes(tmp_path):
    x, w = weighted_camel(60_000, seed=3)
    torch.manual_seed(0)
    gan = WeightedGAN(Standardise(1).fit(x, w), dim=1, latent_dim=4, width=64, layers=3, gradient_penalty=0.5)
    cfg = TrainingSection(batch_size=512, epochs=25, optimizer={"lr": 3e-4, "betas": [0.5, 0.9]},
                          schedule={"name": "cosine", "min_lr_factor": 0.1}, log_every=100)
    train(gan, lambda m, b: m.loss(b), (x, w), cfg, tmp_path, seed=1, progress=False)
    s = gan.sample(100_000, generator=torch.Generator().manual_seed(4))[:, 0].numpy()
    # both modes populated in the right proportion, at the right places
    left, right = s[s < -0.3], s[s >= -0.3]
    assert abs(len(left) / len(s) - 0.5) < 0.06
    assert abs(left.mean() + 1.5) < 0.15 and abs(right.mean() - 1.0) < 0.15
    assert abs(left.std() - 0.5) < 0.15 and abs(right.std() - 0.3) < 0.12


def test_weighted_gan_samples_from_its_weight_average():
    """With ema_decay the weighted GAN keeps ā ← d ā + (1 − d) a of its generator's
    weights at every training step (not at evaluation) and samples from ā."""
    x = torch.randn(64, 2, dtype=torch.float64)
    w = torch.rand(64, dtype=torch.float64) + 0.5
    gan = WeightedGAN(Standardise(2).fit(x, w), dim=2, latent_dim=3, width=8, layers=1, ema_decay=0.8)
    opt = torch.optim.SGD(gan.optimizer_groups(), lr=0.1)
    expected = [p.detach().clone() for p in gan.generator.parameters()]
    for _ in range(3):
        expected = [0.8 * e + 0.2 * p.detach() for e, p in zip(expected, gan.generator.parameters())]
        out = gan.loss((x, w))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    with torch.no_grad():
        gan.loss((x, w))
    for e, avg, live in zip(expected, gan.generator_ema.parameters(), gan.generator.parameters()):
        torch.testing.assert_close(avg, e)
        assert not avg.requires_grad and not torch.equal(avg, live)
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(gan.sample(5, generator=torch.Generator().manual_seed(2)), gan.preprocessing.inverse(gan.generator_ema(z).double())[0])
    with pytest.raises(ValueError, match="ema_decay"):
        WeightedGAN(Standardise(2), dim=2, ema_decay=1.0)


def test_weighted_gan_marginal_term_uses_the_weights_and_reaches_the_generator_only():
    """marginal_weight λ adds λ · Σ_k W₂²(generated, weighted truth) to the loss; its
    gradient goes to the generator, not to the discriminator."""
    from partonic.models.weighted_gan import marginal_distance

    x = torch.randn(256, 2, dtype=torch.float64)
    w = torch.rand(256, dtype=torch.float64) + 0.5
    pre = Standardise(2).fit(x, w)
    outs = []
    for lam in (0.0, 3.0):
        torch.manual_seed(0)
        gan = WeightedGAN(pre, dim=2, latent_dim=3, width=8, layers=1, generator="residual", marginal_weight=lam)
        torch.manual_seed(1)
        outs.append(gan.loss((x, w)))
    assert "marginal_w2" not in outs[0]
    torch.testing.assert_close(outs[1]["loss"], outs[0]["loss"] + 3.0 * outs[1]["marginal_w2"])
    # the same number from the function: the generator's batch (same noise) against the weighted truth
    torch.manual_seed(1)
    z = torch.randn(256, 3, dtype=torch.float32)
    u = pre(x)[0].float()
    torch.testing.assert_close(outs[1]["marginal_w2"], marginal_distance(gan.generator(z), u, (w / w.mean()).float()).detach())
    gan.zero_grad()
    (3.0 * marginal_distance(gan.generator(z), u, w.float())).backward()
    assert all(p.grad is None for p in gan.discriminator.parameters())
    assert any(float(p.grad.abs().sum()) > 0 for p in gan.generator.parameters())


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_cramer_distance_to_sample_quantiles_is_unbiased_with_the_cdf_gradient(shift):
    """SampleQuantiles of the standard normal, batches of 256 from N(shift, 1): the mean
    Cramér distance over 2000 batches is ∫ (Φ(x − shift) − Φ(x))² dx (quadrature) within
    four standard errors, zero included; the gradient on each value is 2 (F(x) − F̂(x))/n,
    F̂ the fraction of the batch's other values below x."""
    from scipy import integrate

    from partonic.models.weighted_gan import SampleQuantiles

    q = SampleQuantiles(1, levels=8192)
    q.quantiles[:, 0] = torch.special.ndtri((torch.arange(8192, dtype=torch.float64) + 0.5) / 8192)
    n = 256
    x = torch.randn(2000, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + shift
    values = torch.stack([q.cramer(b[:, None]) for b in x])
    expected = integrate.quad(lambda t: (stats.norm.cdf(t - shift) - stats.norm.cdf(t)) ** 2, -12, 12)[0]
    err = float(values.std()) / math.sqrt(len(values))
    assert abs(float(values.mean()) - expected) < 4 * err, (float(values.mean()), expected, err)
    b = x[0][:, None].clone().requires_grad_(True)
    q.cramer(b).backward()
    f_grid = torch.searchsorted(q.quantiles[:, 0], x[0]).double() / 8192
    rank = torch.argsort(torch.argsort(x[0])).double()
    torch.testing.assert_close(b.grad[:, 0], 2 * (f_grid - rank / (n - 1)) / n)
    with pytest.raises(ValueError, match="cramer"):
        q.cramer(torch.zeros(1, 1, dtype=torch.float64))


@pytest.mark.parametrize("negative_fraction", [0.0, 0.5])
def test_sample_quantiles_of_a_weighted_sample_follow_its_net_distribution(negative_fraction):
    """Fitted on the weighted camel (negative weights included), the quantile at level p
    has camel CDF p within five standard errors of the weighted CDF estimate there."""
    from partonic.models.weighted_gan import SampleQuantiles

    x, w = weighted_camel(200_000, seed=4, negative_fraction=negative_fraction)
    q = SampleQuantiles(1, levels=64).fit(x, w)
    levels = (np.arange(64) + 0.5) / 64
    xq = q.quantiles[:, 0].numpy()
    xs, ws = x[:, 0].numpy(), w.numpy()
    below = xs[None, :] < xq[:, None]
    f_hat = (below * ws).sum(1) / ws.sum()
    sigma = np.sqrt(((below - f_hat[:, None]) ** 2 * ws**2).sum(1)) / ws.sum()
    pulls = (camel_cdf(xq) - levels) / sigma
    assert np.abs(pulls).max() < 5.0, np.round(pulls, 2)


def test_weighted_gan_marginal_target_input_uses_the_whole_input():
    """marginal_target = "input": the marginal term is the Cramér distance of the
    generated batch to the whole weighted input, not W₂² to the step's batch."""
    x = torch.randn(5000, 2, dtype=torch.float64)
    w = torch.rand(5000, dtype=torch.float64) + 0.5
    pre = Standardise(2).fit(x, w)
    torch.manual_seed(0)
    gan = WeightedGAN(pre, dim=2, latent_dim=3, width=8, layers=1, generator="residual", marginal_weight=2.0, marginal_target="input")
    gan.fit_marginal_targets(x, w)
    torch.testing.assert_close(gan.input_quantiles.quantiles, type(gan.input_quantiles)(2).fit(pre(x)[0], w).quantiles)
    assert "input_quantiles.quantiles" in gan.state_dict()
    torch.manual_seed(1)
    out = gan.loss((x[:128], w[:128]))
    torch.manual_seed(1)  # the same noise as inside the loss
    fake = gan.generator(torch.randn(128, 3))
    assert "marginal_w2" not in out
    torch.testing.assert_close(out["marginal_cramer"], gan.input_quantiles.cramer(fake).detach())
    torch.testing.assert_close(out["loss"], out["loss_d"] + out["loss_g"] + 2.0 * out["marginal_cramer"])
    with pytest.raises(ValueError, match="marginal_target"):
        WeightedGAN(pre, dim=2, marginal_target="data")
    with pytest.raises(ValueError, match="marginal_target='input'"):
        WeightedGAN(pre, dim=2).fit_marginal_targets(x, w)


def test_residual_generator_starts_as_the_standard_normal_and_trains_its_correction():
    """model.generator = residual: G(z) = z[:d] + f(z) with f zero at the start, so the
    untrained GAN samples the preprocessing's analytic model exactly; one training step
    moves the correction, and too small a latent space is refused."""
    torch.manual_seed(0)
    x = torch.randn(256, 2, dtype=torch.float64) * 2 + 1
    w = torch.rand(256, dtype=torch.float64) + 0.5
    pre = Standardise(2).fit(x, w)
    gan = WeightedGAN(pre, dim=2, latent_dim=5, width=16, layers=2, generator="residual")
    z = torch.randn(1000, 5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(gan.generator(z), z[:, :2])
    torch.testing.assert_close(gan.sample(1000, generator=torch.Generator().manual_seed(3)), pre.inverse(z[:, :2].double())[0])
    opt = torch.optim.Adam(gan.optimizer_groups(), lr=1e-2)
    out = gan.loss((x, w))
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    assert not torch.allclose(gan.generator(z), z[:, :2])
    with pytest.raises(ValueError, match="latent_dim"):
        WeightedGAN(pre, dim=3, latent_dim=2, generator="residual")
    with pytest.raises(ValueError, match="'mlp' or 'residual'"):
        WeightedGAN(pre, dim=2, generator="resnet")
    with pytest.raises(CardError, match="latent_dim ≥ 3"):
        parse_card({"job": "unweight", "name": "x", "model": {"method": "gan", "generator": "residual", "latent_dim": 2}})


def test_a_fixed_coordinate_keeps_the_weighted_input_marginal_through_training(tmp_path):
    """model.fixed_coordinate: the residual generator leaves one coordinate uncorrected, so
    behind the weighted input's quantile map its generated marginal is the input's (here
    the weighted camel back) before and after training, while the other coordinate's
    correction trains; the card refuses the option without a residual generator behind
    quantile marginals, and the checkpoint keys are those of a generator without it."""
    x1, w = weighted_camel(60_000, seed=7)
    x2 = 0.5 * x1 + 0.3 * torch.randn(len(x1), 1, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    x = torch.cat([x1, x2], 1)
    pre = QuantileStandardise(2).fit(x, w)
    torch.manual_seed(0)
    gan = WeightedGAN(pre, dim=2, latent_dim=4, width=32, layers=2, generator="residual", fixed_coordinates=(0,), ema_decay=0.9)
    plain = WeightedGAN(pre, dim=2, latent_dim=4, width=32, layers=2, generator="residual", ema_decay=0.9)
    assert gan.state_dict().keys() == plain.state_dict().keys()
    edges = np.linspace(-3.0, 2.0, 26)
    cfg = TrainingSection(batch_size=512, epochs=2, optimizer={"lr": 1e-3, "betas": [0.5, 0.9]}, log_every=100)
    z = torch.randn(1000, 4, generator=torch.Generator().manual_seed(3))
    for trained in (False, True):
        if trained:
            train(gan, lambda m, b: m.loss(b), (x, w), cfg, tmp_path, seed=1, progress=False)
            assert not torch.allclose(gan.generator(z)[:, 1], z[:, 1])  # the free coordinate trained
        torch.testing.assert_close(gan.generator(z)[:, 0], z[:, 0])
        s = gan.sample(400_000, generator=torch.Generator().manual_seed(4))[:, 0].numpy()
        # 17 bulk bins: the training input's own precision plus the sample's, 4.5 standard errors
        check_against_camel(s, x1[:, 0].numpy(), w.numpy(), edges, max_pull=4.5)
    with pytest.raises(ValueError, match="at most one"):
        WeightedGAN(pre, dim=2, latent_dim=4, generator="residual", fixed_coordinates=(0, 1))
    with pytest.raises(ValueError, match="residual"):
        WeightedGAN(pre, dim=2, latent_dim=4, fixed_coordinates=(0,))
    base = {"method": "gan", "generator": "residual", "marginals": "quantile", "fixed_coordinate": "m_ll"}
    assert parse_card({"job": "unweight", "name": "x", "model": base}).model.fixed_coordinate == "m_ll"
    for change in ({"marginals": "standard"}, {"generator": "mlp"}, {"method": "flow"}):
        with pytest.raises(CardError, match="fixed_coordinate"):
            parse_card({"job": "unweight", "name": "x", "model": {**base, **change}})
    with pytest.raises(CardError, match="fixed_coordinate"):
        parse_card({"job": "unweight", "name": "x", "model": {**base, "fixed_coordinate": "mll"}})


def test_marginal_map_carries_one_marginal_onto_another_and_keeps_the_ranks():
    """MarginalMap between the quantile tables of N(0, 1) and N(1, 2²): normal events
    come out with mean 1 and standard deviation 2 within their standard errors, the
    map is continuous across its outermost points (a shift beyond them), an identity
    coordinate is untouched, and bad tables are refused."""
    levels = 4096
    p = torch.from_numpy((np.arange(levels) + 0.5) / levels)
    q = torch.from_numpy(stats.norm.ppf(p.numpy()))
    mm = MarginalMap(2, levels=levels)
    assert not mm.fitted
    info = mm.fit(torch.stack([q, q], 1), torch.stack([1 + 2 * q, 1 + 2 * q], 1), identity=(1,))
    assert mm.fitted and info["max_shift"][1] == 0.0 and info["max_shift"][0] > 1.0
    n = 400_000
    u = torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v = mm(u)
    assert abs(float(v[:, 0].mean()) - 1.0) < 4 * 2.0 / math.sqrt(n)
    assert abs(float(v[:, 0].std()) - 2.0) < 4 * 2.0 / math.sqrt(2 * n)
    torch.testing.assert_close(v[:, 1], u[:, 1])
    assert torch.equal(torch.argsort(v[:, 0]), torch.argsort(u[:, 0]))  # increasing: the copula is kept
    edge = q[-1].item()
    out = mm(torch.tensor([[edge - 1e-9, 0.0], [edge + 1.0, 0.0], [q[0].item() - 2.0, 0.0]], dtype=torch.float64))[:, 0]
    torch.testing.assert_close(out, torch.tensor([1 + 2 * edge, 2 + 2 * edge, 1 + 2 * q[0].item() - 2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        mm.fit(torch.stack([q, q], 1)[:10], torch.stack([q, q], 1))
    with pytest.raises(ValueError, match="non-decreasing"):
        mm.fit(torch.stack([q.flip(0), q], 1), torch.stack([q, q], 1))


def test_marginal_calibration_gives_a_wrong_generator_the_weighted_input_marginals():
    """model.marginal_calibration: an untrained GAN's marginals are far from the weighted
    camel; after calibrate_marginals each coordinate's marginal is the weighted input's
    within its statistical precision (4.5 standard errors on 17 bulk bins), the events of
    one noise stream keep their order in every coordinate, the map travels in the
    checkpoint, a fixed coordinate keeps the identity, and the card allows it for gan
    only."""
    x1, w = weighted_camel(60_000, seed=7)
    x2 = 0.5 * x1 + 0.3 * torch.randn(len(x1), 1, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    x = torch.cat([x1, x2], 1)
    pre = QuantileStandardise(2).fit(x, w)
    torch.manual_seed(0)
    gan = WeightedGAN(pre, dim=2, latent_dim=4, width=32, layers=2, marginal_calibration=True)
    with pytest.raises(RuntimeError, match="calibrate_marginals"):
        gan.sample(10)
    edges = np.linspace(-3.0, 2.0, 26)
    z = torch.randn(50_000, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = pre.inverse(gan.generator(z).double())[0]
    with pytest.raises(AssertionError):
        check_against_camel(before[:, 0].numpy(), x1[:, 0].numpy(), w.numpy(), edges, max_pull=4.5)
    info = gan.calibrate_marginals(x, w, n_generated=2_000_000, generator=torch.Generator().manual_seed(5))
    assert len(info["max_shift"]) == 2
    s = gan.sample(400_000, generator=torch.Generator().manual_seed(4))
    check_against_camel(s[:, 0].numpy(), x1[:, 0].numpy(), w.numpy(), edges, max_pull=4.5)
    # the second coordinate against the weighted input's own histogram, both errors
    e2 = np.linspace(-2.0, 1.5, 15)
    h, _ = np.histogram(s[:, 1].numpy(), e2)
    tw, _ = np.histogram(x2[:, 0].numpy(), e2, weights=w.numpy())
    tw2, _ = np.histogram(x2[:, 0].numpy(), e2, weights=w.numpy() ** 2)
    p_in, p_gen = tw / w.sum().item(), h / len(s)
    bulk = p_in > 0.01
    pull = (p_gen - p_in)[bulk] / np.sqrt(tw2 / w.sum().item() ** 2 + p_gen / len(s))[bulk]
    assert np.abs(pull).max() < 4.5, np.round(pull, 2)
    with torch.no_grad():
        after = pre.inverse(gan.marginal_map(gan.generator(z).double()))[0]
    for k in range(2):
        assert torch.equal(torch.argsort(after[:, k]), torch.argsort(before[:, k]))
    loaded = WeightedGAN(pre, dim=2, latent_dim=4, width=32, layers=2, marginal_calibration=True)
    loaded.load_state_dict(gan.state_dict())
    torch.testing.assert_close(loaded.sample(1000, generator=torch.Generator().manual_seed(9)), gan.sample(1000, generator=torch.Generator().manual_seed(9)))
    fixed = WeightedGAN(pre, dim=2, latent_dim=4, width=32, layers=2, generator="residual", fixed_coordinates=(0,), marginal_calibration=True)
    fixed.calibrate_marginals(x, w, n_generated=200_000, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        u = fixed.generator(z).double()
    torch.testing.assert_close(fixed.marginal_map(u)[:, 0], u[:, 0])
    with pytest.raises(ValueError, match="marginal_calibration"):
        WeightedGAN(pre, dim=2).calibrate_marginals(x, w)
    assert parse_card({"job": "unweight", "name": "x", "model": {"method": "gan", "marginal_calibration": True}}).model.marginal_calibration
    with pytest.raises(CardError, match="marginal_calibration"):
        parse_card({"job": "unweight", "name": "x", "model": {"method": "flow", "marginal_calibration": True}})


def _near_camel(n, g):
    """A generator that is close to the camel back but visibly wrong: modes 10% too
    wide, shifted by 0.1, with 45 : 55 instead of 50 : 50."""
    left = torch.rand(n, generator=g, dtype=torch.float64) < 0.45
    z = torch.randn(n, generator=g, dtype=torch.float64)
    return torch.where(left, -1.4 + 0.55 * z, 1.1 + 0.33 * z)[:, None]


@pytest.mark.parametrize("negative_fraction", [0.0, 0.5])
def test_classifier_refinement_turns_a_wrong_generator_into_the_weighted_target(negative_fraction):
    """A near-miss generator refined against the weighted camel back: the classifier's
    density ratio, unweighted, gives the camel within the training sample's own
    precision (the tolerance of the weighted-flow test); an untrained refiner (r = 1)
    changes nothing, and the unrefined generator fails the same check."""
    x, w = weighted_camel(100_000, seed=7, negative_fraction=negative_fraction)
    features = lambda v: v.float()  # noqa: E731
    torch.manual_seed(0)
    ref = ClassifierRefiner(1, width=64, layers=3)
    _, info0 = ref.sample(_near_camel, features, 20_000, torch.Generator().manual_seed(1))
    assert info0["efficiency"] == 1.0 and info0["duplicated_fraction"] == 0.0
    info = ref.fit(x, w, _near_camel(100_000, torch.Generator().manual_seed(2)), epochs=10, batch_size=1024, lr=3e-3, seed=3, progress=False)
    assert info["best_val_loss"] < info["val_loss_before_training"] - 0.003  # it found the difference
    refined, s_info = ref.sample(_near_camel, features, 200_000, torch.Generator().manual_seed(4))
    assert len(refined) == 200_000 and 0.2 < s_info["efficiency"] < 1.0
    edges = np.linspace(-3.0, 2.0, 26)
    check_against_camel(refined[:, 0].numpy(), x[:, 0].numpy(), w.numpy(), edges, max_pull=4.5)
    with pytest.raises(AssertionError):
        check_against_camel(_near_camel(200_000, torch.Generator().manual_seed(5))[:, 0].numpy(), x[:, 0].numpy(), w.numpy(), edges, max_pull=4.5)


def test_classifier_weights_of_the_generated_class():
    """Data N(0.5, 1) against generated N(0, 1): unweighted, the classifier's log-ratio is
    the line 0.5 x − 0.125; with the generated events weighted by that ratio, the two
    classes are the same and ln r is flat. The slope of a least-squares line through ln r
    on [−1.5, 2.5] has a statistical error of about 0.01 at 40 000 events a class; the
    tolerance 0.1 leaves room for the network's shape. Bad weights are refused."""
    g = torch.Generator().manual_seed(11)
    n = 40_000
    data = 0.5 + torch.randn(n, 1, generator=g)
    generated = torch.randn(n, 1, generator=g)
    ratio = torch.exp(0.5 * generated[:, 0] - 0.125)
    grid = torch.linspace(-1.5, 2.5, 41)[:, None]

    def slope(weights):
        torch.manual_seed(0)
        ref = ClassifierRefiner(1, width=32, layers=2)
        ref.fit(data, torch.ones(n), generated, epochs=6, batch_size=1024, seed=3, progress=False, generated_weights=weights)
        y = ref.log_ratio(grid).numpy()
        return np.polyfit(grid[:, 0].numpy(), y, 1)[0]

    assert abs(slope(None) - 0.5) < 0.1
    assert abs(slope(ratio)) < 0.1
    ref = ClassifierRefiner(1)
    with pytest.raises(ValueError, match="generated weights"):
        ref.fit(data, torch.ones(n), generated, generated_weights=ratio[:10])
    with pytest.raises(ValueError, match="positive and finite"):
        ref.fit(data, torch.ones(n), generated, generated_weights=ratio - 1.0)


def test_validation_split_keeps_groups_whole():
    g = torch.Generator().manual_seed(3)
    groups = torch.randint(0, 500, (3000,), generator=g)
    generated_groups = groups.repeat_interleave(2)
    val, tr = validation_split(3000, 6000, 0.1, g, groups, generated_groups)
    assert sorted(torch.cat([val, tr]).tolist()) == list(range(9000))
    ids = torch.cat([groups, generated_groups])
    assert not set(ids[val].tolist()) & set(ids[tr].tolist())
    assert len(set(ids[val].tolist())) == int(0.1 * len(set(ids.tolist())))
    val, tr = validation_split(3000, 6000, 0.1, g)
    assert len(val) == 900 and len(tr) == 8100
    with pytest.raises(ValueError, match="or for neither"):
        validation_split(3000, 6000, 0.1, g, groups, None)
    with pytest.raises(ValueError, match="group ids"):
        validation_split(3000, 6000, 0.1, g, groups[:10], generated_groups)


def test_group_validation_does_not_reward_memorising_repeated_data():
    """Data and generated events from the same N(0, 1) in 6 dimensions, but each data point
    repeated 5 times (one parton event under 5 detector realisations): there is nothing to
    learn, so an honest validation loss cannot go below ln 2 = 0.693. Split by rows, the
    validation data are copies of training data and the memorising classifier's loss
    falls to about 0.64; split by groups it stays at ln 2 (best epoch early) and rises
    as the network memorises. A loss of 1000 validation events near ln 2 scatters by
    less than 0.005, so the margins 0.02 and 0.005 are several standard errors."""
    g = torch.Generator().manual_seed(2)
    n, d, k = 1000, 6, 5
    data = torch.randn(n, d, generator=g).repeat(k, 1)
    generated = torch.randn(k * n, d, generator=g)
    losses = {}
    for split, kw in (("rows", {}), ("groups", {"groups": torch.arange(n).repeat(k), "generated_groups": torch.arange(n, (k + 1) * n)})):
        torch.manual_seed(0)
        info = ClassifierRefiner(d, width=256, layers=3).fit(data, torch.ones(k * n), generated, epochs=30, batch_size=256, lr=3e-3, seed=1,
                                                             progress=False, **kw)
        assert info["validation"] == split
        losses[split] = info
    assert losses["rows"]["best_val_loss"] < math.log(2) - 0.02
    assert losses["groups"]["best_val_loss"] > math.log(2) - 0.005
    assert losses["groups"]["val_loss"][-1] > math.log(2) + 0.02 and losses["groups"]["best_epoch"] <= 5


def test_copy_unweighting_is_unbiased_below_the_maximum():
    """With w_max at half the largest weight, copies keep the distribution exact."""
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(400_000, generator=gen, dtype=torch.float64) * 7 - 4
    w = torch.from_numpy(camel_pdf(x.numpy()) * 7.0)
    idx = unweight_with_copies(w, float(w.max()) * 0.5, gen)
    edges = np.linspace(-3.0, 2.0, 26)
    h, _ = np.histogram(x[idx].numpy(), edges)
    p = bin_truth(edges)
    expected = p / p.sum() * h.sum()
    chi2 = ((h - expected) ** 2 / expected).sum()
    assert chi2 < 25 + 5 * math.sqrt(50), chi2
    assert len(torch.unique(idx)) < len(idx)  # some events were copied


def test_bulk_deviation_carries_its_statistical_error():
    """One bin 20% high: its ratio 1.2·(4000/4200) and error from both samples' counts."""
    edges = np.arange(5.0)
    reference = np.repeat([0.5, 1.5, 2.5, 3.5], 1000)
    sample = np.repeat([0.5, 1.5, 2.5, 3.5], [1000, 1000, 1000, 1200])
    c = compare_histograms(sample, reference, edges)
    r = 1200 / 4200 / 0.25
    assert c.max_bulk_deviation == pytest.approx(r - 1)
    assert c.max_bulk_deviation_error == pytest.approx(r * math.sqrt(1 / 1200 + 1 / 1000))
    # a reference of weight-2 events: √(Σw²)/Σw is the same relative error
    c2 = compare_histograms(sample, reference, edges, reference_weights=np.full(4000, 2.0))
    assert c2.max_bulk_deviation_error == pytest.approx(c.max_bulk_deviation_error)


def test_comparison_with_an_exact_reference_has_the_sample_error_only():
    """Against an exactly known shape the ratio error is the sample's alone; a wrong
    number of bins is an error."""
    edges = np.arange(5.0)
    sample = np.repeat([0.5, 1.5, 2.5, 3.5], [1000, 1000, 1000, 1200])
    c = compare_to_expected(sample, [1.0, 1.0, 1.0, 1.0], edges)
    r = 1200 / 4200 / 0.25
    assert c.max_bulk_deviation == pytest.approx(r - 1)
    assert c.max_bulk_deviation_error == pytest.approx(r * math.sqrt(1 / 1200))
    with pytest.raises(ValueError, match="bins"):
        compare_to_expected(sample, [1.0, 1.0, 1.0], edges)


def test_a_bulk_bin_the_sample_leaves_empty_is_its_worst_bin():
    """Reference uniform in 10 bins, the sample the same but empty in one: that bin is a
    ratio of 0 (deviation 1), counted in χ² and ndf; against an exact reference the
    empty bin's error is that of the 900 events expected there, so its pull is −30."""
    edges = np.arange(11.0)
    reference = np.repeat(np.arange(10) + 0.5, 1000)
    sample = np.repeat(np.arange(10) + 0.5, [1000] * 5 + [0] + [1000] * 4)
    c = compare_histograms(sample, reference, edges)
    assert c.ratio[5] == 0.0 and c.max_bulk_deviation == 1.0
    # the reference's error in that bin, √1000/10⁴, and the 900 events the sample should hold there
    assert c.ndf == 10 and c.pull[5] == pytest.approx(-0.1 / math.sqrt(1000 / 1e8 + 0.1 / 9000))
    assert c.chi2 > c.pull[5] ** 2 - 1e-9
    exact = compare_to_expected(sample, np.ones(10), edges)
    assert exact.max_bulk_deviation == 1.0 and exact.ndf == 10
    assert exact.pull[5] == pytest.approx(-30.0) and exact.max_bulk_pull == pytest.approx(30.0)
    assert exact.chi2 == pytest.approx(900 + sum(p**2 for k, p in enumerate(exact.pull) if k != 5))


def test_lepton_kinematics_round_trip():
    gen = torch.Generator().manual_seed(6)
    n = 1000
    x = torch.stack([50 + 500 * torch.rand(n, generator=gen, dtype=torch.float64), 4 * torch.rand(n, generator=gen, dtype=torch.float64) - 2,
                     2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1], 1)
    phi = 2 * math.pi * torch.rand(n, generator=gen, dtype=torch.float64)
    leptons = leptons_from_kinematics(x[:, 0], x[:, 1], x[:, 2], phi, 0.105658)
    torch.testing.assert_close(kinematics_from_leptons(leptons[:, 0], leptons[:, 1]), x, rtol=1e-9, atol=1e-9)



@pytest.mark.parametrize("rapidity", ["y", "bounded"])
def test_drell_yan_preprocessing_inverts_with_its_jacobian_and_gaussian_tails(rapidity):
    """(m, y, cos θ*) → u: the inverse returns x, the log-determinant equals the
    autograd Jacobian's, and events from the analytic m model with flat cos θ* map to
    standard normal u1, u3 before standardisation, tails included (the flow's base
    density then has the right tails: the m_ℓℓ > 500 GeV fraction lies in |u| < 5).
    With the bounded rapidity, y flat in its kinematic range maps to a standard normal
    u2 too, and any u2 maps back inside the beams."""
    pre = DrellYanPreprocessing(50.0, 13000.0, 91.1876, 2.4952, rapidity=rapidity)
    gen = torch.Generator().manual_seed(8)
    x = pre.reference_sample(20_000, generator=gen)
    pre.fit(x)
    u, logdet = pre(x)
    back, logdet_inverse = pre.inverse(u)
    torch.testing.assert_close(back, x, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(logdet_inverse, -logdet, rtol=1e-8, atol=1e-8)
    for i in range(0, 20_000, 2000):  # 10 events spread over the sample
        jac = torch.autograd.functional.jacobian(lambda v: pre(v[None])[0][0], x[i])
        # (the standardisation keeps float32 moments: agreement to 1e-6)
        assert float(torch.linalg.slogdet(jac).logabsdet) == pytest.approx(float(logdet[i]), abs=1e-6)
    raw = u * pre.standardise.std + pre.standardise.mean
    n = len(raw)
    for k in (0, 1, 2) if rapidity == "bounded" else (0, 2):  # mean 0, variance 1 within 3 standard errors; the 99.9% quantile of N(0, 1)
        assert abs(float(raw[:, k].mean())) < 3 / math.sqrt(n)
        assert abs(float(raw[:, k].var()) - 1) < 3 * math.sqrt(2 / n)
        tail = float((raw[:, k] > 3.0902).double().mean())
        assert abs(tail - 1e-3) < 3 * math.sqrt(1e-3 / n), tail
    assert float(u[x[:, 0] > 500, 0].max()) < 5.0
    if rapidity == "bounded":
        far, _ = pre.inverse(torch.randn(2000, 3, generator=gen, dtype=torch.float64) * 4)
        assert bool((far[:, 1].abs() <= torch.log(13000.0 / far[:, 0]) + 1e-12).all())  # to rounding
    with pytest.raises(ValueError, match="rapidity must be one of"):
        DrellYanPreprocessing(50.0, 13000.0, 91.1876, 2.4952, rapidity="eta")


def test_drell_yan_quantile_marginals_start_a_generator_on_the_weighted_marginals():
    """marginals = "quantile": reference events weighted by (1 + cos θ*)² / m (a known
    weighted marginal of cos θ*, ((1 + c)/2)³) map to exactly standard normal u3, so
    standard normal noise, mapped back, has that marginal: 10 equal-probability bins of
    the exact CDF each hold a tenth within 4 binomial standard errors. The map inverts
    with its log-Jacobian (against autograd)."""
    pre = DrellYanPreprocessing(50.0, 13000.0, 91.1876, 2.4952, rapidity="bounded", marginals="quantile")
    gen = torch.Generator().manual_seed(9)
    x = pre.reference_sample(40_000, generator=gen)
    w = (1 + x[:, 2]) ** 2 / x[:, 0]
    pre.fit(x, w)
    u, logdet = pre(x)
    back, logdet_inverse = pre.inverse(u)
    torch.testing.assert_close(back, x, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(logdet_inverse, -logdet, rtol=1e-8, atol=1e-8)
    for i in range(0, 40_000, 4000):
        jac = torch.autograd.functional.jacobian(lambda v: pre(v[None])[0][0], x[i])
        assert float(torch.linalg.slogdet(jac).logabsdet) == pytest.approx(float(logdet[i]), abs=1e-6)
    m = 40_000
    drawn, _ = pre.inverse(torch.randn(m, 3, generator=gen, dtype=torch.float64))
    f = ((1 + drawn[:, 2]) / 2) ** 3  # the exact weighted CDF of cos θ*
    counts = torch.histc(f, bins=10, min=0.0, max=1.0) / m
    n_eff = float(w.sum() ** 2 / (w * w).sum())
    se = math.sqrt(0.09 * (1 / m + 1 / n_eff))
    assert float((counts - 0.1).abs().max()) < 4 * se
    with pytest.raises(ValueError, match="marginals must be"):
        DrellYanPreprocessing(50.0, 13000.0, 91.1876, 2.4952, marginals="gauss")


TINY = ["data.n_events=40000", "data.n_truth_events=100000", "data.mapping=breit_wigner", "training.epochs=2",
        "evaluation.n_unweighted=5000", "evaluation.tail_events=20000", "evaluation.bins=20"]


def run_job(tmp_path, name, extra, monkeypatch):
    monkeypatch.setenv("PARTONIC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / name
    args = ["unweight", "--card", "cards/drell_yan.yaml", "--output", str(out), "--device", "cpu"]
    for item in TINY + extra:
        args += ["--set", item]
    assert main(args) == 0
    return out, json.loads((out / "report.json").read_text())


def test_unweight_job_exact_mode_end_to_end(tmp_path, monkeypatch):
    out, report = run_job(tmp_path, "exact", ["model.method=flow-exact", "lhe.compress=true"], monkeypatch)
    for key in ("partonic_version", "card", "device", "seed", "created", "outputs", "timing", "cross_section_pb",
                "cross_section_error_pb", "naive_unweighting_efficiency", "methods"):
        assert key in report
    m = report["methods"]["flow-exact"]
    # the generator's quadrature is the truth: the χ² below are the sample's statistics alone
    assert report["truth"].startswith("quadrature")
    # the weighted training input itself against truth: 40 000 events, deviations of a few percent
    inp = report["training_input_vs_truth"]
    assert 0 < inp["max_bulk_deviation"] < 6 * inp["max_bulk_deviation_error"], inp["max_bulk_deviation"]
    assert m["unweighting_efficiency"] > 0.05  # a barely trained flow; the CPU card reaches more
    # the exact mode's σ is an independent estimate: it agrees with the quadrature
    assert abs(m["sigma_pb"] - report["cross_section_quadrature_pb"]) < 4 * m["sigma_error_pb"]
    for name, c in m["observables"].items():
        assert c["chi2_ndf"] < 2.5, (name, c["chi2_ndf"])
    assert (out / report["outputs"]["lhe"]).exists() and (out / "model.pt").exists()
    assert len(report["outputs"]["plots"]) == 14
    init, events = read_lhe(out / report["outputs"]["lhe"])
    assert init.weighting == 3 and len(events) == 5000
    assert init.processes[0].cross_section == pytest.approx(m["sigma_pb"])
    summary = shower_lhe(out / report["outputs"]["lhe"], max_events=300)
    assert summary.n_accepted == 300 and summary.errors == {}


def test_unweight_job_from_weighted_lhe_with_negative_weights(tmp_path, monkeypatch):
    from conftest import drell_yan_lhe_events

    ev = drell_yan_lhe_events(3000)
    ev.weight = torch.where(torch.arange(3000) % 6 == 0, -1.0, 1.0).double() * 100.0
    path = write_lhe(tmp_path / "nlo_like.lhe", ev, LHEInit(weighting=-4, processes=[LHEProcess(1000.0, 10.0, 100.0, 1)]))
    out, report = run_job(tmp_path, "fromlhe", ["data.source=lhe", f"data.files=[{path}]", "model.method=flow", "training.batch_size=512",
                                                        "model.batch_weights=resample", "evaluation.plots=false"], monkeypatch)
    assert report["training_negative_weight_fraction"] == pytest.approx(500 / 3000, abs=1e-9)
    # ±100 weights: (Σw)²/(nΣw²) = (1 − 2·1/6)²; resampled batches draw every event equally often
    assert report["training_batches"] == {"batch_weights": "resample", "input_effective_fraction": pytest.approx((2 / 3) ** 2, rel=0.02)}
    assert report["cross_section_pb"] == pytest.approx(1000.0)
    assert report["truth"] == "the weighted input events"
    assert "flow" in report["methods"]
    # evaluation.plots = false: no plot, every figure in the report
    assert report["outputs"]["plots"] == [] and not (out / "plots").exists() and report["methods"]["flow"]["observables"]
    big = report["methods"]["flow"]["large_sample"]
    assert big["events"] == 20000 and set(big["observables"]) == set(report["methods"]["flow"]["observables"])
    assert 0 <= big["max_bulk_deviation"] < 10 and big["max_bulk_deviation_error"] > 0


def test_unweight_job_gan_with_classifier_refinement(tmp_path, monkeypatch):
    out, report = run_job(tmp_path, "refined", ["model.method=gan", "model.refine=classifier", "model.refine_epochs=2", "model.generator=residual",
                                                "model.rapidity=bounded", "model.marginal_weight=0.5", "model.marginal_target=input",
                                                "model.marginal_calibration=true", "evaluation.plots=false"], monkeypatch)
    m = report["methods"]["gan"]
    calib = report["training"]["marginal_calibration"]
    assert calib["coordinates"] == ["m_ll", "y_ll", "cos_theta"] and len(calib["max_shift"]) == 3 and all(v > 0 for v in calib["max_shift"])
    # the ablation: the same noise without the maps, a different sample of the same size
    unc = m["large_sample_uncalibrated"]
    assert unc["events"] == m["large_sample"]["events"] and set(unc["observables"]) == set(m["large_sample"]["observables"])
    assert unc["observables"]["cos_theta"]["ratio"] != m["large_sample_unrefined"]["observables"]["cos_theta"]["ratio"]
    assert report["refine"]["data_events"] == report["training_events"] and report["refine"]["best_epoch"] in (1, 2)
    assert 0 < m["refine"]["efficiency"] <= 1 and m["refine"]["r_max"] == pytest.approx(report["refine"]["r_max"])
    raw, big = m["large_sample_unrefined"], m["large_sample"]
    lim = m["input_limited"]
    assert set(lim["observables"]) == set(big["observables"]) and lim["max_bulk_pull_with_input_error"] > 0
    assert raw["events"] == big["events"] and set(raw["observables"]) == set(big["observables"])
    assert set(m["tails_unrefined"]) == set(m["tails"]) and all(v["ratio"] >= 0 for v in m["tails_unrefined"].values())
    saved = torch.load(out / "model.pt", weights_only=False)
    # the marginal targets came from the whole training input (quantiles of near-normal coordinates)
    assert bool(saved["state_dict"]["marginal_map.is_fitted"])  # the map travels in the checkpoint
    qs = saved["state_dict"]["input_quantiles.quantiles"]
    assert torch.all(torch.diff(qs, dim=0) >= 0) and torch.all(qs[0] < -2.5) and torch.all(qs[-1] > 2.5)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [rec for rec in logged if "loss" in rec]  # the training steps (validation records have val_loss only)
    assert steps and all("marginal_cramer" in rec for rec in steps)
    assert "r_max" in saved["refiner"] and float(saved["refiner"]["r_max"]) == pytest.approx(report["refine"]["r_max"])


def test_unweight_job_gan_ensemble(tmp_path, monkeypatch):
    """model.ensemble = 2: member 0 is the single network of the same card, unchanged;
    member 1 is trained from the seed + 1000 in member1/ and saved beside it."""
    gan = ["model.method=gan", "model.generator=residual", "model.rapidity=bounded", "evaluation.tail_events=5000", "evaluation.plots=false"]
    _, single = run_job(tmp_path, "single", gan, monkeypatch)
    out, report = run_job(tmp_path, "ensemble", gan + ["model.ensemble=2"], monkeypatch)
    ens = report["ensemble"]
    assert ens["members"] == 2 and ens["seeds"] == [report["seed"], report["seed"] + 1000]
    assert ens["training"][0] == single["training"] == report["training"]
    assert ens["training"][1]["final_loss"] != ens["training"][0]["final_loss"]
    assert (out / "member1" / "checkpoint.pt").exists()
    saved = torch.load(out / "model.pt", weights_only=False)
    assert len(saved["ensemble_state_dicts"]) == 1
    first, second = saved["state_dict"], saved["ensemble_state_dicts"][0]
    assert set(first) == set(second) and any(not torch.equal(first[k], second[k]) for k in first if first[k].is_floating_point())
    # the events differ from the single network's (half of them come from member 1)
    assert report["methods"]["gan"]["large_sample"]["observables"] != single["methods"]["gan"]["large_sample"]["observables"]
    # a flow ensemble draws through the flow's own sampler
    _, flows = run_job(tmp_path, "flows", ["model.method=flow", "model.ensemble=2", "evaluation.tail_events=5000", "evaluation.plots=false"], monkeypatch)
    assert flows["ensemble"]["members"] == 2 and flows["methods"]["flow"]["large_sample"]["events"] == 5000


def test_unweight_job_bad_inputs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PARTONIC_CACHE", str(tmp_path / "cache"))
    lhe = tmp_path / "x.lhe"
    assert main(["unweight", "--card", "cards/drell_yan.yaml", "--output", str(tmp_path / "a"), "--set", "data.source=lhe",
                 "--set", f"data.files=[{lhe}]"]) == 1
    assert "flow-exact" in capsys.readouterr().err
    assert main(["unweight", "--card", "cards/drell_yan.yaml", "--output", str(tmp_path / "b"), "--set", "data.source=lhe",
                 "--set", f"data.files=[{lhe}]", "--set", "model.method=flow"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["unweight", "--card", "cards/drell_yan.yaml", "--set", "model.method=vegas"]) == 2
    assert "'gan', 'flow' or 'flow-exact'" in capsys.readouterr().err
    assert main(["unweight", "--card", "cards/drell_yan.yaml", "--set", "model.refine=classifier"]) == 2
    assert "refine" in capsys.readouterr().err
    assert main(["unweight", "--card", "cards/drell_yan.yaml", "--set", "model.refine=dctr"]) == 2
    assert "'none' or 'classifier'" in capsys.readouterr().err
    assert main(["unweight", "--card", "cards/drell_yan.yaml", "--set", "model.ensemble=2"]) == 2
    assert "ensemble = 2 applies to method = 'gan' or 'flow'" in capsys.readouterr().err


def _toy_drell_yan(n, rng):
    """(m, y, cos θ*) from a fixed toy law: m − 50 exponential, y Gaussian, cos θ* ∝ 1 + c²."""
    m = 50.0 + rng.exponential(30.0, n).clip(max=900.0)
    y = rng.normal(0.0, 1.5, n).clip(-4.0, 4.0)
    c = rng.uniform(-1, 1, 3 * n)
    c = c[rng.uniform(0, 2, 3 * n) < 1 + c * c][:n]
    return torch.from_numpy(np.stack([m, y, c], 1))


def test_input_limited_summary_tells_a_network_that_copies_its_input_from_an_independent_one():
    """A 'network' that resamples its weighted input carries the input's fluctuations:
    it tracks the input bin by bin (vs-input χ²/ndf far below 1, correlation near 1)
    and is consistent with truth once the input's errors are added. An independent
    sample of the true law is not correlated with the input's fluctuations."""
    from partonic.jobs.unweight import _bulk_summary, _input_limited_summary, _Truth, observables

    rng = np.random.default_rng(11)
    phi = lambda n: torch.from_numpy(rng.uniform(0, 2 * math.pi, n))
    obs = lambda x: observables(x, phi(len(x)), 0.105)
    x_truth = _toy_drell_yan(1_000_000, rng)
    truth = _Truth(obs(x_truth), torch.ones(len(x_truth), dtype=torch.float64))
    x_in = _toy_drell_yan(20_000, rng)
    w_in = torch.from_numpy(rng.uniform(0.5, 1.5, len(x_in)))
    in_obs = obs(x_in)
    in_summary = _bulk_summary(in_obs, w_in, truth, 50.0)
    copy_idx = torch.multinomial(w_in, 200_000, replacement=True, generator=torch.Generator().manual_seed(3))
    results = {}
    for label, x_net in (("copy", x_in[copy_idx]), ("independent", _toy_drell_yan(200_000, rng))):
        net_obs = obs(x_net)
        results[label] = _input_limited_summary(net_obs, _bulk_summary(net_obs, None, truth, 50.0), in_obs, w_in, in_summary, truth, 50.0)
    copy, indep = results["copy"]["observables"], results["independent"]["observables"]
    mean = lambda d, key: float(np.mean([v[key] for v in d.values()]))
    # the copy tracks the input bin by bin; an independent sample is as far from it as chance makes it
    assert max(v["vs_input_chi2_ndf"] for v in copy.values()) < 0.3 and 0.7 < mean(indep, "vs_input_chi2_ndf") < 1.3
    # correlation of the deviations: near 1 for the copy; 0 ± 0.2 per observable (10-40 bulk bins) for the other
    assert min(v["input_correlation"] for v in copy.values()) > 0.85 and abs(mean(indep, "input_correlation")) < 0.3
    # with the input's errors added the copy is consistent with truth (χ²/ndf ≈ 1, few bins per observable);
    # the independent sample's deviations are its own 200 000 events' noise, a tenth of that
    assert 0.5 < mean(copy, "chi2_ndf_with_input_error") < 1.5 and mean(indep, "chi2_ndf_with_input_error") < 0.3
    assert results["copy"]["max_bulk_pull_with_input_error"] < 4.5
