"""Detector level for pp → ZW → ℓℓ jj: jets with FastJet, a parametrised response, the selection.

The chain follows a fast detector simulation: particle-level objects come from
the generator (isolated e/μ candidates and anti-kT jets of the remaining visible
final state, :func:`particle_level_objects`), then :func:`apply_detector`
smears them, applies lepton efficiencies and the selection (two same-flavour
opposite-sign leptons, ≥ 2 jets). Smearing is vectorised and seeded, so a
different detector card reuses the cached particle level.

Default response parameters are those of the Delphes ATLAS card
(``cards/delphes_card_ATLAS.tcl`` of Delphes 3): the HCAL energy resolution for
jets, the muon momentum resolution for leptons, the muon/electron efficiencies and
the isolation cone. The HCAL formula is a calorimeter-tower resolution; using it
for the jet energy is the usual parametrised shortcut.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

__all__ = [
    "DetectorEvents",
    "DetectorInputError",
    "particle_level_objects",
    "isolated_leptons",
    "isolated_leptons_many",
    "cluster_jets",
    "cluster_jets_many",
    "apply_detector",
    "jet_energy_resolution",
    "lepton_pt_resolution",
    "CHANNELS",
    "PARTON_NAMES",
]

#: Jet-multiplicity channels of the ISR study; "4j" holds ≥ 4 jets.
CHANNELS = ("2j", "3j", "4j")
#: Order of the parton-level particles: the Z's ℓ⁻ and ℓ⁺, the W's quark and antiquark.
PARTON_NAMES = ("l-", "l+", "q", "qbar")


class DetectorInputError(ValueError):
    """A detector-level input file that cannot be used (names the file and what is wrong)."""


@dataclass
class DetectorEvents:
    """Selected events at detector level, with parton truth when known.

    Four-momenta are (E, px, py, pz) in GeV, float64.

    Fields:
        leptons: (N, 2, 4) the selected ℓ⁻ and ℓ⁺, in that order.
        lepton_flavour: (N,) 11 or 13.
        jets: (N, J, 4) the J leading selected jets, pT ordered, zero padded.
        n_jets: (N,) number of selected jets (may exceed J).
        partons: (N, 4, 4) ℓ⁻, ℓ⁺, q, q̄ of the hard process, or None.
        parton_ids: (N, 4) their PDG ids, or None.
        n_generated: events before the selection (for the efficiency), or None.
        cutflow: named event counts after each selection step.
    """

    leptons: np.ndarray
    lepton_flavour: np.ndarray
    jets: np.ndarray
    n_jets: np.ndarray
    partons: Optional[np.ndarray] = None
    parton_ids: Optional[np.ndarray] = None
    n_generated: Optional[int] = None
    cutflow: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.leptons)
        if self.leptons.shape[1:] != (2, 4) or self.jets.ndim != 3 or self.jets.shape[2] != 4:
            raise ValueError(f"DetectorEvents needs leptons (N, 2, 4) and jets (N, J, 4); got {self.leptons.shape} and {self.jets.shape}")
        for name in ("lepton_flavour", "jets", "n_jets"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"DetectorEvents.{name} has {len(getattr(self, name))} events, leptons have {n}")
        if self.partons is not None and self.partons.shape != (n, 4, 4):
            raise ValueError(f"DetectorEvents.partons needs shape ({n}, 4, 4), got {self.partons.shape}")

    def __len__(self) -> int:
        return len(self.leptons)

    @property
    def max_jets(self) -> int:
        return self.jets.shape[1]

    @property
    def has_truth(self) -> bool:
        return self.partons is not None

    def channel_index(self) -> np.ndarray:
        """0, 1, 2 for 2, 3, ≥ 4 jets."""
        return np.clip(self.n_jets, 2, 4).astype(np.int64) - 2

    def channel_mask(self, channel: str) -> np.ndarray:
        if channel == "inclusive":
            return np.ones(len(self), dtype=bool)
        return self.channel_index() == CHANNELS.index(channel)

    def subset(self, index) -> "DetectorEvents":
        return DetectorEvents(
            leptons=self.leptons[index],
            lepton_flavour=self.lepton_flavour[index],
            jets=self.jets[index],
            n_jets=self.n_jets[index],
            partons=None if self.partons is None else self.partons[index],
            parton_ids=None if self.parton_ids is None else self.parton_ids[index],
            n_generated=None,
            cutflow={},
        )

    def rotated(self) -> "DetectorEvents":
        """The same events rotated by π about the x axis, (E, px, py, pz) → (E, px, −py, −pz):
        η → −η and φ → −φ for every object. A proper rotation that swaps the two
        (identical) proton beams, so an exact symmetry of pp collisions; with a
        forward-backward symmetric detector the rotated events are as likely as the
        originals."""
        flip = np.array([1.0, 1.0, -1.0, -1.0])
        return DetectorEvents(
            leptons=self.leptons * flip,
            lepton_flavour=self.lepton_flavour,
            jets=self.jets * flip,
            n_jets=self.n_jets,
            partons=None if self.partons is None else self.partons * flip,
            parton_ids=self.parton_ids,
            n_generated=self.n_generated,
            cutflow=dict(self.cutflow),
        )

    def with_jet_slots(self, k: int) -> "DetectorEvents":
        """The same events with at least ``k`` jet slots (extra slots zero). Events that
        count more jets (n_jets) than the slots they came with would then claim absent
        jets they had: a :class:`DetectorInputError`."""
        if self.max_jets >= k:
            return self
        short = int((np.asarray(self.n_jets) > self.max_jets).sum())
        if short:
            raise DetectorInputError(
                f"{short} events count more jets (n_jets) than the input's {self.max_jets} jet slots, and {k} are needed: "
                f"their jets beyond slot {self.max_jets} are missing. Write the events with {k} jet slots (pT ordered, zero padded)"
            )
        jets = np.concatenate([self.jets, np.zeros((len(self), k - self.max_jets, 4))], 1)
        return DetectorEvents(self.leptons, self.lepton_flavour, jets, self.n_jets, self.partons, self.parton_ids, self.n_generated, self.cutflow)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"leptons": self.leptons, "lepton_flavour": self.lepton_flavour, "jets": self.jets, "n_jets": self.n_jets}
        if self.partons is not None:
            out["partons"] = self.partons
            out["parton_ids"] = self.parton_ids if self.parton_ids is not None else np.zeros(self.partons.shape[:2], dtype=np.int64)
        return out

    def to_hdf5(self, path: str | Path) -> Path:
        """Write the events as an HDF5 file (datasets named as the fields)."""
        from partonic.jobs.common import atomic_write_bytes  # local: jobs import simulate

        import io

        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as fh:
            fh.attrs["partonic_kind"] = "detector_events"
            for name, value in self.arrays().items():
                fh.create_dataset(name, data=value)
        atomic_write_bytes(Path(path), buffer.getvalue())
        return Path(path)

    @classmethod
    def from_hdf5(cls, path: str | Path) -> "DetectorEvents":
        """Read events written by :meth:`to_hdf5` (or any file with the same datasets)."""
        path = Path(path)
        if not path.is_file():
            raise DetectorInputError(f"{path}: no such file")
        try:
            with h5py.File(path, "r") as fh:
                missing = [n for n in ("leptons", "lepton_flavour", "jets", "n_jets") if n not in fh]
                if missing:
                    raise DetectorInputError(f"{path}: missing datasets {missing} (needs leptons, lepton_flavour, jets, n_jets; partons optional)")
                data = {name: fh[name][()] for name in fh.keys() if name in ("leptons", "lepton_flavour", "jets", "n_jets", "partons", "parton_ids")}
        except OSError as exc:
            raise DetectorInputError(f"{path}: not a readable HDF5 file ({exc})") from None
        try:
            return cls(**data)
        except ValueError as exc:
            raise DetectorInputError(f"{path}: {exc}") from None


# ------------------------------------------------------------- particle level
def cluster_jets(particles: np.ndarray, radius: float, pt_min: float, max_jets: int) -> np.ndarray:
    """Anti-kT jets (FastJet, E-scheme) of (n, 4) (E, px, py, pz) particles.

    Returns (max_jets, 4), pT ordered, zero padded."""
    import fastjet

    out = np.zeros((max_jets, 4))
    if len(particles) == 0:
        return out
    definition = fastjet.JetDefinition(fastjet.antikt_algorithm, radius)
    inputs = [fastjet.PseudoJet(float(px), float(py), float(pz), float(e)) for e, px, py, pz in particles]
    sequence = fastjet.ClusterSequence(inputs, definition)
    jets = fastjet.sorted_by_pt(sequence.inclusive_jets(pt_min))[:max_jets]
    for k, jet in enumerate(jets):
        out[k] = (jet.E(), jet.px(), jet.py(), jet.pz())
    return out


def cluster_jets_many(particles: np.ndarray, counts: np.ndarray, radius: float, pt_min: float, max_jets: int) -> np.ndarray:
    """Anti-kT jets of many events at once: FastJet's array interface clusters them in
    one call, without a Python object per particle (about five times faster than
    :func:`cluster_jets` per event).

    ``particles`` is (Σ counts, 4) (E, px, py, pz), the events one after the other;
    ``counts`` (n,) their numbers of particles. Returns (n, max_jets, 4), each
    event's jets as :func:`cluster_jets` gives them (pT ordered, zero padded)."""
    import awkward as ak
    import fastjet

    counts = np.asarray(counts, dtype=np.int64)
    particles = np.asarray(particles, dtype=np.float64).reshape(-1, 4)
    if particles.shape[0] != counts.sum():
        raise ValueError(f"cluster_jets_many: {particles.shape[0]} particles for counts summing to {counts.sum()}")
    out = np.zeros((len(counts), max_jets, 4))
    if particles.shape[0] == 0:
        return out
    events = ak.unflatten(ak.zip({"px": particles[:, 1], "py": particles[:, 2], "pz": particles[:, 3], "E": particles[:, 0]}), counts)
    sequence = fastjet.ClusterSequence(events, fastjet.JetDefinition(fastjet.antikt_algorithm, radius))
    jets = sequence.inclusive_jets(min_pt=pt_min)
    order = ak.argsort(jets.px**2 + jets.py**2, axis=1, ascending=False, stable=True)
    jets = ak.pad_none(jets[order][:, :max_jets], max_jets, clip=True)
    for k, field in enumerate(("E", "px", "py", "pz")):
        out[..., k] = ak.to_numpy(ak.fill_none(jets[field], 0.0))
    return out


def _np_pt_eta_phi(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pt = np.hypot(p[..., 1], p[..., 2])
    with np.errstate(divide="ignore", invalid="ignore"):
        eta = np.arcsinh(np.where(pt > 0, p[..., 3] / np.where(pt > 0, pt, 1.0), 0.0))
    return pt, eta, np.arctan2(p[..., 2], p[..., 1])


def particle_level_objects(
    final: np.ndarray,
    ids: np.ndarray,
    *,
    radius: float,
    isolation_dr: float = 0.5,
    isolation_ratio: float = 0.12,
    isolation_pt_min: float = 0.5,
    lepton_pt_min: float = 10.0,
    max_leptons: int = 4,
    jet_pt_min: float = 10.0,
    max_jets: int = 8,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Isolated e/μ candidates and jets of one event's visible final state.

    ``final`` is (n, 4) (E, px, py, pz) of the visible final-state particles
    (neutrinos already left out), ``ids`` their PDG ids. A lepton is isolated when
    the scalar pT sum of the other particles with pT > ``isolation_pt_min`` within
    ΔR < ``isolation_dr`` is below ``isolation_ratio`` × its pT (Delphes' rule).
    Jets are clustered from everything but the isolated leptons.

    Returns leptons (max_leptons, 4), lepton ids (max_leptons,), jets (max_jets, 4),
    each pT ordered and zero padded."""
    leptons, lepton_ids, isolated = isolated_leptons(final, ids, isolation_dr=isolation_dr, isolation_ratio=isolation_ratio,
                                                     isolation_pt_min=isolation_pt_min, lepton_pt_min=lepton_pt_min, max_leptons=max_leptons)
    jets = cluster_jets(final[~isolated], radius, jet_pt_min, max_jets)
    return leptons, lepton_ids, jets


def isolated_leptons(
    final: np.ndarray,
    ids: np.ndarray,
    *,
    isolation_dr: float = 0.5,
    isolation_ratio: float = 0.12,
    isolation_pt_min: float = 0.5,
    lepton_pt_min: float = 10.0,
    max_leptons: int = 4,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The isolated e/μ of :func:`particle_level_objects`: leptons (max_leptons, 4), their
    ids (max_leptons,), pT ordered and zero padded, and the mask (n,) of the isolated
    particles (left out of the jets)."""
    pt, eta, phi = _np_pt_eta_phi(final)
    is_lepton = np.isin(np.abs(ids), (11, 13)) & (pt > lepton_pt_min)
    isolated = np.zeros(len(final), dtype=bool)
    if is_lepton.any():
        soft = pt > isolation_pt_min
        for i in np.flatnonzero(is_lepton):
            dphi = np.angle(np.exp(1j * (phi - phi[i])))
            near = soft & (np.hypot(eta - eta[i], dphi) < isolation_dr)
            near[i] = False
            isolated[i] = pt[near].sum() < isolation_ratio * pt[i]
    leptons = np.zeros((max_leptons, 4))
    lepton_ids = np.zeros(max_leptons, dtype=np.int64)
    order = np.flatnonzero(isolated)[np.argsort(-pt[isolated])][:max_leptons]
    leptons[: len(order)] = final[order]
    lepton_ids[: len(order)] = ids[order]
    return leptons, lepton_ids, isolated


# ------------------------------------------------------------- detector level
def jet_energy_resolution(energy: np.ndarray, eta: np.ndarray, central, forward, forward_eta: float) -> np.ndarray:
    """σ_E (GeV) = √(N² + S² E + C² E²), with (N, S, C) = ``central`` for |η| ≤
    ``forward_eta`` and ``forward`` beyond (Delphes ATLAS HCAL form)."""
    n, s, c = (np.where(np.abs(eta) <= forward_eta, a, b) for a, b in zip(central, forward))
    return np.sqrt(n**2 + s**2 * energy + (c * energy) ** 2)


def isolated_leptons_many(
    final: np.ndarray,
    ids: np.ndarray,
    counts: np.ndarray,
    *,
    isolation_dr: float = 0.5,
    isolation_ratio: float = 0.12,
    isolation_pt_min: float = 0.5,
    lepton_pt_min: float = 10.0,
    max_leptons: int = 4,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`isolated_leptons` of many events at once, without a Python loop.

    ``final`` is (Σ counts, 4) (E, px, py, pz) and ``ids`` (Σ counts,) the visible
    final-state particles of the events one after the other, ``counts`` (n,) their
    numbers. Every lepton candidate is paired with every particle of its own event;
    the cone sums are the same as the per-event ones up to the order of summation.
    Returns leptons (n, max_leptons, 4), their ids (n, max_leptons) and the mask
    (Σ counts,) of the isolated particles."""
    final = np.asarray(final, dtype=np.float64).reshape(-1, 4)
    ids = np.asarray(ids, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    n = len(counts)
    if final.shape[0] != counts.sum() or ids.shape != (final.shape[0],):
        raise ValueError(f"isolated_leptons_many: {final.shape[0]} particles and {ids.shape} ids for counts summing to {counts.sum()}")
    offsets = np.concatenate([[0], np.cumsum(counts)])
    event = np.repeat(np.arange(n), counts)
    pt, eta, phi = _np_pt_eta_phi(final)
    cand = np.flatnonzero(np.isin(np.abs(ids), (11, 13)) & (pt > lepton_pt_min))
    # (candidate, particle of the same event) pairs
    m = counts[event[cand]]
    pair = np.repeat(np.arange(len(cand)), m)
    j = np.repeat(offsets[event[cand]], m) + np.arange(m.sum()) - np.repeat(np.cumsum(m) - m, m)
    i = cand[pair]
    dphi = np.angle(np.exp(1j * (phi[j] - phi[i])))
    near = (pt[j] > isolation_pt_min) & (np.hypot(eta[j] - eta[i], dphi) < isolation_dr) & (j != i)
    cone = np.bincount(pair, weights=np.where(near, pt[j], 0.0), minlength=len(cand))
    isolated = np.zeros(len(final), dtype=bool)
    isolated[cand] = cone < isolation_ratio * pt[cand]
    # per event: the isolated leptons, pT ordered, the first max_leptons
    iso = np.flatnonzero(isolated)
    order = iso[np.lexsort((-pt[iso], event[iso]))]
    ev = event[order]
    rank = np.arange(len(order)) - np.searchsorted(ev, ev)
    keep = rank < max_leptons
    leptons = np.zeros((n, max_leptons, 4))
    lepton_ids = np.zeros((n, max_leptons), dtype=np.int64)
    leptons[ev[keep], rank[keep]] = final[order[keep]]
    lepton_ids[ev[keep], rank[keep]] = ids[order[keep]]
    return leptons, lepton_ids, isolated


def lepton_pt_resolution(pt: np.ndarray, eta: np.ndarray, barrel, endcap, barrel_eta: float) -> np.ndarray:
    """σ_pT / pT = √(a² + (b pT)²), (a, b) = ``barrel`` for |η| ≤ ``barrel_eta``,
    ``endcap`` beyond (Delphes ATLAS muon form)."""
    a, b = (np.where(np.abs(eta) <= barrel_eta, x, y) for x, y in zip(barrel, endcap))
    return np.sqrt(a**2 + (b * pt) ** 2)


def _scale_momentum(p: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Scale the three-momentum and energy together (keeps the mass ratio: E and p both × factor)."""
    return p * factor[..., None]


def _smear_angles(p: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    if sigma <= 0:
        return p
    pt, eta, phi = _np_pt_eta_phi(p)
    m2 = np.maximum(p[..., 0] ** 2 - (p[..., 1:] ** 2).sum(-1), 0.0)
    eta = eta + sigma * rng.standard_normal(eta.shape)
    phi = phi + sigma * rng.standard_normal(phi.shape)
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    e = np.sqrt(px**2 + py**2 + pz**2 + m2)
    return np.where((pt > 0)[..., None], np.stack([e, px, py, pz], -1), 0.0)


def apply_detector(
    leptons: np.ndarray,
    lepton_ids: np.ndarray,
    jets: np.ndarray,
    detector,
    rng: np.random.Generator,
    partons: Optional[np.ndarray] = None,
    parton_ids: Optional[np.ndarray] = None,
    return_rows: bool = False,
):
    """Smear particle-level objects, apply efficiencies and the ZW selection.

    Returns the selected :class:`DetectorEvents`; with ``return_rows`` also the
    particle-level row of each selected event.

    Arguments:
        leptons, lepton_ids: (N, L, 4) and (N, L) isolated e/μ candidates (zero padded).
        jets: (N, K, 4) particle-level jets (zero padded, K ≥ ``detector.max_jets``).
        detector: the card's ``data.detector`` section.
        rng: NumPy generator (the only source of randomness).
        partons, parton_ids: truth carried along for the selected events.
    """
    d = detector
    n_events = len(leptons)
    cutflow = {"generated": int(n_events)}

    # Jets: energy smearing at fixed direction, then angles, then acceptance.
    jet_present = jets[..., 0] > 0
    _, jet_eta, _ = _np_pt_eta_phi(jets)
    sigma = jet_energy_resolution(jets[..., 0], jet_eta, d.jet_resolution_central, d.jet_resolution_forward, d.jet_forward_eta)
    factor = 1.0 + sigma / np.where(jet_present, jets[..., 0], 1.0) * rng.standard_normal(jet_present.shape)
    smeared = _smear_angles(_scale_momentum(jets, np.clip(factor, 0.0, None)), d.jet_angle_resolution, rng)
    jpt, jeta, _ = _np_pt_eta_phi(smeared)
    jet_ok = jet_present & (jpt > d.jet_pt_min) & (np.abs(jeta) < d.jet_eta_max)
    order = np.argsort(np.where(jet_ok, -jpt, np.inf), axis=1, kind="stable")
    smeared = np.take_along_axis(smeared, order[..., None], axis=1)
    jet_ok = np.take_along_axis(jet_ok, order, axis=1)
    n_jets = jet_ok.sum(1)
    selected_jets = np.where(jet_ok[..., None], smeared, 0.0)[:, : d.max_jets]

    # Leptons: pT resolution at fixed direction, efficiency, acceptance.
    present = lepton_ids != 0
    lpt, leta, _ = _np_pt_eta_phi(leptons)
    rel = lepton_pt_resolution(lpt, leta, d.lepton_resolution_barrel, d.lepton_resolution_endcap, d.lepton_barrel_eta)
    factor = np.clip(1.0 + rel * rng.standard_normal(rel.shape), 0.0, None)
    sm_leptons = _scale_momentum(leptons, factor)
    efficiency = np.where(np.abs(leta) <= d.lepton_barrel_eta, d.lepton_efficiency_barrel, d.lepton_efficiency_endcap)
    found = present & (rng.random(present.shape) < efficiency)
    spt = lpt * factor
    lep_ok = found & (spt > d.lepton_pt_min) & (np.abs(leta) < d.lepton_eta_max)

    # Same-flavour opposite-sign pair: the flavour of the leading accepted lepton,
    # then the leading ℓ⁻ and leading ℓ⁺ of that flavour.
    key = np.where(lep_ok, spt, -1.0)
    lead = np.argmax(key, axis=1)
    has_lepton = key.max(1) > 0
    flavour = np.abs(np.take_along_axis(lepton_ids, lead[:, None], 1)[:, 0])
    same = lep_ok & (np.abs(lepton_ids) == flavour[:, None])
    minus = same & (lepton_ids > 0)  # PDG: e⁻ = 11, μ⁻ = 13
    plus = same & (lepton_ids < 0)
    i_minus = np.argmax(np.where(minus, spt, -1.0), axis=1)
    i_plus = np.argmax(np.where(plus, spt, -1.0), axis=1)
    pair = has_lepton & minus.any(1) & plus.any(1)
    cutflow["sfos_leptons"] = int(pair.sum())
    two_jets = pair & (n_jets >= 2)
    cutflow["two_jets"] = int(two_jets.sum())

    rows = np.flatnonzero(two_jets)
    sel_leptons = np.stack([sm_leptons[rows, i_minus[rows]], sm_leptons[rows, i_plus[rows]]], axis=1)
    events = DetectorEvents(
        leptons=sel_leptons,
        lepton_flavour=flavour[rows].astype(np.int64),
        jets=selected_jets[rows],
        n_jets=n_jets[rows].astype(np.int64),
        partons=None if partons is None else partons[rows],
        parton_ids=None if parton_ids is None else parton_ids[rows],
        n_generated=int(n_events),
        cutflow=cutflow,
    )
    return (events, rows) if return_rows else events
