"""Delphes ROOT files to :class:`~partonic.simulate.detector.DetectorEvents`, through uproot.

:func:`read_delphes` reads the reconstructed jets, electrons and muons of a
Delphes tree and applies the same ZW → ℓℓ jj selection as
:func:`partonic.simulate.detector.apply_detector` (without smearing: Delphes has
done that). The parton truth (ℓ⁻, ℓ⁺ of the Z, q, q̄ of the W) comes from the
generator record that Delphes keeps in its ``Particle`` branch. All work on the
events is vectorised with awkward arrays; only the files are looped over.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, Optional, Union

import awkward as ak
import numpy as np
import uproot

from partonic.physics.constants import M_ELECTRON, M_MUON
from partonic.simulate.detector import DetectorEvents, DetectorInputError

__all__ = ["read_delphes", "delphes_branches", "DELPHES_BRANCHES", "TRUTH_BRANCHES"]


def delphes_branches(jets: str = "Jet", electrons: str = "Electron", muons: str = "Muon") -> tuple[str, ...]:
    """The branches of the reconstructed objects read from collections of these names
    (the Delphes cards' default names; e.g. ``jets="JetPUPPI"`` for the CMS card's
    PUPPI jets, whose leaves are those of Jet)."""
    return (f"{jets}.PT", f"{jets}.Eta", f"{jets}.Phi", f"{jets}.Mass",
            *(f"{c}.{leaf}" for c in (electrons, muons) for leaf in ("PT", "Eta", "Phi", "Charge")))


#: Branches of the reconstructed objects, as the Delphes cards name them by default.
DELPHES_BRANCHES = delphes_branches()
#: Branches of the generator record, needed for the parton truth.
TRUTH_BRANCHES = (
    "Particle.PID", "Particle.Status", "Particle.M1",
    "Particle.Px", "Particle.Py", "Particle.Pz", "Particle.E",
)

_LEPTONS = (("Electron", 11, M_ELECTRON), ("Muon", 13, M_MUON))


# ------------------------------------------------------------------ file access
def _open_tree(path: Path, tree: str, names: tuple[str, ...], truth: bool):
    """Open ``path`` and map each Delphes branch name to its key in ``tree``.

    Returns (file, tree, {name: key}); the caller closes the file."""
    if not path.exists():
        raise DetectorInputError(f"{path}: no such file")
    if not path.is_file():
        raise DetectorInputError(f"{path}: not a file")
    try:
        fh = uproot.open(path)
    except Exception as exc:  # uproot raises OSError or ValueError depending on how the bytes are wrong
        raise DetectorInputError(f"{path}: not a readable ROOT file ({str(exc).splitlines()[0]})") from None
    try:
        try:
            ttree = fh[tree]
        except KeyError:
            raise DetectorInputError(f"{path}: no tree '{tree}' (the file holds {sorted(fh.keys(cycle=False))})") from None
        if not isinstance(ttree, uproot.behaviors.TTree.TTree):
            raise DetectorInputError(f"{path}: '{tree}' is a {type(ttree).__name__}, not a TTree")
        # Real Delphes files nest the leaves ("Jet/Jet.PT"); flat writers do not ("Jet.PT").
        keys = ttree.keys(recursive=True)
        by_leaf: dict[str, str] = {}
        for key in keys:
            by_leaf.setdefault(key.rsplit("/", 1)[-1], key)
        found = {name: name if name in keys else by_leaf.get(name) for name in names}
        missing = [name for name, key in found.items() if key is None]
        if missing:
            message = f"{path}: tree '{tree}' lacks the branches {', '.join(missing)}"
            held = {leaf.split(".", 1)[0] for leaf in by_leaf if "." in leaf}
            absent = sorted({name.split(".", 1)[0] for name in missing} - held)
            if absent:  # a whole collection: name the ones the tree has
                message += (f" (no collection {', '.join(absent)}; the tree's collections are {', '.join(sorted(held)) or 'none'}:"
                            " data.delphes names the jet, electron and muon collections)")
            if truth and any(name in TRUTH_BRANCHES for name in missing):
                message += (
                    "; the Particle branches hold the parton truth (keep the generator record in the"
                    " Delphes output, or pass truth=False to read detector objects only)"
                )
            raise DetectorInputError(message)
    except DetectorInputError:
        fh.close()
        raise
    except Exception as exc:  # noqa: BLE001 - uproot's reader on a truncated or damaged file
        fh.close()
        raise _damaged(path, f"tree '{tree}'", exc) from None
    except BaseException:
        fh.close()
        raise
    return fh, ttree, found


def _damaged(path: Path, what: str, exc: Exception) -> DetectorInputError:
    """The error for a file uproot cannot read through (its own error's first line)."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return DetectorInputError(f"{path}: {what} cannot be read ({first}); the file is truncated or damaged (a copy cut short?)")


def _has_branches(path: Path, tree: str, names: tuple[str, ...]) -> bool:
    """Whether the tree in ``path`` has every branch of ``names`` (False for any unreadable file)."""
    try:
        fh, _, _ = _open_tree(path, tree, names, False)
    except DetectorInputError:
        return False
    fh.close()
    return True


# ------------------------------------------------------------------ kinematics
def _four_vectors(pt, eta, phi, mass) -> np.ndarray:
    """(E, px, py, pz) from float64 numpy (pt, eta, phi, m); pt = 0 rows come out as zeros."""
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    p2 = px**2 + py**2 + pz**2
    # Delphes writes a negative mass for a space-like jet (ROOT's M()); undo it as ROOT's SetPtEtaPhiM does.
    e = np.sqrt(np.maximum(p2 + np.sign(mass) * mass**2, 0.0))
    return np.stack([e, px, py, pz], axis=-1)


def _f64(array) -> ak.Array:
    return ak.values_astype(array, np.float64)


def _numpy(array, fill=0) -> np.ndarray:
    return ak.to_numpy(ak.fill_none(array, fill))


def _leading(records, key: str):
    """The record with the largest ``key`` in each event, None where the list is empty."""
    return ak.firsts(records[ak.argmax(records[key], axis=1, keepdims=True)])


# ------------------------------------------------------------------ selection
def _select_jets(data, name: str, max_jets: int, pt_min: float, eta_max: float):
    jets = ak.zip({
        "pt": _f64(data[f"{name}.PT"]), "eta": _f64(data[f"{name}.Eta"]),
        "phi": _f64(data[f"{name}.Phi"]), "mass": _f64(data[f"{name}.Mass"]),
    })
    jets = jets[(jets.pt > pt_min) & (abs(jets.eta) < eta_max)]
    jets = jets[ak.argsort(jets.pt, axis=1, ascending=False, stable=True)]
    n_jets = ak.to_numpy(ak.num(jets, axis=1)).astype(np.int64)
    padded = ak.pad_none(jets, max_jets, axis=1, clip=True)
    fields = [_numpy(padded[name], 0.0).reshape(len(n_jets), max_jets) for name in ("pt", "eta", "phi", "mass")]
    return _four_vectors(*fields), n_jets


def _select_leptons(data, names: tuple[str, str], pt_min: float, eta_max: float):
    """The SFOS pair: flavour of the leading accepted lepton, its leading ℓ⁻ and ℓ⁺
    (``names``: the electron and the muon collection)."""
    collections = []
    for name, (_, pdg, mass) in zip(names, _LEPTONS):
        charge = ak.values_astype(data[f"{name}.Charge"], np.int64)
        collections.append(ak.zip({
            "pt": _f64(data[f"{name}.PT"]), "eta": _f64(data[f"{name}.Eta"]), "phi": _f64(data[f"{name}.Phi"]),
            "charge": charge, "flavour": charge * 0 + pdg, "mass": charge * 0.0 + mass,
        }))
    leptons = ak.concatenate(collections, axis=1)
    leptons = leptons[(leptons.pt > pt_min) & (abs(leptons.eta) < eta_max)]
    flavour = _numpy(_leading(leptons, "pt").flavour, 0)
    same = leptons[leptons.flavour == flavour]
    pair, found = [], []
    for sign in (-1, 1):
        best = _leading(same[same.charge * sign > 0], "pt")
        found.append(~ak.to_numpy(ak.is_none(best)))
        pair.append(_four_vectors(*(_numpy(best[name], 0.0) for name in ("pt", "eta", "phi", "mass"))))
    return np.stack(pair, axis=1), flavour.astype(np.int64), found[0] & found[1]


def _parton_truth(data):
    """ℓ⁻, ℓ⁺ (Z decay) and q, q̄ (W decay) of the hard process: four-vectors, ids, found mask."""
    pid = ak.values_astype(data["Particle.PID"], np.int64)
    status = abs(ak.values_astype(data["Particle.Status"], np.int64))
    m1 = ak.values_astype(data["Particle.M1"], np.int64)
    has_mother = (m1 >= 0) & (m1 < ak.num(pid, axis=1))
    mother = ak.where(has_mother, pid[ak.where(has_mother, m1, 0)], 0)
    index = ak.local_index(pid, axis=1)
    apid = abs(pid)

    outgoing = status == 23
    z_lepton = outgoing & ((apid == 11) | (apid == 13)) & (mother == 23)
    # The first Z lepton fixes the flavour, so ℓ⁻ and ℓ⁺ come from the same decay.
    flavour = ak.fill_none(ak.firsts(apid[z_lepton]), 0)
    w_quark = outgoing & (apid >= 1) & (apid <= 5) & (abs(mother) == 24)
    masks = (z_lepton & (pid == flavour), z_lepton & (pid == -flavour), w_quark & (pid > 0), w_quark & (pid < 0))
    first = [ak.firsts(index[mask]) for mask in masks]
    found = np.logical_and.reduce([~ak.to_numpy(ak.is_none(i)) for i in first])

    n = len(pid)
    momenta = np.zeros((n, 4, 4))
    ids = np.zeros((n, 4), dtype=np.int64)
    if found.any():
        take = ak.from_regular(ak.Array(np.stack([_numpy(i, 0) for i in first], axis=1)[found]), axis=1)
        for column, name in enumerate(("Particle.E", "Particle.Px", "Particle.Py", "Particle.Pz")):
            momenta[found, :, column] = ak.to_numpy(_f64(data[name][found][take]))
        ids[found] = ak.to_numpy(pid[found][take])
    return momenta, ids, found


# ------------------------------------------------------------------ public API
def read_delphes(
    paths: Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]],
    *,
    tree: str = "Delphes",
    max_jets: int = 4,
    jet_pt_min: float = 25.0,
    jet_eta_max: float = 2.5,
    lepton_pt_min: float = 20.0,
    lepton_eta_max: float = 2.5,
    max_events: Optional[int] = None,
    truth: Optional[bool] = True,
    jets: str = "Jet",
    electrons: str = "Electron",
    muons: str = "Muon",
) -> DetectorEvents:
    """Read Delphes ROOT files and select ZW → ℓℓ jj events.

    Jets need pT > ``jet_pt_min`` and |η| < ``jet_eta_max``; ``n_jets`` counts all
    of them, ``jets`` keeps the ``max_jets`` leading (zero padded). Electrons and
    muons need pT > ``lepton_pt_min`` and |η| < ``lepton_eta_max``; the pair is the
    leading ℓ⁻ and ℓ⁺ of the leading lepton's flavour. Events need that pair and
    ≥ 2 jets. With ``truth`` the parton truth is read from the Particle branch;
    selected events without it are dropped with a warning. With ``truth=None`` (new
    data to unfold) the truth is kept where every file has the Particle branches and
    every selected event its partons; otherwise all selected events are kept without
    truth (with a warning when a generator record is there but incomplete).

    Arguments:
        paths: a file or several; ``max_events`` counts events across them in order.
        tree: name of the Delphes tree.
        jets, electrons, muons: names of the collections to read (the leaves of each
            are those of Delphes' Jet, Electron and Muon: PT, Eta, Phi, Mass or Charge).

    Raises:
        DetectorInputError: a file that is missing, not ROOT, without the tree or
            branches, or (with ``truth``) without any parton truth.
    """
    paths = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    if not paths:
        raise DetectorInputError("read_delphes: no input files given")
    if max_jets < 1:
        raise ValueError(f"read_delphes: max_jets must be ≥ 1, got {max_jets}")
    if max_events is not None and max_events < 0:
        raise ValueError(f"read_delphes: max_events must be ≥ 0, got {max_events}")
    auto = truth is None
    if auto:  # the generator record may be there; the detector branches are checked below
        truth = all(_has_branches(path, tree, TRUTH_BRANCHES) for path in paths)
    objects = delphes_branches(jets, electrons, muons)
    names = objects + (TRUTH_BRANCHES if truth else ())

    # Check every file first: a bad last file should fail before the others are read.
    for path in paths:
        _open_tree(path, tree, names, truth)[0].close()

    parts = []
    remaining = max_events
    for path in paths:
        fh, ttree, keys = _open_tree(path, tree, names, truth)
        with fh:
            stop = ttree.num_entries if remaining is None else min(remaining, ttree.num_entries)
            data = {}
            for name, key in keys.items():
                try:
                    data[name] = ttree[key].array(library="ak", entry_stop=stop)
                except Exception as exc:  # noqa: BLE001 - a truncated or damaged file fails in uproot's reader
                    raise _damaged(path, f"branch {key!r} of tree '{tree}'", exc) from None
        if remaining is not None:
            remaining -= stop
        jet_p4, n_jets = _select_jets(data, jets, max_jets, jet_pt_min, jet_eta_max)
        leptons, flavour, pair = _select_leptons(data, (electrons, muons), lepton_pt_min, lepton_eta_max)
        part = {"jets": jet_p4, "n_jets": n_jets, "leptons": leptons, "lepton_flavour": flavour, "pair": pair}
        if truth:
            part["partons"], part["parton_ids"], part["truth"] = _parton_truth(data)
        parts.append(part)

    merged = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    n_read = len(merged["pair"])
    two_jets = merged["pair"] & (merged["n_jets"] >= 2)
    cutflow = {"read": n_read, "sfos_leptons": int(merged["pair"].sum()), "two_jets": int(two_jets.sum())}
    keep = two_jets
    if auto and truth and not merged["truth"][two_jets].all():
        missing = int((two_jets & ~merged["truth"]).sum())
        warnings.warn(
            f"read_delphes: {missing} of {cutflow['two_jets']} selected events have no parton truth (status-23"
            " ℓ⁻ℓ⁺ from a Z and q q̄ from a W), so the events are read without truth", stacklevel=2,
        )
        truth = False
    if truth:
        if n_read and not merged["truth"].any():
            raise DetectorInputError(
                f"{', '.join(map(str, paths))}: no event has the parton truth (status-23 ℓ⁻ℓ⁺ from a Z and q q̄"
                " from a W in the Particle branch); pass truth=False to read detector objects only"
            )
        keep = two_jets & merged["truth"]
        dropped = cutflow["two_jets"] - int(keep.sum())
        if dropped:
            warnings.warn(f"read_delphes: {dropped} of {cutflow['two_jets']} selected events have no parton truth and are dropped", stacklevel=2)
        cutflow["parton_truth"] = int(keep.sum())
    return DetectorEvents(
        leptons=merged["leptons"][keep],
        lepton_flavour=merged["lepton_flavour"][keep],
        jets=merged["jets"][keep],
        n_jets=merged["n_jets"][keep],
        partons=merged["partons"][keep] if truth else None,
        parton_ids=merged["parton_ids"][keep] if truth else None,
        n_generated=n_read,
        cutflow=cutflow,
    )
