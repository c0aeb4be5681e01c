"""A GAN for pp → tt̄ → 6 quarks with an MMD term on the W and top masses.

References: A. Butter, T. Plehn, R. Winterhalder, "How to GAN LHC events",
arXiv:1907.03764. The generator maps noise to the three-momenta of the six quarks
(18 numbers; masses fixed by flavour), the discriminator tells them from truth,
and the generator loss carries λ Σ MMD²(m_gen, m_truth) over the two W and the two
top masses with Breit–Wigner kernels of the W and top widths (Sec. 3), which
restores the narrow peaks a plain GAN smears out. PHYSICS.md notes that the public
code of that paper appears to swap the widths; here W masses get Γ_W and top
masses Γ_t.

The later precision ingredients are options: the (pT, η, φ) or (log pT, η, φ)
representation, spectral normalisation of the discriminator (arXiv:1802.05957),
batch statistics in the discriminator (the minibatch standard deviation of
arXiv:1710.10196), and the resonance masses as extra discriminator inputs.

Beyond the paper: the ``decay`` representation makes the four resonance masses
coordinates (through their Breit–Wigner CDFs), and a residual generator starts from
that representation's standard normal, i.e. from Breit–Wigner peaks: the GAN then
learns the phase space around peaks it does not have to build.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from torch import nn

from ..physics import kinematics as kin
from ..physics.constants import GAMMA_TOP, GAMMA_W, M_B, M_TOP, M_W
from .flows import mlp
from .marginals import QuantileMarginals
from .mmd import KernelName, mmd2
from .weighted_gan import ResidualGenerator, gan_losses, marginal_distance, gan_optimizer_groups, latent_batches, update_weight_average, weight_average

__all__ = ["QUARK_MASSES", "TopQuarkRepresentation", "decay_coordinates", "decay_momenta", "MMDGAN", "resonance_masses", "RESONANCES", "swap_beams"]

Representation = Literal["momenta", "ptetaphi", "logpt", "decay"]

#: Fixed masses of the six quarks in the order of :data:`partonic.simulate.pythia.TTBAR_ORDER`
#: (b 4.7 GeV, light quarks massless, as in arXiv:1907.03764).
QUARK_MASSES = (M_B, 0.0, 0.0, M_B, 0.0, 0.0)

#: The four resonances: name → (indices of its daughters among the six quarks, mass, width).
RESONANCES = {
    "W+": ((1, 2), M_W, GAMMA_W),
    "W-": ((4, 5), M_W, GAMMA_W),
    "t": ((0, 1, 2), M_TOP, GAMMA_TOP),
    "tbar": ((3, 4, 5), M_TOP, GAMMA_TOP),
}


def resonance_masses(quarks: torch.Tensor) -> torch.Tensor:
    """(N, 4) invariant masses of W⁺, W⁻, t, t̄ from the (N, 6, 4) quark momenta.

    Sums of on-shell momenta are time-like; the clamp keeps the gradient of √m²
    finite for exactly collinear massless pairs."""
    m2 = torch.stack([kin.mass2(quarks[:, list(idx)].sum(1)) for idx, _, _ in RESONANCES.values()], 1)
    return torch.sqrt(torch.clamp(m2, min=1e-6))


# --------------------------------------------------------------- the decay chain
#: (b, q, q̄) indices of each top's daughters, and its resonances' keys in RESONANCES
_CHAINS = (((0, 1, 2), "t", "W+"), ((3, 4, 5), "tbar", "W-"))
_RES_INDEX = {name: k for k, name in enumerate(RESONANCES)}


def _unit_to_normal(f: torch.Tensor) -> torch.Tensor:
    # float32 training: 1 − 1e-12 rounds to 1, whose Φ⁻¹ is inf; stay a few ulps inside
    eps = max(1e-12, 4 * torch.finfo(f.dtype).eps)
    return torch.special.ndtri(f.clamp(eps, 1 - eps))


def _angles_to_normal(p: torch.Tensor, axes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The direction of p (N, 4) as two nearly standard normal numbers,
    Φ⁻¹((1 + cos θ)/2) and Φ⁻¹((φ + π)/2π), flat for an isotropic direction; θ and φ
    are measured in ``axes`` (N, 3, 3: rows x, y, z), by default the lab's."""
    v = p[:, 1:] if axes is None else torch.einsum("nij,nj->ni", axes, p[:, 1:])
    cos_theta = v[:, 2] / torch.sqrt((v**2).sum(-1)).clamp(min=1e-12)
    return _unit_to_normal((1 + cos_theta) / 2), _unit_to_normal((torch.atan2(v[:, 1], v[:, 0]) + math.pi) / (2 * math.pi))


def _helicity_axes(z: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) right-handed axes (rows x, y, z) with z along ``z`` (N, 3) and x in the
    plane of z and the beam (the lab's x axis where z runs along the beam)."""
    z = z / torch.sqrt((z * z).sum(-1, keepdim=True)).clamp(min=1e-300)
    beam = torch.zeros_like(z)
    beam[:, 2] = 1.0
    x = beam - (z * beam).sum(-1, keepdim=True) * z
    norm = torch.sqrt((x * x).sum(-1, keepdim=True))
    lab_x = torch.zeros_like(z)
    lab_x[:, 0] = 1.0
    fallback = lab_x - (z * lab_x).sum(-1, keepdim=True) * z
    x = torch.where(norm > 1e-9, x, fallback)
    x = x / torch.sqrt((x * x).sum(-1, keepdim=True)).clamp(min=1e-300)
    return torch.stack([x, torch.linalg.cross(z, x), z], 1)


def _frames(angles: str, top: torch.Tensor, b_in_w: torch.Tensor | None) -> torch.Tensor | None:
    """Axes of the b direction in the top rest frame (``b_in_w`` None) or of the quark
    direction in the W rest frame: the lab's, or helicity axes (z along the top's flight
    direction, or along the W's flight direction in the top frame, i.e. opposite to the
    b in the W frame)."""
    if angles == "lab":
        return None
    return _helicity_axes(top[:, 1:] if b_in_w is None else -b_in_w[:, 1:])


def _direction(u_theta: torch.Tensor, u_phi: torch.Tensor) -> torch.Tensor:
    # cos θ = 2F − 1 = F − F̄ and sin θ = 2√(F F̄) with F̄ = 1 − F = Φ(−u): no √0 (whose
    # gradient is infinite) where Φ(u) rounds to 1
    u_theta = u_theta.clamp(-7.5, 7.5)  # the data reach |u| ≤ 7.04 (Φ clamped at 1e-12); √(F F̄) stays smooth
    f, f_bar = torch.special.ndtr(u_theta), torch.special.ndtr(-u_theta)
    cos_theta, sin_theta = f - f_bar, 2 * torch.sqrt(f * f_bar)
    phi = 2 * math.pi * torch.special.ndtr(u_phi) - math.pi
    return torch.stack([sin_theta * torch.cos(phi), sin_theta * torch.sin(phi), cos_theta], -1)


def _to_lab_axes(direction: torch.Tensor, axes: torch.Tensor | None) -> torch.Tensor:
    return direction if axes is None else torch.einsum("nji,nj->ni", axes, direction)


def _two_body(parent_mass: torch.Tensor, m1: torch.Tensor | float, m2: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Daughter 1 of a two-body decay in the parent's rest frame, along ``direction``."""
    lam = (parent_mass**2 - (m1 + m2) ** 2) * (parent_mass**2 - (m1 - m2) ** 2)
    p = torch.sqrt(lam.clamp(min=0)) / (2 * parent_mass)
    e = torch.sqrt(p**2 + m1**2)
    return torch.cat([e[..., None], p[..., None] * direction], -1)


def _boost_pair(first: torch.Tensor, parent_mass: torch.Tensor, parent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both daughters of a two-body decay in the lab: ``first`` in the rest frame, the
    second back to back with it, boosted with the parent's velocity."""
    second = torch.cat([(parent_mass - first[:, 0])[:, None], -first[:, 1:]], 1)
    beta = parent[:, 1:] / parent[:, :1]
    return kin.boost(first, beta), kin.boost(second, beta)


def _to_rest_frame(p: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """p in the rest frame of ``parent``, whose velocity is taken as p⃗/√(p⃗² + m²) with
    m² ≥ 1 GeV²: generated events that float32 rounding left light-like still boost."""
    p3 = parent[:, 1:]
    m2 = (parent[:, 0] ** 2 - (p3 * p3).sum(-1)).clamp(min=1.0)
    return kin.boost(p, -p3 / torch.sqrt((p3 * p3).sum(-1) + m2)[:, None])


def _bw_to_normal(m: torch.Tensor, mass: float, width: float, window: torch.Tensor) -> torch.Tensor:
    """Φ⁻¹ of the CDF of a relativistic Breit–Wigner 1/((m² − M²)² + M²Γ²) in m²,
    restricted to ``window`` = (m_lo, m_hi): a Breit–Wigner mass becomes standard normal."""
    mg = mass * width
    lo, hi = (torch.atan((window**2 - mass**2) / mg)).unbind(-1)
    f = (torch.atan((m**2 - mass**2) / mg) - lo) / (hi - lo)
    return _unit_to_normal(f)


def _normal_to_bw(u: torch.Tensor, mass: float, width: float, window: torch.Tensor) -> torch.Tensor:
    mg = mass * width
    lo, hi = (torch.atan((window**2 - mass**2) / mg)).unbind(-1)
    a = lo + torch.special.ndtr(u) * (hi - lo)
    return torch.sqrt((mass**2 + mg * torch.tan(a)).clamp(min=0))


def decay_coordinates(quarks: torch.Tensor, windows: torch.Tensor, masses: Sequence[float] = QUARK_MASSES, angles: str = "lab") -> torch.Tensor:
    """(N, 16) decay-chain coordinates of (N, 6, 4) quark momenta; see :func:`decay_momenta`."""
    dtype, quarks, windows = quarks.dtype, quarks.double(), windows.double()
    tops = [quarks[:, list(idx)].sum(1) for idx, _, _ in _CHAINS]
    t = tops[0]
    out = [torch.log(kin.pt(t).clamp(min=1e-6)), kin.rapidity(t), _unit_to_normal((kin.phi(t) + math.pi) / (2 * math.pi)), kin.rapidity(tops[1])]
    for ((ib, iq, iqb), top, w), tp in zip(_CHAINS, tops):
        wb = quarks[:, [iq, iqb]].sum(1)
        _, m_t, g_t = RESONANCES[top]
        _, m_w, g_w = RESONANCES[w]
        b_in_w = _to_rest_frame(quarks[:, ib], wb) if angles != "lab" else None
        out += [_bw_to_normal(kin.mass(tp), m_t, g_t, windows[_RES_INDEX[top]]), *_angles_to_normal(_to_rest_frame(quarks[:, ib], tp), _frames(angles, tp, None)),
                _bw_to_normal(kin.mass(wb), m_w, g_w, windows[_RES_INDEX[w]]), *_angles_to_normal(_to_rest_frame(quarks[:, iq], wb), _frames(angles, tp, b_in_w))]
    return torch.stack(out, 1).to(dtype)


def decay_momenta(raw: torch.Tensor, windows: torch.Tensor, masses: Sequence[float] = QUARK_MASSES, angles: str = "lab") -> torch.Tensor:
    """(N, 6, 4) quark momenta from (N, 16) decay-chain coordinates: log pT, rapidity and
    azimuth of the top, the rapidity of the t̄ (its transverse momentum balances the top's:
    the hard process has no recoil), then per top (t, t̄) its mass, the b direction in its
    rest frame, the W mass and the q direction in the W rest frame.

    Masses enter through Φ⁻¹ of a Breit–Wigner CDF and angles through Φ⁻¹ of their flat
    CDF, so every real vector is a physical event whose resonances lie inside their
    ``windows`` (4, 2; in the order of :data:`RESONANCES`), and standard normal
    coordinates are Breit–Wigner peaks and isotropic decays. Rest frames are reached by
    a pure boost from the lab; ``angles`` = "lab" measures the decay angles from the lab
    axes, "helicity" from helicity axes (z along the top's flight direction for the b,
    along the W's flight direction in the top frame for the quark; x towards the beam),
    where the W polarisation is a function of one angle.

    The boosts run in float64 whatever the input's dtype: a 1 TeV top has 1 − β ≈ 10⁻⁵,
    which float32 resolves poorly, and beyond γ ≈ 3000 not at all (β rounds to 1)."""
    dtype, raw, windows = raw.dtype, raw.double(), windows.double()
    # bounded near the kinematic limits of 13–14 TeV (pT ≤ 8.1 TeV, |y| ≤ 5): an unstable
    # generator must not overflow, nor leave float32 unable to tell E from |pz|
    pt = torch.exp(raw[:, 0].clamp(max=9.0))
    phi = 2 * math.pi * torch.special.ndtr(raw[:, 2]) - math.pi
    px, py = pt * torch.cos(phi), pt * torch.sin(phi)
    quarks: list[torch.Tensor | None] = [None] * 6
    for c, ((ib, iq, iqb), top, w) in enumerate(_CHAINS):
        r = raw[:, 4 + 6 * c : 10 + 6 * c]
        _, m_t, g_t = RESONANCES[top]
        _, m_w, g_w = RESONANCES[w]
        mt = _normal_to_bw(r[:, 0], m_t, g_t, windows[_RES_INDEX[top]])
        mw = _normal_to_bw(r[:, 3], m_w, g_w, windows[_RES_INDEX[w]])
        mw = torch.minimum(mw, mt - masses[ib] - 1e-3)  # t → b W needs m_W < m_t − m_b
        y = raw[:, 1 + 2 * c].clamp(-5, 5)
        mtr = torch.sqrt(mt**2 + pt**2)
        sign = 1 - 2 * c
        t = torch.stack([mtr * torch.cosh(y), sign * px, sign * py, mtr * torch.sinh(y)], -1)
        # both daughters of each decay are built in the rest frame and boosted (not taken
        # as the difference in the lab, which loses the masses to rounding at large boosts)
        b, wb = _boost_pair(_two_body(mt, masses[ib], mw, _to_lab_axes(_direction(r[:, 1], r[:, 2]), _frames(angles, t, None))), mt, t)
        axes_w = _frames(angles, t, _to_rest_frame(b, wb) if angles != "lab" else None)
        q, qb = _boost_pair(_two_body(mw, masses[iq], torch.full_like(mw, masses[iqb]), _to_lab_axes(_direction(r[:, 4], r[:, 5]), axes_w)), mw, wb)
        quarks[ib], quarks[iq], quarks[iqb] = b, q, qb
    return torch.stack(quarks, 1).to(dtype)


class TopQuarkRepresentation(nn.Module):
    """Invertible map between six quark momenta (N, 6, 4) and 18 (or 16) standardised numbers.

    ``momenta``: (px, py, pz) per quark; ``ptetaphi``: (pT, η, φ); ``logpt``:
    (log pT, η, φ). The inverse puts every quark on its mass shell
    (:data:`QUARK_MASSES`); a negative pT from the network is read as its modulus,
    and φ needs no range (cos and sin take care of it).

    ``decay``: the decay chain in 16 numbers (:func:`decay_momenta`): the tops' log pT,
    rapidities and azimuth (their transverse momenta balance), and per top its mass, the
    b direction in its rest frame, the W mass and the quark direction in the W rest
    frame. The four resonance masses are coordinates, through
    the CDF of their Breit–Wigner, so a generator gets the peaks' shape from the
    representation instead of learning it; the windows of the masses are those of the
    training events (set by :meth:`fit`).

    ``marginals`` = "quantile" replaces the standardisation by the training data's
    quantile map (:class:`~partonic.models.marginals.QuantileMarginals`): every
    coordinate of the training data becomes standard normal, so a residual generator
    starts with all marginals of the truth (the top's pT spectrum, its rapidity, the W
    polarisation) and learns only their correlations.

    Example:
        >>> rep = TopQuarkRepresentation("logpt").fit(quarks)
        >>> u = rep(quarks)                # (N, rep.dim): 18, or 16 for "decay"
        >>> back = rep.inverse(u)          # (N, 6, 4), equal to quarks up to the masses
    """

    def __init__(self, representation: Representation = "momenta", masses: Sequence[float] = QUARK_MASSES, angles: str = "lab", marginals: str = "standard"):
        super().__init__()
        if marginals not in ("standard", "quantile"):
            raise ValueError(f"unknown marginals {marginals!r} (allowed: 'standard', 'quantile')")
        if angles not in ("lab", "helicity"):
            raise ValueError(f"unknown decay angles {angles!r} (allowed: 'lab', 'helicity')")
        #: the decay representation's angle axes (see :func:`decay_momenta`)
        self.angles = angles
        if representation not in ("momenta", "ptetaphi", "logpt", "decay"):
            raise ValueError(f"unknown representation {representation!r} (allowed: 'momenta', 'ptetaphi', 'logpt', 'decay')")
        self.representation = representation
        #: number of coordinates
        self.dim = 16 if representation == "decay" else 18
        self.register_buffer("masses", torch.tensor(masses, dtype=torch.float64))
        self._mass_values = tuple(float(m) for m in masses)  # read on the training step without a device sync
        self.register_buffer("mean", torch.zeros(self.dim, dtype=torch.float64))
        self.register_buffer("std", torch.ones(self.dim, dtype=torch.float64))
        #: "standard": each coordinate standardised (mean 0, variance 1); "quantile": each
        #: made standard normal through the training data's quantiles (QuantileMarginals)
        self.marginals = marginals
        self.quantiles = QuantileMarginals(self.dim) if marginals == "quantile" else None
        if representation == "decay":
            # resonance mass windows (W⁺, W⁻, t, t̄) × (low, high); fit() sets them from the data
            default = [[m - 30 * g, m + 30 * g] for _, m, g in RESONANCES.values()]
            self.register_buffer("windows", torch.tensor(default, dtype=torch.float64))

    def _raw(self, quarks: torch.Tensor) -> torch.Tensor:
        if self.representation == "momenta":
            return quarks[..., 1:].reshape(-1, 18)
        if self.representation == "decay":
            return decay_coordinates(quarks, self.windows.to(quarks.dtype), self.masses.tolist(), self.angles)
        pt = kin.pt(quarks)
        first = torch.log(torch.clamp(pt, min=1e-6)) if self.representation == "logpt" else pt
        return torch.stack([first, kin.eta(quarks), kin.phi(quarks)], -1).reshape(-1, 18)

    def fit(self, quarks: torch.Tensor) -> "TopQuarkRepresentation":
        quarks = quarks.to(self.mean.device, torch.float64)
        if self.representation == "decay":
            m = resonance_masses(quarks)
            # the training events' range, widened by a tenth of a width on each side
            margin = torch.tensor([0.1 * g for _, _, g in RESONANCES.values()], dtype=torch.float64, device=m.device)
            self.windows.copy_(torch.stack([(m.min(0).values - margin).clamp(min=1.0), m.max(0).values + margin], 1))
        raw = self._raw(quarks)
        self.mean.copy_(raw.mean(0))
        self.std.copy_(raw.std(0).clamp(min=1e-8))
        if self.quantiles is not None:
            self.quantiles.fit(raw)
        return self

    def forward(self, quarks: torch.Tensor) -> torch.Tensor:
        return self._from_raw(self._raw(quarks))

    def _to_raw(self, u: torch.Tensor) -> torch.Tensor:
        return self.quantiles.inverse(u) if self.quantiles is not None else u * self.std.to(u.dtype) + self.mean.to(u.dtype)

    def _from_raw(self, raw: torch.Tensor) -> torch.Tensor:
        if self.quantiles is not None:
            return self.quantiles(raw)
        return (raw - self.mean.to(raw.dtype)) / self.std.to(raw.dtype)

    @property
    def coordinate_training(self) -> bool:
        """True where :meth:`forward` after :meth:`inverse` is the identity (up to the
        inverse's bounds), so a GAN can train on the coordinates themselves: ``momenta``
        and ``decay``. Not ``ptetaphi``/``logpt``, whose inverse folds φ and the sign of
        pT (the discriminator then sees the folded values)."""
        return self.representation in ("momenta", "decay")

    def _swap_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw coordinates of the events rotated by π about x (:func:`swap_beams`)."""
        out = raw.clone()
        if self.representation == "momenta":
            out[:, 1::3], out[:, 2::3] = -raw[:, 1::3], -raw[:, 2::3]  # p_y, p_z of each quark
            return out
        if self.representation != "decay":
            raise ValueError(f"the {self.representation!r} representation swaps beams on momenta (swap_beams)")
        # the tops' rapidities change sign and φ → −φ, i.e. Φ⁻¹(F) → Φ⁻¹(1 − F) = −Φ⁻¹(F)
        out[:, 1:4] = -raw[:, 1:4]
        thetas, phis = [5, 8, 11, 14], [6, 9, 12, 15]
        if self.angles == "lab":
            # a direction (x, y, z) → (x, −y, −z) in the lab's axes: cos θ → −cos θ, φ → −φ
            out[:, thetas + phis] = -raw[:, thetas + phis]
        else:
            # helicity axes: z turns with the direction and x (towards the beam, which
            # turns over) becomes −x: θ is kept and φ → φ + π, i.e. F → F + ½ mod 1
            f = torch.special.ndtr(raw[:, phis].double())
            out[:, phis] = _unit_to_normal(torch.remainder(f + 0.5, 1.0)).to(raw.dtype)
        return out

    def swap_beams(self, u: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Coordinates u (N, dim) with the events where ``mask`` is set rotated by π
        about x: the same as ``self(swap_beams(self.inverse(u), mask))`` without going
        through the momenta (only for :attr:`coordinate_training` representations)."""
        swapped = self._from_raw(self._swap_raw(self._to_raw(u)))
        return torch.where(mask.to(u.device)[:, None], swapped, u)

    def resonance_masses(self, u: torch.Tensor) -> torch.Tensor:
        """(N, 4) masses of W⁺, W⁻, t, t̄ of the events with coordinates u: with the
        ``decay`` representation straight from its mass coordinates (as
        :func:`decay_momenta` builds them), else from :meth:`inverse`."""
        if self.representation != "decay":
            return resonance_masses(self.inverse(u))
        raw = self._to_raw(u).double()
        windows = self.windows.double()
        out = [None] * 4
        for c, (idx, top, w) in enumerate(_CHAINS):
            _, m_t, g_t = RESONANCES[top]
            _, m_w, g_w = RESONANCES[w]
            mt = _normal_to_bw(raw[:, 4 + 6 * c], m_t, g_t, windows[_RES_INDEX[top]])
            mw = _normal_to_bw(raw[:, 7 + 6 * c], m_w, g_w, windows[_RES_INDEX[w]])
            out[_RES_INDEX[top]] = mt
            out[_RES_INDEX[w]] = torch.minimum(mw, mt - self._mass_values[idx[0]] - 1e-3)
        return torch.stack(out, 1).to(u.dtype)

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        raw = self._to_raw(u)
        if self.representation == "decay":
            return decay_momenta(raw, self.windows.to(u.dtype), self.masses.tolist(), self.angles)
        raw = raw.reshape(-1, 6, 3)
        if self.representation == "momenta":
            p3 = raw.clamp(-2e4, 2e4)
        else:
            # bounded (pT ≤ 20 TeV): an unstable generator must not overflow into inf/NaN
            pt = torch.exp(raw[..., 0].clamp(max=10.0)) if self.representation == "logpt" else raw[..., 0].abs().clamp(max=2e4)
            eta, phi = raw[..., 1].clamp(-20, 20), raw[..., 2]
            p3 = torch.stack([pt * torch.cos(phi), pt * torch.sin(phi), pt * torch.sinh(eta)], -1)
        m = self.masses.to(u.dtype)
        e = torch.sqrt((p3 * p3).sum(-1) + m * m)
        return torch.cat([e[..., None], p3], -1)


def swap_beams(quarks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The events where ``mask`` is set rotated by π about the x axis, (p_y, p_z) →
    (−p_y, −p_z): a proper rotation that exchanges the two proton beams, so a pp
    event and its rotated copy are equally likely (weak decays included: helicities
    are unchanged)."""
    sign = torch.ones(quarks.shape[0], 1, 4, dtype=quarks.dtype, device=quarks.device)
    sign[mask.to(quarks.device), :, 2:] = -1.0
    return quarks * sign


class _BatchStatistics(nn.Module):
    """Appends the batch's standard deviation of every input (averaged over the batch,
    the same for every event): a discriminator that sees it spots a generator whose
    events are too alike (minibatch standard deviation, arXiv:1710.10196, Sec. 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        std = x.std(0, keepdim=True).expand_as(x) if x.shape[0] > 1 else torch.zeros_like(x)
        return torch.cat([x, std], 1)


class MMDGAN(nn.Module):
    """Generator and discriminator for six-quark events, with an MMD term on the
    resonance masses in the generator loss.

    Arguments:
        representation: a fitted :class:`TopQuarkRepresentation` (its space is the
            generator's output and the discriminator's input).
        latent_dim, width, layers: noise dimension and both MLPs (LeakyReLU).
        gradient_penalty: R1 weight on the discriminator (arXiv:1801.04406).
        mmd_weight: λ of the MMD term (0 switches it off: the ablation).
        mmd_kernel: ``breit_wigner`` or ``gaussian``; widths are each resonance's
            width times ``mmd_width_factors``.
        spectral_norm, batch_statistics, discriminator_masses: precision options.
        mmd_start_step, mmd_ramp_steps: the MMD weight is 0 for the first
            ``mmd_start_step`` training steps and then grows linearly to ``mmd_weight``
            over ``mmd_ramp_steps``; the GAN first learns the phase space, then the
            peaks are sharpened (an MMD at full weight from the start lets the
            generator satisfy it by collapsing onto a few configurations).
        discriminator_lr_factor: the discriminator's learning rate in units of the
            generator's (two time-scale updates, arXiv:1706.08500); the training loop
            reads it through :meth:`optimizer_groups`.
        ema_decay: when > 0, an exponential moving average of the generator's weights
            (decay per step) is kept and :meth:`sample` uses it. Simultaneous GAN
            updates circle around the equilibrium, and over long training the average
            can sit closer to it than any single iterate (arXiv:1806.04498); measured
            here with the momentum representation it was worse (over 6125 steps it
            shifted the top peaks down by 5 GeV: the MMD holds the last iterate's
            masses, not the average's); with the decay representation and a residual
            generator, whose masses are coordinates, decay 0.999 keeps the peaks and
            halves the bulk deviations (docs/results.md, run 9). Off by default.
        generator: "mlp" (noise → coordinates) or "residual" (the first ``dim`` noise
            coordinates plus a learned correction, :class:`ResidualGenerator`). With the
            ``decay`` representation a residual generator starts with Breit–Wigner
            peaks at the right places and isotropic decays.
        symmetrise: the beams of pp are identical, so every event is as likely as its
            copy rotated by π about x (:func:`swap_beams`). With this on, half of the
            real and of the generated events of every training batch are rotated, and
            so is a random half of the sampled events: the output is exactly symmetric
            under the exchange (in η, y, p_z), and the generator's forward–backward
            errors, which a GAN's circling last iterate leaves, average out.
        marginal_weight: λ_marg of a term λ_marg · Σ_k W₂²(u_fake,k, u_real,k) in the
            generator's loss: per coordinate k, the mean squared difference of the
            batch's sorted generated and true values (the 1-D Wasserstein-2 distance of
            the two marginals). A residual generator behind quantile marginals starts
            on every marginal; with a discriminator near 2 ln 2 nothing stops it from
            drifting away (forward tops 20% short with one seed, docs/results.md), and
            this term pulls it back at the cost of one sort per coordinate. 0: off.

    Example:
        >>> gan = MMDGAN(TopQuarkRepresentation().fit(quarks), mmd_weight=1.0)
        >>> out = gan.loss((quarks_batch,))     # inside the training loop
        >>> events = gan.sample(100_000)        # (N, 6, 4) momenta
    """

    def __init__(
        self,
        representation: TopQuarkRepresentation,
        latent_dim: int = 18,
        width: int = 512,
        layers: int = 10,
        gradient_penalty: float = 1.0,
        mmd_weight: float = 1.0,
        mmd_kernel: KernelName = "breit_wigner",
        mmd_width_factors: Sequence[float] = (1.0,),
        spectral_norm: bool = False,
        batch_statistics: bool = False,
        discriminator_masses: bool = False,
        mmd_start_step: int = 0,
        mmd_ramp_steps: int = 0,
        discriminator_lr_factor: float = 1.0,
        ema_decay: float = 0.0,
        generator: str = "mlp",
        symmetrise: bool = False,
        marginal_weight: float = 0.0,
    ):
        super().__init__()
        self.representation = representation
        self.symmetrise = bool(symmetrise)
        self.marginal_weight = float(marginal_weight)
        self.latent_dim = latent_dim
        self.gradient_penalty, self.mmd_weight, self.mmd_kernel = gradient_penalty, mmd_weight, mmd_kernel
        self.mmd_width_factors = tuple(float(f) for f in mmd_width_factors)
        self.discriminator_masses = discriminator_masses
        self.mmd_start_step, self.mmd_ramp_steps = int(mmd_start_step), int(mmd_ramp_steps)
        self.discriminator_lr_factor = float(discriminator_lr_factor)
        # training steps seen (a buffer: saved in checkpoints, so a resumed run keeps its MMD schedule)
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))
        dim = representation.dim
        if generator == "mlp":
            self.generator = mlp(latent_dim, dim, width, layers, activation=lambda: nn.LeakyReLU(0.2))
            nn.init.normal_(self.generator[-1].weight, std=0.1)
        elif generator == "residual":
            self.generator = ResidualGenerator(latent_dim, dim, width, layers)
        else:
            raise ValueError(f"generator must be 'mlp' or 'residual', got {generator!r}")
        self.ema_decay = float(ema_decay)
        # the averaged generator: not trained (no gradients), saved with the model
        self.generator_ema = weight_average(self.generator, ema_decay)
        n_in = dim + (4 if discriminator_masses else 0)
        net = mlp(n_in * (2 if batch_statistics else 1), 1, width, layers, activation=lambda: nn.LeakyReLU(0.2))
        nn.init.normal_(net[-1].weight, std=0.1)
        if spectral_norm:
            for i, mod in enumerate(net):
                if isinstance(mod, nn.Linear):
                    net[i] = nn.utils.parametrizations.spectral_norm(mod)
        self.discriminator = nn.Sequential(_BatchStatistics(), net) if batch_statistics else net
        # Resonance-mass standardisation for the discriminator: mass − M in units of 10 Γ.
        self.register_buffer("_res_mass", torch.tensor([m for _, m, _ in RESONANCES.values()]))
        self.register_buffer("_res_scale", torch.tensor([10.0 * g for _, _, g in RESONANCES.values()]))

    def optimizer_groups(self) -> list[dict]:
        """Generator and discriminator parameters as optimizer groups, the latter with
        its learning-rate factor."""
        return gan_optimizer_groups(self.generator, self.discriminator, self.discriminator_lr_factor)

    def _features(self, u: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        """The discriminator's input: the coordinates, and with ``discriminator_masses``
        the resonance masses m (N, 4)."""
        if not self.discriminator_masses:
            return u
        return torch.cat([u, (m - self._res_mass.to(m.dtype)) / self._res_scale.to(m.dtype)], 1)

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """(N, 6, 4) quark momenta from noise ``z`` (differentiable)."""
        return self.representation.inverse(self.generator(z))

    def mmd(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Σ over W⁺, W⁻, t, t̄ of MMD² between generated and true masses (from momenta)."""
        return self.mmd_masses(resonance_masses(fake), resonance_masses(real))

    def mmd_masses(self, m_fake: torch.Tensor, m_real: torch.Tensor) -> torch.Tensor:
        """Σ over W⁺, W⁻, t, t̄ of MMD² between generated and true masses (N, 4)."""
        total = m_fake.new_zeros(())
        for k, (_, _, gamma) in enumerate(RESONANCES.values()):
            widths = [gamma * f for f in self.mmd_width_factors]
            total = total + mmd2(m_fake[:, k], m_real[:, k], widths, self.mmd_kernel)
        return total

    @torch.no_grad()
    def training_inputs(self, quarks: torch.Tensor, batch_size: int = 65_536) -> tuple[torch.Tensor, torch.Tensor]:
        """(coordinates, resonance masses) of true events, in the networks' dtype: what
        :meth:`loss` takes instead of momenta, so the representation of the training
        events is computed once instead of at every step (coordinate-training
        representations only)."""
        if not self.representation.coordinate_training:
            raise ValueError(f"the {self.representation.representation!r} representation trains on momenta; pass (quarks,) to loss()")
        dtype = next(self.generator.parameters()).dtype
        u, m = [], []
        for start in range(0, len(quarks), batch_size):
            q = quarks[start : start + batch_size].double()
            u.append(self.representation(q).to(dtype))
            m.append(resonance_masses(q).to(dtype))
        return torch.cat(u), torch.cat(m)
    def current_mmd_weight(self) -> float:
        """λ at the current training step (the warm-up schedule applied)."""
        step = int(self.steps_seen)
        if step < self.mmd_start_step:
            return 0.0
        if self.mmd_ramp_steps <= 0:
            return self.mmd_weight
        return self.mmd_weight * min(1.0, (step - self.mmd_start_step + 1) / self.mmd_ramp_steps)

    def loss(self, batch) -> dict[str, torch.Tensor]:
        """Losses of both networks (and the MMD term) on a batch of true events:
        ``(quarks,)`` momenta (N, 6, 4), or for a :attr:`~TopQuarkRepresentation.coordinate_training`
        representation ``(u, masses)`` from :meth:`training_inputs`.

        With a coordinate-training representation the discriminator sees the
        generator's coordinates themselves (the beam exchange applied in coordinates)
        and the MMD takes the masses from the coordinates: no trip through the
        momenta, which costs more than both networks (docs/results.md). Otherwise the
        generated coordinates go to momenta and back, as the truth does."""
        rep = self.representation
        dtype = next(self.generator.parameters()).dtype
        first = batch[0]
        device = first.device
        weight = self.current_mmd_weight() if torch.is_grad_enabled() else self.mmd_weight
        masses = self.discriminator_masses or weight > 0  # during the MMD's warm-up it is not even computed
        m_real = m_fake = None
        z = torch.randn(first.shape[0], self.latent_dim, dtype=dtype, device=device)
        if rep.coordinate_training:
            if len(batch) == 2:
                u_real, m_real = batch[0].to(dtype), batch[1].to(dtype)
            else:
                u_real, m_real = rep(first.to(dtype)), resonance_masses(first.to(dtype))
            g = self.generator(z)
            u_fake = g
            if self.symmetrise:
                u_real = rep.swap_beams(u_real, torch.rand(u_real.shape[0], device=device) < 0.5)
                u_fake = rep.swap_beams(g, torch.rand(g.shape[0], device=device) < 0.5)
            if masses:
                m_fake = rep.resonance_masses(g)  # the beam exchange keeps the masses
        else:
            if len(batch) != 1:
                raise ValueError(f"the {rep.representation!r} representation trains on momenta: pass (quarks,)")
            real = first.to(dtype)
            fake = self.generate(z)
            if self.symmetrise:
                real = swap_beams(real, torch.rand(real.shape[0], device=device) < 0.5)
                fake = swap_beams(fake, torch.rand(fake.shape[0], device=device) < 0.5)
            u_real = rep(real)
            # the discriminator sees generated events in the same coordinates as the truth
            u_fake = rep(fake)
            if masses:
                m_real, m_fake = resonance_masses(real), resonance_masses(fake)
        loss_d, loss_g = gan_losses(self.discriminator, self._features(u_real, m_real), self._features(u_fake, m_fake), None, self.gradient_penalty)
        out = {"loss_d": loss_d.detach(), "loss_g": loss_g.detach()}
        loss = loss_d + loss_g
        if weight > 0:
            mmd = self.mmd_masses(m_fake, m_real)
            loss = loss + weight * mmd
            out["mmd"] = mmd.detach()
        if self.marginal_weight > 0:
            marg = marginal_distance(u_fake, u_real.detach())
            loss = loss + self.marginal_weight * marg
            out["marginal_w2"] = marg.detach()
        if self.mmd_weight > 0:
            out["mmd_weight"] = torch.tensor(weight)
        if torch.is_grad_enabled() and self.training:
            self.steps_seen += 1
            update_weight_average(self.generator_ema, self.generator, self.ema_decay)
        out["loss"] = loss
        return out

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, batch_size: int = 262_144) -> torch.Tensor:
        """``n`` events as (n, 6, 4) momenta in float64 (masses exact), from the averaged
        generator when there is one."""
        net = self.generator_ema if self.generator_ema is not None else self.generator
        out = [self.representation.inverse(net(z).double()) for z in latent_batches(net, self.latent_dim, n, generator, batch_size)]
        events = torch.cat(out) if out else torch.zeros(0, 6, 4, dtype=torch.float64, device=next(self.parameters()).device)
        if self.symmetrise:
            events = swap_beams(events, torch.rand(len(events), generator=generator) < 0.5)
        return events
