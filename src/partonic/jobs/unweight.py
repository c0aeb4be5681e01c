"""``partonic unweight``: weighted Drell–Yan events → unweighted events with a
weighted GAN, a weighted flow, or a flow whose samples are reweighted to the
exact cross section and unweighted again (``flow-exact``)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from ..evaluate.metrics import (
    BULK_FRACTION,
    amplification,
    compare_histograms,
    compare_to_expected,
    hit_or_miss,
    qmse,
    quantile_edges,
    unweighting_efficiency,
)
from ..evaluate.plots import Series, ratio_plot
from ..io.lhe import LHEError, LHEEvents, iter_lhe_chunks, write_lhe
from ..io.store import DatasetCache, cache_key
from ..models.refine import ClassifierRefiner, unweight_with_copies
from ..models.weighted_flow import DrellYanPreprocessing, WeightedFlow
from ..models.weighted_gan import WeightedGAN
from ..physics import kinematics as kin
from ..physics.pdf import from_card
from ..simulate.weighted import CHANNELS, DrellYanGenerator, DrellYanSetup, electroweak_from_card, exact_histograms
from ..train import TrainingError, seed_everything, train
from .common import JobError, RunFolder, atomic_write_bytes, lhe_init, resolve_device

__all__ = ["run", "training_weights", "drell_yan_setup", "network_preprocessing", "network_model", "observables", "leptons_from_kinematics", "kinematics_from_leptons", "lhe_events_from_kinematics", "unweight_with_copies"]

OBSERVABLES = {
    "m_ll": (r"$m_{\mu\mu}$ [GeV]", lambda m_min: np.geomspace(m_min, 1000.0, 41), True),
    "pt_lminus": (r"$p_T(\mu^-)$ [GeV]", lambda m_min: np.linspace(0.0, 150.0, 41), True),
    "pt_lplus": (r"$p_T(\mu^+)$ [GeV]", lambda m_min: np.linspace(0.0, 150.0, 41), True),
    "eta_lminus": (r"$\eta(\mu^-)$", lambda m_min: np.linspace(-6.0, 6.0, 41), False),
    "eta_lplus": (r"$\eta(\mu^+)$", lambda m_min: np.linspace(-6.0, 6.0, 41), False),
    "y_ll": (r"$y_{\mu\mu}$", lambda m_min: np.linspace(-5.0, 5.0, 41), False),
    "cos_theta": (r"$\cos\theta^*$", lambda m_min: np.linspace(-1.0, 1.0, 41), False),
}


#: the networks' three coordinates, in order (model.fixed_coordinate names one)
NETWORK_COORDINATES = ("m_ll", "y_ll", "cos_theta")


def leptons_from_kinematics(m, y, cos_theta, phi, lepton_mass: float) -> torch.Tensor:
    """(N, 2, 4) lab momenta of ℓ⁻, ℓ⁺ from m_ℓℓ, y_ℓℓ, cos θ* (to +z in the rest frame
    reached by a boost along z) and the azimuth, at zero transverse momentum of the pair."""
    p = torch.sqrt(torch.clamp(m * m / 4 - lepton_mass**2, min=0.0))
    sin_t = torch.sqrt(torch.clamp(1 - cos_theta**2, min=0.0))
    vec = torch.stack([sin_t * torch.cos(phi), sin_t * torch.sin(phi), cos_theta], 1) * p[:, None]
    e = torch.sqrt(p * p + lepton_mass**2)
    rest = torch.stack([torch.cat([e[:, None], vec], 1), torch.cat([e[:, None], -vec], 1)], 1)
    beta = torch.stack([torch.zeros_like(y), torch.zeros_like(y), torch.tanh(y)], 1)
    return kin.boost(rest, beta[:, None, :].expand(-1, 2, 3))


def kinematics_from_leptons(lminus: torch.Tensor, lplus: torch.Tensor) -> torch.Tensor:
    """(m, y, cos θ*) of a lepton pair: cos θ* of ℓ⁻ to +z after boosting along z to
    zero pair rapidity and then to the pair rest frame (at LO: the partonic frame)."""
    pair = lminus + lplus
    m = kin.mass(pair)
    y = kin.rapidity(pair)
    rest = kin.boost_to_rest_frame(lminus, pair)
    cos_t = rest[:, 3] / torch.linalg.vector_norm(rest[:, 1:], dim=1)
    return torch.stack([m, y, cos_t], 1)


def observables(x: torch.Tensor, phi: torch.Tensor, lepton_mass: float) -> dict[str, np.ndarray]:
    leptons = leptons_from_kinematics(x[:, 0], x[:, 1], x[:, 2], phi, lepton_mass)
    lm, lp = leptons[:, 0], leptons[:, 1]
    out = {
        "m_ll": x[:, 0], "pt_lminus": kin.pt(lm), "pt_lplus": kin.pt(lp), "eta_lminus": kin.eta(lm),
        "eta_lplus": kin.eta(lp), "y_ll": x[:, 1], "cos_theta": x[:, 2],
    }
    return {k: v.detach().cpu().double().numpy() for k, v in out.items()}


def _read_lhe_inputs(files: list[str], lepton: int, device) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    xs, ws, sigma, err = [], [], 0.0, 0.0
    for name in files:
        path = Path(name)
        for init, events in iter_lhe_chunks(path):
            final = events.status == 1
            minus = final & (events.pid == lepton)
            plus = final & (events.pid == -lepton)
            good = (minus.sum(1) == 1) & (plus.sum(1) == 1)
            if not bool(good.all()):
                bad = int((~good).nonzero()[0, 0]) + 1
                raise JobError(f"{path}: event {bad} has no single {lepton}/{-lepton} pair in its final state")
            lm = events.momenta[minus]
            lp = events.momenta[plus]
            xs.append(kinematics_from_leptons(lm, lp))
            ws.append(events.weight)
            sigma += sum(p.cross_section for p in init.processes)
            err = math.hypot(err, math.sqrt(sum(p.error**2 for p in init.processes)))
    if not xs:
        raise JobError("data.files holds no events")
    return torch.cat(xs).to(device), torch.cat(ws).to(device).double(), sigma / len(files), err / len(files)


def lhe_events_from_kinematics(x: torch.Tensor, phi: torch.Tensor, generator: DrellYanGenerator, sigma: float, gen: torch.Generator) -> LHEEvents:
    """Unweighted LHE events q q̄ → Z/γ* → ℓ⁻ℓ⁺ from (m, y, cos θ*) and φ: incoming
    flavours drawn from their share of dσ at each point, colour lines, momenta that
    balance (incoming partons along the beams), XWGTUP = σ."""
    n = x.shape[0]
    m, y, c = x[:, 0], x[:, 1], x[:, 2]
    leptons = leptons_from_kinematics(m, y, c, phi, generator.lepton_mass)
    probs = generator.channel_probabilities(m, y, c).cpu()
    pick = torch.multinomial(probs, 1, generator=gen)[:, 0]
    beam_a = torch.tensor([ch[0] for ch in CHANNELS])[pick]
    tot = leptons.sum(1).cpu().double()
    zero = torch.zeros(n, dtype=torch.float64)
    ea, eb = (tot[:, 0] + tot[:, 3]) / 2, (tot[:, 0] - tot[:, 3]) / 2
    momenta = torch.stack([torch.stack([ea, zero, zero, ea], 1), torch.stack([eb, zero, zero, -eb], 1), tot, leptons[:, 0].cpu().double(), leptons[:, 1].cpu().double()], 1)
    row = lambda v: torch.tensor(v, dtype=torch.int64).expand(n, 5).clone()
    lepton = generator.setup.lepton
    pid = row([0, 0, 23, lepton, -lepton])
    pid[:, 0], pid[:, 1] = beam_a, -beam_a
    quark_first = beam_a > 0
    color1, color2 = row([0] * 5), row([0] * 5)
    color1[:, 0] = torch.where(quark_first, 501, 0)
    color2[:, 0] = torch.where(quark_first, 0, 501)
    color1[:, 1] = torch.where(quark_first, 0, 501)
    color2[:, 1] = torch.where(quark_first, 501, 0)
    mass = torch.zeros(n, 5, dtype=torch.float64)
    mass[:, 2] = kin.mass(tot)
    mass[:, 3:] = generator.lepton_mass
    return LHEEvents(
        pid=pid, status=row([-1, -1, 2, 1, 1]), mother1=row([0, 0, 1, 3, 3]), mother2=row([0, 0, 2, 3, 3]),
        color1=color1, color2=color2, momenta=momenta, mass=mass, weight=torch.full((n,), sigma, dtype=torch.float64),
        scale=mass[:, 2].clone(), aqed=torch.tensor(generator.setup.ew.alpha, dtype=torch.float64),
        aqcd=torch.tensor(0.0, dtype=torch.float64), process_id=torch.tensor(1),
    )


#: share of exact-mode proposals drawn from the analytic reference density
DEFENSIVE_FRACTION = 0.05


def _exact_unweight(model, generator, n_target, batch, gen, windows):
    """Sample the flow, weight each event by dσ/dx / p_flow, unweight exactly."""
    pilot_x, pilot_lp = model.sample_defensive(batch, DEFENSIVE_FRACTION, generator=gen)
    pilot_w = generator.density(pilot_x[:, 0], pilot_x[:, 1], pilot_x[:, 2]) / pilot_lp.exp()
    eff = unweighting_efficiency(pilot_w)
    w_max = eff.w_max
    kept, weights, masses, n_kept = [], [], [], 0
    x_all, w_all = pilot_x, pilot_w
    while True:
        idx = unweight_with_copies(w_all, w_max, gen)
        kept.append(x_all[idx])
        weights.append(w_all)
        masses.append(x_all[:, 0])
        n_kept += len(idx)
        if n_kept >= n_target:
            break
        x_all, lp = model.sample_defensive(batch, DEFENSIVE_FRACTION, generator=gen)
        w_all = generator.density(x_all[:, 0], x_all[:, 1], x_all[:, 2]) / lp.exp()
    w_cat, m_cat = torch.cat(weights), torch.cat(masses)
    tried = len(w_cat)
    out = torch.cat(kept)
    # the output follows the weighted flow samples: their weighted fractions estimate
    # its tail content with the full statistics of every tried event
    tails = {}
    for lo, hi in windows:
        sel = ((m_cat >= lo) & (m_cat < hi)).double()
        frac = float((w_cat * sel).sum() / w_cat.sum())
        err = float((w_cat * sel).std() * math.sqrt(tried) / w_cat.sum())
        tails[(lo, hi)] = (frac, err)
    return out[torch.randperm(len(out), generator=gen)[:n_target].to(out.device)], {
        "unweighting_efficiency": n_kept / tried,
        "robust_efficiency": eff.efficiency,
        "w_max": w_max,
        "duplicated_fraction": float(((w_cat / w_max) > 1).double().mean()),
        "sigma_pb": float(w_cat.mean()),
        "sigma_error_pb": float(w_cat.std() / math.sqrt(tried)),
        "events_tried": tried,
    }, tails


class _Truth:
    """The reference every sample is compared with, per observable: σ per bin from the
    generator's quadrature (``exact``, no statistical error) when the generator defines
    the process, otherwise the weighted events themselves."""

    def __init__(self, obs: dict, weights: torch.Tensor, exact: dict | None = None):
        self.obs, self.weights, self.exact = obs, weights.cpu().numpy(), exact
        self.label = "truth (quadrature)" if exact is not None else f"truth (weighted, {len(self.weights)} ev.)"

    def compare(self, name: str, values, edges, weights=None):
        w = None if weights is None else (weights.cpu().numpy() if torch.is_tensor(weights) else weights)
        if self.exact is not None:
            return compare_to_expected(values, self.exact[name], edges, sample_weights=w)
        return compare_histograms(values, self.obs[name], edges, sample_weights=w, reference_weights=self.weights)

    def series(self, name: str, edges) -> Series:
        if self.exact is not None:
            return Series.histogram(edges, self.exact[name], self.label)
        return Series(self.obs[name], self.label, self.weights)


def _bulk_summary(obs, weights, truth: _Truth, m_min: float) -> dict:
    """Per observable: largest bulk deviation from truth with its statistical error, the
    largest pull, χ²/ndf and the ratio per bin; and the worst observable."""
    out = {}
    for name, (_, edges_fn, _) in OBSERVABLES.items():
        c = truth.compare(name, obs[name], edges_fn(m_min), weights)
        out[name] = {"max_bulk_deviation": c.max_bulk_deviation, "max_bulk_deviation_error": c.max_bulk_deviation_error,
                     "max_bulk_pull": c.max_bulk_pull, "chi2_ndf": c.chi2_ndf, "ratio": c.ratio, "ratio_error": c.ratio_error}
    worst = max(out, key=lambda k: out[k]["max_bulk_deviation"])
    return {"max_bulk_deviation": out[worst]["max_bulk_deviation"], "max_bulk_deviation_error": out[worst]["max_bulk_deviation_error"],
            "worst_observable": worst, "observables": out}


def _input_limited_summary(obs, net_summary: dict, train_obs, w_train, input_summary: dict, truth: _Truth, m_min: float) -> dict:
    """How much of a network's deviation from truth its finite training input explains.

    A network learns the weighted input, statistical fluctuations included, so its
    deviation from truth is (network − input) + (input − truth). Per observable:

    - ``vs_input_*``: the network's events against the weighted input itself (both
      samples' errors). χ²/ndf well below 1 means the network follows the input's own
      fluctuations bin by bin; near 1, it is as close as an independent sample would be.
    - ``chi2_ndf_with_input_error``, ``max_bulk_pull_with_input_error``: the deviation
      from truth in units of the network's and the input's errors added in quadrature.
      About 1 (and pulls of 2–3) means a network that reproduced its input could not be
      told from this one: the remaining deviation is the input's statistics, and more
      input, not more training, is what reduces it.
    - ``input_correlation``: the correlation, over the bulk bins, of the network's and
      the input's deviations from truth.
    """
    out = {}
    for name, (_, edges_fn, _) in OBSERVABLES.items():
        edges = edges_fn(m_min)
        vs_input = compare_histograms(obs[name], train_obs[name], edges, reference_weights=w_train.cpu().numpy())
        net, inp = net_summary["observables"][name], input_summary["observables"][name]
        r, e = np.asarray(net["ratio"], dtype=float), np.asarray(net["ratio_error"], dtype=float)
        ri, ei = np.asarray(inp["ratio"], dtype=float), np.asarray(inp["ratio_error"], dtype=float)
        reference = truth.exact[name] if truth.exact is not None else np.histogram(truth.obs[name], edges, weights=truth.weights)[0]
        bulk = (reference / reference.sum() >= BULK_FRACTION) & np.isfinite(r) & np.isfinite(ri) & (e > 0) & (ei > 0)
        pull = (r[bulk] - 1) / np.hypot(e[bulk], ei[bulk])
        out[name] = {
            "vs_input_max_bulk_deviation": vs_input.max_bulk_deviation, "vs_input_chi2_ndf": vs_input.chi2_ndf,
            "chi2_ndf_with_input_error": float(np.mean(pull**2)) if bulk.any() else float("nan"),
            "max_bulk_pull_with_input_error": float(np.abs(pull).max()) if bulk.any() else float("nan"),
            "input_correlation": float(np.corrcoef(r[bulk] - 1, ri[bulk] - 1)[0, 1]) if bulk.sum() > 2 else float("nan"),
        }
    return {"bulk_bins": "bins holding ≥ 1% of the truth",
            "max_chi2_ndf_with_input_error": max(v["chi2_ndf_with_input_error"] for v in out.values()),
            "max_bulk_pull_with_input_error": max(v["max_bulk_pull_with_input_error"] for v in out.values()),
            "observables": out}


def drell_yan_setup(card) -> DrellYanSetup:
    """The generator setup an unweight card describes (physics and data sections)."""
    data = card.data
    return DrellYanSetup(
        sqrt_s=card.physics.sqrt_s, m_min=data.m_min, m_max=data.m_max, mapping=data.mapping, scale=data.scale,
        fixed_scale=data.fixed_scale, lepton=data.lepton, ew=electroweak_from_card(card.physics.electroweak),
    )


def network_preprocessing(generator: DrellYanGenerator, rapidity: str, marginals: str = "standard") -> DrellYanPreprocessing:
    """The (unfitted) map between (m_ℓℓ, y_ℓℓ, cos θ*) and the networks' coordinates."""
    setup = generator.setup
    return DrellYanPreprocessing(setup.m_min, generator.m_max, setup.ew.m_z, setup.ew.gamma_z, sqrt_s=setup.sqrt_s, rapidity=rapidity, marginals=marginals)


def network_model(pre: DrellYanPreprocessing, m) -> WeightedGAN | WeightedFlow:
    """The (untrained) network the card's model section describes, behind ``pre``: a
    :class:`WeightedGAN` for method gan, else a :class:`WeightedFlow`."""
    if m.method == "gan":
        return WeightedGAN(pre, dim=3, latent_dim=m.latent_dim, width=m.width, layers=m.layers, gradient_penalty=m.gradient_penalty,
                           discriminator_lr_factor=m.discriminator_lr_factor, ema_decay=m.ema_decay, generator=m.generator,
                           marginal_weight=m.marginal_weight, marginal_target=m.marginal_target,
                           fixed_coordinates=() if m.fixed_coordinate == "none" else (NETWORK_COORDINATES.index(m.fixed_coordinate),),
                           marginal_calibration=m.marginal_calibration)
    return WeightedFlow(pre, dim=3, blocks=m.blocks, bins=m.bins, width=m.width, layers=m.layers)


def training_weights(w: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weights the loss sees, weights the batches are drawn with) for event weights w.

    "loss": (w, None), uniform batches of weighted events. "resample": (sign w, |w|),
    batches drawn with replacement in proportion to |w|: E[sign(w) f(x)] over such draws
    is Σ w f / Σ|w|, the weighted mean up to the constant Σw/Σ|w| that every loss
    normalises away, and no batch event has a weight near zero."""
    if mode == "loss":
        return w, None
    if mode == "resample":
        return torch.sign(w), w.abs()
    raise ValueError(f"unknown batch_weights {mode!r}; allowed: 'loss', 'resample'")


#: the seed of an ensemble's member k is the card's plus k times this
ENSEMBLE_SEED_STEP = 1000


def run(card, args) -> int:
    device = resolve_device(card.device)
    folder = RunFolder.create(card, device, args.output, args.resume)
    seed_everything(card.seed)
    report = folder.report_base()
    timing = report["timing"]
    data, method = card.data, card.model.method
    if data.source == "lhe" and method == "flow-exact":
        raise JobError("model.method = 'flow-exact' needs the generator's exact cross section; with data.source = 'lhe' use 'flow' or 'gan'")

    pdf, _ = from_card(card.physics, device=device)
    setup = drell_yan_setup(card)
    generator = DrellYanGenerator(setup, pdf, device=device)
    gen_cpu = torch.Generator().manual_seed(card.seed)

    # ---- training input: weighted events ------------------------------------
    t0 = time.perf_counter()
    if data.source == "generator":
        cache = DatasetCache()
        key = cache_key("drell_yan_weighted", data, card.seed, physics=card.physics.model_dump(mode="json"))
        cached = cache.load(key)
        if cached is None:
            ev = generator.generate(data.n_events, gen_cpu, batch_size=data.batch_size)
            arrays = {"x": torch.stack([ev.m, ev.y, ev.cos_theta], 1).cpu().numpy(), "w": ev.weight.cpu().numpy()}
            cache.save(key, arrays, meta={"n_events": data.n_events})
        else:
            arrays = cached[0]
        x_all = torch.from_numpy(arrays["x"]).to(device)
        w_all = torch.from_numpy(arrays["w"]).to(device)
        sigma = float(w_all.mean())
        sigma_err = float(w_all.std() / math.sqrt(len(w_all)))
        nonzero = w_all != 0
        x_train, w_train = x_all[nonzero], w_all[nonzero]
    else:
        try:
            x_train, w_train, sigma, sigma_err = _read_lhe_inputs(data.files, data.lepton, device)
        except LHEError as exc:
            raise JobError(str(exc)) from None
        if not sigma:
            sigma = float(w_train.mean())
    simulate_s = time.perf_counter() - t0
    eff = unweighting_efficiency(w_train.cpu())
    report.update({
        "cross_section_pb": sigma, "cross_section_error_pb": sigma_err,
        "naive_unweighting_efficiency": eff.efficiency, "naive_unweighting": eff.as_dict(),
        "training_events": int(len(w_train)), "training_negative_weight_fraction": float((w_train < 0).double().mean()),
        # the input's effective size (Σw)²/(nΣw²) as a fraction of n: what a uniform batch of
        # weighted events is worth; a resampled batch is worth its size
        "training_batches": {"batch_weights": card.model.batch_weights,
                             "input_effective_fraction": float(w_train.double().sum() ** 2 / (w_train.double() ** 2).sum() / len(w_train))},
    })
    if data.source == "generator":
        report["cross_section_quadrature_pb"] = generator.integrate()
        if data.mapping != "flat":
            # the reference figure of the naive method: flat sampling of x1, x2
            flat = DrellYanGenerator(DrellYanSetup(**{**setup.__dict__, "mapping": "flat"}), pdf, device=device)
            flat_w = flat.generate(1_000_000, torch.Generator().manual_seed(card.seed + 5)).weight
            report["naive_unweighting_efficiency_flat_sampling"] = unweighting_efficiency(flat_w.cpu()).efficiency
        else:
            report["naive_unweighting_efficiency_flat_sampling"] = eff.efficiency
    timing["simulate_s"] = simulate_s
    timing["weighted_events_per_s"] = data.n_events / simulate_s if data.source == "generator" and cached is None else None

    # ---- references: truth and hit-or-miss ---------------------------------
    if data.source == "generator":
        truth_setup = DrellYanSetup(**{**setup.__dict__, "mapping": "multichannel"})
        truth_gen = DrellYanGenerator(truth_setup, pdf, device=device)
        truth_ev = truth_gen.generate(data.n_truth_events, torch.Generator().manual_seed(card.seed + 1), batch_size=data.batch_size)
        truth_x = torch.stack([truth_ev.m, truth_ev.y, truth_ev.cos_theta], 1)
        truth_w = truth_ev.weight
        del truth_ev
    else:
        truth_x, truth_w = x_train, w_train
    phi = lambda n: 2 * math.pi * torch.rand(n, generator=gen_cpu, dtype=torch.float64).to(device)
    truth_obs = observables(truth_x, phi(len(truth_x)), generator.lepton_mass)
    exact = None
    if data.source == "generator":
        # the generator defines the process: its quadrature is a truth without statistical error
        t0 = time.perf_counter()
        exact = exact_histograms(generator, {name: edges_fn(setup.m_min) for name, (_, edges_fn, _) in OBSERVABLES.items()})
        timing["exact_histograms_s"] = time.perf_counter() - t0
    truth = _Truth(truth_obs, truth_w, exact)
    report["truth"] = "quadrature of the generator's density (exact σ per bin)" if exact is not None else "the weighted input events"
    hm_idx = hit_or_miss(w_train, generator=gen_cpu)
    hm_x = x_train[hm_idx]
    hm_obs = observables(hm_x, phi(len(hm_x)), generator.lepton_mass)
    report["hit_or_miss_events"] = int(len(hm_idx))
    if data.source == "generator":
        # the input's own fluctuations: how close to truth a network trained on it can get
        phi_train = 2 * math.pi * torch.rand(len(x_train), generator=torch.Generator().manual_seed(card.seed + 6), dtype=torch.float64)
        train_obs = observables(x_train, phi_train.to(device), generator.lepton_mass)
        report["training_input_vs_truth"] = _bulk_summary(train_obs, w_train, truth, setup.m_min)
    else:
        train_obs = None

    # ---- model and training ---------------------------------------------------
    m = card.model
    pre = network_preprocessing(generator, m.rapidity, m.marginals).fit(x_train.cpu(), w_train.cpu()).to(device)
    model = network_model(pre, m)
    perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(card.seed + 2)).to(device)
    n_val = int(card.training.validation_fraction * len(perm))
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    w_fit, draw_weights = training_weights(w_train[tr_idx], m.batch_weights)
    # model.ensemble: member k > 0 is the same network on the same input, started and
    # batched from the seed card.seed + ENSEMBLE_SEED_STEP·k, checkpointed in member<k>/
    models, summaries = [], []
    timing["train_s"] = 0.0
    for k in range(m.ensemble):
        seed = card.seed + ENSEMBLE_SEED_STEP * k
        if k:
            seed_everything(seed)
            model = network_model(pre, m)
        if method == "gan" and m.marginal_target == "input":
            model.fit_marginal_targets(x_train[tr_idx], w_train[tr_idx])
        try:
            result = train(
                model, lambda mod, batch: mod.loss(batch), (x_train[tr_idx], w_fit), card.training, folder.path / f"member{k}" if k else folder.path,
                seed=seed, device=device, val_data=(x_train[val_idx], w_train[val_idx]) if n_val else None,
                resume=args.resume, description=f"training {method}" + (f" {k + 1}/{m.ensemble}" if m.ensemble > 1 else ""), sample_weights=draw_weights,
            )
        except TrainingError as exc:
            raise JobError(str(exc)) from None
        timing["train_s"] += result.train_s
        summaries.append(result.summary(kept_best=card.training.keep_best))
        if method == "gan" and m.marginal_calibration:
            t0 = time.perf_counter()
            calib = model.calibrate_marginals(x_train[tr_idx], w_train[tr_idx], generator=torch.Generator().manual_seed(seed + 9))
            summaries[-1]["marginal_calibration"] = {"coordinates": list(NETWORK_COORDINATES), **calib, "fit_s": round(time.perf_counter() - t0, 2)}
        models.append(model.eval())
    report["training"] = summaries[0]
    if m.ensemble > 1:
        report["ensemble"] = {"members": m.ensemble, "seeds": [card.seed + ENSEMBLE_SEED_STEP * k for k in range(m.ensemble)], "training": summaries}

    def draw_one(net, n: int, gen: torch.Generator, calibrated: bool = True) -> torch.Tensor:
        if method == "gan":
            return net.sample(n, generator=gen, calibrated=calibrated)
        return torch.cat([net.sample(min(200_000, n - s), generator=gen)[0] for s in range(0, n, 200_000)])

    def draw(n: int, gen: torch.Generator, calibrated: bool = True) -> torch.Tensor:
        """n events of the network itself (physics variables); of an ensemble, an equal
        share from each member, shuffled: events of the members' mixture.
        ``calibrated=False``: a GAN's events without its marginal map (the ablation)."""
        if len(models) == 1:
            return draw_one(models[0], n, gen, calibrated)
        shares = [n // len(models) + (1 if k < n % len(models) else 0) for k in range(len(models))]
        x = torch.cat([draw_one(net, s, gen, calibrated) for net, s in zip(models, shares) if s])
        return x[torch.randperm(n, generator=gen).to(x.device)]

    def features(x: torch.Tensor) -> torch.Tensor:
        return torch.nan_to_num(pre(x)[0], nan=0.0, posinf=40.0, neginf=-40.0).float()

    refiner = None
    if m.refine == "classifier":
        t0 = time.perf_counter()
        refiner = ClassifierRefiner(3, m.refine_width, m.refine_layers).to(device)
        x_ref = draw(len(x_train), torch.Generator().manual_seed(card.seed + 7))
        report["refine"] = refiner.fit(features(x_train), w_train, features(x_ref), epochs=m.refine_epochs, seed=card.seed)
        del x_ref
        timing["refine_s"] = time.perf_counter() - t0
    buffer = __import__("io").BytesIO()
    torch.save({"method": method, "state_dict": models[0].state_dict(), "card": report["card"],
                "ensemble_state_dicts": [net.state_dict() for net in models[1:]],
                "refiner": None if refiner is None else refiner.state_dict()}, buffer)
    atomic_write_bytes(folder.path / "model.pt", buffer.getvalue())
    report["outputs"]["model"] = "model.pt"

    # ---- unweighted events ---------------------------------------------------
    n_out = card.evaluation.n_unweighted
    sample_gen = torch.Generator().manual_seed(card.seed + 3)
    t0 = time.perf_counter()
    method_report: dict = {}
    windows = ((200.0, 500.0), (500.0, 1000.0))
    if method == "flow-exact":
        x_gen, info, tail_fracs = _exact_unweight(model, generator, n_out, batch=max(100_000, n_out // 2), gen=sample_gen, windows=windows)
        method_report.update(info)
        lhe_sigma, lhe_err = info["sigma_pb"], info["sigma_error_pb"]
    elif refiner is not None:
        x_gen, method_report["refine"] = refiner.sample(draw, features, n_out, sample_gen)
        lhe_sigma, lhe_err = sigma, sigma_err
    else:
        x_gen = draw(n_out, sample_gen)
        lhe_sigma, lhe_err = sigma, sigma_err
    sample_s = time.perf_counter() - t0
    timing["sample_s"] = sample_s
    method_report["events_per_s"] = n_out / sample_s
    # events outside the physical region (a GAN or plain flow can put a few there)
    physical = generator.density(x_gen[:, 0], x_gen[:, 1], x_gen[:, 2]) > 0
    method_report["unphysical_fraction"] = float((~physical).double().mean())
    x_phys = x_gen[physical]
    gen_phi = phi(len(x_gen))
    gen_obs = observables(x_gen, gen_phi, generator.lepton_mass)

    # ---- metrics ------------------------------------------------------------
    comparisons, plots = {}, []
    label = {"gan": "weighted GAN", "flow": "weighted flow", "flow-exact": "flow, exactly reweighted"}[method]
    if refiner is not None:
        label += " + classifier"
    for name, (xlabel, edges_fn, logy) in OBSERVABLES.items():
        edges = edges_fn(setup.m_min)
        cmp = truth.compare(name, gen_obs[name], edges)
        cmp_hm = truth.compare(name, hm_obs[name], edges)
        comparisons[name] = {
            "max_bulk_deviation": cmp.max_bulk_deviation, "max_bulk_pull": cmp.max_bulk_pull, "chi2_ndf": cmp.chi2_ndf,
            "ratio": cmp.ratio, "ratio_error": cmp.ratio_error, "edges": cmp.edges,
            "hit_or_miss_max_bulk_deviation": cmp_hm.max_bulk_deviation, "hit_or_miss_chi2_ndf": cmp_hm.chi2_ndf,
        }
        if card.evaluation.plots:
            written = ratio_plot(
                [truth.series(name, edges), Series(gen_obs[name], label), Series(hm_obs[name], f"hit-or-miss ({len(hm_x)} ev.)")],
                edges, xlabel, folder.path / "plots" / name, title=rf"pp$\to\mu\mu$, {card.physics.sqrt_s / 1000:g} TeV", logy=logy,
            )
            plots += [str(p.relative_to(folder.path)) for p in written]
    method_report["max_bulk_deviation"] = max(c["max_bulk_deviation"] for c in comparisons.values())
    method_report["chi2_ndf"] = {k: c["chi2_ndf"] for k, c in comparisons.items()}
    method_report["observables"] = comparisons
    # tails of m_ll: generated fraction against the exact (quadrature) fraction
    if method != "flow-exact":
        # tail fractions from a larger sample than the histograms use
        n_tail = max(card.evaluation.tail_events, n_out)
        tail_gen = torch.Generator().manual_seed(card.seed + 4)
        if refiner is not None:
            x_big, _ = refiner.sample(draw, features, n_tail, tail_gen)
            # the ablation: the network's own events, before the refinement
            x_raw = draw(n_tail, torch.Generator().manual_seed(card.seed + 4))
            raw_obs = observables(x_raw, phi(len(x_raw)), generator.lepton_mass)
            method_report["large_sample_unrefined"] = {"events": n_tail, **_bulk_summary(raw_obs, None, truth, setup.m_min)}
            method_report["tails_unrefined"] = {f"{lo:g}-{hi:g}": float(((x_raw[:, 0] >= lo) & (x_raw[:, 0] < hi)).double().mean()) for lo, hi in windows}
            del x_raw, raw_obs
        else:
            x_big = draw(n_tail, tail_gen)
        if method == "gan" and m.marginal_calibration:
            # the ablation: the same noise without the marginal maps
            x_raw = draw(n_tail, torch.Generator().manual_seed(card.seed + 4), calibrated=False)
            raw_obs = observables(x_raw, phi(len(x_raw)), generator.lepton_mass)
            method_report["large_sample_uncalibrated"] = {"events": n_tail, **_bulk_summary(raw_obs, None, truth, setup.m_min)}
            del x_raw, raw_obs
        m_tail = x_big[:, 0]
        # the large sample also measures the network's qMSE with little sampling noise
        big_obs = observables(x_big, phi(len(x_big)), generator.lepton_mass)
        # ... and its bulk deviations, resolved below the 10^5-event output's 2-3% per bin
        method_report["large_sample"] = {"events": n_tail, **_bulk_summary(big_obs, None, truth, setup.m_min)}
        if train_obs is not None:
            method_report["input_limited"] = _input_limited_summary(big_obs, method_report["large_sample"], train_obs, w_train,
                                                                     report["training_input_vs_truth"], truth, setup.m_min)
        tail_fracs = {}
        for lo, hi in windows:
            k = int(((m_tail >= lo) & (m_tail < hi)).sum())
            tail_fracs[(lo, hi)] = (k / n_tail, math.sqrt(max(k, 1)) / n_tail)
    tails = {}
    for lo, hi in windows:
        if data.source == "generator":
            truth_frac = generator.integrate(lo, hi) / generator.integrate()
        else:
            sel = (truth_x[:, 0] >= lo) & (truth_x[:, 0] < hi)
            truth_frac = float((truth_w * sel).sum() / truth_w.sum())
        frac, err = tail_fracs[(lo, hi)]
        if "tails_unrefined" in method_report:
            f_raw = method_report["tails_unrefined"][f"{lo:g}-{hi:g}"]
            method_report["tails_unrefined"][f"{lo:g}-{hi:g}"] = {"fraction": f_raw, "ratio": f_raw / truth_frac if truth_frac > 0 else float("nan")}
        tails[f"{lo:g}-{hi:g}"] = {
            "ratio": frac / truth_frac if truth_frac > 0 else float("nan"),
            "ratio_error": err / truth_frac if truth_frac > 0 else float("nan"),
            "fraction": frac, "truth_fraction": truth_frac,
        }
    method_report["tail_deviation"] = {k: abs(v["ratio"] - 1) for k, v in tails.items()}
    method_report["tails"] = tails
    # qMSE and amplification against the hit-or-miss sample of the same input
    nq = card.evaluation.quantiles
    qm = {}
    net_obs = gen_obs if method == "flow-exact" else big_obs
    n_net = len(next(iter(net_obs.values())))
    for name in ("m_ll", "pt_lminus"):
        edges = quantile_edges(truth_obs[name], nq, truth_w.cpu().numpy())
        q_net, q_hm = qmse(net_obs[name], edges), qmse(hm_obs[name], edges)
        qm[name] = {"qmse": q_net, "network_events": n_net, "qmse_hit_or_miss": q_hm, "hit_or_miss_events": len(hm_x),
                    "amplification": amplification(q_net, len(hm_x), nq),
                    "expected_qmse_of_true_sample": (1 - 1 / nq) / (nq * n_net)}
    method_report["qmse"] = qm
    method_report["amplification"] = min(v["amplification"] for v in qm.values())

    # ---- LHE -----------------------------------------------------------------
    if card.lhe.write:
        n_lhe = min(len(x_phys), card.lhe.max_events or len(x_phys))
        t0 = time.perf_counter()
        events = lhe_events_from_kinematics(x_phys[:n_lhe], gen_phi[physical][:n_lhe], generator, lhe_sigma, sample_gen)
        name = "events.lhe.gz" if card.lhe.compress else "events.lhe"
        init = lhe_init(card, lhe_sigma, lhe_err, version=report["partonic_version"])
        write_lhe(folder.path / name, events, init, comment=f"partonic unweight, method {method}")
        timing["lhe_write_events_per_s"] = n_lhe / (time.perf_counter() - t0)
        report["outputs"]["lhe"] = name
        # the file holds the physical events only: fewer than asked for when the network
        # put some outside phase space (unphysical_fraction)
        requested = int(min(len(x_gen), card.lhe.max_events or len(x_gen)))
        report["lhe"] = {"events": n_lhe, "requested": requested, "dropped_unphysical": requested - n_lhe}
    report["outputs"]["plots"] = plots
    report["methods"] = {method: method_report}
    report["method"] = method
    folder.write_report(report)
    print(_summary(report, folder.path))
    return 0


def _summary(report: dict, path: Path) -> str:
    m = report["methods"][report["method"]]
    lines = [
        f"partonic unweight: {report['method']}" + (f", an ensemble of {report['ensemble']['members']} networks" if "ensemble" in report else "") + f" → {path}",
        f"  σ = {report['cross_section_pb']:.2f} ± {report['cross_section_error_pb']:.2f} pb from the weighted input; naive unweighting efficiency {report['naive_unweighting_efficiency']:.2e}",
        f"  largest bulk deviation from truth: {m['max_bulk_deviation']:.3f}; tails 200-500: {m['tail_deviation']['200-500']:.3f}, 500-1000: {m['tail_deviation']['500-1000']:.3f}; amplification {m['amplification']:.2f}",
    ]
    if "large_sample" in m:
        big = m["large_sample"]
        lines.append(f"  with {big['events']} generated events: largest bulk deviation {big['max_bulk_deviation']:.3f} ± {big['max_bulk_deviation_error']:.3f} ({big['worst_observable']})")
    if "input_limited" in m:
        lim = m["input_limited"]["observables"]
        vs_in = [v["vs_input_chi2_ndf"] for v in lim.values()]
        lines.append(f"  against its own training input χ²/ndf {min(vs_in):.2f}–{max(vs_in):.2f}; against truth with the input's errors added: "
                     f"χ²/ndf up to {m['input_limited']['max_chi2_ndf_with_input_error']:.2f}, largest pull {m['input_limited']['max_bulk_pull_with_input_error']:.1f}")
    if "large_sample_unrefined" in m:
        raw = m["large_sample_unrefined"]
        lines.append(f"  before the classifier refinement: {raw['max_bulk_deviation']:.3f} ± {raw['max_bulk_deviation_error']:.3f} ({raw['worst_observable']}); "
                     f"refinement efficiency {m['refine']['efficiency']:.3f}")
    if "large_sample_uncalibrated" in m:
        raw = m["large_sample_uncalibrated"]
        lines.append(f"  without the marginal calibration: {raw['max_bulk_deviation']:.3f} ± {raw['max_bulk_deviation_error']:.3f} ({raw['worst_observable']})")
    if "unweighting_efficiency" in m:
        lines.append(f"  exact reweighting: unweighting efficiency {m['unweighting_efficiency']:.3f}, σ = {m['sigma_pb']:.2f} ± {m['sigma_error_pb']:.2f} pb")
    if "lhe" in report:
        lhe = report["lhe"]
        dropped = (f" of {lhe['requested']} asked for: the network put {m['unphysical_fraction']:.1%} of its events "
                   "outside phase space") if lhe["dropped_unphysical"] else ""
        lines.append(f"  LHE: {lhe['events']} events in {report['outputs']['lhe']}{dropped}")
    return "\n".join(lines)
