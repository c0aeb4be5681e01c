"""The unfolding job: ``unfold --card cards/zw.yaml``.

Simulate pp → ZW → ℓℓ jj with ISR (Pythia8 + FastJet + parametrised detector,
cached), or read detector events (HDF5, Delphes ROOT); train the cINN; unfold the
test events with many posterior samples each; write calibration curves, parton-level
distributions per jet channel with ratio panels, the comparison with iterative
Bayesian unfolding, unfolded events as LHE, the model and ``report.json``.

``unfold --card … --model RUN/model.pt --input FILE`` unfolds new detector events
with a trained model, without retraining.
"""

from __future__ import annotations

import copy
import hashlib
import io
import math
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from partonic.cards import card_to_dict, parse_card
from partonic.evaluate.calibration import calibration, noise_floor
from partonic.evaluate.ibu import bin_index, bootstrap_chi2, chi2_ndf, clipped_histogram, ibu_unfold
from partonic.evaluate.metrics import compare_histograms, fwhm
from partonic.evaluate.plots import Series, calibration_plot, ratio_plot
from partonic.io.lhe import LHEEvents, write_lhe
from partonic.io.store import DatasetCache, atomic_target, cache_key
from partonic.jobs.common import JobError, RunFolder, atomic_write_bytes, lhe_init, resolve_device
from partonic.models.cinn import Unfolder, parton_observables, quark_jet_distances
from partonic.physics.constants import M_ELECTRON, M_MUON
from partonic.physics.pdf import AlphaS
from partonic.simulate.detector import CHANNELS, DetectorEvents, DetectorInputError, apply_detector, lepton_pt_resolution
from partonic.train import TrainingError, seed_everything, train

__all__ = ["run", "load_events", "OBSERVABLES", "CALIBRATED", "detector_observables"]

#: observable → (axis label, log y)
OBSERVABLES = {
    "pt_q1": (r"$p_{T,q_1}$ [GeV]", False),
    "pt_q2": (r"$p_{T,q_2}$ [GeV]", False),
    "eta_q1": (r"$\eta_{q_1}$", False),
    "eta_q2": (r"$\eta_{q_2}$", False),
    "m_jj": (r"$m_{jj}$ [GeV]", False),
    "pt_l1": (r"$p_{T,\ell_1}$ [GeV]", False),
    "pt_l2": (r"$p_{T,\ell_2}$ [GeV]", False),
    "eta_l1": (r"$\eta_{\ell_1}$", False),
    "eta_l2": (r"$\eta_{\ell_2}$", False),
    "m_ll": (r"$m_{\ell\ell}$ [GeV]", False),
    "pt_w": (r"$p_{T,W} = p_{T,Z}$ [GeV]", False),
    "m_zw": (r"$m_{ZW}$ [GeV]", False),
    "y_zw": (r"$y_{ZW}$", False),
}
#: the observables with a calibration target (ARCHITECTURE.md report contract)
CALIBRATED = ("pt_q1", "pt_q2", "eta_q1", "m_jj", "pt_l1")
#: functions of partons and detector (ΔR of each quark to the nearest jet): calibration
#: only, no ratio; they test where the posteriors put the quarks relative to the jets
JET_RELATIVE = ("dr_q1_jet", "dr_q2_jet")
#: the calibration target of the ZW cards, max |coverage − q| (drawn in the calibration plots)
CALIBRATION_TARGET = 0.03
#: IBU comparison: parton observable → its detector-level proxy (same name in detector_observables)
IBU_OBSERVABLES = ("m_jj", "pt_q1")
CHANNEL_NAMES = ("inclusive",) + CHANNELS
#: data.lepton_veto: a Z-decay lepton counts as failing the detector's pT threshold
#: only this many standard deviations of the lepton pT resolution below it
LEPTON_VETO_SIGMAS = 6.0
#: default Pythia8 PDF (PDF:pSet = 13) is this set
_PYTHIA_DEFAULT_PDF = ("NNPDF23_lo_as_0130_qed", 0)


# --------------------------------------------------------------------- data
def lepton_veto_cuts(detector) -> dict:
    """The cuts of ``data.lepton_veto``: |η| < the detector's lepton acceptance (which
    the response does not change: it scales lepton momenta), and pT above the lepton
    threshold less LEPTON_VETO_SIGMAS of the worst relative pT resolution there."""
    pt = np.array([detector.lepton_pt_min] * 2)
    worst = float(lepton_pt_resolution(pt, np.array([0.0, np.inf]), detector.lepton_resolution_barrel,
                                       detector.lepton_resolution_endcap, detector.lepton_barrel_eta).max())
    return {"pt_min": detector.lepton_pt_min * max(0.0, 1.0 - LEPTON_VETO_SIGMAS * worst), "eta_max": detector.lepton_eta_max}


def _pythia_events(card, progress: bool) -> tuple[DetectorEvents, dict]:
    from partonic.physics.pdf import PDFError, find_pdf_member
    from partonic.simulate.pythia import simulate_zw

    d = card.data
    generator = {
        "sqrt_s": card.physics.sqrt_s, "z_decay": sorted(set(d.z_decay)), "isr": d.isr, "fsr": d.fsr,
        "hadronisation": d.hadronisation, "mpi": d.mpi,
    }
    # what the generator does beyond the card (changes here must change the cache key)
    key_extra = {"w_decay": "ud,us,cd,cs"}
    objects = {"radius": d.detector.jet_radius, "isolation_dr": d.detector.isolation_dr, "isolation_ratio": d.detector.isolation_ratio}
    if d.lepton_veto:
        objects["lepton_veto"] = lepton_veto_cuts(d.detector)
    pdf = (card.physics.pdf.set, card.physics.pdf.member)
    key = cache_key("zw_particle_level", {"generator": generator, "objects": objects, "pdf": pdf, "n_events": d.n_events, **key_extra}, card.seed)
    cache = DatasetCache()
    loaded = cache.load(key)
    if loaded is None:
        settings = dict(generator)
        if pdf != _PYTHIA_DEFAULT_PDF:
            try:
                settings["pdf_path"] = str(find_pdf_member(*pdf))
            except PDFError as exc:
                raise JobError(str(exc)) from None
        scratch = cache.root / f".{key}.chunks"
        arrays, meta = simulate_zw(d.n_events, card.seed, settings, objects, workers=d.workers, progress=progress, scratch=scratch)
        cache.save(key, arrays, meta)
        shutil.rmtree(scratch, ignore_errors=True)
        meta["cached"] = False
    else:
        arrays, meta = loaded
        meta["cached"] = True
    events, rows = apply_detector(
        arrays["leptons"], arrays["lepton_ids"], arrays["jets"], d.detector, np.random.default_rng([card.seed, 17]),
        partons=arrays["partons"], parton_ids=arrays["parton_ids"], return_rows=True,
    )
    meta["cache_key"] = key
    if "vetoed" in arrays:
        meta["lepton_vetoed"] = int(arrays["vetoed"].sum())
    meta["particle_level"] = {"arrays": arrays, "rows": rows}  # for data.resmear; not reported
    return events, meta


def resmeared_events(arrays: dict, detector, seed: int, realisations: int, exclude: np.ndarray) -> tuple[DetectorEvents, np.ndarray]:
    """More detector realisations of the particle-level events: the detector response
    (jet and lepton smearing, lepton efficiencies, hence the selection) drawn anew,
    ``realisations`` times, for every particle-level event not in ``exclude`` (the rows
    behind the validation and test events, which must stay unseen). Realisation k uses
    the generator [seed, 17, k]; k = 0 is the card's own detector sample.

    Returns the selected events and the particle-level row of each."""
    pool = np.setdiff1d(np.arange(len(arrays["leptons"])), exclude)
    a = {name: arrays[name][pool] for name in ("leptons", "lepton_ids", "jets", "partons", "parton_ids")}
    parts, rows = [], []
    for k in range(1, realisations + 1):
        ev, r = apply_detector(
            a["leptons"], a["lepton_ids"], a["jets"], detector, np.random.default_rng([seed, 17, k]),
            partons=a["partons"], parton_ids=a["parton_ids"], return_rows=True,
        )
        parts.append(ev)
        rows.append(pool[r])
    return _concatenate(parts), np.concatenate(rows)


#: the seed of model.refine.independent_events is the card's plus this
REFINE_SEED_OFFSET = 1_000_000


def independent_refine_events(card, progress: bool = True) -> tuple[DetectorEvents, dict]:
    """Events for the refiner alone (``model.refine.independent_events``): that many more
    generated events, simulated and cached like the card's own with the seed
    card.seed + :data:`REFINE_SEED_OFFSET`, the card's detector applied ``data.resmear``
    + 1 times. The cINN has never seen them, so the classifier learns the cINN's error
    on new events, not on the events it was trained on. Returns the selected events and
    their description for the report."""
    seed = card.seed + REFINE_SEED_OFFSET
    extra_card = card.model_copy(update={"seed": seed, "data": card.data.model_copy(update={"n_events": card.model.refine.independent_events})})
    events, meta = load_events(extra_card, progress)
    particle = meta.pop("particle_level")
    parts = [events]
    if card.data.resmear:
        parts.append(resmeared_events(particle["arrays"], card.data.detector, seed, card.data.resmear, exclude=np.zeros(0, dtype=np.int64))[0])
    out = _concatenate(parts)
    return out, {"source": "independent", "seed": seed, "generated": card.model.refine.independent_events, "realisations": card.data.resmear + 1,
                 "events": len(out), "cached": bool(meta.get("cached"))}


def _concatenate(parts: list[DetectorEvents]) -> DetectorEvents:
    if len(parts) == 1:
        return parts[0]
    jets = max(p.max_jets for p in parts)
    parts = [p.with_jet_slots(jets) for p in parts]
    truth = all(p.has_truth for p in parts)
    return DetectorEvents(
        leptons=np.concatenate([p.leptons for p in parts]),
        lepton_flavour=np.concatenate([p.lepton_flavour for p in parts]),
        jets=np.concatenate([p.jets for p in parts]),
        n_jets=np.concatenate([p.n_jets for p in parts]),
        partons=np.concatenate([p.partons for p in parts]) if truth else None,
        parton_ids=np.concatenate([p.parton_ids for p in parts]) if truth else None,
        n_generated=sum(p.n_generated or len(p) for p in parts),
    )


def read_detector_files(files, detector, truth: bool | None = True, delphes=None) -> DetectorEvents:
    """Detector events from HDF5 (``DetectorEvents.to_hdf5`` layout) or Delphes ROOT files.

    ``truth`` applies to Delphes files: True needs the parton truth, None reads it when
    the files have it (see :func:`partonic.io.delphes.read_delphes`); ``delphes`` (a
    card's data.delphes) names their tree and collections (default: Delphes' own)."""
    names = {} if delphes is None else {"tree": delphes.tree, "jets": delphes.jets, "electrons": delphes.electrons, "muons": delphes.muons}
    paths = [Path(f) for f in files]
    # a bad name anywhere in the list fails before any file is read
    for path in paths:
        if path.suffix.lower() not in (".root", ".h5", ".hdf5"):
            raise DetectorInputError(f"{path}: unknown detector-event format (allowed: .h5/.hdf5 from partonic, .root from Delphes)")
        if not path.exists():
            raise DetectorInputError(f"{path}: no such file")
        if not path.is_file():
            raise DetectorInputError(f"{path}: not a file")
    parts = []
    for path in paths:
        if path.suffix.lower() == ".root":
            from partonic.io.delphes import read_delphes

            parts.append(read_delphes(
                path, max_jets=detector.max_jets, jet_pt_min=detector.jet_pt_min, jet_eta_max=detector.jet_eta_max,
                lepton_pt_min=detector.lepton_pt_min, lepton_eta_max=detector.lepton_eta_max, truth=truth, **names,
            ))
        else:
            parts.append(DetectorEvents.from_hdf5(path))
    without = [str(f) for f, p in zip(paths, parts) if not p.has_truth]
    mixed = 0 < len(without) < len(parts)
    if truth and mixed:
        raise DetectorInputError(f"{', '.join(without)}: no parton truth, which the other files have and training needs in every file")
    if truth is None and mixed:
        warnings.warn(f"{', '.join(without)} {'holds' if len(without) == 1 else 'hold'} no parton truth, the other input files do: "
                      "all are unfolded without truth", stacklevel=2)
    return _concatenate(parts)


def load_events(card, progress: bool = True) -> tuple[DetectorEvents, dict]:
    """The card's detector events with truth, and what is known about how they were made."""
    d = card.data
    try:
        if d.source == "pythia":
            return _pythia_events(card, progress)
        events = read_detector_files(d.files, d.detector, delphes=d.delphes)
    except DetectorInputError as exc:
        raise JobError(str(exc)) from None
    if not events.has_truth:
        raise JobError(f"training needs parton truth, and data.files {d.files} hold none")
    return events, {"files": list(d.files)}


# ------------------------------------------------------------ observables
def detector_observables(events: DetectorEvents) -> dict[str, np.ndarray]:
    """Detector-level counterparts of the parton observables (j₁, j₂ for q₁, q₂)."""
    p = np.concatenate([events.leptons, events.jets[:, :2]], 1)
    return {k: v.numpy() for k, v in parton_observables(torch.as_tensor(p)).items()}


def _edges(values: np.ndarray, name: str, bins: int) -> np.ndarray:
    if name == "m_jj":
        return np.linspace(70.0, 90.0, bins + 1)
    if name == "m_ll":
        return np.linspace(80.0, 100.0, bins + 1)
    if name.startswith("eta") or name == "y_zw":
        hi = float(np.quantile(np.abs(values), 0.995))
        return np.linspace(-hi, hi, bins + 1)
    lo, hi = np.quantile(values, [0.002, 0.99])
    return np.linspace(max(0.0, float(lo)), float(hi), bins + 1)


# ------------------------------------------------------------- evaluation
def _posterior_figures(gen: np.ndarray, truth: np.ndarray, truth_all: np.ndarray, name: str, bins: int):
    """The calibration of samples ``gen`` (N, S) against ``truth`` (N,), the binning of the
    observable (from ``truth_all``, every channel's truth) and the ratio to truth."""
    n, s = gen.shape
    cal = calibration(gen, truth)
    edges = _edges(truth_all, name, bins)
    cmp = compare_histograms(gen.reshape(-1), truth, edges, sample_weights=np.full(n * s, 1.0 / s))
    ratio = {
        "max_bulk_deviation": cmp.max_bulk_deviation, "chi2_ndf": cmp.chi2_ndf,
        # the statistical error of the ratio in that bin, and the largest |pull| of a bulk bin
        "max_bulk_deviation_error": cmp.max_bulk_deviation_error, "max_bulk_pull": cmp.max_bulk_pull,
        # the truth histogram's own relative error in the smallest bulk bin: the
        # floor below which max_bulk_deviation cannot be resolved with this test set
        "statistical_floor": float(1.0 / np.sqrt(max(1.0, 0.01 * n))),
        "ratio": cmp.ratio, "ratio_error": cmp.ratio_error, "edges": cmp.edges,
    }
    return cal, edges, ratio


def posterior_summary(events: DetectorEvents, samples: torch.Tensor, bins: int) -> dict:
    """The headline figures of unfolded ``samples`` without plots, per channel: the
    largest calibration deviation over the calibrated observables, the coverage of
    their central 68% and 95% intervals, and the largest bulk deviation of the
    ratio to truth of pT,q1, pT,q2 and m_jj with the ratios per bin (the report's
    ablation of the refiner, and each ensemble member's figures)."""
    n, s = samples.shape[:2]
    gen = {k: v.view(n, s).numpy() for k, v in parton_observables(samples.reshape(-1, 4, 4)).items()}
    t = Unfolder.tensors(events)
    truth = {k: v.numpy() for k, v in parton_observables(t["partons"]).items()}
    rel_gen = {k: v.numpy() for k, v in quark_jet_distances(samples, t["jets"]).items()}
    rel_truth = {k: v.numpy() for k, v in quark_jet_distances(t["partons"], t["jets"]).items()}
    out = {}
    for channel in CHANNEL_NAMES:
        mask = events.channel_mask(channel)
        if mask.sum() < 20:
            continue
        entry = {"max_calibration_deviation": 0.0, "coverage_68": {}, "coverage_95": {}, "max_bulk_deviation": {}, "ratio": {},
                 "jet_distance_calibration": {name: calibration(rel_gen[name][mask], rel_truth[name][mask]).max_deviation for name in JET_RELATIVE}}
        for name in CALIBRATED:
            cal, _, ratio = _posterior_figures(gen[name][mask], truth[name][mask], truth[name], name, bins)
            entry["max_calibration_deviation"] = max(entry["max_calibration_deviation"], cal.max_deviation)
            entry["coverage_68"][name], entry["coverage_95"][name] = cal.coverage_68, cal.coverage_95
            if name in ("pt_q1", "pt_q2", "m_jj"):
                entry["max_bulk_deviation"][name] = ratio["max_bulk_deviation"]
                entry["ratio"][name] = {k: ratio[k] for k in ("ratio", "ratio_error", "max_bulk_deviation_error", "max_bulk_pull")}
        out[channel] = entry
    return out


def evaluate(events: DetectorEvents, samples: torch.Tensor, card, out: Path, report: dict, train_events: DetectorEvents | None = None) -> list[str]:
    """Calibration, ratios to truth, m_jj width, IBU comparison and plots for unfolded ``samples``."""
    n, s = samples.shape[:2]
    bins = card.evaluation.bins
    gen = {k: v.view(n, s).numpy() for k, v in parton_observables(samples.reshape(-1, 4, 4)).items()}
    t = Unfolder.tensors(events)
    truth = {k: v.numpy() for k, v in parton_observables(t["partons"]).items()}
    det = detector_observables(events)
    rel_gen = {k: v.numpy() for k, v in quark_jet_distances(samples, t["jets"]).items()}
    rel_truth = {k: v.numpy() for k, v in quark_jet_distances(t["partons"], t["jets"]).items()}
    title = rf"pp$\to$ZW$\to\ell\ell jj$, {card.physics.sqrt_s / 1000:g} TeV"
    plots: list[str] = []
    t_start, plot_s = time.perf_counter(), 0.0

    def draw(plot, *args, **kwargs) -> None:
        """Write one plot (PDF and PNG) unless evaluation.plots is false; time it."""
        nonlocal plot_s
        if card.evaluation.plots:
            t0 = time.perf_counter()
            plots.extend(str(p.relative_to(out)) for p in plot(*args, **kwargs))
            plot_s += time.perf_counter() - t0

    cal_report: dict = {}
    ratio_report: dict = {}
    for channel in CHANNEL_NAMES:
        mask = events.channel_mask(channel)
        if mask.sum() < 20:
            continue
        cal_report[channel], ratio_report[channel] = {}, {}
        curves = {}
        for name in OBSERVABLES:
            cal, edges, ratio = _posterior_figures(gen[name][mask], truth[name][mask], truth[name], name, bins)
            cal_report[channel][name] = cal.as_dict()
            ratio_report[channel][name] = ratio
            if name in CALIBRATED:
                curves[name] = (np.asarray(cal.q), np.asarray(cal.coverage))
            label, logy = OBSERVABLES[name]
            draw(ratio_plot,
                 [Series(truth[name][mask], "parton truth"), Series(gen[name][mask].reshape(-1), f"cINN unfolded ({s}/event)", np.full(mask.sum() * s, 1.0 / s)),
                  Series(det[name][mask], "detector level")],
                 edges, label, out / "plots" / channel / name, title=f"{title}, {channel}", logy=logy, ratio_range=(0.5, 1.5))
        for name in JET_RELATIVE:
            cal = calibration(rel_gen[name][mask], rel_truth[name][mask])
            cal_report[channel][name] = cal.as_dict()
            curves[name] = (np.asarray(cal.q), np.asarray(cal.coverage))
        labels = {name: OBSERVABLES[name][0].split(" [")[0] for name in curves if name in OBSERVABLES}
        labels.update({"dr_q1_jet": r"$\Delta R(q_1, j)$", "dr_q2_jet": r"$\Delta R(q_2, j)$"})
        draw(calibration_plot, curves, out / "plots" / channel / "calibration", title=f"{title}, {channel}",
             floor=cal_report[channel][CALIBRATED[0]]["noise_floor"], labels=labels, focus=CALIBRATED, target=CALIBRATION_TARGET)
    report["calibration"] = cal_report
    report["ratio_to_truth"] = ratio_report
    report["max_calibration_deviation"] = {c: max(cal_report[c][o]["max_deviation"] for o in CALIBRATED) for c in cal_report}
    # what a calibrated posterior would show by chance on each channel's test events (95%)
    report["calibration_noise_floor"] = {c: cal_report[c][CALIBRATED[0]]["noise_floor"] for c in cal_report}
    # max_calibration_deviation is the largest of len(CALIBRATED) observables' deviations, which
    # exceeds one observable's floor more often than 5%; for independent observables its 95%
    # point is one's at 0.95^(1/k): an upper bound for correlated ones
    report["calibration_noise_floor_of_max"] = {
        c: noise_floor(cal_report[c][CALIBRATED[0]]["n_events"], s, cal_report[c][CALIBRATED[0]]["q"], level=0.95 ** (1 / len(CALIBRATED)))
        for c in cal_report}
    # no target, but a posterior that is right puts the quarks as far from the jets as the truth is
    report["max_jet_distance_calibration_deviation"] = {c: max(cal_report[c][o]["max_deviation"] for o in JET_RELATIVE) for c in cal_report}

    # the W and Z Breit–Wigner peaks at parton level (m_jj, m_ℓℓ)
    for name, centre, window in (("m_jj", 80.4, 60.0), ("m_ll", 91.2, 20.0)):
        width_t = fwhm(truth[name], None, centre)
        width_u = fwhm(gen[name].reshape(-1), None, centre)
        report[f"{name}_peak"] = {
            "truth_fwhm": width_t, "unfolded_fwhm": width_u, "width_ratio": width_u / width_t,
            "truth_median": float(np.median(truth[name])), "unfolded_median": float(np.median(gen[name])),
            "detector_fwhm": fwhm(det[name], None, centre, window=window, bins=120),
        }

    # the binned reference: iterative Bayesian unfolding with the response of the training events
    if train_events is not None and train_events.has_truth:
        truth_train = {k: v.numpy() for k, v in parton_observables(Unfolder.tensors(train_events)["partons"]).items()}
        det_train = detector_observables(train_events)
        ibu_report = {}
        for name in IBU_OBSERVABLES:
            lo, hi = np.quantile(truth_train[name], [0.01, 0.99])
            edges = np.linspace(lo, hi, bins + 1)
            rlo, rhi = np.quantile(det_train[name], [0.01, 0.99])
            reco_edges = np.linspace(rlo, rhi, bins + 1)
            res = ibu_unfold(truth_train[name], det_train[name], det[name], edges, reco_edges, iterations=card.evaluation.ibu_iterations, prior="truth")
            t_counts = clipped_histogram(truth[name], edges)
            c_counts = clipped_histogram(gen[name].reshape(-1), edges) / s
            d_counts = clipped_histogram(det[name], edges)
            ibu_report[name] = {
                "cinn_chi2_ndf": chi2_ndf(c_counts, t_counts), "ibu_chi2_ndf": chi2_ndf(res.counts, t_counts),
                "detector_chi2_ndf": chi2_ndf(d_counts, t_counts), "bins": bins, "iterations": res.iterations,
                "edges": edges.tolist(), "truth": t_counts.tolist(), "cinn": c_counts.tolist(), "ibu": res.counts.tolist(),
            }
            if card.evaluation.bootstrap:
                # the two χ²/ndf scatter by ~sqrt(2/bins) with the test set: their paired
                # difference and its bootstrap error say whether one method is closer
                unfold_replica = lambda w, name=name, edges=edges, reco_edges=reco_edges: ibu_unfold(
                    truth_train[name], det_train[name], det[name], edges, reco_edges, iterations=card.evaluation.ibu_iterations, prior="truth", test_weights=w).counts
                boot = bootstrap_chi2(bin_index(truth[name], edges), bin_index(gen[name], edges).reshape(n, s), unfold_replica, bins,
                                      card.evaluation.bootstrap, seed=card.seed)
                ibu_report[name].update({
                    "chi2_ndf_difference": ibu_report[name]["cinn_chi2_ndf"] - ibu_report[name]["ibu_chi2_ndf"],
                    "chi2_ndf_difference_error": boot["difference_error"], "bootstrap_replicas": boot["replicas"],
                    "chi2_ndf_difference_error_uncorrected": boot["difference_error_uncorrected"],
                })
            draw(_ibu_plot, edges, t_counts, c_counts, res.counts, res.errors, OBSERVABLES[name][0], out / "plots" / f"ibu_{name}", title)
        report["ibu_comparison"] = ibu_report
    # the evaluation's time, and how much of it the plots took (evaluation.plots = false saves that)
    report.setdefault("timing", {}).update(evaluate_s=time.perf_counter() - t_start, plots_s=plot_s)
    return plots


def _ibu_plot(edges, truth, cinn, ibu, ibu_err, xlabel, path, title):
    import matplotlib.pyplot as plt

    from partonic.evaluate.plots import _save, _style

    _style()
    fig, (ax, rax) = plt.subplots(2, 1, figsize=(7, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.05})
    ax.stairs(truth, edges, color="black", label="parton truth", linewidth=1.6)
    ax.stairs(cinn, edges, color="#3f90da", label="cINN (mean over samples)", linewidth=1.4)
    mids = 0.5 * (edges[1:] + edges[:-1])
    ax.errorbar(mids, ibu, ibu_err, fmt="o", color="#e42536", markersize=3, label="iterative Bayesian unfolding")
    ax.set_ylabel("events per bin")
    ax.legend(title=title, fontsize=10, title_fontsize=10)
    with np.errstate(divide="ignore", invalid="ignore"):
        rax.stairs(np.where(truth > 0, cinn / truth, np.nan), edges, color="#3f90da")
        rax.errorbar(mids, np.where(truth > 0, ibu / truth, np.nan), np.where(truth > 0, ibu_err / truth, np.nan), fmt="o", color="#e42536", markersize=3)
        rel = np.where(truth > 0, 1 / np.sqrt(np.maximum(truth, 1)), 0)
    rax.stairs(1 + rel, edges, baseline=1 - rel, fill=True, alpha=0.25, color="black")
    rax.axhline(1.0, color="black", linewidth=1)
    rax.set_ylim(0.8, 1.2)
    rax.set_ylabel("ratio to truth", fontsize=10)
    rax.set_xlabel(xlabel)
    return _save(fig, path)


# --------------------------------------------------------------------- LHE
def lhe_events(samples: torch.Tensor, flavour: np.ndarray, sigma_pb: float, alpha_em: float = 1 / 132.507,
               alpha_s=None) -> LHEEvents:
    """One unfolded sample per event as u d̄ → Z W⁺ → ℓ⁻ℓ⁺ u d̄ (quark flavours are not
    unfolded: the momenta are, the flavour assignment is a convention), incoming
    partons along the beams so that momentum balances, XWGTUP = σ. AQEDUP is
    ``alpha_em``, AQCDUP ``alpha_s`` (a callable of Q²) at the event's scale
    (default: α_s(M_Z) = 0.130 at one loop, the card's default)."""
    p = samples.double().clone()
    n = len(p)
    # the leptons on their mass shells (the network's partons are massless), as
    # Pythia would otherwise reshuffle them to be
    m_lep = torch.where(torch.as_tensor(flavour) == 13, M_MUON, M_ELECTRON).to(p.dtype)[:, None]
    p[:, :2, 0] = torch.sqrt((p[:, :2, 1:] ** 2).sum(-1) + m_lep**2)
    # and the quarks massless as written: samples kept in float32 (an input unfolded in
    # chunks) carry E² − p² of rounding, up to a few tenths of a GeV² at a TeV
    p[:, 2:, 0] = p[:, 2:, 1:].norm(dim=-1)
    z, w = p[:, 0] + p[:, 1], p[:, 2] + p[:, 3]
    tot = z + w
    zero = torch.zeros(n, dtype=torch.float64)
    ea, eb = (tot[:, 0] + tot[:, 3]) / 2, (tot[:, 0] - tot[:, 3]) / 2
    momenta = torch.stack([torch.stack([ea, zero, zero, ea], 1), torch.stack([eb, zero, zero, -eb], 1), z, w, p[:, 0], p[:, 1], p[:, 2], p[:, 3]], 1)
    row = lambda v: torch.tensor(v, dtype=torch.int64).expand(n, 8).clone()  # noqa: E731
    pid = row([2, -1, 23, 24, 0, 0, 2, -1])
    lep = torch.as_tensor(flavour, dtype=torch.int64)
    pid[:, 4], pid[:, 5] = lep, -lep
    mass = torch.zeros(n, 8, dtype=torch.float64)
    mass[:, 4:6] = m_lep
    mass[:, 2] = (z[:, 0] ** 2 - (z[:, 1:] ** 2).sum(-1)).clamp(min=0).sqrt()
    mass[:, 3] = (w[:, 0] ** 2 - (w[:, 1:] ** 2).sum(-1)).clamp(min=0).sqrt()
    scale = (mass[:, 2] + mass[:, 3]) / 2
    return LHEEvents(
        pid=pid, status=row([-1, -1, 2, 2, 1, 1, 1, 1]), mother1=row([0, 0, 1, 1, 3, 3, 4, 4]), mother2=row([0, 0, 2, 2, 3, 3, 4, 4]),
        color1=row([501, 0, 0, 0, 0, 0, 502, 0]), color2=row([0, 501, 0, 0, 0, 0, 0, 502]),
        momenta=momenta, mass=mass, weight=torch.full((n,), sigma_pb, dtype=torch.float64),
        scale=scale, aqed=torch.tensor(alpha_em, dtype=torch.float64),
        aqcd=(alpha_s or AlphaS(0.130, order=1))(scale * scale).double().cpu(), process_id=torch.tensor(1),
    )


def lhe_pick(samples: torch.Tensor, sqrt_s: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the LHE file takes from each event's samples (N, S, 4, 4): its first sample
    that fits in the beams, whether it has one, and whether its very first sample does
    (see :func:`physical_samples`)."""
    chosen, physical = physical_samples(samples, sqrt_s)
    return chosen, physical, _in_reach(samples[:, 0], sqrt_s)


def _write_lhe(folder: RunFolder, card, picked: tuple, flavour: np.ndarray, sigma_pb: float | None, report: dict) -> None:
    """The LHE file of the events' ``picked`` samples (:func:`lhe_pick`)."""
    n = min(len(picked[0]), card.lhe.max_events or len(picked[0]))
    xs = sigma_pb if sigma_pb else 1.0
    name = "unfolded.lhe.gz" if card.lhe.compress else "unfolded.lhe"
    init = lhe_init(card, xs, version=report["partonic_version"])
    comment = "partonic unfold: one cINN posterior sample per detector event; quark flavours by convention (u dbar)"
    if not sigma_pb:
        comment += "; cross section unknown, weights set to 1"
    chosen, physical, first_ok = (x[:n] for x in picked)
    alpha_s = AlphaS(card.physics.alpha_s.value_mz, order=card.physics.alpha_s.order)
    events = lhe_events(chosen[physical], flavour[:n][physical.numpy()], xs, card.physics.electroweak.alpha_em, alpha_s)
    write_lhe(folder.path / name, events, init, comment=comment)
    report["outputs"]["lhe"] = name
    report["lhe"] = {"events": int(physical.sum()), "dropped_unphysical": int(n - physical.sum()),
                     "first_sample_unphysical": int((physical & ~first_ok).sum())}


def _in_reach(partons: torch.Tensor, sqrt_s: float) -> torch.Tensor:
    """Whether the incoming momentum fractions x₁, x₂ = (E ± p_z)/√s of the final state are ≤ 1."""
    tot = partons.double().sum(-2)
    x1, x2 = (tot[..., 0] + tot[..., 3]) / sqrt_s, (tot[..., 0] - tot[..., 3]) / sqrt_s
    return torch.isfinite(tot).all(-1) & (x1 <= 1.0) & (x2 <= 1.0)


def physical_samples(samples: torch.Tensor, sqrt_s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For each event (N, S, 4, 4), its first posterior sample that fits in the beams
    (x₁, x₂ ≤ 1; the network's tails reach beyond), and whether it has one.
    The true posterior is zero outside, so this only removes what the flow leaks."""
    ok = _in_reach(samples, sqrt_s)
    first = ok.int().argmax(1)
    return samples[torch.arange(len(samples)), first], ok.any(1)


def _save_samples(path: Path, events: DetectorEvents, samples) -> None:
    """unfolded.h5: the posterior samples (N, S, 4, 4) of each event and its detector
    objects. ``samples``: a tensor, or (for inputs unfolded in chunks) a list of
    callables that each return the next events' samples, so that only one part is in
    memory at a time. Written beside ``path`` and renamed into place."""
    import h5py

    parts = [lambda: samples] if isinstance(samples, torch.Tensor) else list(samples)
    with atomic_target(path) as tmp:
        with h5py.File(tmp, "w") as fh:
            fh.attrs["partonic_kind"] = "unfolded_events"
            fh.attrs["parton_order"] = "l-, l+, q, qbar; (E, px, py, pz) GeV; massless"
            ds, lo = None, 0
            for part in parts:
                x = part().float().numpy()
                if ds is None:
                    ds = fh.create_dataset("samples", shape=(len(events), *x.shape[1:]), dtype="f4", compression="lzf",
                                           chunks=(max(1, min(len(events), 256)), *x.shape[1:]))
                ds[lo : lo + len(x)] = x
                lo += len(x)
            if lo != len(events):
                raise RuntimeError(f"unfolded.h5: {lo} events of samples for {len(events)} detector events")
            for name, value in events.arrays().items():
                fh.create_dataset(f"detector/{name}", data=value)


def _summary(report: dict, path: Path) -> str:
    lines = [f"partonic unfold → {path}"]
    if "selection" in report:
        sel = report["selection"]
        lines.append(f"  events: {sel.get('generated', '?')} generated, {sel['selected']} selected; train {report['training_events']}, unfold {report['test_events']} × {report['samples_per_event']} samples")
    if "max_calibration_deviation" in report:
        floor, of_max = report.get("calibration_noise_floor", {}), report.get("calibration_noise_floor_of_max", {})
        dev = ", ".join(f"{c} {v:.3f}" + (f" (noise {floor[c]:.3f}" + (f", of the max {of_max[c]:.3f})" if c in of_max else ")") if c in floor else "")
                        for c, v in report["max_calibration_deviation"].items())
        lines.append(f"  calibration, max |coverage − q| over {', '.join(CALIBRATED)}: {dev}")
    if "max_jet_distance_calibration_deviation" in report:
        dev = ", ".join(f"{c} {v:.3f}" for c, v in report["max_jet_distance_calibration_deviation"].items())
        lines.append(f"    of the quarks' ΔR to the nearest jet (no target): {dev}")
    refine = report.get("refine", {})
    if "test" in refine:
        t = refine["test"]
        ev = refine.get("events", {})
        learnt = f"; learnt from {ev['events']} {ev['source']} events" if ev else ""
        fits = refine.get("fit", {}).get("fits", 1)
        learnt += f" by {fits} classifiers, ln r averaged" if fits > 1 else ""
        kept = t.get("kept_per_event", t["samples_per_event"])
        down = f", resampled to {kept}" if kept != t["samples_per_event"] else ""
        lines.append(f"  refinement: {t['effective_samples_mean']:.1f} effective samples of {t['samples_per_event']} per event (fewest {t['effective_samples_min']:.1f}){down}{learnt}")
    if "unrefined" in refine:
        dev = ", ".join(f"{c} {v['max_calibration_deviation']:.3f}" for c, v in refine["unrefined"].items())
        lines.append(f"    before it, max |coverage − q|: {dev}")
    for name in ("m_jj", "m_ll"):
        if f"{name}_peak" in report:
            pk = report[f"{name}_peak"]
            lines.append(f"  {name} FWHM: truth {pk['truth_fwhm']:.2f} GeV, unfolded {pk['unfolded_fwhm']:.2f} GeV, detector {pk['detector_fwhm']:.1f} GeV")
    for name, v in report.get("ibu_comparison", {}).items():
        line = f"  {name}: χ²/ndf to truth, cINN {v['cinn_chi2_ndf']:.2f} vs IBU {v['ibu_chi2_ndf']:.2f}"
        if "chi2_ndf_difference_error" in v:
            error = v["chi2_ndf_difference_error"]
            if error is not None and math.isfinite(error):
                line += f" (difference {v['chi2_ndf_difference']:+.2f} ± {error:.2f}, {v['bootstrap_replicas']} test-set bootstraps)"
            else:  # the corrected bootstrap error is undetermined: its upper bound
                bound = v.get("chi2_ndf_difference_error_uncorrected", float("nan"))
                line += (f" (difference {v['chi2_ndf_difference']:+.2f}, error ≤ {bound:.2f}: undetermined by"
                         f" {v['bootstrap_replicas']} test-set bootstraps, the bound uncorrected)")
        lines.append(line)
    ensemble = report.get("ensemble", {})
    alone = "alone, before the mixture's refiner" if ensemble.get("refine") == "mixture" else "alone"
    for member in ensemble.get("members", []):
        if "summary" in member:
            dev = ", ".join(f"{c} {v['max_calibration_deviation']:.3f}" for c, v in member["summary"].items())
            lines.append(f"  ensemble member {member['model']} ({member['samples_per_event']} samples/event) {alone}, max |coverage − q|: {dev}")
    if "unfold_samples_per_s" in report.get("timing", {}):
        lines.append(f"  unfolding: {report['timing']['unfold_samples_per_s']:.3g} parton-level samples/s on {report['device']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- run
def channel_weights(n_jets: np.ndarray, balance: float) -> torch.Tensor | None:
    """Per-event sampling weight f_c^(−balance) of the jet channel c (2, 3, ≥ 4 jets)
    holding the fraction f_c of the events; None for balance 0 (no oversampling)."""
    if balance == 0:
        return None
    channel = np.clip(np.asarray(n_jets), 2, 4)
    weights = np.zeros(len(channel))
    for c in (2, 3, 4):
        mask = channel == c
        if mask.any():
            weights[mask] = (mask.mean()) ** (-balance)
    return torch.as_tensor(weights)


def _channel_share(n_jets: np.ndarray, weights: torch.Tensor) -> dict[str, float]:
    """Expected share of each channel among the training draws."""
    channel = np.clip(np.asarray(n_jets), 2, 4)
    w = weights.numpy()
    return {f"{c}j": float(w[channel == c].sum() / w.sum()) for c in (2, 3, 4)}


def _split(n: int, card) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    perm = np.random.default_rng([card.seed, 23]).permutation(n)
    n_test = max(1, int(round(card.data.test_fraction * n)))
    test, rest = perm[:n_test], perm[n_test:]
    n_val = int(round(card.training.validation_fraction * len(rest)))
    return rest[n_val:], rest[:n_val], test


#: what ``--resume`` may change in a finished or interrupted run: the refiner is fitted
#: after the cINN on every run, so a resumed run with another number of samples, epochs,
#: independent events or validation split refits it on the unchanged cINN (minutes instead
#: of the cINN's training). Its width, layers, inputs and fits change the saved model's shape.
REFIT_ON_RESUME = ("model.refine.samples", "model.refine.epochs", "model.refine.independent_events", "model.refine.validation")


def run(card, args) -> int:
    if getattr(args, "model", None) or getattr(args, "input", None):
        return apply_model(card, args)
    device = resolve_device(card.device)
    folder = RunFolder.create(card, device, args.output, args.resume, may_change=REFIT_ON_RESUME)
    report = folder.report_base()
    timing = report["timing"]

    t0 = time.perf_counter()
    events, meta = load_events(card)
    timing["simulate_s"] = time.perf_counter() - t0
    if meta.get("cached") is False and "events_per_s_per_core" in meta:
        timing["simulate_events_per_s"] = card.data.n_events / meta["wall_s"]
        timing["simulate_events_per_s_per_core"] = meta["events_per_s_per_core"]
    report["selection"] = {**events.cutflow, "selected": len(events), "channels": {c: int(events.channel_mask(c).sum()) for c in CHANNELS}}
    if meta.get("sigma_pb"):
        report["cross_section_pb"] = float(meta["sigma_pb"])
        report["fiducial_cross_section_pb"] = float(meta["sigma_pb"]) * len(events) / max(1, events.n_generated or len(events))
    report["data"] = {k: v for k, v in meta.items() if k in ("cache_key", "cached", "files", "n_failed", "errors", "workers", "lepton_vetoed")}
    particle = meta.pop("particle_level", None)
    if len(events) < 50:
        raise JobError(f"only {len(events)} events pass the selection; raise data.n_events")

    tr, va, te = _split(len(events), card)
    base_ev, val_ev, test_ev = events.subset(tr), events.subset(va), events.subset(te)
    del events
    if card.evaluation.test_events:
        test_ev = test_ev.subset(slice(0, card.evaluation.test_events))
    report["training_events"], report["validation_events"], report["test_events"] = len(base_ev), len(val_ev), len(test_ev)
    report["samples_per_event"] = card.evaluation.samples_per_event
    held_out = particle["rows"][np.concatenate([va, te])] if card.data.resmear else None
    n_members = card.model.ensemble
    mixture_refine = n_members > 1 and card.evaluation.ensemble_refine == "mixture"
    refine_events: tuple | None = None  # model.refine.independent_events, simulated once for every member

    def member_refine_events(train_events):
        nonlocal refine_events
        if not card.model.refine.independent_events:
            return train_events, {"source": "training", "events": len(train_events)}
        if refine_events is None:
            t0 = time.perf_counter()
            refine_events = independent_refine_events(card)
            timing["refine_simulate_s"] = time.perf_counter() - t0
        return refine_events

    members, member_info = [], []
    for k in range(n_members):
        seed = card.seed + MEMBER_SEED_STEP * k
        member_report: dict = {}
        train_ev, refine_ev = _member_training_events(base_ev, particle, held_out, card, seed, member_report)
        if k == 0:
            report.update(member_report)
            first_train_ev, first_refine_ev = train_ev, refine_ev
        unfolder, fit = _train_member(train_ev, val_ev, card, seed, folder.path / f"member{k}" if k else folder.path, args.resume, device,
                                      timing if k == 0 else {}, label=f" {k + 1}/{n_members}" if n_members > 1 else "")
        del train_ev
        if unfolder.refiner is not None and not mixture_refine:
            unfolder.eval()
            r = card.model.refine
            refine_ev, events_info = member_refine_events(refine_ev)
            t0 = time.perf_counter()
            fit["refine"] = {"events": events_info, "fit": unfolder.fit_refiner(refine_ev, r.samples, r.epochs, seed=seed + 53, batch_size=card.evaluation.batch_size,
                                                                                validation=r.validation)}
            timing["refine_fit_s"] = timing.get("refine_fit_s", 0.0) + time.perf_counter() - t0
        del refine_ev
        members.append(unfolder.eval())
        member_info.append({"seed": seed, **fit})
    del particle, base_ev
    report["training"] = member_info[0]["training"]
    if "training_channel_share" in member_info[0]:
        report["training_channel_share"] = member_info[0]["training_channel_share"]
    if n_members > 1:
        timing["train_s"] = sum(info["train_s"] for info in member_info)
    if n_members == 1 and "refine" in member_info[0]:
        report["refine"] = member_info[0]["refine"]
    mixture = None
    if mixture_refine:
        refine_ev, events_info = member_refine_events(first_refine_ev)
        t0 = time.perf_counter()
        mixture, fit = fit_mixture_refiner(members, refine_ev, card, seed=card.seed + 53)
        timing["refine_fit_s"] = time.perf_counter() - t0
        report["refine"] = {"events": events_info, "fit": fit}
        del refine_ev
    refine_events = first_refine_ev = None
    _save_model(folder, report, members, mixture)

    if n_members == 1:
        samples = _unfold(members[0], test_ev, card, timing, report)
    else:
        samples = _ensemble_unfold([(f"member{k}", u) for k, u in enumerate(members)], test_ev, card, timing, report, mixture=mixture)
        for entry, info in zip(report["ensemble"]["members"], member_info):
            for key, value in info.items():  # a member's own refiner: its fit beside its test figures
                entry[key] = {**value, **entry[key]} if key == "refine" and key in entry else value
    if members[0].pairs:
        report["pairing"] = {"fit": member_info[0].get("pairing_fit"), "test": members[0].pairing_summary(test_ev)}
    plots = evaluate(test_ev, samples, card, folder.path, report, train_events=first_train_ev)
    _save_samples(folder.path / "unfolded.h5", test_ev, samples)
    report["outputs"]["samples"] = "unfolded.h5"
    if card.lhe.write:
        _write_lhe(folder, card, lhe_pick(samples, card.physics.sqrt_s), test_ev.lepton_flavour, report.get("fiducial_cross_section_pb"), report)
    report["outputs"]["plots"] = plots
    folder.write_report(report)
    print(_summary(report, folder.path))
    return 0


def _member_training_events(base: DetectorEvents, particle: dict | None, held_out: np.ndarray | None, card, seed: int,
                            report: dict) -> tuple[DetectorEvents, DetectorEvents]:
    """One ensemble member's training events: the card's training split with
    data.resmear more detector realisations drawn from ``seed`` (never of the validation
    and test events' particle-level rows, ``held_out``), then with data.symmetrise the
    rotated copies. Returns them and the events its refiner would learn from when it has
    no independent events (the same, without the rotated copies: half the time, and the
    rotation is a symmetry the cINN's samples already share); counts go into ``report``."""
    train_ev = base
    if card.data.resmear:
        extra, _ = resmeared_events(particle["arrays"], card.data.detector, seed, card.data.resmear, exclude=held_out)
        train_ev = _concatenate([train_ev, extra])
        report["training_events_resmeared"] = len(extra)
    refine_ev = train_ev
    if card.data.symmetrise:
        train_ev = _concatenate([train_ev, train_ev.rotated()])
        report["training_events_symmetrised"] = len(train_ev)
    return train_ev, refine_ev


def _train_member(train_ev: DetectorEvents, val_ev: DetectorEvents, card, seed: int, run_dir: Path, resume: bool, device,
                  timing: dict, label: str = "") -> tuple[Unfolder, dict]:
    """A cINN (with its pairing classifier) trained from ``seed`` on ``train_ev``,
    checkpointed in ``run_dir``; its training (and pairing fit) summary."""
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    unfolder = Unfolder(card.data.detector.max_jets, card.model).fit(train_ev)
    data = unfolder.training_data(train_ev)
    val = unfolder.training_data(val_ev) if len(val_ev) else None
    info: dict = {}
    if unfolder.pairs:
        if val is None:
            raise JobError("model.pairing = classifier needs validation events (training.validation_fraction > 0)")
        t0 = time.perf_counter()
        m = card.model
        info["pairing_fit"] = unfolder.fit_pairing(data, val, epochs=m.pairing_epochs, dropout=m.pairing_dropout, batch_size=card.training.batch_size,
                                                   seed=seed, device=device)
        timing["pairing_fit_s"] = time.perf_counter() - t0
    weights = channel_weights(train_ev.n_jets, card.data.channel_balance)
    if weights is not None:
        info["training_channel_share"] = _channel_share(train_ev.n_jets, weights)
    try:
        result = train(unfolder, lambda m, b: m.loss(b), data, card.training, run_dir, seed=seed, device=device,
                       val_data=val, resume=resume, description="training cINN" + label, sample_weights=weights)
    except TrainingError as exc:
        raise JobError(str(exc)) from None
    timing["train_s"] = result.train_s
    timing["train_s_per_epoch"] = result.train_s / max(result.epochs, 1e-9)
    info["training"] = result.summary(kept_best=card.training.keep_best)
    info["train_s"] = result.train_s
    return unfolder, info


#: model.pt of an ensemble (``model.ensemble`` > 1): every member's state and the mixture's refiner
ENSEMBLE_KIND = "partonic-unfold-ensemble"


def _save_model(folder: RunFolder, report: dict, members: list[Unfolder], mixture: Unfolder | None) -> None:
    """model.pt: the cINN (kind partonic-unfold-cinn) or, for an ensemble, every member and
    the mixture's refiner (held as the refitted copy of the first member)."""
    meta = {"card": report["card"], "version": report["partonic_version"]}
    if len(members) == 1:
        state = {"kind": "partonic-unfold-cinn", "state_dict": members[0].state_dict(), **meta}
    else:
        state = {"kind": ENSEMBLE_KIND, "members": [u.state_dict() for u in members],
                 "mixture": mixture.state_dict() if mixture is not None else None, **meta}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(folder.path / "model.pt", buffer.getvalue())
    report["outputs"]["model"] = "model.pt"


def _unfold(unfolder: Unfolder, events: DetectorEvents, card, timing: dict, report: dict, n_samples: int | None = None, seed: int | None = None,
            refine: bool = True, diagnostics: dict | None = None, label: str = "") -> torch.Tensor:
    """Unfold ``events`` (``n_samples`` per event, default the card's; seeds from ``seed``,
    default the card's); with a fitted refiner (and ``refine``), resample and record in
    ``report["refine"]`` the weights' spread and, with truth, the figures of the samples
    before resampling (or, given ``diagnostics``, put those samples there to be summarised
    later: see :func:`_summarise_diagnostics`). ``label``: added to the progress bar."""
    s = n_samples or card.evaluation.samples_per_event
    seed = card.seed if seed is None else seed
    refining = refine and unfolder.refined
    # evaluation.refine_oversample: the refiner resamples that many times s down to s
    drawn = s * (card.evaluation.refine_oversample if refining else 1)
    device = next(unfolder.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with tqdm(total=len(events), unit="ev", desc=f"unfolding{label} ({drawn} samples/event)") as bar:
        samples = unfolder.unfold(events, drawn, batch_size=card.evaluation.batch_size, seed=seed + 101, progress=bar, refine=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    timing["sample_s"] = time.perf_counter() - t0
    timing["unfold_samples_per_s"] = len(events) * drawn / timing["sample_s"]
    if unfolder.region_stats is not None:
        # model.quark_regions: the share of samples outside their label's region (the cINN's leak, kept)
        report["quark_regions"] = {"kind": unfolder.regions, **unfolder.region_stats}
    if refining:
        samples = _refine(unfolder, events, samples, card, seed + 103, timing, report, n_out=s, diagnostics=diagnostics)
    return samples


def _refine(unfolder: Unfolder, events: DetectorEvents, raw: torch.Tensor, card, seed: int, timing: dict, report: dict,
            n_out: int | None = None, diagnostics: dict | None = None) -> torch.Tensor:
    """``raw`` resampled by the unfolder's refiner into ``n_out`` (default as many) samples
    per event; the weights' spread and, with truth, the figures of ``raw`` (its first
    n_out samples per event, a draw of the unrefined posterior of the same size) in
    ``report["refine"]``, or those samples in ``diagnostics`` (keyed by where their
    figures go in the report)."""
    t0 = time.perf_counter()
    samples, weights = unfolder.refine_samples(events, raw, seed=seed, n_out=n_out)
    timing["refine_s"] = time.perf_counter() - t0
    refine = report.setdefault("refine", {})
    refine["test"] = weights
    if events.has_truth:
        first = raw[:, : samples.shape[1]]
        # kept for later: a copy, so that the oversampled raw samples can go
        _diagnose(events, first if diagnostics is None else first.clone(), card, ("refine", "unrefined"), report, diagnostics)
    return samples


def _diagnose(events: DetectorEvents, samples: torch.Tensor, card, where: tuple, report: dict, diagnostics: dict | None) -> None:
    """The figures of ``samples`` (posterior_summary) at ``where`` in ``report`` now, or,
    given ``diagnostics``, the samples kept there under ``where`` for later."""
    if diagnostics is not None:
        diagnostics[where] = samples
        return
    entry = report
    for key in where[:-1]:
        entry = entry[key]
    entry[where[-1]] = posterior_summary(events, samples, card.evaluation.bins)


def _summarise_diagnostics(events: DetectorEvents, diagnostics: dict, card, report: dict) -> None:
    """Put the figures of the samples kept in ``diagnostics`` (see :func:`_diagnose`) into
    ``report``."""
    for where, samples in diagnostics.items():
        _diagnose(events, samples, card, where, report, None)


def fit_mixture_refiner(unfolders: list[Unfolder], events: DetectorEvents, card, seed: int) -> tuple[Unfolder, dict]:
    """One refiner for an ensemble's mixture (``evaluation.ensemble_refine: mixture``):
    a copy of the first member whose new classifier (sized by the card's model.refine)
    separates the parton truth of ``events`` from the members' samples before their own
    refiners, an equal share from each, ⌈model.refine.samples / members⌉ per member and
    event. At the optimum its ratio is p_truth / q_mixture, which resampling then
    corrects, including any widening of the posteriors by mixing members that disagree.
    ``seed`` seeds the classifier's initial weights and its fit. Returns the copy and
    the classifier's fit summary."""
    r = card.model.refine
    mixture = copy.deepcopy(unfolders[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the classifier's initial weights: the run is reproducible
        mixture.new_refiner(r.width, r.layers, r.inputs, r.fits)

    def sampler(ev, n, s):
        share = -(-n // len(unfolders))
        return torch.cat([u.unfold(ev, share, batch_size=card.evaluation.batch_size, seed=s + MEMBER_SEED_STEP * i, refine=False)
                          for i, u in enumerate(unfolders)], 1)

    info = mixture.fit_refiner(events, r.samples, r.epochs, seed=seed, batch_size=card.evaluation.batch_size, sampler=sampler, validation=r.validation)
    return mixture, info


#: the parton representation of models saved before ``model.azimuth``, ``quark_label``,
#: ``leptons`` and ``decay_angle`` existed (the first three defaults have changed since)
_LEGACY_REPRESENTATION = {"azimuth": "interval", "quark_label": "energy", "leptons": "momenta", "decay_angle": "atanh"}


def load_models(path: str | Path, device: torch.device) -> tuple[list[Unfolder], object, Unfolder | None]:
    """The trained :class:`Unfolder` (or every member of a ``model.ensemble`` run), the
    card it was trained with, and an ensemble's mixture refiner (held as a refitted copy
    of its first member; None for one model or an ensemble refined by its members)."""
    path = Path(path)
    if not path.is_file():
        raise JobError(f"--model {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error here
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise JobError(f"--model {path}: not a readable model file ({first}); give the model.pt of a finished unfold run") from None
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind not in ("partonic-unfold-cinn", ENSEMBLE_KIND):
        raise JobError(f"--model {path}: not a partonic unfolding model (expected the model.pt of an unfold run)")
    card = copy.deepcopy(state["card"])
    if isinstance(card, dict) and isinstance(card.get("model"), dict):
        # models trained before these options existed used the first representation
        for key, value in _LEGACY_REPRESENTATION.items():
            card["model"].setdefault(key, value)
    trained = parse_card(card, source=f"{path} (card)")

    def build(state_dict):
        unfolder = Unfolder(trained.data.detector.max_jets, trained.model)
        unfolder.load_state_dict(state_dict)
        return unfolder.to(device).eval()

    if kind == ENSEMBLE_KIND:
        return [build(sd) for sd in state["members"]], trained, build(state["mixture"]) if state.get("mixture") is not None else None
    return [build(state["state_dict"])], trained, None


def load_model(path: str | Path, device: torch.device) -> tuple[Unfolder, object]:
    """A trained :class:`Unfolder` and the card it was trained with (one model, not an ensemble)."""
    members, trained, _ = load_models(path, device)
    if len(members) > 1:
        raise JobError(f"--model {path}: holds an ensemble of {len(members)} models; load it with load_models")
    return members[0], trained


#: the seeds of an ensemble's member k are the card's (or the refiner's) plus k times this
MEMBER_SEED_STEP = 7919


def _ensemble_unfold(members: list[tuple[str, Unfolder]], events: DetectorEvents, card, timing: dict, report: dict,
                     mixture: Unfolder | None = None, seed: int | None = None, diagnostics: dict | None = None, label: str = "") -> torch.Tensor:
    """The mixture of the members' posteriors: member k draws its share of the card's
    samples per event (seeds apart by k), each with its own refiner, or, given the
    ``mixture``'s refiner (:func:`fit_mixture_refiner`), without them; the samples of each
    event are then shuffled, so that any one of them (the LHE file's) comes from a member
    chosen at random, and resampled by the mixture's refiner. The report holds each
    member's headline figures (or ``diagnostics`` the samples behind them, as in
    :func:`_unfold`); seeds from ``seed``, default the card's."""
    seed = card.seed if seed is None else seed
    s, k = card.evaluation.samples_per_event, len(members)
    shares = [s // k + (1 if i < s % k else 0) for i in range(k)]
    # with the mixture's refiner and evaluation.refine_oversample, the members draw that
    # many times their shares, and the mixture's refiner resamples them down to s
    over = card.evaluation.refine_oversample if mixture is not None else 1
    parts, info = [], []
    for i, ((path, unfolder), n) in enumerate(zip(members, shares)):
        member_timing, member_report, member_diag = {}, {}, ({} if diagnostics is not None else None)
        part = _unfold(unfolder, events, card, member_timing, member_report, n_samples=n * over, seed=seed + MEMBER_SEED_STEP * i, refine=mixture is None,
                       diagnostics=member_diag, label=f"{label} member {i + 1}/{k}")
        entry = {"model": path, "samples_per_event": part.shape[1], "timing": member_timing, **member_report}
        info.append(entry)
        if events.has_truth and diagnostics is None:
            entry["summary"] = posterior_summary(events, part, card.evaluation.bins)
        elif events.has_truth:
            diagnostics[("ensemble", "members", i, "summary")] = part
        for where, kept in (member_diag or {}).items():
            diagnostics[("ensemble", "members", i, *where)] = kept
        parts.append(part)
    samples = torch.cat(parts, 1)
    del parts
    order = torch.argsort(torch.rand(samples.shape[:2], generator=torch.Generator().manual_seed(seed + 107)), 1)
    samples = samples[torch.arange(len(samples))[:, None], order]
    timing["sample_s"] = sum(e["timing"]["sample_s"] for e in info)
    timing["unfold_samples_per_s"] = len(events) * samples.shape[1] / timing["sample_s"]
    report["ensemble"] = {"members": info, "refine": "members" if mixture is None else "mixture"}
    if mixture is not None:
        samples = _refine(mixture, events, samples, card, seed + 109, timing, report, n_out=s, diagnostics=diagnostics)
    return samples


def _mixture_refine_card(card, trained):
    """The card whose independent events teach an ensemble's mixture refiner: the first
    member's data section (its generator and detector) with this card's seed and
    model.refine; a clear error where there is nothing to simulate them with."""
    r = card.model.refine
    why = None
    if r.method != "classifier":
        why = f"model.refine.method = classifier (the card has {r.method!r})"
    elif not r.independent_events:
        why = "model.refine.independent_events > 0 (the card has 0, and there are no training events here)"
    elif trained.data.source != "pythia":
        why = f"members trained on data.source = pythia, whose generator simulates the events (the first member's is {trained.data.source!r})"
    if why:
        raise JobError(f"evaluation.ensemble_refine = mixture needs {why}; or set evaluation.ensemble_refine = members")
    return trained.model_copy(update={"seed": card.seed, "model": trained.model.model_copy(update={"refine": r})})


def apply_model(card, args) -> int:
    """Unfold ``--input`` with the trained ``--model`` (or the mixture of several);
    evaluate against truth when the input has it."""
    paths = [args.model] if isinstance(args.model, str) else list(args.model or [])
    inputs = [args.input] if isinstance(args.input, str) else list(args.input or [])
    if not (paths and inputs):
        raise JobError("unfolding new data needs both --model RUN/model.pt and --input FILE")
    device = resolve_device(card.device)
    loaded = [(str(p), *load_models(p, device)) for p in paths]
    # an ensemble's model.pt brings its members (named path#k) and, refined as a mixture, its fitted refiner
    members = [(name if len(units) == 1 else f"{name}#{k}", u, trained) for name, units, trained, _ in loaded for k, u in enumerate(units)]
    stored_mixture = loaded[0][3] if len(loaded) == 1 and card.evaluation.ensemble_refine == "mixture" else None
    for name, units, _, mix in loaded:
        if mix is not None and card.evaluation.ensemble_refine == "members" and not any(u.refined for u in units):
            # trained with ensemble_refine = mixture: the members have no refiners of their own
            warnings.warn(f"--model {name}: its members were trained to be refined as a mixture and have no refiners of their own; "
                          "with evaluation.ensemble_refine = members their samples are not refined (set it to mixture to use the stored refiner)", stacklevel=2)
    _, unfolder, trained = members[0]
    for path, _, other in members[1:]:
        if other.data.detector != trained.data.detector:
            raise JobError(f"--model {path}: trained with another detector section than --model {paths[0]}; an ensemble needs one detector")
    if card.evaluation.samples_per_event < len(members):
        # before any simulation or refiner fit: each member draws at least one sample per event
        raise JobError(f"an ensemble of {len(members)} models needs evaluation.samples_per_event ≥ {len(members)}, got {card.evaluation.samples_per_event}")
    fit_mixture = len(members) > 1 and card.evaluation.ensemble_refine == "mixture" and stored_mixture is None
    if fit_mixture:
        ensemble_card = _mixture_refine_card(card, trained)
    output = args.output or str(Path(card.output or Path("runs") / card.name).with_name(f"{card.name}_unfolded"))
    try:
        # the trained card's selection; this card's names for the files' collections. Read
        # before the run folder is made, so that a bad input leaves no folder behind
        events = read_detector_files(inputs, trained.data.detector, truth=None, delphes=card.data.delphes)
    except DetectorInputError as exc:
        raise JobError(str(exc)) from None
    if len(events) == 0:
        raise JobError(f"--input {' '.join(map(str, inputs))}: no event passes the selection")
    try:
        events = events.with_jet_slots(trained.data.detector.max_jets)
    except DetectorInputError as exc:
        raise JobError(f"--input {' '.join(map(str, inputs))}: {exc} (the model was trained with {trained.data.detector.max_jets})") from None
    folder = RunFolder.create(card, device, output, args.resume)
    report = folder.report_base()
    report["model"] = str(paths[0]) if len(paths) == 1 else [str(p) for p in paths]
    report["input"] = str(inputs[0]) if len(inputs) == 1 else [str(f) for f in inputs]
    if card.evaluation.test_events:
        events = events.subset(slice(0, card.evaluation.test_events))
    report["test_events"] = len(events)
    report["input_has_truth"] = events.has_truth
    report["samples_per_event"] = card.evaluation.samples_per_event
    mixture = stored_mixture

    def unfold_chunk(ev: DetectorEvents, seed: int, part_report: dict, diagnostics: dict, label: str) -> torch.Tensor:
        nonlocal mixture
        if len(members) == 1:
            return _unfold(unfolder, ev, card, part_report["timing"], part_report, seed=seed, diagnostics=diagnostics, label=label)
        if fit_mixture and mixture is None:  # only when a chunk is left to unfold
            t0 = time.perf_counter()
            refine_ev, events_info = independent_refine_events(ensemble_card)
            report["timing"]["refine_simulate_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            mixture, fit = fit_mixture_refiner([u for _, u, _ in members], refine_ev, card, seed=card.seed + 53)
            report["timing"]["refine_fit_s"] = time.perf_counter() - t0
            report["refine"] = {"events": events_info, "fit": fit}
            del refine_ev
        return _ensemble_unfold([(p, u) for p, u, _ in members], ev, card, part_report["timing"], part_report, mixture=mixture, seed=seed,
                                diagnostics=diagnostics, label=label)

    # what a kept chunk must have been unfolded with: the models, the seed, the settings that shape the samples
    e = card.evaluation
    settings = {"models": [[str(p), _file_digest(p)] for p in paths], "seed": card.seed, "samples_per_event": e.samples_per_event,
                "refine_oversample": e.refine_oversample, "ensemble_refine": e.ensemble_refine, "batch_size": e.batch_size,
                "mixture_refine": card_to_dict(card)["model"]["refine"] if fit_mixture else None}
    chunks = ChunkedUnfolding(folder.path / "chunks", settings, card.evaluation.chunk_events, card.physics.sqrt_s)
    result = chunks.run(events, unfold_chunk, report)
    if events.has_truth:  # the chunks read back once, for the evaluation and unfolded.h5
        samples, diagnostics = result.load()
        _summarise_diagnostics(events, diagnostics, card, report)
        del diagnostics
        plots = evaluate(events, samples, card, folder.path, report)
        _save_samples(folder.path / "unfolded.h5", events, samples)
        del samples
    else:  # one chunk in memory at a time
        plots = []
        _save_samples(folder.path / "unfolded.h5", events, result.parts())
    report["outputs"]["samples"] = "unfolded.h5"
    report["outputs"]["model"] = report["model"]
    if card.lhe.write:
        _write_lhe(folder, card, result.lhe_picked, events.lepton_flavour, None, report)
    report["outputs"]["plots"] = plots
    folder.write_report(report)
    chunks.remove()
    print(_summary(report, folder.path))
    return 0


def _file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _events_digest(events: DetectorEvents) -> str:
    h = hashlib.sha256()
    for name, value in events.arrays().items():
        if name in ("leptons", "lepton_flavour", "jets", "n_jets"):
            h.update(name.encode())
            h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


#: the seeds of chunk k (k > 0) of ``unfold --model … --input`` are the card's plus k times this
CHUNK_SEED_STEP = 104_729
#: the layout of a kept chunk's file (a chunk of another layout is unfolded again)
CHUNK_FORMAT = 1


class ChunkedUnfolding:
    """``unfold --model … --input`` over the input ``chunk_events`` events at a time
    (evaluation.chunk_events). Each finished chunk is written to ``folder`` (one file,
    renamed into place: its samples, what the report records of it and, with truth, the
    samples behind the diagnostic figures) under a key of the ``settings`` and its
    events; a resumed run keeps the chunks whose key matches and unfolds the others.
    Chunk 0 is seeded as an unchunked run (the card's seed), chunk k by the card's seed
    + k · :data:`CHUNK_SEED_STEP`, so a resumed run gives what an uninterrupted one does."""

    def __init__(self, folder: Path, settings: dict, chunk_events: int, sqrt_s: float):
        self.folder, self.chunk_events, self.sqrt_s = Path(folder), int(chunk_events), sqrt_s
        self.settings = hashlib.sha256(repr(sorted({**settings, "format": CHUNK_FORMAT}.items())).encode()).hexdigest()
        self.files: list[Path] = []
        self.sizes: list[int] = []
        self.lhe_picked: tuple | None = None

    def _key(self, k: int, lo: int, hi: int, events: DetectorEvents) -> str:
        return f"{self.settings}:{k}:{lo}:{hi}:{_events_digest(events)}"

    def _load(self, path: Path, key: str) -> dict | None:
        if not path.exists():
            return None
        try:
            record = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # an unreadable file: unfold that chunk again
            warnings.warn(f"{path}: unreadable ({type(exc).__name__}: {exc}); unfolding its events again", stacklevel=2)
            return None
        return record if isinstance(record, dict) and record.get("key") == key else None

    def run(self, events: DetectorEvents, unfold_chunk, report: dict) -> "ChunkedUnfolding":
        """Unfold ``events`` with ``unfold_chunk(events, seed, part_report, diagnostics,
        label)`` chunk by chunk, keeping finished chunks; the chunks' report entries are
        merged into ``report`` (:func:`merge_chunk_reports`)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        n, c = len(events), self.chunk_events
        bounds = [(lo, min(lo + c, n)) for lo in range(0, n, c)]
        seed0 = report["seed"]
        parts, kept, picked = [], 0, []
        for k, (lo, hi) in enumerate(bounds):
            ev = events.subset(slice(lo, hi))
            path = self.folder / f"chunk_{k:05d}.pt"
            key = self._key(k, lo, hi, ev)
            record = self._load(path, key)
            if record is None:
                part_report, diagnostics = {"timing": {}}, {}
                label = f" chunk {k + 1}/{len(bounds)}" if len(bounds) > 1 else ""
                samples = unfold_chunk(ev, seed0 + CHUNK_SEED_STEP * k, part_report, diagnostics, label)
                # kept as float32, as unfolded.h5 has them (half the disk of float64); the
                # chunks just unfolded are used as read back, so a resumed run is the same
                record = {"key": key, "events": hi - lo, "samples": samples.float(), "report": part_report,
                          "diagnostics": [[list(where), x.float()] for where, x in diagnostics.items()]}
                del samples, diagnostics
                with atomic_target(path, fsync=False) as tmp:
                    torch.save(record, tmp)
            else:
                kept += 1
                print(f"--resume: chunk {k + 1}/{len(bounds)} ({hi - lo} events) kept from before: {path}")
            picked.append(lhe_pick(record["samples"], self.sqrt_s))
            parts.append(record["report"])
            self.files.append(path)
            self.sizes.append(hi - lo)
            del record
        self.lhe_picked = tuple(torch.cat(x) for x in zip(*picked))
        merged = merge_chunk_reports(parts, self.sizes)
        report["timing"].update(merged.pop("timing", {}))
        _merge_into(report, merged)
        report["chunks"] = {"events_per_chunk": c, "chunks": len(bounds), "kept_from_before": kept}
        return self

    def parts(self) -> list:
        """A callable per chunk returning its samples (read back one at a time)."""
        return [lambda path=path: torch.load(path, map_location="cpu", weights_only=True)["samples"] for path in self.files]

    def load(self) -> tuple[torch.Tensor, dict]:
        """Every chunk read back in one pass: the samples of all events, and the samples
        behind the diagnostic figures (see :func:`_summarise_diagnostics`)."""
        samples, kept = [], {}
        for path in self.files:
            record = torch.load(path, map_location="cpu", weights_only=True)
            samples.append(record["samples"])
            for where, x in record["diagnostics"]:
                kept.setdefault(tuple(where), []).append(x)
        return torch.cat(samples), {where: torch.cat(xs) for where, xs in kept.items()}

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _merge_into(target: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge_into(target[key], value)
        else:
            target[key] = value


def merge_chunk_reports(parts: list, sizes: list[int], key: str = ""):
    """One report entry from the chunks' (``parts``, over ``sizes`` events each): times
    (…_s) add up, rates are recomputed from them, minima and maxima stay so, the mean and
    spread of ln r are pooled, other fractional figures are averaged over the events,
    and counts and labels are the first chunk's."""
    first = parts[0]
    w = np.asarray(sizes, dtype=np.float64)
    if isinstance(first, dict):
        out = {k: merge_chunk_reports([p[k] for p in parts], sizes, k) for k in first}
        if "unfold_samples_per_s" in first and "sample_s" in first:
            out["unfold_samples_per_s"] = sum(p["unfold_samples_per_s"] * p["sample_s"] for p in parts) / out["sample_s"]
        if "log_ratio_std" in first and "log_ratio_mean" in first:
            mean = np.array([p["log_ratio_mean"] for p in parts])
            second = np.array([p["log_ratio_std"] ** 2 for p in parts]) + mean**2
            out["log_ratio_std"] = float(np.sqrt(max(0.0, np.dot(w, second) / w.sum() - out["log_ratio_mean"] ** 2)))
        return out
    if isinstance(first, list):
        return [merge_chunk_reports([p[i] for p in parts], sizes, key) for i in range(len(first))]
    return _merge_leaf(parts, key, w)


def _merge_leaf(values: list, key: str, w: np.ndarray):
    first = values[0]
    if isinstance(first, bool) or not isinstance(first, (int, float)):
        return first
    if key.endswith("_s"):
        return float(sum(values))
    if key.endswith("_min"):
        return min(values)
    if key.endswith("_max"):
        return max(values)
    if isinstance(first, int):
        return first
    return float(np.dot(w, values) / w.sum())
