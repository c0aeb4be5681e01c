"""Delphes ROOT reader: selection and truth on hand-made files, errors, a loop-based cross-check."""

import math

import numpy as np
import pytest
import uproot
from delphes_files import write_delphes

from partonic.io.delphes import read_delphes
from partonic.simulate.detector import DetectorInputError

ME, MMU = 0.000511, 0.105658  # PDG 2024


def four_vector(pt, eta, phi, m):
    px, py, pz = pt * math.cos(phi), pt * math.sin(phi), pt * math.sinh(eta)
    return np.array([math.sqrt(px * px + py * py + pz * pz + m * m), px, py, pz])


def f32(x):
    """The value as a float32 branch stores it, so the test and the file agree exactly."""
    return float(np.float32(x))


def truth_record(rng, complete=True):
    """A Pythia-like record of u d̄ → Z W with decoys; returns (particles, expected momenta, expected ids).

    Decoys the reader must skip: a status-23 lepton whose mother is a quark (listed
    first), status-5x shower copies, the incoming partons. Decay products get
    status ±23 (Pythia flips it once showered) and come in random order."""
    flavour = int(rng.choice([11, 13]))
    w_sign = int(rng.choice([1, -1]))
    quark, antiquark = (2, -1) if w_sign > 0 else (1, -2)

    def momentum(m):
        p = rng.normal(0.0, 60.0, 3)
        return np.array([math.sqrt(p @ p + m * m), *p])

    truth = {
        flavour: momentum(ME if flavour == 11 else MMU), -flavour: momentum(ME if flavour == 11 else MMU),
        quark: momentum(0.0), antiquark: momentum(0.0),
    }
    particles = []

    def add(pid, status, m1, p):
        particles.append((pid, status, m1, p[1], p[2], p[3], p[0]))
        return len(particles) - 1

    add(2212, 4, -1, np.array([6500.0, 0, 0, 6500.0]))
    add(2212, 4, -1, np.array([6500.0, 0, 0, -6500.0]))
    u = add(2, -21, 0, np.array([300.0, 0, 0, 300.0]))
    add(-1, -21, 1, np.array([200.0, 0, 0, -200.0]))
    z = add(23, -22, u, truth[flavour] + truth[-flavour])
    w = add(24 * w_sign, -22, u, truth[quark] + truth[antiquark])
    add(flavour, 23, u, momentum(0.0))  # status 23 but not from the Z
    groups = [[(flavour, z), (-flavour, z)], [(quark, w), (antiquark, w)] if complete else []]
    for g in rng.permutation(len(groups)):
        group = groups[g]
        for k in rng.permutation(len(group)):
            pid, mother = group[k]
            i = add(pid, int(rng.choice([23, -23])), mother, truth[pid])
            add(pid, 52, i, truth[pid] * 0.99)  # shower copy
    add(21, 51, u, momentum(0.0))
    expected = np.stack([truth[flavour], truth[-flavour], truth[quark], truth[antiquark]])
    return particles, expected, np.array([flavour, -flavour, quark, antiquark])


def event(rng, electrons=(), muons=(), jets=(), complete=True):
    particles, partons, ids = truth_record(rng, complete)
    return {"Electron": list(electrons), "Muon": list(muons), "Jet": list(jets), "Particle": particles,
            "partons": partons, "ids": ids}


def hand_events(rng):
    """Six events whose selection is worked out by hand (comments give the expected outcome)."""
    return [
        # e⁻e⁺ (60, 45) over a softer μ pair and a third electron; 5 of 7 jets pass, stored unsorted.
        event(rng, electrons=[(45.0, 0.3, 1.0, 1), (60.0, -1.2, -2.0, -1), (25.0, 0.5, 0.1, 1)],
              muons=[(30.0, 0.1, 0.2, -1), (22.0, 0.2, 0.3, 1)],
              jets=[(40.0, 0.5, 0.3, 5.0), (120.0, -0.4, 2.0, 12.0), (20.0, 0.0, 0.0, 1.0), (80.0, 2.0, -1.0, 8.0),
                    (300.0, 3.0, 0.0, 10.0), (60.0, 1.0, 1.0, 6.0), (35.0, -2.4, -3.0, 4.0)]),
        # μ⁺ leads; a hard electron at |η| = 2.7 is out; two jets, so two zero rows.
        event(rng, electrons=[(200.0, 2.7, 0.0, -1)], muons=[(90.0, 0.2, 0.5, 1), (50.0, -0.7, -2.5, -1)],
              jets=[(70.0, 0.1, 1.5, 9.0), (30.0, -1.1, -0.5, 3.0)]),
        # Leading e⁻ has no e⁺ partner: fails although a μ pair is there.
        event(rng, electrons=[(80.0, 0.0, 0.0, -1)], muons=[(50.0, 0.1, 1.0, -1), (40.0, 0.2, 2.0, 1)],
              jets=[(70.0, 0.1, 1.5, 9.0), (60.0, -1.1, -0.5, 3.0)]),
        # SFOS pair but one jet in acceptance: passes the leptons, fails two_jets.
        event(rng, electrons=[(50.0, 0.1, 1.0, -1), (40.0, 0.2, 2.0, 1)],
              jets=[(70.0, 0.1, 1.5, 9.0), (24.0, -1.1, -0.5, 3.0)]),
        # Nothing at all.
        event(rng),
        # Electrons below 20 GeV: the μ pair (25, 21) is taken; three jets, one just inside |η| < 2.5.
        event(rng, electrons=[(19.0, 0.1, 1.0, -1), (19.5, 0.2, 2.0, 1)], muons=[(21.0, 1.5, 0.3, 1), (25.0, -2.0, 3.0, -1)],
              jets=[(26.0, 0.1, 1.5, 2.0), (27.0, -2.2, -0.5, 3.0), (28.0, 0.3, 0.5, 1.0)]),
    ]


def assert_f32_close(actual, expected):
    # Branches are float32: ~1e-7 relative per input, momenta up to a few hundred GeV.
    np.testing.assert_allclose(actual, expected, rtol=2e-6, atol=1e-4)


def test_hand_made_events(tmp_path):
    rng = np.random.default_rng(11)
    events = hand_events(rng)
    got = read_delphes(write_delphes(tmp_path / "hand.root", events))

    assert got.cutflow == {"read": 6, "sfos_leptons": 4, "two_jets": 3, "parton_truth": 3}
    assert got.n_generated == 6 and len(got) == 3 and got.max_jets == 4
    np.testing.assert_array_equal(got.lepton_flavour, [11, 13, 13])
    np.testing.assert_array_equal(got.n_jets, [5, 2, 3])
    assert got.leptons.dtype == got.jets.dtype == got.partons.dtype == np.float64

    expected_leptons = [
        [four_vector(60.0, -1.2, -2.0, ME), four_vector(45.0, 0.3, 1.0, ME)],
        [four_vector(50.0, -0.7, -2.5, MMU), four_vector(90.0, 0.2, 0.5, MMU)],
        [four_vector(25.0, -2.0, 3.0, MMU), four_vector(21.0, 1.5, 0.3, MMU)],
    ]
    assert_f32_close(got.leptons, np.array(expected_leptons))

    zero = np.zeros(4)
    expected_jets = [
        [four_vector(120.0, -0.4, 2.0, 12.0), four_vector(80.0, 2.0, -1.0, 8.0),
         four_vector(60.0, 1.0, 1.0, 6.0), four_vector(40.0, 0.5, 0.3, 5.0)],
        [four_vector(70.0, 0.1, 1.5, 9.0), four_vector(30.0, -1.1, -0.5, 3.0), zero, zero],
        [four_vector(28.0, 0.3, 0.5, 1.0), four_vector(27.0, -2.2, -0.5, 3.0), four_vector(26.0, 0.1, 1.5, 2.0), zero],
    ]
    assert_f32_close(got.jets, np.array(expected_jets))

    kept = [0, 1, 5]
    assert_f32_close(got.partons, np.stack([events[i]["partons"] for i in kept]))
    np.testing.assert_array_equal(got.parton_ids, np.stack([events[i]["ids"] for i in kept]))
    # ℓ⁻ (PID > 0) then ℓ⁺, quark then antiquark.
    assert (got.parton_ids[:, 0] > 0).all() and (got.parton_ids[:, 1] < 0).all()
    assert (got.parton_ids[:, 2] > 0).all() and (got.parton_ids[:, 3] < 0).all()

    # More jets kept: the fifth passing jet appears, the rest stays zero.
    wide = read_delphes(tmp_path / "hand.root", max_jets=6)
    assert_f32_close(wide.jets[0, 4], four_vector(35.0, -2.4, -3.0, 4.0))
    assert (wide.jets[0, 5] == 0).all() and (wide.jets[1, 2:] == 0).all()


def test_nested_branch_names_read_the_same(tmp_path):
    rng = np.random.default_rng(7)
    events = hand_events(rng)
    flat = read_delphes(write_delphes(tmp_path / "flat.root", events))
    nested_path = write_delphes(tmp_path / "nested.root", events, nested=True)
    assert "Jet/Jet.PT" in uproot.open(nested_path)["Delphes"].keys(recursive=True)
    nested = read_delphes(nested_path)
    for name, value in flat.arrays().items():
        np.testing.assert_array_equal(getattr(nested, name), value, err_msg=name)


def test_events_without_truth_are_dropped_with_a_warning(tmp_path):
    rng = np.random.default_rng(5)
    good = hand_events(rng)[0]
    no_w = event(rng, electrons=good["Electron"], jets=good["Jet"], complete=False)
    path = write_delphes(tmp_path / "partial.root", [good, no_w, good])
    with pytest.warns(UserWarning, match="1 of 3 selected events have no parton truth"):
        got = read_delphes(path)
    assert len(got) == 2 and got.cutflow["two_jets"] == 3 and got.cutflow["parton_truth"] == 2
    # Without truth nothing is dropped.
    assert len(read_delphes(path, truth=False)) == 3

    none = write_delphes(tmp_path / "none.root", [no_w, no_w])
    with pytest.raises(DetectorInputError, match="no event has the parton truth.*truth=False"):
        read_delphes(none)


def test_missing_branches_are_all_named(tmp_path):
    rng = np.random.default_rng(1)
    path = write_delphes(tmp_path / "broken.root", hand_events(rng), drop=("Muon.Charge", "Jet.Mass"))
    with pytest.raises(DetectorInputError) as info:
        read_delphes(path, truth=False)
    message = str(info.value)
    assert "broken.root" in message and "Muon.Charge" in message and "Jet.Mass" in message


def test_collections_under_other_names(tmp_path):
    """The CMS card's PUPPI jets (JetPUPPI) and renamed lepton collections read as Delphes'
    default ones when named; unnamed, the error names the collections the tree holds."""
    events = hand_events(np.random.default_rng(4))
    default = read_delphes(write_delphes(tmp_path / "default.root", events))
    names = {"Jet": "JetPUPPI", "Electron": "ElectronTight", "Muon": "MuonLoose"}
    path = write_delphes(tmp_path / "renamed.root", events, rename=names, nested=True)
    renamed = read_delphes(path, jets="JetPUPPI", electrons="ElectronTight", muons="MuonLoose")
    for name, value in default.arrays().items():
        np.testing.assert_array_equal(getattr(renamed, name), value, err_msg=name)
    with pytest.raises(DetectorInputError) as info:
        read_delphes(path, electrons="ElectronTight", muons="MuonLoose")
    message = str(info.value)
    assert "Jet.PT" in message and "no collection Jet;" in message and "data.delphes" in message
    assert "collections are ElectronTight, JetPUPPI, MuonLoose, Particle" in message


def test_bad_files_fail_clearly(tmp_path):
    with pytest.raises(DetectorInputError, match="no such file"):
        read_delphes(tmp_path / "absent.root")
    text = tmp_path / "notes.root"
    text.write_text("not a ROOT file\n" * 100)
    with pytest.raises(DetectorInputError, match="notes.root: not a readable ROOT file"):
        read_delphes(text)
    good = write_delphes(tmp_path / "good.root", hand_events(np.random.default_rng(2)))
    with pytest.raises(DetectorInputError, match="no tree 'Events'"):
        read_delphes(good, tree="Events")
    # A bad file anywhere in the list fails before anything is read.
    with pytest.raises(DetectorInputError, match="absent.root"):
        read_delphes([good, tmp_path / "absent.root"])
    # A copy cut short, wherever it stops, is named (uproot's own errors were tracebacks).
    data = good.read_bytes()
    for fraction in (0.1, 0.3, 0.5, 0.7, 0.9, 0.97):
        cut = tmp_path / f"cut_{fraction}.root"
        cut.write_bytes(data[: int(fraction * len(data))])
        with pytest.raises(DetectorInputError, match=f"cut_{fraction}.root"):
            read_delphes(cut)


def test_truth_false_reads_files_without_particles(tmp_path):
    rng = np.random.default_rng(3)
    events = hand_events(rng)
    path = write_delphes(tmp_path / "reco.root", events, collections=("Jet", "Electron", "Muon"))
    with pytest.raises(DetectorInputError, match="Particle.PID.*Particle.E\\b.*truth=False"):
        read_delphes(path)
    got = read_delphes(path, truth=False)
    assert not got.has_truth and got.parton_ids is None
    assert got.cutflow == {"read": 6, "sfos_leptons": 4, "two_jets": 3}
    np.testing.assert_array_equal(got.n_jets, [5, 2, 3])


def test_truth_none_reads_the_truth_only_where_every_selected_event_has_it(tmp_path):
    """New data to unfold: no event is lost for want of a generator record."""
    rng = np.random.default_rng(4)
    events = hand_events(rng)
    full = read_delphes(write_delphes(tmp_path / "full.root", events), truth=None)
    assert full.has_truth and len(full) == 3
    np.testing.assert_array_equal(full.partons, read_delphes(tmp_path / "full.root").partons)
    reco = read_delphes(write_delphes(tmp_path / "reco.root", events, collections=("Jet", "Electron", "Muon")), truth=None)
    assert not reco.has_truth and len(reco) == 3 and "parton_truth" not in reco.cutflow
    # The first selected event loses its W: read without truth, all three kept, with a warning.
    partial = hand_events(np.random.default_rng(4))
    partial[0] = event(np.random.default_rng(5), partial[0]["Electron"], partial[0]["Muon"], partial[0]["Jet"], complete=False)
    with pytest.warns(UserWarning, match="1 of 3 selected events have no parton truth"):
        got = read_delphes(write_delphes(tmp_path / "partial.root", partial), truth=None)
    assert not got.has_truth and len(got) == 3
    np.testing.assert_array_equal(got.jets, reco.jets)
    # Detector branches stay compulsory.
    with pytest.raises(DetectorInputError, match="Jet.Mass"):
        read_delphes(write_delphes(tmp_path / "broken.root", events, drop=("Jet.Mass",)), truth=None)


# ------------------------------------------------------------ loop cross-check
def random_event(rng):
    """Random objects around the cuts (stored values already float32-exact)."""
    def objects(n, pt_range, eta_max, last):
        return [(f32(rng.uniform(*pt_range)), f32(rng.uniform(-eta_max, eta_max)), f32(rng.uniform(-math.pi, math.pi)), last())
                for _ in range(n)]

    charge = lambda: int(rng.choice([-1, 1]))
    ev = event(rng, electrons=objects(rng.integers(0, 5), (10, 120), 3.0, charge),
               muons=objects(rng.integers(0, 5), (10, 120), 3.0, charge),
               jets=objects(rng.integers(0, 8), (10, 200), 3.5, lambda: f32(rng.uniform(0, 20))),
               complete=rng.random() < 0.9)
    ev["Particle"] = [p[:3] + tuple(f32(x) for x in p[3:]) for p in ev["Particle"]]
    return ev


def loop_selection(events, max_jets=4, jet_pt_min=25.0, jet_eta_max=2.5, lepton_pt_min=20.0, lepton_eta_max=2.5):
    """The selection and truth search written as a plain loop over events and particles."""
    rows, cutflow = [], {"read": len(events), "sfos_leptons": 0, "two_jets": 0, "parton_truth": 0}
    for ev in events:
        jets = sorted((j for j in ev["Jet"] if j[0] > jet_pt_min and abs(j[1]) < jet_eta_max), key=lambda j: -j[0])
        leptons = [(pt, eta, phi, q, 11, ME) for pt, eta, phi, q in ev["Electron"]]
        leptons += [(pt, eta, phi, q, 13, MMU) for pt, eta, phi, q in ev["Muon"]]
        leptons = [l for l in leptons if l[0] > lepton_pt_min and abs(l[1]) < lepton_eta_max]
        if not leptons:
            continue
        flavour = max(leptons, key=lambda l: l[0])[4]
        minus = [l for l in leptons if l[4] == flavour and l[3] < 0]
        plus = [l for l in leptons if l[4] == flavour and l[3] > 0]
        if not minus or not plus:
            continue
        cutflow["sfos_leptons"] += 1
        if len(jets) < 2:
            continue
        cutflow["two_jets"] += 1

        parts = ev["Particle"]
        found = {}
        for pid, status, m1, px, py, pz, e in parts:
            mother = parts[m1][0] if 0 <= m1 < len(parts) else 0
            if abs(status) != 23:
                continue
            if abs(pid) in (11, 13) and mother == 23:
                found.setdefault("flavour", abs(pid))
                if abs(pid) == found["flavour"]:
                    found.setdefault("l-" if pid > 0 else "l+", (pid, e, px, py, pz))
            if 1 <= abs(pid) <= 5 and abs(mother) == 24:
                found.setdefault("q" if pid > 0 else "qbar", (pid, e, px, py, pz))
        if not all(k in found for k in ("l-", "l+", "q", "qbar")):
            continue
        cutflow["parton_truth"] += 1

        lep = [max(group, key=lambda l: l[0]) for group in (minus, plus)]
        jet_rows = [four_vector(pt, eta, phi, m) for pt, eta, phi, m in jets[:max_jets]]
        jet_rows += [np.zeros(4)] * (max_jets - len(jet_rows))
        rows.append({
            "leptons": np.stack([four_vector(l[0], l[1], l[2], l[5]) for l in lep]),
            "lepton_flavour": flavour, "jets": np.stack(jet_rows), "n_jets": len(jets),
            "partons": np.array([found[k][1:] for k in ("l-", "l+", "q", "qbar")]),
            "parton_ids": np.array([found[k][0] for k in ("l-", "l+", "q", "qbar")]),
        })
    return rows, cutflow


@pytest.mark.parametrize("max_events", [None, 170])
def test_matches_a_loop_over_events(tmp_path, max_events):
    rng = np.random.default_rng(2024)
    events = [random_event(rng) for _ in range(300)]
    # Two files, so max_events = 170 stops inside the second one.
    paths = [write_delphes(tmp_path / "a.root", events[:120]), write_delphes(tmp_path / "b.root", events[120:])]
    with pytest.warns(UserWarning, match="no parton truth"):
        got = read_delphes(paths, max_events=max_events)
    rows, cutflow = loop_selection(events[:max_events])

    assert got.cutflow == cutflow and got.n_generated == len(events[:max_events])
    assert len(rows) > 40 and len(got) == len(rows)
    for name in ("lepton_flavour", "n_jets", "parton_ids"):
        np.testing.assert_array_equal(getattr(got, name), [r[name] for r in rows], err_msg=name)
    for name in ("leptons", "jets", "partons"):
        # Same float32 inputs on both sides: only float64 rounding differs.
        np.testing.assert_allclose(getattr(got, name), np.stack([r[name] for r in rows]), rtol=1e-12, atol=1e-9, err_msg=name)
    assert (got.n_jets > got.max_jets).any() and (got.lepton_flavour == 11).any() and (got.lepton_flavour == 13).any()
