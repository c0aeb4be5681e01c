"""Write small Delphes-format ROOT files with uproot, for the reader's and the unfold job's tests."""

import awkward as ak
import numpy as np
import uproot

# Delphes' leaf names and ROOT types, per collection (object tuples follow this order).
FIELDS = {
    "Jet": (("PT", "f4"), ("Eta", "f4"), ("Phi", "f4"), ("Mass", "f4")),
    "Electron": (("PT", "f4"), ("Eta", "f4"), ("Phi", "f4"), ("Charge", "i4")),
    "Muon": (("PT", "f4"), ("Eta", "f4"), ("Phi", "f4"), ("Charge", "i4")),
    "Particle": (("PID", "i4"), ("Status", "i4"), ("M1", "i4"), ("Px", "f4"), ("Py", "f4"), ("Pz", "f4"), ("E", "f4")),
}


def write_delphes(path, events, drop=(), collections=tuple(FIELDS), nested=False, rename=None):
    """Write events (dicts of object-tuple lists) as a Delphes-like tree: "Jet.PT", ..., counters "Jet_size".

    ``nested`` names the branches "Jet/Jet.PT", as uproot lists real Delphes files;
    ``rename`` writes a collection under another name ({"Jet": "JetPUPPI"})."""
    rename = rename or {}
    arrays = {}
    for coll in collections:
        counts = np.array([len(ev[coll]) for ev in events], dtype=np.int64)
        columns = {}
        for k, (name, dtype) in enumerate(FIELDS[coll]):
            if f"{coll}.{name}" not in drop:
                flat = np.array([obj[k] for ev in events for obj in ev[coll]], dtype=dtype)
                columns[name] = ak.unflatten(flat, counts)
        arrays[rename.get(coll, coll)] = ak.zip(columns)
    with uproot.recreate(path) as fh:
        tree = fh.mktree(
            "Delphes",
            {coll: array.type for coll, array in arrays.items()},
            field_name=lambda outer, inner: f"{outer}/{outer}.{inner}" if nested else f"{outer}.{inner}",
            counter_name=lambda counted: f"{counted}_size",
        )
        tree.extend(arrays)
    return path


def _pt_eta_phi_m(p):
    """(pT, η, φ, m) of an (E, px, py, pz) four-momentum, the way Delphes stores its objects."""
    e, px, py, pz = (float(x) for x in p)
    pt = np.hypot(px, py)
    return pt, float(np.arcsinh(pz / pt)), float(np.arctan2(py, px)), float(np.sqrt(max(e * e - pt * pt - pz * pz, 0.0)))


def delphes_records(events, truth=True):
    """Delphes-like records of :class:`~partonic.simulate.detector.DetectorEvents`, for :func:`write_delphes`.

    Leptons go to the Electron or Muon collection by flavour with charge −1 (ℓ⁻) and +1
    (ℓ⁺); the stored jets (at most ``events.max_jets``, so ``n_jets`` is capped there) go
    to Jet. With ``truth`` the Particle record holds the incoming protons, a Z and a W
    (status −22) and the four partons as their status-23 daughters."""
    records = []
    for i in range(len(events)):
        collection = "Electron" if int(events.lepton_flavour[i]) == 11 else "Muon"
        leptons = [(*_pt_eta_phi_m(events.leptons[i, k])[:3], charge) for k, charge in ((0, -1), (1, 1))]
        jets = [_pt_eta_phi_m(events.jets[i, k]) for k in range(min(int(events.n_jets[i]), events.max_jets))]
        record = {"Electron": [], "Muon": [], "Jet": jets, "Particle": []}
        record[collection] = leptons
        if truth:
            partons, ids = events.partons[i], events.parton_ids[i]
            z, w = partons[0] + partons[1], partons[2] + partons[3]
            w_id = 24 if int(ids[2]) % 2 == 0 else -24  # an up-type quark comes from a W⁺
            particles = [(2212, 4, -1, 0.0, 0.0, 6500.0, 6500.0), (2212, 4, -1, 0.0, 0.0, -6500.0, 6500.0),
                         (23, -22, 0, *z[1:], z[0]), (w_id, -22, 0, *w[1:], w[0])]
            for k in range(4):
                particles.append((int(ids[k]), 23, 2 if k < 2 else 3, *partons[k][1:], partons[k][0]))
            record["Particle"] = particles
        records.append(record)
    return records
