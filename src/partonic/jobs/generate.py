"""``partonic generate``: pp → tt̄ → 6 quarks from an MMD-regularised GAN, with the
no-MMD ablation, resonance fits, a classifier test and LHE output with the full
decay chain."""

from __future__ import annotations

import io
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..evaluate.metrics import amplification, classifier_auc, compare_histograms, fit_breit_wigner, qmse, quantile_edges
from ..evaluate.plots import Series, ratio_plot
from ..io.lhe import LHEError, LHEEvents, iter_lhe_chunks, write_lhe
from ..io.store import DatasetCache, cache_key
from ..models.mmd_gan import QUARK_MASSES, RESONANCES, MMDGAN, TopQuarkRepresentation, resonance_masses
from ..physics import kinematics as kin
from ..physics.constants import ALPHA_EM_MZ, GEV2_TO_PB
from ..physics.matrix_elements import ttbar_me2
from ..physics.pdf import PDFError, from_card
from ..train import TrainingError, seed_everything, train
from .common import JobError, RunFolder, atomic_write_bytes, lhe_init, resolve_device

__all__ = ["run", "on_shell", "quarks_from_lhe", "observables", "ttbar_lhe_events", "incoming_probabilities"]

_PYTHIA_DEFAULT_PDF = ("NNPDF23_lo_as_0130_qed", 0)
_QUARK_LABELS = ("b", "q_{W^+}", r"\bar q_{W^+}", r"\bar b", "q_{W^-}", r"\bar q_{W^-}")
_QUARK_NAMES = ("b", "qWp", "qbarWp", "bbar", "qWm", "qbarWm")


# --------------------------------------------------------------------- data
def on_shell(quarks: torch.Tensor, masses=QUARK_MASSES) -> torch.Tensor:
    """Keep the three-momenta, set E from the fixed quark masses (b 4.7 GeV, light 0)."""
    m = torch.as_tensor(masses, dtype=quarks.dtype, device=quarks.device)
    e = torch.sqrt((quarks[..., 1:] ** 2).sum(-1) + m * m)
    return torch.cat([e[..., None], quarks[..., 1:]], -1)


def quarks_from_lhe(events: LHEEvents, where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """The six quarks (N, 6, 4) and their ids (N, 6) in the order b, q(W⁺), q̄(W⁺),
    b̄, q(W⁻), q̄(W⁻), found through the mother pointers of an LHE record
    t → b W⁺, W⁺ → q q̄' (and conjugate)."""
    final = events.status == 1
    mother = (events.mother1 - 1).clamp(min=0)
    mother_id = torch.gather(events.pid, 1, mother)
    has_mother = events.mother1 > 0
    pid = events.pid
    slots = [
        final & (pid == 5),
        final & has_mother & (mother_id == 24) & (pid > 0) & (pid.abs() <= 5),
        final & has_mother & (mother_id == 24) & (pid < 0) & (pid.abs() <= 5),
        final & (pid == -5),
        final & has_mother & (mother_id == -24) & (pid > 0) & (pid.abs() <= 5),
        final & has_mother & (mother_id == -24) & (pid < 0) & (pid.abs() <= 5),
    ]
    # b quarks from W decays (CKM-suppressed) are not the top's b: count only top daughters
    for k in (0, 3):
        slots[k] = slots[k] & has_mother & (mother_id.abs() == 6)
    counts = torch.stack([s.sum(1) for s in slots], 1)
    bad = (counts != 1).any(1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise JobError(
            f"{where}event {i + 1} is not t t̄ → b q q̄' b̄ q q̄' with the resonances in the record (found "
            f"{counts[i].tolist()} particles for b, q(W+), q̄(W+), b̄, q(W-), q̄(W-)); generate with the decay "
            "chain, e.g. MadGraph 'p p > t t~, (t > w+ b, w+ > j j), (t~ > w- b~, w- > j j)'"
        )
    idx = torch.stack([s.float().argmax(1) for s in slots], 1)
    quarks = torch.gather(events.momenta, 1, idx[..., None].expand(-1, -1, 4)).double()
    return quarks, torch.gather(pid, 1, idx)


# The held-out truth sample's Pythia seeds: the card seed shifted by a prime, so its
# chunks never share a seed with the training sample's (test).
HELD_OUT_SEED_OFFSET = 104_729


def _pythia_truth(card, progress: bool, n_events: int | None = None, seed: int | None = None) -> tuple[dict, dict]:
    from ..physics.pdf import find_pdf_member
    from ..simulate.pythia import simulate_ttbar

    d = card.data
    n_events = d.n_events if n_events is None else n_events
    seed = card.seed if seed is None else seed
    pdf = (card.physics.pdf.set, card.physics.pdf.member)
    # what the generator does beyond the card (a change here must change the key)
    extra = {"sqrt_s": card.physics.sqrt_s, "pdf": pdf, "top_decay": "bW", "w_decay": "ud,us,cd,cs"}
    key = cache_key("ttbar_parton_level", {"n_events": n_events}, seed, **extra)
    cache = DatasetCache()
    loaded = cache.load(key)
    if loaded is not None:
        arrays, meta = loaded
        meta["cached"] = True
    else:
        pdf_path = None
        if pdf != _PYTHIA_DEFAULT_PDF:
            try:
                pdf_path = str(find_pdf_member(*pdf))
            except PDFError as exc:
                raise JobError(str(exc)) from None
        scratch = cache.root / f".{key}.chunks"
        arrays, meta = simulate_ttbar(n_events, seed, card.physics.sqrt_s, pdf_path, workers=d.workers, progress=progress, scratch=scratch)
        cache.save(key, arrays, meta)
        shutil.rmtree(scratch, ignore_errors=True)
        meta["cached"] = False
    meta["cache_key"] = key
    return arrays, meta


def _lhe_truth(card, n_events: int | None = None) -> tuple[dict, dict]:
    n_events = card.data.n_events if n_events is None else n_events
    quarks, ids, sigma = [], [], []
    n = 0
    for name in card.data.files:
        try:
            for init, events in iter_lhe_chunks(name):
                q, i = quarks_from_lhe(events, where=f"{name}: ")
                quarks.append(q)
                ids.append(i)
                n += len(q)
                sigma.append(sum(p.cross_section for p in init.processes))
                if n >= n_events:
                    break
        except LHEError as exc:
            raise JobError(str(exc)) from None
        if n >= n_events:
            break
    if not quarks:
        raise JobError("data.files hold no events")
    arrays = {"quarks": torch.cat(quarks)[:n_events].numpy(), "ids": torch.cat(ids)[:n_events].numpy()}
    return arrays, {"sigma_pb": float(np.mean(sigma)), "files": list(card.data.files)}


# ---------------------------------------------------------------- observables
def observables(quarks: torch.Tensor) -> dict[str, np.ndarray]:
    """pT, η, φ of the six quarks and of t, t̄; the W and top masses; ΔR of every quark pair."""
    out: dict[str, torch.Tensor] = {}
    for j, name in enumerate(_QUARK_NAMES):
        p = quarks[:, j]
        out[f"pt_{name}"], out[f"eta_{name}"], out[f"phi_{name}"] = kin.pt(p), kin.eta(p), kin.phi(p)
    tops = {"t": quarks[:, 0:3].sum(1), "tbar": quarks[:, 3:6].sum(1)}
    for name, p in tops.items():
        out[f"pt_{name}"], out[f"eta_{name}"], out[f"phi_{name}"] = kin.pt(p), kin.eta(p), kin.phi(p)
    masses = resonance_masses(quarks)
    for k, name in enumerate(RESONANCES):
        out[f"m_{name}"] = masses[:, k]
    for i in range(6):
        for j in range(i + 1, 6):
            out[f"dR_{_QUARK_NAMES[i]}_{_QUARK_NAMES[j]}"] = kin.delta_r(quarks[:, i], quarks[:, j])
    return {k: v.detach().cpu().double().numpy() for k, v in out.items()}


def _binning(name: str, bins: int) -> tuple[np.ndarray, str, bool]:
    """Histogram edges, axis label and log scale of an observable."""
    if name.startswith("m_"):
        res = name[2:]
        _, mass, width = RESONANCES[res]
        label = {"W+": "W^+", "W-": "W^-", "t": "t", "tbar": r"\bar t"}[res]
        return np.linspace(mass - 8 * width, mass + 8 * width, 2 * bins + 1), rf"$m_{{{label}}}$ [GeV]", False
    obj = name.split("_", 1)[1]
    label = {"t": "t", "tbar": r"\bar t"}.get(obj) or (_QUARK_LABELS[_QUARK_NAMES.index(obj)] if obj in _QUARK_NAMES else obj)
    if name.startswith("pt_"):
        top = obj in ("t", "tbar")
        return np.linspace(0.0, 500.0 if top else 300.0, bins + 1), rf"$p_T({label})$ [GeV]", True
    if name.startswith("eta_"):
        return np.linspace(-5.0, 5.0, bins + 1), rf"$\eta({label})$", False
    if name.startswith("phi_"):
        return np.linspace(-math.pi, math.pi, bins + 1), rf"$\phi({label})$", False
    a, b = obj.split("_")
    la, lb = _QUARK_LABELS[_QUARK_NAMES.index(a)], _QUARK_LABELS[_QUARK_NAMES.index(b)]
    return np.linspace(0.0, 6.0, bins + 1), rf"$\Delta R({la}, {lb})$", False


def _classifier_features(quarks: torch.Tensor) -> torch.Tensor:
    """log pT, η, cos φ, sin φ of every quark and the four resonance masses."""
    pt, eta, phi = kin.pt(quarks), kin.eta(quarks), kin.phi(quarks)
    return torch.cat([torch.log(pt.clamp(min=1e-3)), eta, torch.cos(phi), torch.sin(phi), resonance_masses(quarks)], 1).float()


# ------------------------------------------------------------------------- LHE
def incoming_probabilities(x1: torch.Tensor, x2: torch.Tensor, shat: torch.Tensor, that: torch.Tensor, pdf, alpha_s, scale: torch.Tensor) -> torch.Tensor:
    """(N, 3) probabilities of g g, q q̄ and q̄ q initial states at each point: their
    shares of f_a(x1) f_b(x2) |M_ab|² at LO (t̂ of the quark from beam 1; for q̄ q the
    quark comes from beam 2, so its t̂ is û)."""
    q2 = scale * scale
    return _channel_probabilities(_parton_densities(pdf, x1, q2), _parton_densities(pdf, x2, q2), shat, that, alpha_s(q2))


def _parton_densities(pdf, x: torch.Tensor, q2: torch.Tensor) -> torch.Tensor:
    """(N, 11) x·f(x, Q²) of the ids −5 … 5, the gluon (id 0) in column 5."""
    return torch.stack([pdf.xfxQ2(pid, x, q2) for pid in range(-5, 6)], 1)


def _quark_luminosities(fa: torch.Tensor, fb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 5) f_q(x1) f_q̄(x2) and f_q̄(x1) f_q(x2) for q = d, u, s, c, b."""
    return (torch.stack([fa[:, 5 + q] * fb[:, 5 - q] for q in range(1, 6)], 1),
            torch.stack([fa[:, 5 - q] * fb[:, 5 + q] for q in range(1, 6)], 1))


def _channel_probabilities(fa, fb, shat, that, a_s) -> torch.Tensor:
    gg = fa[:, 5] * fb[:, 5] * ttbar_me2(shat, that, "gg", alpha_s=a_s)
    uhat = 2 * float(RESONANCES["t"][1]) ** 2 - shat - that
    lum_qqbar, lum_qbarq = _quark_luminosities(fa, fb)
    qqbar = lum_qqbar.sum(1) * ttbar_me2(shat, that, "qq", alpha_s=a_s)
    qbarq = lum_qbarq.sum(1) * ttbar_me2(shat, uhat, "qq", alpha_s=a_s)
    w = torch.stack([gg, qqbar, qbarq], 1).clamp(min=0)
    return w / w.sum(1, keepdim=True).clamp(min=1e-300)


def _gauss_legendre(n: int, lo, hi) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights, shape (..., n), of n-point Gauss–Legendre quadrature on [lo, hi]
    (``lo`` and ``hi`` numbers or tensors of the same shape)."""
    x, w = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(n))
    lo, hi = torch.as_tensor(lo, dtype=torch.float64)[..., None], torch.as_tensor(hi, dtype=torch.float64)[..., None]
    half = (hi - lo) / 2
    return lo + half * (x + 1), half * w


def ttbar_cross_section(pdf, alpha_s, sqrt_s: float = 13000.0, m_top: float = float(RESONANCES["t"][1]), nodes: tuple[int, int, int] = (64, 32, 16)) -> float:
    """LO σ(pp → tt̄) in pb: Σ_ab ∫ dx₁ dx₂ f_a(x₁, μ²) f_b(x₂, μ²) dσ̂_ab/dt̂ dt̂ over
    g g, q q̄ and q̄ q (q = d, u, s, c, b), with stable tops and μ² = m_T² of the tops
    (Pythia8's default renormalisation and factorisation scales for a 2 → 2 process
    with equal final masses).

    Nested Gauss–Legendre quadrature in ln τ (τ = x₁x₂ from 4m²/s to 1), the rapidity
    y = ½ ln(x₁/x₂) and cos θ* (``nodes`` points each); with dx₁ dx₂ = τ d(ln τ) dy and
    f = xf/x the integrand is xf_a xf_b dσ̂/dcos θ*. The defaults converge to 10⁻⁴.

    Example:
        >>> ttbar_cross_section(load_pdf("NNPDF23_lo_as_0130_qed"), AlphaS(0.13, 1, nf_max=6))  # ≈ 514 pb
    """
    s = sqrt_s * sqrt_s
    m2 = m_top * m_top
    lt, wt = _gauss_legendre(nodes[0], math.log(4 * m2 / s), 0.0)
    y, wy = _gauss_legendre(nodes[1], 0.5 * lt, -0.5 * lt)                  # (n_τ, n_y)
    c, wc = _gauss_legendre(nodes[2], -1.0, 1.0)
    shape = (nodes[0], nodes[1], nodes[2])
    lt, y, c = lt[:, None, None].expand(shape), y[:, :, None].expand(shape), c[None, None, :].expand(shape)
    weight = (wt[:, None, None] * wy[:, :, None] * wc[None, None, :]).reshape(-1)
    lt, y, c = lt.reshape(-1), y.reshape(-1), c.reshape(-1)
    tau = torch.exp(lt)
    x1, x2 = torch.sqrt(tau) * torch.exp(y), torch.sqrt(tau) * torch.exp(-y)
    shat = tau * s
    beta = torch.sqrt(torch.clamp(1 - 4 * m2 / shat, min=0.0))
    that = m2 - shat / 2 * (1 - beta * c)
    uhat = 2 * m2 - shat - that
    mu2 = m2 + shat * beta**2 * (1 - c * c) / 4
    fa, fb = _parton_densities(pdf, x1, mu2), _parton_densities(pdf, x2, mu2)
    a_s = alpha_s(mu2)
    lum_qqbar, lum_qbarq = _quark_luminosities(fa, fb)
    me2 = (fa[:, 5] * fb[:, 5] * ttbar_me2(shat, that, "gg", m_top, a_s) + lum_qqbar.sum(1) * ttbar_me2(shat, that, "qq", m_top, a_s)
           + lum_qbarq.sum(1) * ttbar_me2(shat, uhat, "qq", m_top, a_s))
    dsigma_dcos = me2 * beta / (32 * math.pi * shat)  # dσ̂/dt̂ = |M|²/(16π ŝ²), dt̂ = ŝβ/2 dcos θ*
    return float((weight * dsigma_dcos).sum()) * GEV2_TO_PB


def _pick_quark(lum: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The light flavour q (1-5) of a q q̄ (or q̄ q) initial state, by its luminosity share."""
    lum = lum.clamp(min=1e-300)
    return torch.multinomial((lum / lum.sum(1, keepdim=True)).cpu().float(), 1, generator=gen)[:, 0] + 1


def ttbar_lhe_events(quarks: torch.Tensor, ids: torch.Tensor, sigma_pb: float, sqrt_s: float, pdf, alpha_s, gen: torch.Generator) -> tuple[LHEEvents, dict]:
    """LHE events with the full decay chain from six quark momenta.

    The final state is boosted transversely to zero total pT (a generated event
    balances only approximately; the boost keeps every invariant mass), the incoming
    partons are reconstructed along the beams (x1,2 = (E ± pz)/√s), their flavours
    drawn by :func:`incoming_probabilities`. Record: 1, 2 incoming; 3 t, 4 t̄ (status 2);
    5 W⁺, 6 b (from t); 7 W⁻, 8 b̄ (from t̄); 9, 10 W⁺ → q q̄'; 11, 12 W⁻ → q q̄'; colour
    lines as in Pythia8's record. Events with x > 1 are dropped. Returns the events
    and a summary (mean |pT| removed, events dropped)."""
    quarks = quarks.double().cpu()
    ids = ids.long().cpu()
    total = quarks.sum(1)
    pt_before = kin.pt(total)
    beta_t = torch.zeros(len(total), 3, dtype=torch.float64)
    beta_t[:, :2] = -total[:, 1:3] / total[:, :1]
    quarks = kin.boost(quarks, beta_t[:, None, :].expand(-1, 6, 3))
    total = quarks.sum(1)
    x1 = (total[:, 0] + total[:, 3]) / sqrt_s
    x2 = (total[:, 0] - total[:, 3]) / sqrt_s
    ok = (x1 < 1) & (x2 < 1) & (x1 > 0) & (x2 > 0)
    quarks, ids, total, x1, x2 = quarks[ok], ids[ok], total[ok], x1[ok], x2[ok]
    n = len(quarks)
    ea, eb = x1 * sqrt_s / 2, x2 * sqrt_s / 2
    zero = torch.zeros(n, dtype=torch.float64)
    pa = torch.stack([ea, zero, zero, ea], 1)
    pb = torch.stack([eb, zero, zero, -eb], 1)
    top, tbar = quarks[:, 0:3].sum(1), quarks[:, 3:6].sum(1)
    wp, wm = quarks[:, 1:3].sum(1), quarks[:, 4:6].sum(1)
    shat = kin.mass2(total)
    that = kin.mass2(pa - top)
    mt_top = torch.sqrt(kin.pt(top) ** 2 + kin.mass2(top).clamp(min=0))
    mt_tbar = torch.sqrt(kin.pt(tbar) ** 2 + kin.mass2(tbar).clamp(min=0))
    scale = torch.sqrt(mt_top * mt_tbar)
    dev = getattr(pdf, "device", torch.device("cpu"))
    q2 = (scale * scale).to(dev)
    # one PDF evaluation serves the channel choice and the quark flavour
    fa, fb = _parton_densities(pdf, x1.to(dev), q2).cpu(), _parton_densities(pdf, x2.to(dev), q2).cpu()
    probs = _channel_probabilities(fa, fb, shat, that, alpha_s(q2).cpu())
    channel = torch.multinomial(probs.float(), 1, generator=gen)[:, 0]
    lum_qqbar, lum_qbarq = _quark_luminosities(fa, fb)
    flav_qq = _pick_quark(lum_qqbar, gen)
    flav_qbarq = _pick_quark(lum_qbarq, gen)
    in1 = torch.where(channel == 0, 21, torch.where(channel == 1, flav_qq, -flav_qbarq))
    in2 = torch.where(channel == 0, 21, torch.where(channel == 1, -flav_qq, flav_qbarq))

    momenta = torch.stack([pa, pb, top, tbar, wp, quarks[:, 0], wm, quarks[:, 3], quarks[:, 1], quarks[:, 2], quarks[:, 4], quarks[:, 5]], 1)
    row = lambda v: torch.tensor(v, dtype=torch.int64).expand(n, 12).clone()  # noqa: E731
    pid = torch.stack([in1, in2] + [torch.full((n,), v, dtype=torch.int64) for v in (6, -6, 24)] + [ids[:, 0], torch.full((n,), -24, dtype=torch.int64), ids[:, 3], ids[:, 1], ids[:, 2], ids[:, 4], ids[:, 5]], 1)
    status = row([-1, -1, 2, 2, 2, 1, 2, 1, 1, 1, 1, 1])
    mother1 = row([0, 0, 1, 1, 3, 3, 4, 4, 5, 5, 7, 7])
    mother2 = row([0, 0, 2, 2, 3, 3, 4, 4, 5, 5, 7, 7])
    # colour lines: g g → t t̄: g(501,502) g(502,503) → t(501) t̄(503); q q̄ → t t̄: q(501) q̄(502)
    gg = channel == 0
    qfirst = channel == 1
    c1, c2 = row([0] * 12), row([0] * 12)
    c1[:, 0] = torch.where(gg | qfirst, 501, 0)
    c2[:, 0] = torch.where(gg, 502, torch.where(qfirst, 0, 502))
    c1[:, 1] = torch.where(gg, 502, torch.where(qfirst, 0, 501))
    c2[:, 1] = torch.where(gg, 503, torch.where(qfirst, 502, 0))
    anti = torch.where(gg, 503, 502)
    c1[:, 2] = 501  # t
    c2[:, 3] = anti  # t̄
    c1[:, 5] = 501  # b
    c2[:, 7] = anti  # b̄
    c1[:, 8], c2[:, 9] = 504, 504  # W⁺ → q q̄'
    c1[:, 10], c2[:, 11] = 505, 505  # W⁻ → q q̄'
    mass = torch.zeros(n, 12, dtype=torch.float64)
    for k in (2, 3, 4, 6):
        mass[:, k] = kin.mass(momenta[:, k])
    mass[:, 5], mass[:, 7] = QUARK_MASSES[0], QUARK_MASSES[3]
    events = LHEEvents(
        pid=pid, status=status, mother1=mother1, mother2=mother2, color1=c1, color2=c2, momenta=momenta, mass=mass,
        weight=torch.full((n,), sigma_pb, dtype=torch.float64), scale=scale, aqed=torch.tensor(ALPHA_EM_MZ, dtype=torch.float64),
        aqcd=alpha_s(scale * scale).double().cpu(), process_id=torch.tensor(1),
    )
    summary = {"events": n, "dropped_x_above_1": int((~ok).sum()), "mean_pt_removed_gev": float(pt_before.mean()),
               "channel_fractions": {"gg": float(gg.double().mean()), "qqbar": float((~gg).double().mean())}}
    return events, summary


# ----------------------------------------------------------------------- job
def _build(card, rep: TopQuarkRepresentation, mmd_weight: float, steps_per_epoch: int = 1) -> MMDGAN:
    m = card.model
    return MMDGAN(
        rep, latent_dim=m.latent_dim, width=m.width, layers=m.layers, gradient_penalty=m.gradient_penalty,
        mmd_weight=mmd_weight, mmd_kernel=m.mmd_kernel, mmd_width_factors=m.mmd_width_factors,
        spectral_norm=m.spectral_norm, batch_statistics=m.batch_statistics, discriminator_masses=m.discriminator_masses,
        mmd_start_step=round(m.mmd_start_epoch * steps_per_epoch), mmd_ramp_steps=round(m.mmd_ramp_epochs * steps_per_epoch),
        discriminator_lr_factor=m.discriminator_lr_factor, ema_decay=m.ema_decay, generator=m.generator,
        symmetrise=m.symmetrise, marginal_weight=m.marginal_weight,
    )


def _train(card, args, rep, mmd_weight, folder: Path, x_train, x_val, device, label, inputs: dict | None = None) -> tuple[MMDGAN, dict]:
    """Train one GAN. ``inputs`` (a dict, filled on the first call) keeps the truth's
    coordinates and masses for the next model: both models share the representation."""
    seed_everything(card.seed)
    gan = _build(card, rep, mmd_weight, steps_per_epoch=max(len(x_train) // min(card.training.batch_size, len(x_train)), 1))
    if rep.coordinate_training:
        # the truth's coordinates and masses once, not at every step nor for every model
        gan.to(device)
        inputs = {} if inputs is None else inputs
        if not inputs:
            inputs["train"] = gan.training_inputs(x_train)
            inputs["val"] = gan.training_inputs(x_val) if x_val is not None and len(x_val) > 1 else None
        x_train, x_val = inputs["train"], inputs["val"]
    else:
        x_train = (x_train,)
        x_val = (x_val,) if x_val is not None and len(x_val) > 1 else None
    try:
        result = train(
            gan, lambda mod, batch: mod.loss(batch), x_train, card.training, folder, seed=card.seed, device=device,
            val_data=x_val, resume=args.resume, description=label,
        )
    except TrainingError as exc:
        raise JobError(str(exc)) from None
    info = {**result.summary(kept_best=card.training.keep_best), "train_s": result.train_s,
            "s_per_epoch": result.train_s / max(result.steps, 1) * max(len(x_train[0]) // min(card.training.batch_size, len(x_train[0])), 1)}
    last = result.history[-1] if result.history else {}
    info.update({k: last[k] for k in ("loss_d", "loss_g", "mmd", "mmd_weight") if k in last})
    gan.eval()
    return gan, info


def run(card, args) -> int:
    device = resolve_device(card.device)
    folder = RunFolder.create(card, device, args.output, args.resume)
    seed_everything(card.seed)
    report = folder.report_base()
    timing = report["timing"]

    # ---- truth -------------------------------------------------------------
    t0 = time.perf_counter()
    n_held_out = card.evaluation.truth_events
    held_out = None
    if card.data.source == "pythia":
        arrays, meta = _pythia_truth(card, progress=True)
        report["pythia"] = {k: meta.get(k) for k in ("sigma_pb", "n_failed", "errors", "events_per_s_per_core", "workers", "cached", "cache_key")}
        if n_held_out:
            held_out, held_meta = _pythia_truth(card, progress=True, n_events=n_held_out, seed=card.seed + HELD_OUT_SEED_OFFSET)
            report["pythia_evaluation_truth"] = {k: held_meta.get(k) for k in ("sigma_pb", "n_failed", "errors", "cached", "cache_key")}
    else:
        arrays, meta = _lhe_truth(card, card.data.n_events + n_held_out)
        if n_held_out:
            available = len(arrays["quarks"]) - card.data.n_events
            if available < n_held_out:
                raise JobError(f"evaluation.truth_events = {n_held_out}: data.files hold {len(arrays['quarks'])} events, "
                               f"{card.data.n_events} of them for training (data.n_events), so at most {max(available, 0)} are left")
            held_out = {k: v[card.data.n_events:] for k, v in arrays.items()}
            arrays = {k: v[: card.data.n_events] for k, v in arrays.items()}
    timing["simulate_s"] = time.perf_counter() - t0
    sigma = float(meta.get("sigma_pb") or 0.0)
    truth = on_shell(torch.from_numpy(np.asarray(arrays["quarks"], dtype=np.float64)))
    truth_ids = torch.from_numpy(np.asarray(arrays["ids"], dtype=np.int64))
    n = len(truth)
    report["training_events"] = n
    report["cross_section_pb"] = sigma
    # what the generated events are compared with: independent events, or the training set
    truth_eval = truth if held_out is None else on_shell(torch.from_numpy(np.asarray(held_out["quarks"], dtype=np.float64)))
    report["evaluation_truth"] = {"events": len(truth_eval), "independent_of_training": held_out is not None}

    # ---- training: with MMD, and the ablation without --------------------------
    rep = TopQuarkRepresentation(card.model.representation, angles=card.model.decay_angles, marginals=card.model.marginals).fit(truth)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(card.seed + 2))
    n_val = int(card.training.validation_fraction * n)
    x_train, x_val = truth[perm[n_val:]].to(device), truth[perm[:n_val]].to(device)
    runs = {"generated": card.model.mmd_weight}
    if card.model.ablation and card.model.mmd_weight > 0:
        runs["generated_no_mmd"] = 0.0
    models, train_info, inputs = {}, {}, {}
    t0 = time.perf_counter()
    for key, weight in runs.items():
        label = "GAN + MMD" if weight > 0 else "GAN without MMD"
        models[key], train_info[key] = _train(card, args, rep, weight, folder.path / ("train_mmd" if key == "generated" else "train_no_mmd"),
                                              x_train, x_val, device, label, inputs)
    timing["train_s"] = time.perf_counter() - t0
    timing["train_s_per_epoch"] = train_info["generated"]["s_per_epoch"]
    report["training"] = train_info
    buffer = io.BytesIO()
    torch.save({"card": report["card"], "representation": rep.state_dict(), "models": {k: m.state_dict() for k, m in models.items()}}, buffer)
    atomic_write_bytes(folder.path / "model.pt", buffer.getvalue())
    report["outputs"]["model"] = "model.pt"

    # ---- generation ------------------------------------------------------------
    n_gen = card.evaluation.n_generated
    samples = {}
    for key, model in models.items():
        gen = torch.Generator().manual_seed(card.seed + 3)
        model.sample(min(n_gen, 1024), generator=gen)  # warm-up (allocations, kernels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        samples[key] = model.sample(n_gen, generator=gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        if key == "generated":
            timing["sample_s"] = elapsed
            timing["generate_events_per_s"] = n_gen / elapsed
        samples[key] = samples[key].cpu()
        bad = ~torch.isfinite(samples[key]).all(2).all(1)
        report.setdefault("non_finite_events", {})[key] = int(bad.sum())
        samples[key] = samples[key][~bad]

    # ---- metrics -----------------------------------------------------------------
    obs_truth = observables(truth_eval)
    obs = {k: observables(v) for k, v in samples.items()}
    report["resonances"] = {}
    for k, (name, (_, mass, width)) in enumerate(RESONANCES.items()):
        entry = {"truth": fit_breit_wigner(obs_truth[f"m_{name}"], mass, width).as_dict()}
        for key in samples:
            entry[key] = fit_breit_wigner(obs[key][f"m_{name}"], mass, width).as_dict()
        for key in samples:
            entry[f"{key}_width_ratio"] = entry[key]["width"] / entry["truth"]["width"]
            entry[f"{key}_position_shift"] = entry[key]["position"] - entry["truth"]["position"]
        report["resonances"][name] = entry

    bins = card.evaluation.bins
    per_obs, plots = {}, []
    title = rf"pp$\to t\bar t$ (6 quarks), {card.physics.sqrt_s / 1000:g} TeV"
    label = {"generated": "GAN + MMD", "generated_no_mmd": "GAN, no MMD"}
    for name in obs_truth:
        edges, xlabel, logy = _binning(name, bins)
        entry = {}
        for key in samples:
            try:
                c = compare_histograms(obs[key][name], obs_truth[name], edges)
            except ValueError:  # nothing generated inside the plotted range
                entry[key] = {"max_bulk_deviation": float("inf"), "max_bulk_pull": float("inf"), "chi2_ndf": float("inf"), "ratio": [], "ratio_error": []}
                continue
            entry[key] = {"max_bulk_deviation": c.max_bulk_deviation, "max_bulk_pull": c.max_bulk_pull, "chi2_ndf": c.chi2_ndf,
                          "ratio": c.ratio, "ratio_error": c.ratio_error}
        entry["edges"] = list(map(float, edges))
        per_obs[name] = entry
        if card.evaluation.plots:
            series = [Series(obs_truth[name], "truth (Pythia8)" if card.data.source == "pythia" else "truth (LHE)")]
            series += [Series(obs[key][name], label[key]) for key in samples]
            written = ratio_plot(series, edges, xlabel, folder.path / "plots" / name, title=title, logy=logy,
                                 ratio_range=(0.0, 2.0) if name.startswith("m_") else (0.8, 1.2))
            plots += [str(p.relative_to(folder.path)) for p in written]
    report["observables"] = per_obs
    quark_bulk = [n for n in per_obs if (n.startswith("pt_") or n.startswith("eta_")) and n.split("_", 1)[1] in _QUARK_NAMES]
    for key in samples:
        dev = {n: per_obs[n][key]["max_bulk_deviation"] for n in quark_bulk}
        report["max_bulk_deviation" if key == "generated" else "max_bulk_deviation_no_mmd"] = max(dev.values())
        report.setdefault("quark_bulk_deviation", {})[key] = dev

    nq = card.evaluation.quantiles
    report["qmse"] = {}
    for key in samples:
        entry = {}
        for name in ("pt_b", "pt_qWp", "eta_qWp", "pt_t", "m_W+", "m_t"):
            edges = quantile_edges(obs_truth[name], nq)
            q = qmse(obs[key][name], edges)
            entry[name] = {"qmse": q, "expected_qmse_of_true_sample": (1 - 1 / nq) / (nq * len(obs[key][name])),
                           "amplification": amplification(q, len(x_train), nq)}
        report["qmse"][key] = entry
    report["amplification"] = min(v["amplification"] for v in report["qmse"]["generated"].values())

    t0 = time.perf_counter()
    feats_truth = _classifier_features(truth_eval)
    for key in samples:
        a = classifier_auc(feats_truth, _classifier_features(samples[key]), epochs=card.evaluation.classifier_epochs,
                           seed=card.seed, max_events=card.evaluation.classifier_events, device=device)
        report["classifier_auc" if key == "generated" else "classifier_auc_no_mmd"] = a
    timing["classifier_s"] = time.perf_counter() - t0

    # ---- LHE -------------------------------------------------------------------
    if card.lhe.write:
        try:
            pdf, alpha_s = from_card(card.physics)
        except PDFError as exc:
            raise JobError(str(exc)) from None
        gen = torch.Generator().manual_seed(card.seed + 4)
        n_lhe = min(len(samples["generated"]), card.lhe.max_events or len(samples["generated"]))
        # flavours of the light quarks: drawn from the truth's joint flavour content
        pick = torch.randint(0, n, (n_lhe,), generator=gen)
        t0 = time.perf_counter()
        events, lhe_info = ttbar_lhe_events(samples["generated"][:n_lhe], truth_ids[pick], sigma or 1.0, card.physics.sqrt_s, pdf, alpha_s, gen)
        name = "events.lhe.gz" if card.lhe.compress else "events.lhe"
        init = lhe_init(card, sigma or 1.0, version=report["partonic_version"])
        write_lhe(folder.path / name, events, init, comment="partonic generate: pp -> t t~ -> 6 quarks, MMD GAN")
        timing["lhe_write_events_per_s"] = len(events) / (time.perf_counter() - t0)
        report["outputs"]["lhe"] = name
        report["lhe"] = lhe_info
        if card.evaluation.shower_events:
            from ..simulate.pythia import shower_lhe

            shower = shower_lhe(folder.path / name, max_events=card.evaluation.shower_events, seed=card.seed)
            report["shower_check"] = shower.__dict__
    report["outputs"]["plots"] = plots
    folder.write_report(report)
    print(_summary(report, folder.path))
    return 0


def _summary(report: dict, path: Path) -> str:
    lines = [f"partonic generate: pp → tt̄ → 6 quarks → {path}"]
    for name, r in report["resonances"].items():
        parts = [f"truth {r['truth']['position']:.2f}/{r['truth']['width']:.2f}"]
        for key, label in (("generated", "MMD"), ("generated_no_mmd", "no MMD")):
            if key in r:
                parts.append(f"{label} {r[key]['position']:.2f}/{r[key]['width']:.2f}")
        lines.append(f"  m_{name} position/width [GeV]: " + ", ".join(parts))
    line = f"  quark pT, η bulk: max deviation {report['max_bulk_deviation']:.3f}"
    if "max_bulk_deviation_no_mmd" in report:
        line += f" (no MMD {report['max_bulk_deviation_no_mmd']:.3f})"
    line += f"; classifier AUC {report['classifier_auc']:.3f}"
    if "classifier_auc_no_mmd" in report:
        line += f" (no MMD {report['classifier_auc_no_mmd']:.3f})"
    lines.append(line)
    lines.append(f"  {report['timing']['generate_events_per_s']:.3g} events/s generated; amplification {report['amplification']:.2f}")
    if "shower_check" in report:
        s = report["shower_check"]
        lines.append(f"  Pythia8 showered {s['n_accepted']}/{s['n_events']} LHE events, {sum(s['errors'].values())} errors")
    return "\n".join(lines)
