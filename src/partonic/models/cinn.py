"""Conditional invertible network (FrEIA) that unfolds ZW detector events to partons.

References: Bellagente et al., "Invertible networks or partons to detector and
back again", arXiv:2006.06685 (the cINN, its condition network and the ISR
study); Ardizzone et al., arXiv:1907.02392 (conditional INNs); FrEIA 0.2
(``SequenceINN`` of ``AllInOneBlock``s, or of the project's spline couplings,
:mod:`partonic.models.spline_coupling`).

The parton level is the hard process ℓ⁻ ℓ⁺ q q̄, taken massless (quark and
antiquark are not told apart: the jets cannot). Its transverse
momenta sum to zero, so the network sees 10 coordinates, not 12 (see
:class:`PartonRepresentation`); m_jj is one of them, flattened by a Breit–Wigner
CDF, so the narrow W peak needs no MMD term, and with the card's default
``model.leptons: system`` so is m_ℓℓ. Azimuths are measured from detector-level
references (the event is symmetric under rotations about the beam) and
wrapped, so every sample maps back to a physical event. The card's defaults
(``azimuth: plane``, ``quark_label: jet``, ``leptons: system``) differ from the
class's, which are the first representation. The detector level
enters through a condition network fed with log pT, η, cos Δφ, sin Δφ (and
log(1 + m) for jets) of the leptons and the leading jets, the jet count and the
lepton flavour.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from partonic.models.mmd import mmd2
from partonic.models.refine import ClassifierRefiner, systematic_resample
from partonic.physics import kinematics as kin
from partonic.physics.constants import M_W
from partonic.models.weighted_flow import Standardise
from partonic.models.weighted_gan import update_weight_average, weight_average

__all__ = [
    "PartonRepresentation",
    "jet_pairs",
    "pair_axes",
    "pairing_labels",
    "PairingClassifier",
    "DetectorRepresentation",
    "ConditionalINN",
    "Unfolder",
    "parton_observables",
    "jet_mass",
    "massless",
    "order_quarks",
]

#: Azimuthal centres of the wrapped Δφ of ℓ⁻ and ℓ⁺ (relative to the detector ℓ⁻):
#: the seam of each wrapped variable sits where that particle is least likely.
_PHI_CENTRES = (0.0, math.pi)
_ETA_LIMIT = 8.0
_COS_EPS = 1e-7


def _wrap(phi: torch.Tensor) -> torch.Tensor:
    """Angle in [−π, π)."""
    return torch.remainder(phi + math.pi, 2.0 * math.pi) - math.pi


def _references(ref: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """From the detector: ℓ⁻ azimuth; decay azimuth and cos θ of the jet pair closest
    to m_W; azimuth of the lepton pair and the ℓ⁻'s decay azimuth in its helicity frame.

    A 1-D ``ref`` is the ℓ⁻ azimuth alone; the decay azimuths are then measured
    from the helicity frames' x axes (reference 0). Without a third column the
    jets' decay axis is taken on the equator (cos θ = 0); without a fourth, the
    lepton pair's azimuth is the ℓ⁻'s.
    """
    if ref.dim() == 1:
        ref = ref[:, None]
    zero = torch.zeros_like(ref[:, 0])
    col = lambda k, default: ref[:, k] if ref.shape[1] > k else default  # noqa: E731
    return ref[:, 0], col(1, zero), col(2, zero), col(3, ref[:, 0]), col(4, zero)


def _hypothesis_jets(ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pT, η, φ (N, 3) of the two jets of the W hypothesis, the harder first: the
    references' columns 5–10 (:class:`DetectorRepresentation`, :meth:`Unfolder._hypotheses`)."""
    if ref.dim() != 2 or ref.shape[1] < 11:
        raise ValueError(f"w_coordinates = jets and system_pt = w measure from the jets of the W hypothesis: the references need 11 columns, not {tuple(ref.shape)}")
    return ref[:, 5:8], ref[:, 8:11]


def _decay_angles(p: torch.Tensor, system: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos θ and azimuth of ``p`` in the helicity frame of ``system``."""
    n = kin.boost_to_rest_frame(p, system)[:, 1:]
    n = n / n.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    x_h, y_h, z_h = _helicity_axes(system)
    return (n * z_h).sum(-1), torch.atan2((n * y_h).sum(-1), (n * x_h).sum(-1))


def _decay_products(system: torch.Tensor, m: torch.Tensor, cos: torch.Tensor, azimuth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two massless daughters of ``system`` (mass ``m``), the first at (θ, φ) in its helicity frame."""
    sin = torch.sqrt((1 - cos**2).clamp(min=0.0))
    x_h, y_h, z_h = _helicity_axes(system)
    n = (sin * torch.cos(azimuth))[:, None] * x_h + (sin * torch.sin(azimuth))[:, None] * y_h + cos[:, None] * z_h
    half = 0.5 * m
    a = _boost_from_rest(torch.cat([half[:, None], half[:, None] * n], -1), system, m)
    return a, system - a


def _system(m: torch.Tensor, y: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    mt = torch.sqrt(m**2 + px**2 + py**2)
    return torch.stack([mt * torch.cosh(y), px, py, mt * torch.sinh(y)], -1)


def _massless(pt, eta, phi) -> torch.Tensor:
    eta = eta.clamp(-_ETA_LIMIT, _ETA_LIMIT)
    return torch.stack([pt * torch.cosh(eta), pt * torch.cos(phi), pt * torch.sin(phi), pt * torch.sinh(eta)], -1)


def _pt_eta_phi(p: torch.Tensor):
    """pT, η, φ with η finite for pT = 0 (zero-padded slots, beam-collinear samples)."""
    pt = kin.pt(p)
    return pt, torch.asinh(p[..., 3] / pt.clamp(min=1e-12)), kin.phi(p)


def _mass(p: torch.Tensor) -> torch.Tensor:
    """Invariant mass, rounding below zero clipped to 0."""
    return kin.mass2(p).clamp(min=0.0).sqrt()


def _boost_from_rest(p_rest: torch.Tensor, frame: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Boost from the rest frame of ``frame`` (mass ``m``) to the lab, written with
    γ = E/m and γβ = p/m so that it stays finite when β rounds to 1."""
    e, vec = frame[:, 0], frame[:, 1:]
    pdot = (vec * p_rest[:, 1:]).sum(-1)
    energy = (e * p_rest[:, 0] + pdot) / m
    coeff = pdot / (m * (e + m)) + p_rest[:, 0] / m
    return torch.cat([energy[:, None], p_rest[:, 1:] + coeff[:, None] * vec], -1)


def massless(partons: torch.Tensor) -> torch.Tensor:
    """The same pT, η, φ with zero mass (the parton level is taken massless)."""
    return _massless(*_pt_eta_phi(partons))


def order_quarks(partons: torch.Tensor) -> torch.Tensor:
    """(ℓ⁻, ℓ⁺, q, q̄) → (ℓ⁻, ℓ⁺, q₁, q₂) with pT(q₁) ≥ pT(q₂)."""
    pt = torch.hypot(partons[..., 1], partons[..., 2])
    swap = pt[:, 3] > pt[:, 2]
    out = partons.clone()
    out[swap, 2], out[swap, 3] = partons[swap, 3], partons[swap, 2]
    return out


def _helicity_axes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Axes of the W helicity frame, from the lab: z along the W momentum, y normal to
    the plane of the beam and the W, x = y × z."""
    z = w[:, 1:] / w[:, 1:].norm(dim=-1, keepdim=True).clamp(min=1e-12)
    beam = torch.zeros_like(z)
    beam[:, 2] = 1.0
    y = torch.linalg.cross(beam, z)
    norm = y.norm(dim=-1, keepdim=True)
    # a W along the beam has no such plane: take the lab y axis
    fallback = torch.zeros_like(y)
    fallback[:, 1] = 1.0
    y = torch.where(norm > 1e-9, y / norm.clamp(min=1e-12), fallback)
    return torch.linalg.cross(y, z), y, z


def _mass_rapidity(p: torch.Tensor, floor: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Invariant mass (m² floored at ``floor``) and rapidity of systems (N, 4)."""
    m = (p[:, 0] ** 2 - (p[:, 1:] ** 2).sum(-1)).clamp(min=floor).sqrt()
    return m, 0.5 * torch.log((p[:, 0] + p[:, 3]).clamp(min=1e-9) / (p[:, 0] - p[:, 3]).clamp(min=1e-9))


def _decay_coordinates(a: torch.Tensor, b: torch.Tensor):
    """log m, rapidity, atanh(cos θ) and cos φ, sin φ of the decay of a + b in its
    helicity frame, for the more energetic of the two (jets: masses allowed)."""
    w = a + b
    m, y = _mass_rapidity(w)
    cos, azimuth = _decay_angles(torch.where((a[:, 0] >= b[:, 0])[:, None], a, b), w)
    cos = cos.clamp(_COS_EPS, 1 - _COS_EPS)
    return torch.log(m), y, torch.atanh(cos), torch.cos(azimuth), torch.sin(azimuth)


def jet_pairs(max_jets: int) -> list[tuple[int, int]]:
    """The pairs (i, j), i < j, of jet slots: the W hypotheses of ``model.pairing``."""
    return [(i, j) for i in range(max_jets) for j in range(i + 1, max_jets)]


def w_candidate_index(jets: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Index in ``jet_pairs(jets.shape[1])`` of the pair of present jets whose mass is closest to m_W."""
    pairs = jet_pairs(jets.shape[1])
    dist = torch.stack([(_mass(jets[:, i] + jets[:, j]) - M_W).abs() for i, j in pairs], 1)
    ok = torch.stack([present[:, i] & present[:, j] for i, j in pairs], 1)
    return torch.where(ok, dist, torch.full_like(dist, math.inf)).argmin(1)


def _w_candidate(jets: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair of present jets (pT-ordered) whose mass is closest to m_W."""
    slots = torch.tensor(jet_pairs(jets.shape[1]), device=jets.device)[w_candidate_index(jets, present)]
    rows = torch.arange(jets.shape[0], device=jets.device)
    return jets[rows, slots[:, 0]], jets[rows, slots[:, 1]]


def z_balance_azimuth(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """φ of p_Z − p_W in the transverse plane: in the hard process p_W = −p_Z, so this is
    the Z's azimuth with each measurement's ISR recoil partly cancelled (the lepton
    pair's alone leaves it all in the Z). A W candidate of zero momentum (absent jets)
    leaves the lepton pair's azimuth."""
    return torch.atan2(z[:, 2] - w[:, 2], z[:, 1] - w[:, 1])


def pair_axes(jets: torch.Tensor, pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decay azimuth and cos θ of the harder jet in each pair's helicity frame, (N, P)
    each, and whether both jets are present (N, P); absent pairs get φ = 0, cos θ = 1."""
    present = jets[..., 0] > 0
    phi, cos, valid = [], [], []
    for i, j in pairs:
        both = present[:, i] & present[:, j]
        _, _, atanh_cos, c, s = _decay_coordinates(jets[:, i], jets[:, j])
        phi.append(torch.where(both, torch.atan2(s, c), 0.0))
        cos.append(torch.where(both, torch.tanh(atanh_cos), 1.0))
        valid.append(both)
    return torch.stack(phi, 1), torch.stack(cos, 1), torch.stack(valid, 1)


def pairing_labels(partons: torch.Tensor, jets: torch.Tensor, valid: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """The W hypothesis of the truth: the present pair of jets nearest the two quarks,
    by the smaller of ΔR(q, jᵢ) + ΔR(q̄, jⱼ) and ΔR(q, jⱼ) + ΔR(q̄, jᵢ). A function of
    truth and detector, so p(x | d) = Σ_k p(k | d) p(x | d, k) holds exactly with these
    labels. (Labelling by the nearest decay axis in the helicity frames instead made
    the label harder to predict from the detector: on the CPU card's 3-jet events a
    classifier reached a cross-entropy of 0.91 against 0.76 with this one, ln 3 = 1.10.)"""
    _, q_eta, q_phi = _pt_eta_phi(partons[:, 2:4])
    _, j_eta, j_phi = _pt_eta_phi(jets)
    dr = torch.hypot(q_eta[:, :, None] - j_eta[:, None, :], _wrap(q_phi[:, :, None] - j_phi[:, None, :]))
    score = torch.stack([torch.minimum(dr[:, 0, i] + dr[:, 1, j], dr[:, 0, j] + dr[:, 1, i]) for i, j in pairs], 1)
    return torch.where(valid, score, math.inf).argmin(1)


#: the quark regions of ``model.quark_regions`` (:func:`quark_regions`): their number
QUARK_REGIONS = {"none": 1, "forward": 2, "forward_soft": 3}
#: the jet acceptance that bounds them: |η| of a central quark, pT of a hard one (GeV)
REGION_ETA, REGION_PT = 2.5, 25.0


def quark_regions(partons: torch.Tensor, kind: str) -> torch.Tensor:
    """Where the two quarks of partons (..., 4, 4) lie, as a label (...): with ``kind``
    "forward", 1 if a quark has |η| > 2.5, else 0; with "forward_soft", 2 for that, 1 if
    a quark is central with pT < 25 GeV, else 0 (both central and hard); "none": 0.

    A quark that made no jet is forward or soft: given the detector, its posterior lives
    on two disjoint regions, and a flow fills the gap between them (docs/results.md,
    "Where the pT,q1 excess comes from"). A function of the truth alone, so
    p(x | d) = Σ_t p(t | d) p(x | d, t) holds exactly, and p(x | d, t) is zero outside
    region t. The cINN given t learns that posterior, up to a leak across the region's
    edges, which is kept: where two regions meet, each one's leak fills the other's dip.
    """
    n = QUARK_REGIONS[kind]
    if n == 1:
        return torch.zeros(partons.shape[:-2], dtype=torch.long, device=partons.device)
    pt, eta, _ = _pt_eta_phi(partons[..., 2:4, :])
    forward = (eta.abs() > REGION_ETA).any(-1)
    if n == 2:
        return forward.long()
    soft = ((pt < REGION_PT) & (eta.abs() <= REGION_ETA)).any(-1)
    return torch.where(forward, 2, soft.long())


class PairingClassifier(nn.Module):
    """p(k | detector) over the W hypotheses: an MLP on the condition features, with
    dropout only where :meth:`Unfolder.fit_pairing` asks for it (the labels are noisy:
    without it the classifier learns its training events by heart)."""

    def __init__(self, n_in: int, n_out: int, width: int, layers: int):
        super().__init__()
        self.hidden = nn.ModuleList(nn.Linear(n_in if k == 0 else width, width) for k in range(layers))
        self.out = nn.Linear(width, n_out)

    def forward(self, x: torch.Tensor, dropout: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        for layer in self.hidden:
            x = torch.relu(layer(x))
            if dropout > 0:
                keep = torch.bernoulli(torch.full_like(x, 1 - dropout), generator=generator)
                x = x * keep / (1 - dropout)
        return self.out(x)


class PartonRepresentation(nn.Module):
    """ℓ⁻ ℓ⁺ q q̄ of the hard process (Σ pT = 0, massless) ↔ 10 standardised features.

    Features: log pT, η, Δφ of ℓ⁻ and ℓ⁺; the W system's mass through the logit
    of a Breit–Wigner CDF (so the narrow peak is flat for the network) and its
    rapidity (its pT is −pT of the ℓℓ pair: momentum balance); the decay of the
    W in its helicity frame, for the more energetic quark: atanh(cos θ) (cos θ ≥ 0
    is exactly the condition E_a ≥ E_b for massless quarks, so the labelling is
    what the jets measure; the inverse folds at 0, where balanced decays pile up) and the azimuth φ about the W direction,
    measured from the same azimuth of the jet pair closest to m_W (the
    reference's second column). m_jj is thus a coordinate, and the energy sharing
    between the quarks a single number. The azimuth is periodic, and a flow sees
    it as an interval: measured from the jets' value, a narrow posterior sits at
    0, not across the seam at ±π (measured from the helicity x axis, posteriors
    near the seam were split and the subleading quark's pT came out biased soft:
    calibration 0.12 instead of 0.08 on the CPU card).
    The inverse returns the quarks as (more energetic, less energetic).

    With ``azimuth="plane"`` the decay azimuth is not an interval but a point on
    the plane, (cos φ, sin φ) — 11 features. The network then sees the circle
    without a seam: a posterior with modes at 0 and π (the jets' energy sharing
    cannot tell which quark is harder, or the W candidate is the wrong pair; 20–45%
    of the CPU card's posteriors) is two lobes, not three pieces at 0 and both ends of
    [−π, π). The training loss scales the unit vector by a Rayleigh radius r drawn
    afresh for every batch (:meth:`Unfolder.loss`), so a uniform azimuth is the
    standard normal of the plane; sampling reads φ = atan2 and forgets r. The
    density of the ten physical coordinates is then
    p(…, φ) = p(…, u, v) · exp(r²/2) (with du dv = r dr dφ and the Rayleigh
    density r e^(−r²/2)), which is what the loss reports.

    With ``quark_label="jet"`` the decay axis is not the more energetic quark's
    direction but that of the quark in the hemisphere of the W candidate's harder
    jet (the decay axis measured by the jets, the reference's third column): the
    angle θ then runs over [0, π] without a fold, balanced decays sit in the middle
    of atanh cos θ instead of at an edge, and a quark pair whose energy order the
    jets get wrong keeps its azimuth near 0 instead of jumping to π.
    The inverse returns the quarks in that order.

    With ``leptons="system"`` the leptons are described like the W: the Z system's
    mass (m_ℓℓ through the logit of a Breit–Wigner CDF, so the narrow Z peak is a
    coordinate, as m_jj is), rapidity, log pT and azimuth (from the detector lepton
    pair's), and the ℓ⁻'s decay angles in the Z helicity frame (atanh cos θ, no
    fold: the charges tell the leptons apart; the azimuth from the detector
    leptons' own). With each lepton's log pT, η, Δφ as coordinates every one is
    calibrated, but m_ℓℓ, a function of all six, comes out about twice as wide as
    the Z.

    With ``decay_angle="probit"`` both decay angles enter as Φ⁻¹((1 + cos θ)/2)
    instead of atanh cos θ = ½ logit((1 + cos θ)/2). A density that stays finite at
    cos θ = ±1 has exponential tails in atanh cos θ and Gaussian ones in the probit,
    the tails of the flow's base density. Strongly asymmetric W decays (the softer
    quark below about 10 GeV) sit at cos θ → ±1: 10% of those events lie beyond four
    standard deviations of the standardised atanh coordinate, where the flow has to
    stretch a Gaussian into an exponential.

    With ``w_coordinates="jets"`` the quarks are measured from the two jets (a, the
    harder, and b) of the W hypothesis (the references' columns 5–10) instead of
    through the W's decay: the quark nearer jet a (by the smaller ΔR sum of the two
    assignments) as log(pT/pT,a), η − η_a, φ − φ_a; the other quark's direction from
    quark a's, as log tan(θ_ab/2) − log tan(θ_a,jb/2) (the opening angle relative to
    that of quark a and jet b) and its azimuth about a, measured from jet b's; and m_jj
    through the Breit–Wigner logit, which fixes that quark's energy,
    E_b = m² / (2 E_a (1 − cos θ_ab)) for massless quarks — so the narrow W peak stays
    a coordinate, and the energy's error is twice the opening angle's relative one.
    (Quark b's direction as η − η_b, φ − φ_b instead gave samples at smaller opening
    angles than the truth's; neither version calibrates the target observables as
    well as ``"decay"`` does, though both calibrate the quarks' distance to the jets:
    docs/results.md.) The Z's pT then follows from the W's (balance), and
    the leptons are its m_ℓℓ, rapidity and the ℓ⁻'s decay angles (``leptons="system"``
    is required): 4 + 6 = 10 features. The jets measure the quark directions to a few
    hundredths in ΔR; built from the W's pT (taken from the Z), rapidity and decay
    angles, those directions carry every one of those coordinates' errors. The
    inverse returns the quarks as (nearer jet a, the other).

    Arguments:
        m_w, gamma_w: Breit–Wigner used to flatten m_jj (any values near the truth work).
        azimuth: ``"interval"`` (10 features) or ``"plane"`` (11).
        quark_label: ``"energy"`` (axis of the more energetic quark, cos θ ≥ 0) or
            ``"jet"`` (axis of the quark nearer the jets' decay axis).
        leptons: ``"momenta"`` (log pT, η, Δφ of each) or ``"system"`` (the Z and its decay).
        m_z, gamma_z: Breit–Wigner used to flatten m_ℓℓ.
        decay_angle: ``"atanh"`` or ``"probit"``: the coordinate of both cos θ.
        w_coordinates: ``"decay"`` (m, y, decay angles of the W) or ``"jets"`` (the
            quarks from the hypothesis's jets, and m_jj).
        system_pt: ``"z"`` (the Z's pT and azimuth are coordinates, measured from the
            lepton pair's; the W's follow) or ``"w"`` (the W's, as log(pT/pT,jj) and
            φ − φ_jj of the hypothesis's jet pair; the Z's follow, and the leptons are
            m_ℓℓ, y and the ℓ⁻'s decay angles): the W's direction then comes from its
            jets, not from the Z's azimuth.
    """

    #: coordinates of the parton level (4 massless momenta, Σ pT = 0, the W's pT known)
    physical_dim = 10

    def __init__(self, m_w: float = 80.419, gamma_w: float = 2.0476, azimuth: str = "interval", quark_label: str = "energy",
                 leptons: str = "momenta", m_z: float = 91.188, gamma_z: float = 2.4414, decay_angle: str = "atanh", w_coordinates: str = "decay",
                 system_pt: str = "z"):
        super().__init__()
        if w_coordinates not in ("decay", "jets"):
            raise ValueError(f"w_coordinates must be 'decay' or 'jets', not {w_coordinates!r}")
        self.w_jets = w_coordinates == "jets"
        if self.w_jets and leptons != "system":
            raise ValueError(f"w_coordinates = jets takes the Z's pT from the W's: it needs leptons = system, not {leptons!r}")
        if system_pt not in ("z", "w"):
            raise ValueError(f"system_pt must be 'z' or 'w', not {system_pt!r}")
        self.w_pt = system_pt == "w"
        if self.w_pt and (leptons != "system" or self.w_jets):
            raise ValueError("system_pt = w measures the W's pT from its jet pair and lets the Z's follow: it needs leptons = system and w_coordinates = decay")
        if decay_angle not in ("atanh", "probit"):
            raise ValueError(f"decay_angle must be 'atanh' or 'probit', not {decay_angle!r}")
        self.probit = decay_angle == "probit"
        if leptons not in ("momenta", "system"):
            raise ValueError(f"leptons must be 'momenta' or 'system', not {leptons!r}")
        self.z_system = leptons == "system"
        if self.z_system:
            self.register_buffer("m_z", torch.tensor(float(m_z)))
            self.register_buffer("gamma_z", torch.tensor(float(gamma_z)))
        if azimuth not in ("interval", "plane"):
            raise ValueError(f"azimuth must be 'interval' or 'plane', not {azimuth!r}")
        if quark_label not in ("energy", "jet"):
            raise ValueError(f"quark_label must be 'energy' or 'jet', not {quark_label!r}")
        self.plane = azimuth == "plane" and not self.w_jets  # no W decay azimuth with w_coordinates = jets
        self.jet_label = quark_label == "jet"
        self.dim = 11 if self.plane else 10
        self.register_buffer("m_w", torch.tensor(float(m_w)))
        self.register_buffer("gamma_w", torch.tensor(float(gamma_w)))
        self.standardise = Standardise(self.dim)

    def _cos_to_t(self, cos):
        """The decay coordinate of cos θ: atanh(cos θ) (exponential tails) or, with
        ``decay_angle="probit"``, Φ⁻¹((1 + cos θ)/2) (Gaussian tails, like the base density)."""
        cos = cos.clamp(-1 + _COS_EPS, 1 - _COS_EPS)
        return torch.special.ndtri(0.5 * (1 + cos)) if self.probit else torch.atanh(cos)

    def _t_to_cos(self, t):
        return 2 * torch.special.ndtr(t) - 1 if self.probit else torch.tanh(t)

    def _mass_to_xi(self, m, z: bool = False):
        m0, g0 = (self.m_z, self.gamma_z) if z else (self.m_w, self.gamma_w)
        u = torch.atan((m**2 - m0**2) / (m0 * g0)) / math.pi + 0.5
        u = u.clamp(1e-12, 1 - 1e-12)
        return torch.log(u) - torch.log1p(-u)

    def _xi_to_mass(self, xi, z: bool = False):
        m0, g0 = (self.m_z, self.gamma_z) if z else (self.m_w, self.gamma_w)
        u = torch.sigmoid(xi).clamp(1e-12, 1 - 1e-12)
        m2 = m0**2 + m0 * g0 * torch.tan(math.pi * (u - 0.5))
        return m2.clamp(min=1e-4).sqrt()

    def _lepton_columns(self, partons, phi_ref, phi_z_ref, lepton_azimuth_ref):
        pt, eta, phi = _pt_eta_phi(partons)
        if not self.z_system:
            cols = []
            for k, centre in enumerate(_PHI_CENTRES):
                cols += [torch.log(pt[:, k].clamp(min=1e-6)), eta[:, k], _wrap(phi[:, k] - phi_ref - centre)]
            return cols
        z = partons[:, 0] + partons[:, 1]
        m, y = _mass_rapidity(z, floor=1e-12)
        cos, azimuth = _decay_angles(partons[:, 0], z)
        return [self._mass_to_xi(m, z=True), y, torch.log(torch.hypot(z[:, 1], z[:, 2]).clamp(min=1e-6)), _wrap(kin.phi(z) - phi_z_ref),
                self._cos_to_t(cos), _wrap(azimuth - lepton_azimuth_ref)]

    def _leptons(self, raw, phi_ref, phi_z_ref, lepton_azimuth_ref):
        if not self.z_system:
            leptons = []
            for k, centre in enumerate(_PHI_CENTRES):
                log_pt, eta, dphi = raw[:, 3 * k], raw[:, 3 * k + 1], raw[:, 3 * k + 2]
                leptons.append(_massless(torch.exp(log_pt.clamp(max=12.0)), eta, _wrap(phi_ref + centre + dphi)))
            return leptons
        m = self._xi_to_mass(raw[:, 0], z=True)
        pt, phi = torch.exp(raw[:, 2].clamp(max=12.0)), phi_z_ref + raw[:, 3]
        z = _system(m, raw[:, 1].clamp(-_ETA_LIMIT, _ETA_LIMIT), pt * torch.cos(phi), pt * torch.sin(phi))
        return _decay_products(z, m, self._t_to_cos(raw[:, 4]), raw[:, 5] + lepton_azimuth_ref)

    def _balanced_z_columns(self, partons: torch.Tensor, ref: torch.Tensor) -> list[torch.Tensor]:
        """The Z whose pT follows from the W's: m_ℓℓ (Breit–Wigner logit), rapidity, and the
        ℓ⁻'s decay cos θ coordinate and azimuth (from the detector leptons')."""
        lepton_azimuth_ref = _references(ref)[4]
        z = partons[:, 0] + partons[:, 1]
        m_z, y_z = _mass_rapidity(z, floor=1e-12)
        cos_l, azimuth_l = _decay_angles(partons[:, 0], z)
        return [self._mass_to_xi(m_z, z=True), y_z, self._cos_to_t(cos_l), _wrap(azimuth_l - lepton_azimuth_ref)]

    def _balanced_leptons(self, raw: torch.Tensor, w: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ℓ⁻, ℓ⁺ from :meth:`_balanced_z_columns`' coordinates (raw columns 0–3), the Z's pT −pT,W."""
        m_z = self._xi_to_mass(raw[:, 0], z=True)
        z = _system(m_z, raw[:, 1].clamp(-_ETA_LIMIT, _ETA_LIMIT), -w[:, 1], -w[:, 2])
        return _decay_products(z, m_z, self._t_to_cos(raw[:, 2]), raw[:, 3] + _references(ref)[4])

    def _jet_relative_raw(self, partons: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        ja, jb = _hypothesis_jets(ref)
        pt, eta, phi = _pt_eta_phi(partons[:, 2:4])
        dr = lambda k, j: torch.hypot(eta[:, k] - j[:, 1], _wrap(phi[:, k] - j[:, 2]))  # noqa: E731
        first = dr(0, ja) + dr(1, jb) <= dr(1, ja) + dr(0, jb)
        a = torch.where(first, 0, 1)[:, None]
        b = 1 - a
        pick = lambda v, k: v.gather(1, k)[:, 0]  # noqa: E731
        m_w, _ = _mass_rapidity(partons[:, 2] + partons[:, 3], floor=1e-12)
        return torch.stack([
            *self._balanced_z_columns(partons, ref),
            torch.log(pick(pt, a).clamp(min=1e-6) / ja[:, 0].clamp(min=1e-3)), pick(eta, a) - ja[:, 1], _wrap(pick(phi, a) - ja[:, 2]),
            *self._opening_coordinates(partons[:, 2:4].gather(1, a[:, :, None].expand(-1, 1, 4))[:, 0],
                                       partons[:, 2:4].gather(1, b[:, :, None].expand(-1, 1, 4))[:, 0], jb),
            self._mass_to_xi(m_w),
        ], -1)

    @staticmethod
    def _opening_frame(n_a: torch.Tensor, jb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tan(θ/2) of the angle between the unit vector ``n_a`` and jet b's direction, and
        the axes e1 (towards jet b, ⟂ n_a) and e2 = n_a × e1 about n_a."""
        n_j = _massless(torch.ones_like(jb[:, 0]), jb[:, 1], jb[:, 2])
        n_j = n_j[:, 1:] / n_j[:, :1]
        cos = (n_a * n_j).sum(-1)
        perp = n_j - cos[:, None] * n_a
        sin = perp.norm(dim=-1)
        # jet b along n_a has no such plane: any axis ⟂ n_a (from the beam)
        beam = torch.zeros_like(n_a)
        beam[:, 2] = 1.0
        other = torch.linalg.cross(n_a, beam)
        other = torch.where(other.norm(dim=-1, keepdim=True) > 1e-9, other, torch.tensor([1.0, 0.0, 0.0], dtype=n_a.dtype, device=n_a.device).expand_as(n_a))
        e1 = torch.where((sin > 1e-12)[:, None], perp, other)
        e1 = e1 / e1.norm(dim=-1, keepdim=True)
        return sin / (1 + cos).clamp(min=1e-15), e1, torch.linalg.cross(n_a, e1)

    def _opening_coordinates(self, qa: torch.Tensor, qb: torch.Tensor, jb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The softer-side quark b from quark a: log of tan(θ_ab/2) over the same of the
        angle between a and jet b, and b's azimuth about a, from jet b's."""
        n_a = qa[:, 1:] / qa[:, 1:].norm(dim=-1, keepdim=True).clamp(min=1e-300)
        n_b = qb[:, 1:] / qb[:, 1:].norm(dim=-1, keepdim=True).clamp(min=1e-300)
        t_ref, e1, e2 = self._opening_frame(n_a, jb)
        cos = (n_a * n_b).sum(-1)
        sin = torch.linalg.cross(n_a, n_b).norm(dim=-1)
        t = sin / (1 + cos).clamp(min=1e-15)
        return torch.log(t.clamp(min=1e-12)) - torch.log(t_ref.clamp(min=1e-12)), torch.atan2((n_b * e2).sum(-1), (n_b * e1).sum(-1))

    def _jet_relative_inverse(self, raw: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        ja, jb = _hypothesis_jets(ref)
        a = _massless(ja[:, 0].clamp(min=1e-3) * torch.exp(raw[:, 4].clamp(max=12.0)), ja[:, 1] + raw[:, 5], ja[:, 2] + raw[:, 6])
        n_a = a[:, 1:] / a[:, :1].clamp(min=1e-300)
        t_ref, e1, e2 = self._opening_frame(n_a, jb)
        t = (t_ref.clamp(min=1e-12) * torch.exp(raw[:, 7].clamp(-30.0, 30.0))).clamp(1e-12, 1e12)  # tan(θ_ab/2)
        cos, sin = (1 - t**2) / (1 + t**2), 2 * t / (1 + t**2)
        n_b = cos[:, None] * n_a + sin[:, None] * (torch.cos(raw[:, 8])[:, None] * e1 + torch.sin(raw[:, 8])[:, None] * e2)
        # m² = 2 a·b = 2 E_a E_b (1 − cos θ), with 1 − cos θ = 2t²/(1 + t²): no cancellation at small angles
        m_w = self._xi_to_mass(raw[:, 9])
        e_b = m_w**2 * (1 + t**2) / (4 * a[:, 0].clamp(min=1e-300) * t**2)
        b = e_b[:, None] * torch.cat([torch.ones_like(e_b)[:, None], n_b], -1)
        return torch.stack([*self._balanced_leptons(raw, a + b, ref), a, b], 1)

    @staticmethod
    def _pair_transverse(ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pT and φ of the W hypothesis's jet pair (the sum of its two jets' transverse momenta)."""
        ja, jb = _hypothesis_jets(ref)
        px = ja[:, 0] * torch.cos(ja[:, 2]) + jb[:, 0] * torch.cos(jb[:, 2])
        py = ja[:, 0] * torch.sin(ja[:, 2]) + jb[:, 0] * torch.sin(jb[:, 2])
        return torch.hypot(px, py), torch.atan2(py, px)

    def raw(self, partons: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        if self.w_jets:
            return self._jet_relative_raw(partons, ref)
        phi_ref, azimuth_ref, cos_ref, phi_z_ref, lepton_azimuth_ref = _references(ref)
        w = partons[:, 2] + partons[:, 3]
        m, y = _mass_rapidity(w, floor=1e-12)
        if self.w_pt:
            # the Z's pT follows from the W's, whose pT and azimuth are measured from its jet pair's
            pt_jj, phi_jj = self._pair_transverse(ref)
            cols = [*self._balanced_z_columns(partons, ref), self._mass_to_xi(m), y,
                    torch.log(torch.hypot(w[:, 1], w[:, 2]).clamp(min=1e-6) / pt_jj.clamp(min=1e-3)), _wrap(kin.phi(w) - phi_jj)]
        else:
            cols = self._lepton_columns(partons, phi_ref, phi_z_ref, lepton_azimuth_ref) + [self._mass_to_xi(m), y]
        harder = torch.where((partons[:, 2, 0] >= partons[:, 3, 0])[:, None], partons[:, 2], partons[:, 3])
        cos, azimuth = _decay_angles(harder, w)
        if self.jet_label:
            # the other quark (−n) when n points away from the jets' decay axis
            sin, sin_ref = (1 - cos**2).clamp(min=0.0).sqrt(), (1 - cos_ref**2).clamp(min=0.0).sqrt()
            flip = sin * sin_ref * torch.cos(azimuth - azimuth_ref) + cos * cos_ref < 0
            cos = torch.where(flip, -cos, cos)  # clamped in _cos_to_t
            azimuth = torch.where(flip, azimuth + math.pi, azimuth)
        else:
            cos = cos.clamp(_COS_EPS, 1 - _COS_EPS)
        cols += [self._cos_to_t(cos)]
        if self.plane:
            cols += [torch.cos(azimuth - azimuth_ref), torch.sin(azimuth - azimuth_ref)]
        else:
            cols += [_wrap(azimuth - azimuth_ref)]
        return torch.stack(cols, -1)

    def fit(self, partons: torch.Tensor, ref: torch.Tensor) -> "PartonRepresentation":
        self.standardise.fit(self.raw(partons, ref))
        if self.plane:
            # the unit vector stays as it is: scaled by a Rayleigh radius it is the plane's
            # standard normal when the azimuth is uniform
            self.standardise.mean[9:].zero_()
            self.standardise.std[9:].fill_(1.0)
        return self

    def forward(self, partons: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return self.standardise(self.raw(partons, ref))[0]

    def inverse(self, features: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        raw = self.standardise.inverse(features)[0]
        if self.w_jets:
            return self._jet_relative_inverse(raw, ref)
        phi_ref, azimuth_ref, _, phi_z_ref, lepton_azimuth_ref = _references(ref)
        # folded: a sample that leaks below 0 is the same decay seen from the other side
        cos = self._t_to_cos(raw[:, 8] if self.jet_label else raw[:, 8].abs())
        azimuth = (torch.atan2(raw[:, 10], raw[:, 9]) if self.plane else raw[:, 9]) + azimuth_ref
        if self.w_pt:
            m = self._xi_to_mass(raw[:, 4])
            pt_jj, phi_jj = self._pair_transverse(ref)
            pt, phi = pt_jj.clamp(min=1e-3) * torch.exp(raw[:, 6].clamp(max=12.0)), phi_jj + raw[:, 7]
            w = _system(m, raw[:, 5].clamp(-_ETA_LIMIT, _ETA_LIMIT), pt * torch.cos(phi), pt * torch.sin(phi))
            return torch.stack([*self._balanced_leptons(raw, w, ref), *_decay_products(w, m, cos, azimuth)], 1)
        lm, lp = self._leptons(raw, phi_ref, phi_z_ref, lepton_azimuth_ref)
        m = self._xi_to_mass(raw[:, 6])
        y = raw[:, 7].clamp(-_ETA_LIMIT, _ETA_LIMIT)
        w = _system(m, y, -(lm[:, 1] + lp[:, 1]), -(lm[:, 2] + lp[:, 2]))
        return torch.stack([lm, lp, *_decay_products(w, m, cos, azimuth)], 1)


class DetectorRepresentation(nn.Module):
    """Detector-level leptons, jets, jet count and flavour → standardised condition features.

    Per lepton: log pT, η, cos Δφ, sin Δφ (Δφ to the ℓ⁻, so the ℓ⁻ has only the
    first two); per jet slot: the same and log(1 + m); absent jets are zero after
    standardisation; two W candidates, the two leading jets and the jet pair with
    the mass closest to m_W, in the coordinates of :class:`PartonRepresentation`
    (log m, y, atanh cos θ, cos φ, sin φ of the helicity frame), so the network
    need not learn that change of frame; then one-hot 2/3/≥4 jets and 1 for
    muons, 0 for electrons.
    Returns the features and the references (N, 11): the ℓ⁻'s φ; the decay
    azimuth and cos θ (of the harder jet) of the jet pair closest to m_W; the
    lepton pair's φ and the ℓ⁻'s decay azimuth in its helicity frame; pT, η, φ of
    the harder and of the softer jet of that pair.

    With ``lepton_system`` the lepton pair's log m, y and the ℓ⁻'s atanh cos θ,
    cos φ, sin φ in its helicity frame follow (the coordinates of the parton
    representation's ``leptons="system"``), before the jet pairs' columns.

    With ``pair_features`` the same five decay coordinates follow for every pair of
    jet slots (zero where a jet is absent): with ISR jets the W is any pair, and the
    condition then holds every hypothesis instead of two.
    """

    def __init__(self, max_jets: int, pair_features: bool = False, lepton_system: bool = False, z_azimuth: str = "leptons"):
        super().__init__()
        if z_azimuth not in ("leptons", "balance"):
            raise ValueError(f"z_azimuth must be 'leptons' or 'balance', not {z_azimuth!r}")
        #: the fourth reference: φ of the lepton pair, or of p_ℓℓ − p_jj (W candidate)
        self.z_balance = z_azimuth == "balance"
        self.max_jets = max_jets
        self.pair_features = bool(pair_features)
        self.lepton_system = bool(lepton_system)
        self.pairs = jet_pairs(max_jets) if pair_features else []
        self.n_continuous = 2 + 4 + 5 * max_jets + 10 + 5 * len(self.pairs) + 5 * self.lepton_system
        self.dim = self.n_continuous + 3 + 1
        self.register_buffer("mean", torch.zeros(self.n_continuous))
        self.register_buffer("std", torch.ones(self.n_continuous))

    def raw(self, leptons, jets, n_jets, flavour):
        lpt, leta, lphi = _pt_eta_phi(leptons)
        phi_ref = lphi[:, 0]
        jets = jets[:, : self.max_jets]
        jpt, jeta, jphi = _pt_eta_phi(jets)
        present = (jets[..., 0] > 0).to(leptons.dtype)
        m2 = (jets[..., 0] ** 2 - (jets[..., 1:] ** 2).sum(-1)).clamp(min=0.0)
        cols = [torch.log(lpt[:, 0]), leta[:, 0], torch.log(lpt[:, 1]), leta[:, 1], torch.cos(lphi[:, 1] - phi_ref), torch.sin(lphi[:, 1] - phi_ref)]
        masks = [torch.ones_like(phi_ref)] * 6
        for k in range(self.max_jets):
            d = jphi[:, k] - phi_ref
            cols += [torch.log(jpt[:, k].clamp(min=1e-3)), jeta[:, k], torch.cos(d), torch.sin(d), torch.log1p(m2[:, k].sqrt())]
            masks += [present[:, k]] * 5
        # W candidates in the parton representation's own coordinates (log m, y, and
        # the harder jet's helicity angles, cos and sin of φ): the two leading jets,
        # and the pair of jets with the mass closest to m_W (with ISR jets it is the
        # W more often: its decay azimuth is within π/6 of the quarks' in 45% of the
        # 3-jet events against 30% for the leading pair); the latter's azimuth is
        # the reference of the partons' decay azimuth.
        cols += list(_decay_coordinates(jets[:, 0], jets[:, 1]))
        a, b = _w_candidate(jets, present > 0)
        decay = _decay_coordinates(a, b)
        cols += list(decay)
        masks += [torch.ones_like(phi_ref)] * 10
        z = leptons[:, 0] + leptons[:, 1]
        cos_l, azimuth_l = _decay_angles(leptons[:, 0], z)
        if self.lepton_system:
            m_ll, y_ll = _mass_rapidity(z)
            cols += [torch.log(m_ll), y_ll, torch.atanh(cos_l.clamp(-1 + _COS_EPS, 1 - _COS_EPS)), torch.cos(azimuth_l), torch.sin(azimuth_l)]
            masks += [torch.ones_like(phi_ref)] * 5
        for i, j in self.pairs:
            both = present[:, i] * present[:, j]
            # an absent jet is a zero vector, whose rest frame does not exist: zero, not NaN
            cols += [torch.where(both > 0, c, 0.0) for c in _decay_coordinates(jets[:, i], jets[:, j])]
            masks += [both] * 5
        phi_z = z_balance_azimuth(z, a + b) if self.z_balance else kin.phi(z)
        ref = torch.stack([phi_ref, torch.atan2(decay[4], decay[3]), torch.tanh(decay[2]), phi_z, azimuth_l, *_pt_eta_phi(a), *_pt_eta_phi(b)], -1)
        return torch.stack(cols, -1), torch.stack(masks, -1), ref

    def fit(self, leptons, jets, n_jets, flavour) -> "DetectorRepresentation":
        x, mask, _ = self.raw(leptons, jets, n_jets, flavour)
        count = mask.sum(0).clamp(min=1.0)
        mean = (x * mask).sum(0) / count
        var = (((x - mean) * mask) ** 2).sum(0) / count
        self.mean.copy_(mean)
        self.std.copy_(var.sqrt().clamp(min=1e-6))
        return self

    def forward(self, leptons, jets, n_jets, flavour):
        x, mask, ref = self.raw(leptons, jets, n_jets, flavour)
        x = (x - self.mean) / self.std * mask
        channel = torch.nn.functional.one_hot((n_jets.clamp(2, 4) - 2).long(), 3).to(x.dtype)
        muon = (flavour == 13).to(x.dtype)[:, None]
        return torch.cat([x, channel, muon], -1), ref


def _mlp(n_in: int, n_out: int, width: int, layers: int, zero_last: bool = False) -> nn.Sequential:
    mods: list[nn.Module] = []
    d = n_in
    for _ in range(layers):
        mods += [nn.Linear(d, width), nn.ReLU()]
        d = width
    last = nn.Linear(d, n_out)
    if zero_last:
        # Coupling blocks start as the identity: a stable start for deep stacks.
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    mods.append(last)
    return nn.Sequential(*mods)


class ConditionalINN(nn.Module):
    """FrEIA ``SequenceINN`` of ``AllInOneBlock``s, conditioned through a condition network.

    Arguments:
        dim: dimension of the parton features.
        condition_in: dimension of the detector features.
        blocks, subnet_layers, subnet_width: the coupling stack and its subnets.
        condition_layers, condition_width, condition_dim: the condition network.
        clamp: soft clamping of the affine coefficients (FrEIA ``affine_clamping``).
        coupling: "affine", FrEIA ``AllInOneBlock``s (affine couplings with soft
            permutations, the paper's), or "spline", rational-quadratic spline
            couplings (:class:`~partonic.models.spline_coupling.SplineCouplingBlock`)
            each followed by a random permutation (FrEIA ``PermuteRandom``): a spline
            bends a coordinate into any monotone shape, so a posterior mixed over jet
            pairings needs fewer blocks.
        spline_bins, spline_bound: the splines' pieces and interval [−bound, bound].

    Example:
        >>> inn = ConditionalINN(10, 30)
        >>> z, log_jac = inn(torch.randn(5, 10), torch.randn(5, 30))
    """

    def __init__(
        self,
        dim: int,
        condition_in: int,
        blocks: int = 12,
        subnet_layers: int = 2,
        subnet_width: int = 256,
        condition_layers: int = 3,
        condition_width: int = 256,
        condition_dim: int = 64,
        clamp: float = 2.0,
        coupling: str = "affine",
        spline_bins: int = 10,
        spline_bound: float = 5.0,
    ):
        super().__init__()
        import FrEIA.framework as Ff
        import FrEIA.modules as Fm

        from partonic.models.spline_coupling import SplineCouplingBlock

        if coupling not in ("affine", "spline"):
            raise ValueError(f"coupling must be 'affine' or 'spline', got {coupling!r}")

        self.dim = dim
        self.condition_net = _mlp(condition_in, condition_dim, condition_width, condition_layers)

        def subnet(n_in: int, n_out: int) -> nn.Module:
            return _mlp(n_in, n_out, subnet_width, subnet_layers, zero_last=True)

        self.inn = Ff.SequenceINN(dim)
        # FrEIA draws its soft permutations from NumPy's global generator; seed it from
        # torch's, so that torch.manual_seed alone fixes the whole network.
        saved = np.random.get_state()
        np.random.seed(int(torch.randint(0, 2**31 - 1, (1,))))
        try:
            for _ in range(blocks):
                if coupling == "affine":
                    self.inn.append(Fm.AllInOneBlock, cond=0, cond_shape=(condition_dim,), subnet_constructor=subnet, affine_clamping=clamp, permute_soft=True)
                else:
                    self.inn.append(SplineCouplingBlock, cond=0, cond_shape=(condition_dim,), subnet_constructor=subnet, bins=spline_bins, bound=spline_bound)
                    self.inn.append(Fm.PermuteRandom)
        finally:
            np.random.set_state(saved)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Parton features → latent z and log |det ∂z/∂x|."""
        return self.inn(x, c=[self.condition_net(condition)])

    def inverse(self, z: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent z → parton features and log |det ∂x/∂z|."""
        return self.inn(z, c=[self.condition_net(condition)], rev=True)

    def inverse_embedded(self, z: torch.Tensor, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`inverse` given the condition network's output ``embedding`` (one row
        per z): many samples of one condition then share one pass of the condition network."""
        return self.inn(z, c=[embedding], rev=True)

    def log_prob(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        z, log_jac = self(x, condition)
        return -0.5 * (z**2).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi) + log_jac


def jet_mass(partons: torch.Tensor) -> torch.Tensor:
    """m_jj of the two quarks (slots 2, 3)."""
    return _mass(partons[:, 2] + partons[:, 3])


def parton_observables(partons: torch.Tensor) -> dict[str, torch.Tensor]:
    """The observables the job reports, from (N, 4, 4) ℓ⁻ ℓ⁺ q q̄ (any quark order)."""
    p = order_quarks(partons)
    pt, eta, _ = _pt_eta_phi(p)
    lead = pt[:, 0] >= pt[:, 1]
    z = p[:, 0] + p[:, 1]
    w = p[:, 2] + p[:, 3]
    zw = z + w
    return {
        "pt_q1": pt[:, 2],
        "pt_q2": pt[:, 3],
        "eta_q1": eta[:, 2],
        "eta_q2": eta[:, 3],
        "m_jj": _mass(w),
        "pt_l1": torch.where(lead, pt[:, 0], pt[:, 1]),
        "pt_l2": torch.where(lead, pt[:, 1], pt[:, 0]),
        "eta_l1": torch.where(lead, eta[:, 0], eta[:, 1]),
        "eta_l2": torch.where(lead, eta[:, 1], eta[:, 0]),
        "m_ll": _mass(z),
        "pt_w": torch.hypot(w[:, 1], w[:, 2]),
        "m_zw": _mass(zw),
        "y_zw": 0.5 * torch.log((zw[:, 0] + zw[:, 3]).clamp(min=1e-9) / (zw[:, 0] - zw[:, 3]).clamp(min=1e-9)),
    }


def parton_event_ids(partons) -> np.ndarray:
    """An integer per event, equal for events with identical parton momenta (N, 4, 4):
    the detector realisations of one parton event share it."""
    p = partons.detach().cpu().numpy() if isinstance(partons, torch.Tensor) else np.asarray(partons)
    flat = np.ascontiguousarray(p.reshape(len(p), -1))
    return np.unique(flat, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)


def quark_jet_distances(partons: torch.Tensor, jets: torch.Tensor, chunk: int = 5_000) -> dict[str, torch.Tensor]:
    """ΔR of the harder and the softer quark to the nearest present jet of their event:
    ``partons`` (N, S, 4, 4) samples or (N, 4, 4) truth, ``jets`` (N, J, 4) with absent
    slots zero (an event without jets gives ∞). Functions of partons and detector:
    their calibration tests where a posterior puts the quarks relative to the jets,
    which no parton observable alone does."""
    single = partons.dim() == 3
    if single:
        partons = partons[:, None]
    n, s = partons.shape[:2]
    out = {"dr_q1_jet": torch.empty(n, s, dtype=torch.float64), "dr_q2_jet": torch.empty(n, s, dtype=torch.float64)}
    for lo in range(0, n, chunk):
        q = partons[lo : lo + chunk, :, 2:4].double()
        j = jets[lo : lo + chunk].double()
        qpt, qeta, qphi = _pt_eta_phi(q)
        order = qpt.argsort(-1, descending=True)
        qeta, qphi = qeta.gather(-1, order), qphi.gather(-1, order)
        jpt, jeta, jphi = _pt_eta_phi(j)
        dr = torch.hypot(qeta[..., None] - jeta[:, None, None, :], _wrap(qphi[..., None] - jphi[:, None, None, :]))
        dr = torch.where((jpt > 0)[:, None, None, :], dr, math.inf).amin(-1)
        out["dr_q1_jet"][lo : lo + chunk], out["dr_q2_jet"][lo : lo + chunk] = dr[..., 0], dr[..., 1]
    return {k: v[:, 0] if single else v for k, v in out.items()}


def _cpu64(module: nn.Module) -> nn.Module:
    """A double-precision CPU copy (preprocessing runs there, whatever the network's device)."""
    return copy.deepcopy(module).to("cpu", torch.float64)


class Unfolder(nn.Module):
    """Everything needed to unfold: both representations and the cINN (one checkpoint).

    Arguments:
        max_jets: jet slots in the condition.
        model: the card's ``model`` section (sizes, clamp, MMD).

    Example:
        >>> unfolder = Unfolder(4, card.model).fit(train_events)
        >>> samples = unfolder.unfold(test_events, n_samples=100)  # (N, 100, 4, 4)
    """

    def __init__(self, max_jets: int, model):
        super().__init__()
        leptons = getattr(model, "leptons", "momenta")
        pairing = getattr(model, "pairing", "candidate")
        if pairing not in ("candidate", "classifier"):
            raise ValueError(f"pairing must be 'candidate' or 'classifier', not {pairing!r}")
        self.parton = PartonRepresentation(azimuth=getattr(model, "azimuth", "interval"), quark_label=getattr(model, "quark_label", "energy"), leptons=leptons,
                                           decay_angle=getattr(model, "decay_angle", "atanh"), w_coordinates=getattr(model, "w_coordinates", "decay"),
                                           system_pt=getattr(model, "system_pt", "z"))
        if (self.parton.w_jets or self.parton.w_pt) and float(model.mmd.weight) > 0:
            raise ValueError("the m_jj MMD term is not available with w_coordinates = jets or system_pt = w (their references need the jets)")
        # the hypotheses' own decay coordinates enter the condition through the pair features
        self.detector = DetectorRepresentation(max_jets, pair_features=getattr(model, "pair_features", False) or pairing == "classifier", lepton_system=leptons == "system",
                                               z_azimuth=getattr(model, "z_azimuth", "leptons"))
        #: W hypotheses (pairs of jet slots) of ``pairing: classifier``; empty otherwise
        self.pairs = jet_pairs(max_jets) if pairing == "classifier" else []
        n_hyp = len(self.pairs)
        #: ``model.quark_regions``: the quarks' region (:func:`quark_regions`) joins the
        #: hypothesis in the label, label = k · n_regions + region
        self.regions = getattr(model, "quark_regions", "none")
        if self.regions not in QUARK_REGIONS:
            raise ValueError(f"quark_regions must be one of {', '.join(map(repr, QUARK_REGIONS))}, not {self.regions!r}")
        self.n_regions = QUARK_REGIONS[self.regions]
        if self.n_regions > 1 and not n_hyp:
            raise ValueError(f"quark_regions = {self.regions!r} is a label of the pairing classifier: it needs pairing = 'classifier'")
        #: with quark regions, the share of the last :meth:`unfold`'s samples that lie
        #: outside the region of their label (None without regions)
        self.region_stats: dict | None = None
        #: p(k | detector) over the hypotheses (and regions), or None
        self.classifier = PairingClassifier(self.detector.dim, n_hyp * self.n_regions, getattr(model, "pairing_width", 256),
                                            getattr(model, "pairing_layers", 2)) if n_hyp else None
        self.cinn = ConditionalINN(
            self.parton.dim,
            self.detector.dim + (n_hyp + 5 + (self.n_regions if self.n_regions > 1 else 0) if n_hyp else 0),
            blocks=model.blocks,
            subnet_layers=model.subnet_layers,
            subnet_width=model.subnet_width,
            condition_layers=model.condition_layers,
            condition_width=model.condition_width,
            condition_dim=model.condition_dim,
            clamp=model.clamp,
            coupling=getattr(model, "coupling", "affine"),
            spline_bins=getattr(model, "spline_bins", 10),
            spline_bound=getattr(model, "spline_bound", 5.0),
        )
        self.mmd_weight = float(model.mmd.weight)
        self.mmd_widths = list(model.mmd.widths)
        #: a frozen exponential moving average of the cINN's weights (None when
        #: ``model.ema_decay`` is 0); updated every training step, used for unfolding
        self.ema_decay = float(getattr(model, "ema_decay", 0.0))
        self.cinn_ema = weight_average(self.cinn, self.ema_decay)
        #: ``model.refine: classifier``: the classifier whose density ratio resamples the
        #: posterior samples (:meth:`fit_refiner`), and the standardisation of its extra
        #: inputs; None otherwise
        refine = getattr(model, "refine", None)
        self.refiner = self.refine_scale = None
        #: the second stage of refine inputs "partons_then_jets" (:meth:`fit_refiner`); None otherwise
        self.refiner_jets = self.refine_scale_jets = None
        #: model.refine.inputs: what the refiner sees ("partons", "jets", or both in two
        #: stages, "partons_then_jets": :data:`REFINE_STAGES`, :meth:`refine_features`)
        self.refine_inputs = getattr(refine, "inputs", "partons")
        if refine is not None and refine.method == "classifier":
            self.new_refiner(refine.width, refine.layers, fits=getattr(refine, "fits", 1))

    #: samples per inverse pass of the cINN on a CPU (:meth:`sample_features`)
    CPU_PASS = 4096

    #: refiner inputs beyond the parton features: log pT and η of both quarks (pT-ordered),
    #: the jet channel (one-hot) and the lepton flavour; with refine inputs "jets" also
    #: REFINE_JET_EXTRA more and the detector's continuous features
    REFINE_EXTRA = 8
    REFINE_JET_EXTRA = 4
    #: model.refine.inputs → the inputs of each refiner stage, in the order they are fitted
    REFINE_STAGES = {"partons": ("partons",), "jets": ("jets",), "partons_then_jets": ("partons", "jets")}

    def _refine_stages(self) -> list[tuple[str, ClassifierRefiner, Standardise]]:
        """Each refiner stage's (inputs, classifier, standardisation of its extra columns)."""
        kinds = self.REFINE_STAGES[self.refine_inputs]
        stages = [(kinds[0], self.refiner, self.refine_scale)]
        if len(kinds) > 1:
            stages.append((kinds[1], self.refiner_jets, self.refine_scale_jets))
        return stages

    def _refine_dims(self, kind: str) -> tuple[int, int]:
        """(the input dimension of a refiner that sees ``kind`` ("partons" or "jets"), the
        number of its standardised extra columns)."""
        if kind == "jets":
            return self.parton.dim + self.REFINE_EXTRA + self.REFINE_JET_EXTRA + self.detector.n_continuous, 4 + self.REFINE_JET_EXTRA
        return self.parton.dim + self.REFINE_EXTRA, 4

    @staticmethod
    def tensors(events, dtype=torch.float32) -> dict[str, torch.Tensor]:
        out = {
            "leptons": torch.as_tensor(events.leptons, dtype=torch.float64),
            "jets": torch.as_tensor(events.jets, dtype=torch.float64),
            "n_jets": torch.as_tensor(events.n_jets, dtype=torch.long),
            "flavour": torch.as_tensor(events.lepton_flavour, dtype=torch.long),
        }
        if events.partons is not None:
            out["partons"] = massless(torch.as_tensor(events.partons, dtype=torch.float64))
        return out

    def _hypotheses(self, t: dict, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """References of every W hypothesis (N, P, 11): the event's, with the decay azimuth
        and cos θ and the two jets of that pair; which labels exist (N, P · n_regions:
        every region of a present pair); the truth's label (N,) or None."""
        jets = t["jets"][:, : self.detector.max_jets]
        phi, cos, valid = pair_axes(jets, self.pairs)
        refs = ref[:, None, :].repeat(1, len(self.pairs), 1)
        refs[..., 1], refs[..., 2] = phi, cos
        jet_pt_eta_phi = torch.stack(_pt_eta_phi(jets), -1).to(refs.dtype)  # (N, J, 3)
        slots = torch.tensor(self.pairs, device=jets.device)
        refs[..., 5:8], refs[..., 8:11] = jet_pt_eta_phi[:, slots[:, 0]], jet_pt_eta_phi[:, slots[:, 1]]
        if self.detector.z_balance:
            # each hypothesis's own p_ℓℓ − p_jj; an absent pair keeps the candidate's
            z = t["leptons"][:, 0] + t["leptons"][:, 1]
            for k, (i, j) in enumerate(self.pairs):
                refs[:, k, 3] = torch.where(valid[:, k], z_balance_azimuth(z, jets[:, i] + jets[:, j]).to(refs.dtype), refs[:, k, 3])
        label = pairing_labels(t["partons"], jets, valid, self.pairs) if "partons" in t else None
        if self.n_regions > 1:
            valid = valid.repeat_interleave(self.n_regions, 1)
            if label is not None:
                label = label * self.n_regions + quark_regions(t["partons"], self.regions)
        return refs, valid, label

    def hypothesis_of(self, label: torch.Tensor) -> torch.Tensor:
        """The W hypothesis (index into :attr:`pairs`) of a label (with quark regions,
        label = k · n_regions + region)."""
        return torch.div(label, self.n_regions, rounding_mode="floor")

    def fit(self, events) -> "Unfolder":
        """Fit both standardisations on training events (double precision)."""
        t = self.tensors(events)
        self.detector.double().fit(t["leptons"], t["jets"], t["n_jets"], t["flavour"])
        _, ref = self.detector(t["leptons"], t["jets"], t["n_jets"], t["flavour"])
        if self.pairs:
            refs, _, label = self._hypotheses(t, ref)
            ref = refs[torch.arange(len(label)), self.hypothesis_of(label)]
        self.parton.double().fit(t["partons"], ref)
        self.detector.float()
        self.parton.float()
        return self

    def _condition(self, events):
        t = self.tensors(events)
        cond, ref = _cpu64(self.detector)(t["leptons"], t["jets"], t["n_jets"], t["flavour"])
        refs = valid = label = None
        if self.pairs:
            refs, valid, label = self._hypotheses(t, ref)
            if label is not None:
                ref = refs[torch.arange(len(label)), self.hypothesis_of(label)]
        return t, cond, ref, refs, valid, label

    def features(self, events) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(condition features, parton features or None, references (N, 11)), float32.

        With ``pairing: classifier`` and truth, the references (and so the parton
        features) are those of the truth's W hypothesis (:func:`pairing_labels`)."""
        t, cond, ref, _, _, _ = self._condition(events)
        x = _cpu64(self.parton)(t["partons"], ref).float() if "partons" in t else None
        return cond.float(), x, ref

    def training_data(self, events) -> tuple[torch.Tensor, ...]:
        """The tensors :meth:`loss` takes: (parton features, condition), and with
        ``pairing: classifier`` the truth's hypothesis (N,) and the present ones (N, P)."""
        t, cond, ref, _, valid, label = self._condition(events)
        x = _cpu64(self.parton)(t["partons"], ref).float()
        return (x, cond.float()) if not self.pairs else (x, cond.float(), label, valid)

    def _hypothesis_condition(self, cond: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The condition with the hypothesis: one-hot k and pair k's five standardised
        decay coordinates (from the pair features), and with quark regions the region
        (one-hot)."""
        n_hyp = len(self.pairs)
        k = self.hypothesis_of(label)
        first = self.detector.n_continuous - 5 * n_hyp
        cols = first + 5 * k[:, None] + torch.arange(5, device=cond.device)
        parts = [cond, nn.functional.one_hot(k, n_hyp).to(cond.dtype), cond.gather(1, cols)]
        if self.n_regions > 1:
            parts.append(nn.functional.one_hot(label % self.n_regions, self.n_regions).to(cond.dtype))
        return torch.cat(parts, -1)

    @torch.no_grad()
    def pairing_summary(self, events) -> dict[str, dict[str, float]]:
        """How well the classifier names the W hypothesis of events with truth, per jet
        channel: the share of events whose most probable hypothesis is the truth's label
        (``accuracy``), the mean probability it gives that hypothesis (equal to the
        accuracy when the classifier is calibrated), its cross-entropy, and the share
        for the pair of jets closest to m_W (``candidate_accuracy``)."""
        t, cond, _, _, valid, label = self._condition(events)
        if label is None:
            raise ValueError("pairing_summary needs events with parton truth")
        device = next(self.parameters()).device
        probs = torch.softmax(self.pairing_logits(cond.float().to(device), valid.to(device)), -1).cpu().double()
        top = probs.max(1)
        jets = t["jets"][:, : self.detector.max_jets]
        candidate = w_candidate_index(jets, jets[..., 0] > 0)
        ce = -torch.log(probs.gather(1, label[:, None])[:, 0].clamp(min=1e-300))
        channel = t["n_jets"].clamp(2, 4)
        out = {}
        for name, mask in [("inclusive", torch.ones_like(channel, dtype=torch.bool))] + [(f"{c}j", channel == c) for c in (2, 3, 4)]:
            if mask.any():
                out[name] = {"events": int(mask.sum()), "accuracy": float((top.indices == label)[mask].double().mean()),
                             "mean_top_probability": float(top.values[mask].mean()), "cross_entropy": float(ce[mask].mean()),
                             "candidate_accuracy": float((candidate == self.hypothesis_of(label))[mask].double().mean())}
                if self.n_regions > 1:
                    pair_top = self.hypothesis_of(top.indices)
                    region_probs = probs.view(len(probs), -1, self.n_regions).sum(1)
                    out[name]["pair_accuracy"] = float((pair_top == self.hypothesis_of(label))[mask].double().mean())
                    out[name]["region_accuracy"] = float((region_probs.argmax(1) == label % self.n_regions)[mask].double().mean())
                    out[name]["region_fractions"] = torch.bincount(label[mask] % self.n_regions, minlength=self.n_regions).div(int(mask.sum())).tolist()
                    out[name]["region_predicted"] = region_probs[mask].mean(0).tolist()
        return out

    def fit_pairing(self, data: Sequence[torch.Tensor], val_data: Sequence[torch.Tensor], epochs: int = 12, dropout: float = 0.3, lr: float = 1e-3,
                    batch_size: int = 512, seed: int = 0, device: torch.device | str = "cpu", progress: bool | None = None) -> dict:
        """Fit the pairing classifier alone, before the cINN (their parameters and losses
        are separate): Adam on the cross-entropy of the events with more than one
        hypothesis, dropout in the hidden layers, and the parameters of the epoch with
        the lowest validation cross-entropy kept. ``data``, ``val_data``: what
        :meth:`training_data` returns. Returns the validation cross-entropy per epoch
        and the epoch kept."""
        from tqdm.auto import tqdm

        gen = torch.Generator(device=device).manual_seed(int(seed))
        clf = self.classifier.to(device)

        def multi(d):
            keep = d[3].sum(1) > 1
            return d[1][keep].to(device), d[2][keep].to(device), d[3][keep].to(device)

        cond, label, valid = multi(data)
        v_cond, v_label, v_valid = multi(val_data)
        if len(cond) == 0 or len(v_cond) == 0:
            return {"val_cross_entropy": [], "best_epoch": None}
        opt = torch.optim.Adam(clf.parameters(), lr)
        history, best, state = [], math.inf, None
        for epoch in tqdm(range(epochs), desc="training pairing classifier", unit="epoch", disable=progress is False):
            order = torch.randperm(len(cond), generator=gen, device=device)
            for lo in range(0, len(cond), batch_size):
                b = order[lo : lo + batch_size]
                logits = clf(cond[b], dropout, gen).masked_fill(~valid[b], -math.inf)
                loss = nn.functional.cross_entropy(logits, label[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                ce = float(nn.functional.cross_entropy(self.pairing_logits(v_cond, v_valid), v_label))
            history.append(ce)
            if ce < best:
                best, state = ce, copy.deepcopy(clf.state_dict())
        if state is None:
            raise ValueError(f"the pairing classifier's validation cross-entropy is not finite in any epoch ({history})")
        clf.load_state_dict(state)
        return {"val_cross_entropy": history, "best_epoch": int(np.argmin(history)) + 1, "events": len(cond)}

    def pairing_logits(self, cond: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """log p(k | detector) up to a constant, −inf for absent pairs."""
        return self.classifier(cond).masked_fill(~valid, -math.inf)

    def loss(self, batch: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """NLL per physical dimension (+ weight × MMD² of m_jj between samples and truth).

        With the azimuth on the plane, the unit vector is scaled by a fresh Rayleigh
        radius r, and r²/2 is taken off the NLL: that is the NLL of the ten physical
        coordinates (see :class:`PartonRepresentation`), comparable between both
        representations up to the interval's standardisation of φ (log σ_φ).
        """
        x, cond = batch[0], batch[1]
        ce = None
        if self.pairs:
            label, valid = batch[2], batch[3]
            with torch.no_grad():  # the classifier has its own fit (fit_pairing)
                ce = nn.functional.cross_entropy(self.pairing_logits(cond, valid), label, reduction="none")
            cond = self._hypothesis_condition(cond, label)
        if self.parton.plane:
            r2 = -2.0 * torch.log1p(-torch.rand(x.shape[0], device=x.device, dtype=x.dtype))
            x = torch.cat([x[:, :9], x[:, 9:] * r2.sqrt()[:, None]], -1)
        z, log_jac = self.cinn(x, cond)
        nll = 0.5 * (z**2).sum(-1) - log_jac
        if self.parton.plane:
            nll = nll - 0.5 * r2
        out = {}
        if ce is not None:
            # −log p(x | d) = −log p(k | d) − log p(x | d, k): k is a function of x and d
            nll = nll + ce
            out["pairing_ce"] = ce.mean()
        nll = nll.mean() / self.parton.physical_dim
        out["nll"] = nll
        loss = nll
        if self.mmd_weight > 0:
            zero = torch.zeros(x.shape[0], device=x.device)
            gen, _ = self.cinn.inverse(torch.randn_like(x), cond)
            m_gen = jet_mass(self.parton.inverse(gen, zero))
            m_true = jet_mass(self.parton.inverse(x, zero))
            mmd = mmd2(m_gen, m_true, self.mmd_widths)
            out["mmd"] = mmd
            loss = loss + self.mmd_weight * mmd
        out["loss"] = loss
        if torch.is_grad_enabled() and self.training:
            update_weight_average(self.cinn_ema, self.cinn, self.ema_decay)
        return out

    @torch.no_grad()
    def sample_features(self, cond: torch.Tensor, n_samples: int, batch_size: int = 100_000, generator: torch.Generator | None = None, progress=None,
                        valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, n_samples, dim) parton features for N conditions, in batches of events × samples,
        and with ``pairing: classifier`` the W hypothesis of each sample (N, n_samples),
        drawn from the classifier (``valid``: the present hypotheses, (N, P)); else None."""
        device = next(self.parameters()).device
        n = cond.shape[0]
        if self.pairs and valid is None:
            raise ValueError("pairing: classifier samples need the present hypotheses (valid)")
        out = torch.empty(n, n_samples, self.cinn.dim)
        labels = torch.empty(n, n_samples, dtype=torch.long) if self.pairs else None
        per = max(1, batch_size // n_samples)
        # On a CPU the inverse pass runs fastest on a few thousand samples at a time (its
        # activations stay in cache: 1.6 times the samples/s of 10⁵ at once,
        # docs/results.md); a GPU takes the whole batch.
        pass_size = batch_size if device.type != "cpu" else min(batch_size, self.CPU_PASS)
        inn = self.cinn_ema if self.cinn_ema is not None else self.cinn
        for lo in range(0, n, per):
            c = cond[lo : lo + per].to(device)
            m = c.shape[0]
            # the condition network once per event (and hypothesis), not once per sample
            if self.pairs:
                probs = torch.softmax(self.pairing_logits(c, valid[lo : lo + per].to(device)), -1)
                k = torch.multinomial(probs, n_samples, replacement=True, generator=generator)
                labels[lo : lo + per] = k.cpu()
                n_hyp = len(self.pairs) * self.n_regions  # labels
                every = torch.arange(n_hyp, device=device).repeat(m)
                emb = inn.condition_net(self._hypothesis_condition(c.repeat_interleave(n_hyp, 0), every)).view(m, n_hyp, -1)
                emb = emb[torch.arange(m, device=device)[:, None], k].reshape(m * n_samples, -1)
            else:
                emb = inn.condition_net(c).repeat_interleave(n_samples, 0)
            z = torch.randn(m * n_samples, self.cinn.dim, device=device, generator=generator)
            x = torch.cat([inn.inverse_embedded(z[i : i + pass_size], emb[i : i + pass_size])[0] for i in range(0, len(z), pass_size)])
            out[lo : lo + per] = x.view(-1, n_samples, self.cinn.dim).cpu()
            if progress is not None:
                progress.update(len(c))
        return out, labels

    def to_partons(self, features: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """(N, S, dim) features → (N, S, 4, 4) massless partons (ℓ⁻, ℓ⁺, q, q̄); the
        references per event (N, 11) or per sample (N, S, 11)."""
        n, s, d = features.shape
        rep = _cpu64(self.parton)
        ref = ref.cpu().double()
        ref = ref.reshape(n * s, -1) if ref.dim() == 3 else ref.repeat_interleave(s, 0)
        return rep.inverse(features.reshape(-1, d).cpu().double(), ref).view(n, s, 4, 4)

    def unfold(self, events, n_samples: int = 100, batch_size: int = 100_000, seed: int | None = None, progress=None,
               refine: bool = True, oversample: int = 1) -> torch.Tensor:
        """Posterior samples (N, n_samples, 4, 4) of the partons of each detector event;
        resampled by the refiner (:meth:`refine_samples`) when it is fitted and ``refine``,
        from ``oversample`` × n_samples drawn samples."""
        _, cond, ref, refs, valid, _ = self._condition(events)
        device = next(self.parameters()).device
        seed = int(seed if seed is not None else np.random.SeedSequence().entropy % 2**63)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        refining = refine and self.refined
        n_draw = n_samples * (int(oversample) if refining else 1)
        features, labels = self.sample_features(cond.float(), n_draw, batch_size, gen, progress, valid=valid)
        if labels is not None:
            ref = refs[torch.arange(len(labels))[:, None], self.hypothesis_of(labels)]
        samples = self.to_partons(features, ref)
        del features
        if self.n_regions > 1:
            # how far the cINN given region t leaks out of it: such samples are kept, for the
            # leak across a region's edge fills the dip the flow leaves inside it (redrawn,
            # the samples dipped by 16% at pT,q2 = 25 GeV and |η_q| = 2.5; docs/results.md)
            outside = quark_regions(samples, self.regions) != labels % self.n_regions
            self.region_stats = {"outside": float(outside.double().mean())}
        if refining:
            samples, _ = self.refine_samples(events, samples, seed, n_out=n_samples)
        return samples

    # ------------------------------------------------------------ refinement
    @property
    def refined(self) -> bool:
        """Whether a fitted refiner resamples the posteriors."""
        return self.refiner is not None and bool(self.refiner_fitted)

    def _refine_inputs_all(self, events) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per refiner stage and event, from one pass of the detector representation: the
        references of the W candidate (N, 11), not of any hypothesis, so the refiner's
        inputs are a function of the partons and the detector alone; and the jet channel
        (one-hot) with the lepton flavour (N, 4), after the detector's continuous
        condition features for a stage that sees "jets"."""
        t = self.tensors(events)
        cond, ref = _cpu64(self.detector)(t["leptons"], t["jets"], t["n_jets"], t["flavour"])
        n = self.detector.n_continuous
        # "jets": the whole detector event (standardised; absent jets' columns are masked to 0)
        tails = {"partons": cond[:, n:], "jets": torch.cat([torch.nan_to_num(cond[:, :n]).clamp(-10.0, 10.0), cond[:, n:]], 1)}
        return [(ref, tails[kind]) for kind, _, _ in self._refine_stages()]

    def _refine_parts(self, partons: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """What every stage's features share (:meth:`refine_features`): the parton
        features, log pT and η of the harder and the softer quark, and the quarks' η, φ
        (pT-ordered)."""
        partons, ref = partons.cpu().double(), ref.cpu().double()
        x = _cpu64(self.parton)(partons, ref)
        pt, eta, phi = _pt_eta_phi(partons[:, 2:4])
        order = pt.argsort(1, descending=True)
        pt, eta, phi = pt.gather(1, order), eta.gather(1, order), phi.gather(1, order)
        return x, [torch.log(pt[:, 0].clamp(min=1e-3)), torch.log(pt[:, 1].clamp(min=1e-3)), eta[:, 0], eta[:, 1]], eta, phi

    def refine_features(self, partons: torch.Tensor, ref: torch.Tensor, tail: torch.Tensor, fit: bool = False, stage: int = 0,
                        parts: tuple | None = None) -> torch.Tensor:
        """The inputs of refiner ``stage`` (M, :meth:`_refine_dims`: parton dim + 8 for
        "partons"), float32, for partons (M, 4, 4) with
        their events' references (M, 11) and channel and flavour columns (M, 4): the
        standardised parton features, log pT and η of the harder and the softer quark
        (standardised; ``fit`` sets that standardisation), and the channel and flavour.

        For a stage that sees "jets" (``tail`` then also holds the detector's continuous
        features first, :meth:`_refine_inputs_all`) each quark's signed Δη and Δφ to the nearer
        (in ΔR) of the W candidate's two jets (the references' columns 5–10) join the
        standardised columns: the distance of the quarks to their jets, which the cINN's
        posteriors get wrong most (docs/results.md). ``parts``: :meth:`_refine_parts` of the
        same partons, when another stage has computed them."""
        kind, _, standardise = self._refine_stages()[stage]
        x, cols, eta, phi = parts if parts is not None else self._refine_parts(partons, ref)
        cols = list(cols)
        if kind == "jets":
            jet_a, jet_b = _hypothesis_jets(ref.cpu().double())
            jet_eta, jet_phi = torch.stack([jet_a[:, 1], jet_b[:, 1]], 1), torch.stack([jet_a[:, 2], jet_b[:, 2]], 1)
            for q in range(2):
                d_eta, d_phi = eta[:, q, None] - jet_eta, _wrap(phi[:, q, None] - jet_phi)
                nearer = (d_eta**2 + d_phi**2).argmin(1, keepdim=True)
                cols += [d_eta.gather(1, nearer)[:, 0], d_phi.gather(1, nearer)[:, 0]]
        extra = torch.stack(cols, -1)
        scale = _cpu64(standardise.fit(extra.to(standardise.mean)) if fit else standardise)
        return torch.cat([x, scale(extra)[0], tail.cpu().double()], -1).float()

    def new_refiner(self, width: int, layers: int, inputs: str | None = None, fits: int = 1) -> None:
        """A new, unfitted refiner (classifier MLP of ``layers`` × ``width``, one per stage;
        ``fits`` of them per stage, ln r averaged: :class:`ClassifierRefiner`) in place of
        any present one, on the cINN's device; ``inputs`` (a key of :data:`REFINE_STAGES`,
        default this model's) says what it sees (:meth:`refine_features`)."""
        if inputs is not None:
            if inputs not in self.REFINE_STAGES:
                raise ValueError(f"refiner inputs must be one of {', '.join(map(repr, self.REFINE_STAGES))}, not {inputs!r}")
            self.refine_inputs = inputs
        device = next(self.cinn.parameters()).device
        kinds = self.REFINE_STAGES[self.refine_inputs]
        n_in, n_scaled = self._refine_dims(kinds[0])
        self.refiner = ClassifierRefiner(n_in, width, layers, fits).to(device)
        self.refine_scale = Standardise(n_scaled).to(device)
        self.refiner_jets = self.refine_scale_jets = None
        if len(kinds) > 1:
            n_in, n_scaled = self._refine_dims(kinds[1])
            self.refiner_jets = ClassifierRefiner(n_in, width, layers, fits).to(device)
            self.refine_scale_jets = Standardise(n_scaled).to(device)
        if "refiner_fitted" in self._buffers:
            self.refiner_fitted = torch.tensor(False, device=device)
        else:
            self.register_buffer("refiner_fitted", torch.tensor(False, device=device))

    def fit_refiner(self, events, samples: int = 2, epochs: int = 20, seed: int = 0, batch_size: int = 100_000, progress: bool | None = None,
                    sampler=None, validation: str = "events") -> dict:
        """Fit the refiner after the cINN: a classifier between the events' parton truth
        (label 1) and ``samples`` cINN samples per event (label 0), both with the
        event's detector-level channel and references (:class:`ClassifierRefiner`, the
        likelihood-ratio trick). At its optimum r = D/(1 − D) = p(x | d)/q(x | d): the
        density ratio of the true posterior to the cINN's, by which the cINN's samples
        of event d must be weighted to follow the truth (:meth:`refine_samples`).

        The classifier sees the partons in the W candidate's frame and the jet channel,
        but not the rest of the detector event: with every detector feature, trained on
        the cINN's own training events, it learns that the truth lies nearer the centre
        of those events' posteriors than the cINN's samples do (the cINN has seen those
        events), and resampling by that ratio narrowed the posteriors of new events
        (central 68% intervals of pT,q1 covering 0.643 instead of 0.666, docs/results.md).
        ``sampler(events, samples, seed)``, when given, draws the generated class (N, S,
        4, 4), S ≥ samples, instead of this cINN: an ensemble's mixture, whose refiner is
        this model's copy (jobs/unfold.py).

        With two stages (refine inputs "partons_then_jets") the second classifier learns
        the truth against the same generated samples weighted by the first one's ratio
        r₁: at its optimum r₂ = p/(q r₁), so r₁ r₂ = p/q as with one stage, but the
        first stage's correction of the quarks' momenta stays where the second, busy
        with the quark–jet distances, does not learn it (docs/results.md, "Two refiner
        stages"). Returns the first classifier's fit summary, with the second's under
        "second_stage".

        ``validation`` "events" (default) holds out whole parton events for the
        classifiers' validation loss (early stopping): every detector realisation of a
        held-out parton event, and every sample drawn for them; "rows" holds out single
        rows, so a validation truth is mostly also a training truth under another
        realisation (docs/results.md, "The coverage estimator, the refiner's validation
        split, and two stages")."""
        if self.refiner is None:
            raise ValueError("fit_refiner needs model.refine.method = classifier")
        if validation not in ("events", "rows"):
            raise ValueError(f"fit_refiner: validation must be 'events' or 'rows', got {validation!r}")
        truth = self.tensors(events)["partons"]
        if sampler is None:
            gen = self.unfold(events, samples, batch_size=batch_size, seed=seed, refine=False)
        else:
            gen = sampler(events, samples, seed)
            samples = gen.shape[1]
        gen = gen.reshape(-1, 4, 4)
        groups = generated_groups = None
        if validation == "events":
            # one group per parton event: its realisations have the same parton truth
            groups = torch.as_tensor(parton_event_ids(truth))
            generated_groups = groups.repeat_interleave(samples)
        infos, log_r, stages = [], None, self._refine_stages()
        inputs = self._refine_inputs_all(events)
        ref = inputs[0][0]
        ref_gen = ref.repeat_interleave(samples, 0)
        parts_truth, parts_gen = self._refine_parts(truth, ref), self._refine_parts(gen, ref_gen)
        for k, ((_, refiner, _), (_, tail)) in enumerate(zip(stages, inputs)):
            f_truth = self.refine_features(truth, ref, tail, fit=True, stage=k, parts=parts_truth)
            f_gen = self.refine_features(gen, ref_gen, tail.repeat_interleave(samples, 0), stage=k, parts=parts_gen)
            weights = None if log_r is None else log_r.exp()
            infos.append(refiner.fit(f_truth, torch.ones(len(f_truth)), f_gen, epochs=epochs, seed=seed, progress=progress, generated_weights=weights,
                                     groups=groups, generated_groups=generated_groups))
            if k + 1 < len(stages):  # the next stage's generated weights
                stage_log_r = refiner.log_ratio(f_gen).cpu()
                log_r = stage_log_r if log_r is None else log_r + stage_log_r
            del f_truth, f_gen
        self.refiner_fitted.fill_(True)
        info = infos[0]
        if len(infos) > 1:
            info["second_stage"] = infos[1]
        return info

    @torch.no_grad()
    def refine_samples(self, events, samples: torch.Tensor, seed: int, chunk: int = 1_000_000, n_out: int | None = None,
                       progress: bool | None = None) -> tuple[torch.Tensor, dict]:
        """Resample each event's posterior samples (N, S, 4, 4) in proportion to the
        refiner's ratio r into ``n_out`` (default S) samples (systematic resampling:
        sample k is kept ⌊n_out w_k⌋ or ⌈n_out w_k⌉ times, w = r / Σ r over the event's
        samples). As S grows the result follows q(x | d) r(x, d), the truth's posterior
        where the classifier is exact; S > n_out (oversampling) keeps more distinct
        samples where r varies strongly. Returns the resampled samples and the spread of
        the weights: the mean and the smallest effective sample size (Σ r)²/Σ r² of an
        event, and the mean and standard deviation of ln r. ``progress``: a progress bar over the
        events (None: on a terminal only)."""
        from tqdm.auto import tqdm

        if not self.refined:
            raise ValueError("refine_samples needs a fitted refiner (fit_refiner)")
        n, s = samples.shape[:2]
        stages = self._refine_stages()
        inputs = self._refine_inputs_all(events)
        ref = inputs[0][0]
        log_r = torch.zeros(n * s, dtype=torch.float64)
        flat = samples.reshape(-1, 4, 4)
        per = max(1, chunk // s) * s
        bar = tqdm(total=n, desc="refining (classifier ratio)", unit="ev", disable=not progress if progress is not None else None, leave=False)
        for lo in range(0, n * s, per):
            ev = slice(lo // s, (lo + per) // s)
            ref_rep = ref[ev].repeat_interleave(s, 0)
            parts = self._refine_parts(flat[lo : lo + per], ref_rep)  # shared by the stages
            for k, ((_, refiner, _), (_, tail)) in enumerate(zip(stages, inputs)):
                f = self.refine_features(flat[lo : lo + per], ref_rep, tail[ev].repeat_interleave(s, 0), stage=k, parts=parts)
                log_r[lo : lo + per] += refiner.log_ratio(f).cpu()
            bar.update(min(n, (lo + per) // s) - lo // s)
        bar.close()
        log_r = log_r.view(n, s)
        idx = systematic_resample(log_r, torch.Generator().manual_seed(int(seed)), n_out)
        out = samples.gather(1, idx[:, :, None, None].expand(-1, -1, *samples.shape[2:]))
        ess = 1.0 / (torch.softmax(log_r, 1) ** 2).sum(1)
        return out, {"effective_samples_mean": float(ess.mean()), "effective_samples_min": float(ess.min()), "log_ratio_std": float(log_r.std()),
                     "log_ratio_mean": float(log_r.mean()), "samples_per_event": s, "kept_per_event": idx.shape[1]}
