"""Pythia8 (pythia8mc) runs: showering LHE files, and the truth samples of the jobs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ShowerSummary", "shower_lhe", "capture_c_stdout", "pythia_drell_yan", "zw_settings", "zw_chunk", "simulate_zw", "run_chunks", "TTBAR_ORDER", "ttbar_settings", "ttbar_chunk", "simulate_ttbar"]


@contextlib.contextmanager
def capture_c_stdout():
    """Capture what C++ code writes to the process's stdout (file descriptor 1).

    Yields a list that holds the captured text once the block ends."""
    sys.stdout.flush()
    saved = os.dup(1)
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            yield out
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


def new_pythia():
    """A quiet ``pythia8mc.Pythia`` whose settings database is found wherever the wheel
    put its ``share/Pythia8`` (Pythia looks only in ``PYTHIA8DATA`` or the folder it
    was built for, which misses a ``pip install --target`` installation)."""
    import pythia8mc

    if not os.environ.get("PYTHIA8DATA"):
        from partonic.physics.pdf import pythia_share_folders

        for folder in pythia_share_folders():
            if (folder / "xmldoc" / "Index.xml").is_file():
                os.environ["PYTHIA8DATA"] = str(folder / "xmldoc")
                break
    return pythia8mc.Pythia("", False)


@dataclass
class ShowerSummary:
    """Result of showering an LHE file with Pythia8.

    Fields: ``n_events`` events read, ``n_accepted`` showered and hadronised,
    ``n_failed`` rejected by Pythia, ``errors`` Pythia's errors and aborts with
    their counts (from its message statistics; the end-of-file notice left out),
    ``warnings`` likewise, ``n_final`` mean number of final-state particles,
    ``sigma_pb`` Pythia's σ.
    """

    n_events: int = 0
    n_accepted: int = 0
    n_failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    warnings: dict[str, int] = field(default_factory=dict)
    n_final: float = 0.0
    sigma_pb: float = 0.0


_STAT_LINE = re.compile(r"^\s*\|\s+(\d+)\s+((Error|Abort|Warning) [^|]*?)\s*\|\s*$", re.MULTILINE)
_END_OF_FILE = "reached end of Les Houches Events File"


def shower_lhe(path: str | Path, max_events: int | None = None, seed: int = 1, hadronise: bool = True, mpi: bool = False) -> ShowerSummary:
    """Read an LHE file into Pythia8 (``Beams:frameType = 4``), shower and hadronise
    every event, and count Pythia's errors. Pythia's own output is captured."""
    path = Path(path)
    summary = ShowerSummary()
    with capture_c_stdout() as text:
        py = new_pythia()
        for line in (
            "Beams:frameType = 4",
            f"Beams:LHEF = {path}",
            "Random:setSeed = on",
            f"Random:seed = {seed}",
            f"PartonLevel:MPI = {'on' if mpi else 'off'}",
            f"HadronLevel:all = {'on' if hadronise else 'off'}",
            "Next:numberCount = 0",
        ):
            py.readString(line)
        ok = py.init()
        n_final_total = 0
        if ok:
            while max_events is None or summary.n_events < max_events:
                if not py.next():
                    if py.infoPython().atEndOfFile():
                        break
                    summary.n_events += 1
                    summary.n_failed += 1
                    continue
                summary.n_events += 1
                summary.n_accepted += 1
                ev = py.event
                n_final_total += sum(1 for i in range(ev.size()) if ev[i].isFinal())
            summary.sigma_pb = py.infoPython().sigmaGen() * 1e9
            py.stat()
    for m in _STAT_LINE.finditer(text[0]):
        count, message, kind = int(m.group(1)), m.group(2), m.group(3)
        if _END_OF_FILE in message:
            continue
        target = summary.warnings if kind == "Warning" else summary.errors
        target[message] = target.get(message, 0) + count
    if not ok:
        summary.errors[f"Pythia8 could not initialise from {path}"] = 1
    summary.n_final = n_final_total / max(summary.n_accepted, 1)
    return summary


def pythia_drell_yan(
    sqrt_s: float = 13000.0,
    m_min: float = 50.0,
    m_max: float | None = None,
    pdf_path: str | Path | None = None,
    lepton: int = 13,
    n_events: int = 100_000,
    seed: int = 1,
) -> dict:
    """Pythia8's own LO σ(pp → γ*/Z → ℓℓ) (``WeakSingleBoson:ffbar2gmZ``) at parton level.

    α_em is fixed at its M_Z value (``SigmaProcess:alphaEMorder = -1``) and the Z
    width forced to its table value, so the electroweak inputs are fixed numbers;
    they are returned as ``electroweak`` (ready for
    :class:`~partonic.physics.matrix_elements.ElectroweakParameters`), together with
    ``sigma_pb``, ``error_pb``, ``events_per_s`` (one core) and ``n_events``.
    """
    import time

    settings = [
        f"Beams:eCM = {sqrt_s}",
        "WeakSingleBoson:ffbar2gmZ = on",
        "WeakZ0:gmZmode = 0",
        f"PhaseSpace:mHatMin = {m_min}",
        f"PhaseSpace:mHatMax = {m_max if m_max is not None else -1}",
        "23:onMode = off",
        f"23:onIfAny = {lepton}",
        "23:doForceWidth = on",
        "SigmaProcess:alphaEMorder = -1",
        "PartonLevel:all = off",
        "HadronLevel:all = off",
        "Random:setSeed = on",
        f"Random:seed = {seed}",
        "Next:numberCount = 0",
    ]
    if pdf_path is not None:
        settings.append(f"PDF:pSet = LHAGrid1:{pdf_path}")
    with capture_c_stdout() as text:
        py = new_pythia()
        for s in settings:
            py.readString(s)
        if not py.init():
            raise RuntimeError("Pythia8 failed to initialise the Drell-Yan run")
        start = time.perf_counter()
        for _ in range(n_events):
            py.next()
        elapsed = time.perf_counter() - start
        info = py.infoPython()
        result = {
            "sigma_pb": info.sigmaGen() * 1e9,
            "error_pb": info.sigmaErr() * 1e9,
            "events_per_s": n_events / elapsed,
            "n_events": n_events,
            "electroweak": {
                "alpha": py.settings.parm("StandardModel:alphaEMmZ"),
                "m_z": py.particleData.m0(23),
                "gamma_z": py.particleData.mWidth(23),
                "sin2_w": py.settings.parm("StandardModel:sin2thetaW"),
                "sin2_w_bar": py.settings.parm("StandardModel:sin2thetaWbar"),
                "running_width": True,
            },
        }
    errors = [m for m in _STAT_LINE.finditer(text[0]) if m.group(3) in ("Error", "Abort")]
    if errors:
        result["pythia_errors"] = {m.group(2): int(m.group(1)) for m in errors}
    return result


# ------------------------------------------------------------------ pp → ZW
#: Pythia's seeds must lie in [1, 900 000 000].
_MAX_SEED = 900_000_000


def _chunk_seed(seed: int, chunk: int) -> int:
    """Independent Pythia seed of chunk ``chunk`` of a run with card seed ``seed``."""
    return (seed * 1_000_003 + chunk * 7919) % _MAX_SEED + 1


def zw_settings(
    seed: int,
    sqrt_s: float = 13000.0,
    z_decay=(11, 13),
    isr: bool = True,
    fsr: bool = True,
    hadronisation: bool = True,
    mpi: bool = False,
    pdf_path: str | Path | None = None,
) -> list[str]:
    """Pythia8 settings for pp → ZW (``WeakDoubleBoson:ffbar2ZW``), Z → e⁺e⁻/μ⁺μ⁻,
    W → u d̄, u s̄, c d̄, c s̄ (and conjugates)."""
    on = lambda flag: "on" if flag else "off"  # noqa: E731
    settings = [
        f"Beams:eCM = {sqrt_s}",
        "WeakDoubleBoson:ffbar2ZW = on",
        "23:onMode = off",
        f"23:onIfAny = {' '.join(str(abs(int(z))) for z in z_decay)}",
        "24:onMode = off",
        # one channel each: onIfAny would also open the CKM-suppressed c b̄ and u b̄
        "24:onIfMatch = 1 2",
        "24:onIfMatch = 3 2",
        "24:onIfMatch = 1 4",
        "24:onIfMatch = 3 4",
        f"PartonLevel:ISR = {on(isr)}",
        f"PartonLevel:FSR = {on(fsr)}",
        f"PartonLevel:MPI = {on(mpi)}",
        f"HadronLevel:all = {on(hadronisation)}",
        "Random:setSeed = on",
        f"Random:seed = {seed}",
        "Next:numberCount = 0",
        "Next:numberShowInfo = 0",
        "Next:numberShowProcess = 0",
        "Next:numberShowEvent = 0",
        "Init:showChangedSettings = off",
        "Init:showChangedParticleData = off",
    ]
    if pdf_path is not None:
        settings.append(f"PDF:pSet = LHAGrid1:{pdf_path}")
    return settings


def _hard_partons(process) -> tuple[list, list] | None:
    """ℓ⁻, ℓ⁺, q, q̄ (E, px, py, pz) and ids from Pythia's hard-process record."""
    leptons, quarks = {}, {}
    for i in range(process.size()):
        p = process[i]
        if p.status() != 23:
            continue
        mother = abs(process[p.mother1()].id())
        pid = p.id()
        if mother == 23 and abs(pid) in (11, 13):
            leptons.setdefault(pid > 0, (pid, (p.e(), p.px(), p.py(), p.pz())))
        elif mother == 24 and 1 <= abs(pid) <= 5:
            quarks.setdefault(pid > 0, (pid, (p.e(), p.px(), p.py(), p.pz())))
    if len(leptons) != 2 or len(quarks) != 2:
        return None
    ordered = [leptons[True], leptons[False], quarks[True], quarks[False]]
    return [p for _, p in ordered], [pid for pid, _ in ordered]


def _pythia_events(settings: list[str], n: int, process: str, record) -> dict:
    """Run one Pythia8 instance until ``record(pythia, k)`` has accepted ``n`` events
    (it returns False for an event it cannot use, which counts as failed). Returns
    ``sigma_pb``, ``n_failed``, ``errors`` (Pythia's error statistics), ``seconds``."""
    import time

    start = time.perf_counter()
    failed = 0
    with capture_c_stdout() as text:
        py = new_pythia()
        for line in settings:
            if not py.readString(line):
                raise RuntimeError(f"Pythia8 rejected the setting {line!r}")
        if not py.init():
            raise RuntimeError(f"Pythia8 failed to initialise {process}")
        k = 0
        while k < n:
            if not py.next() or not record(py, k):
                failed += 1
                if failed > 100 + n // 10:
                    raise RuntimeError(f"Pythia8 failed {failed} times in a chunk of {n} {process} events")
                continue
            k += 1
        sigma_pb = py.infoPython().sigmaGen() * 1e9
        py.stat()
    errors = {m.group(2): int(m.group(1)) for m in _STAT_LINE.finditer(text[0]) if m.group(3) in ("Error", "Abort")}
    return {"sigma_pb": sigma_pb, "n_failed": failed, "errors": errors, "seconds": time.perf_counter() - start}


def _z_leptons_accepted(event, pt_min: float, eta_max: float) -> int:
    """How many of the two Z-decay leptons, followed through QED radiation to their
    final copies in Pythia's event record, have pT > ``pt_min`` and |η| < ``eta_max``.
    Returns 2 (no veto) when the record does not show one Z with two lepton daughters."""
    import math

    z = [i for i in range(3, min(event.size(), 8)) if event[i].id() == 23]
    if len(z) != 1:
        return 2
    last = event[event[z[0]].iBotCopyId()]
    daughters = range(last.daughter1(), last.daughter2() + 1)
    if last.daughter1() <= 0 or len(daughters) != 2:
        return 2
    accepted = 0
    for d in daughters:
        p = event[event[d].iBotCopyId()]
        if abs(p.id()) not in (11, 13) or not p.isFinal():
            return 2
        pt = math.hypot(p.px(), p.py())
        accepted += pt > pt_min and abs(math.asinh(p.pz() / pt)) < eta_max
    return accepted


def zw_chunk(task: dict) -> dict:
    """Generate one chunk of pp → ZW events (one process, one Pythia instance).

    ``task`` holds ``n_events``, ``seed``, ``settings`` (from :func:`zw_settings`)
    and the particle-level object options ``objects`` (keyword arguments of
    :func:`partonic.simulate.detector.particle_level_objects`, whose objects it makes;
    the isolation and the jets of all its events at once at the end), optionally with
    ``lepton_veto`` = {"pt_min": …, "eta_max": …}: an event whose two Z-decay leptons
    cannot both pass these cuts (:func:`_z_leptons_accepted`) keeps its partons but no
    particle-level objects (zero leptons and jets), which saves the loop over its
    hadrons, the isolation and the clustering. Returns arrays ``partons`` (n, 4, 4),
    ``parton_ids`` (n, 4), ``leptons`` (n, L, 4), ``lepton_ids`` (n, L), ``jets``
    (n, K, 4), ``vetoed`` (n,), and ``sigma_pb``, ``n_failed``, ``errors`` (Pythia's
    error statistics), ``seconds``. The veto acts after ``Pythia.next()``, so it leaves
    Pythia's random sequence, and every event it keeps, unchanged."""
    import time

    import numpy as np

    from partonic.simulate.detector import cluster_jets_many, isolated_leptons_many

    n = task["n_events"]
    objects = dict(task["objects"])
    veto = objects.pop("lepton_veto", None)
    n_jet = objects.pop("max_jets", 8)
    radius, jet_pt_min = objects.pop("radius"), objects.pop("jet_pt_min", 10.0)
    finals, counts = [], np.zeros(n, dtype=np.int64)
    # leptons, lepton ids and jets are made for the whole chunk after the loop
    out = {"partons": np.zeros((n, 4, 4)), "parton_ids": np.zeros((n, 4), dtype=np.int64), "vetoed": np.zeros(n, dtype=bool)}

    def record(py, k: int) -> bool:
        hard = _hard_partons(py.process)
        if hard is None:
            return False
        out["partons"][k], out["parton_ids"][k] = hard
        if veto is not None and _z_leptons_accepted(py.event, **veto) < 2:
            out["vetoed"][k] = True
            return True  # no particle-level objects: counts[k] = 0, leptons and jets zero
        final = [(p.e(), p.px(), p.py(), p.pz(), p.id()) for p in py.event if p.isFinal() and p.isVisible()]
        finals.append(np.asarray(final, dtype=np.float64).reshape(-1, 5))
        counts[k] = len(finals[-1])
        return True

    out.update(_pythia_events(task["settings"], n, "pp → ZW", record))
    # the isolated leptons and the jets of the whole chunk at once (the same objects
    # as particle_level_objects gives event by event): one vectorised isolation, one FastJet call
    start = time.perf_counter()
    final = np.concatenate(finals) if finals else np.zeros((0, 5))
    out["leptons"], out["lepton_ids"], isolated = isolated_leptons_many(final[:, :4], final[:, 4].astype(np.int64), counts, **objects)
    jet_counts = np.bincount(np.repeat(np.arange(n), counts)[~isolated], minlength=n)
    with capture_c_stdout():
        out["jets"] = cluster_jets_many(final[~isolated, :4], jet_counts, radius, jet_pt_min, n_jet)
    out["seconds"] += time.perf_counter() - start
    return out


def simulate_zw(
    n_events: int,
    seed: int,
    settings: dict,
    objects: dict,
    workers: int = 0,
    chunk_size: int = 2000,
    progress: bool = True,
    scratch: str | Path | None = None,
) -> tuple[dict, dict]:
    """pp → ZW truth and particle-level objects from Pythia8, in parallel.

    The run is split into chunks of ``chunk_size`` events with independent seeds
    (:func:`_chunk_seed`) spread over ``workers`` processes (0: all CPU cores).
    Finished chunks are kept in ``scratch`` (``.npz``) so an interrupted run resumes
    where it stopped; the result does not depend on the number of workers.

    Arguments:
        n_events: events to generate (before any selection).
        seed: the card's seed.
        settings: keyword arguments of :func:`zw_settings` except ``seed``.
        objects: keyword arguments of :func:`~partonic.simulate.detector.particle_level_objects`.
    Returns the concatenated arrays (see :func:`zw_chunk`) and a summary dict
    (``sigma_pb``, ``n_failed``, ``errors``, ``events_per_s`` per core, ``workers``).
    """
    return run_chunks(
        zw_chunk, lambda i, n: {"n_events": n, "settings": zw_settings(_chunk_seed(seed, i), **settings), "objects": objects},
        n_events, workers, chunk_size, progress, scratch, "Pythia8 pp→ZW", "simulate_zw",
    )


def run_chunks(
    chunk_fn,
    make_task,
    n_events: int,
    workers: int = 0,
    chunk_size: int = 2000,
    progress: bool = True,
    scratch: str | Path | None = None,
    description: str = "Pythia8",
    caller: str = "the simulation",
) -> tuple[dict, dict]:
    """Run ``chunk_fn(make_task(i, n_i))`` for every chunk i of a run, in parallel,
    keeping finished chunks in ``scratch`` so that an interrupted run resumes.

    ``chunk_fn`` returns NumPy arrays (event index first) plus ``sigma_pb``,
    ``n_failed``, ``errors`` and ``seconds``; they are concatenated in chunk order, so
    the result does not depend on the number of workers. Returns the arrays and a
    summary dict (``sigma_pb``, ``n_failed``, ``errors``, ``events_per_s_per_core``,
    ``wall_s``, ``workers``)."""
    import concurrent.futures as cf
    import multiprocessing as mp
    import time

    import numpy as np
    from tqdm.auto import tqdm

    n_chunks = -(-n_events // chunk_size)
    sizes = [min(chunk_size, n_events - i * chunk_size) for i in range(n_chunks)]
    scratch = Path(scratch) if scratch is not None else None
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    results: dict[int, dict] = {}
    for i in range(n_chunks):
        f = scratch / f"chunk_{i:05d}_{sizes[i]}.npz" if scratch is not None else None
        if f is not None and f.is_file():
            try:
                with np.load(f, allow_pickle=False) as z:
                    results[i] = {k: z[k] for k in z.files}
            except (OSError, ValueError):
                f.unlink(missing_ok=True)
    todo = [i for i in range(n_chunks) if i not in results]
    workers = workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(todo) or 1))
    tasks = {i: make_task(i, sizes[i]) for i in todo}
    start = time.perf_counter()
    bar = tqdm(total=n_events, initial=sum(sizes[i] for i in results), unit="ev", desc=description, disable=not progress)
    scalars = ("sigma_pb", "n_failed", "seconds", "errors")

    def keep(i: int, res: dict) -> None:
        arrays = {k: v for k, v in res.items() if isinstance(v, np.ndarray) and k not in scalars}
        arrays["sigma_pb"] = np.array(res["sigma_pb"])
        arrays["n_failed"] = np.array(res["n_failed"])
        arrays["seconds"] = np.array(res["seconds"])
        arrays["errors"] = np.array(json.dumps(res["errors"]))
        if scratch is not None:
            tmp = scratch / f".chunk_{i:05d}.tmp.npz"
            np.savez(tmp, **arrays)
            os.replace(tmp, scratch / f"chunk_{i:05d}_{sizes[i]}.npz")
        results[i] = arrays
        bar.update(sizes[i])

    try:
        if workers == 1:
            for i in todo:
                keep(i, chunk_fn(tasks[i]))
        elif todo:
            # spawn, not fork: the parent may already hold torch's thread pools.
            pool = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
            try:
                futures = {pool.submit(chunk_fn, tasks[i]): i for i in todo}
                try:
                    for fut in cf.as_completed(futures):
                        keep(futures[fut], fut.result())
                except cf.process.BrokenProcessPool:
                    raise RuntimeError(
                        f"a Pythia8 worker process died; when calling {caller} from a script, "
                        "guard the script's top level with `if __name__ == '__main__':` (worker "
                        "processes are spawned and re-import it), or use workers=1"
                    ) from None
            except BaseException:
                # interrupted (Ctrl-C, SIGTERM) or failed: stop the workers and drop the
                # chunks not started, instead of waiting for the whole run as leaving the
                # executor's block would; the finished chunks are in scratch
                procs = list((getattr(pool, "_processes", None) or {}).values())
                for proc in procs:
                    proc.terminate()
                pool.shutdown(wait=False, cancel_futures=True)
                for proc in procs:  # and kill one that has not stopped within 2 s
                    proc.join(timeout=2.0)
                    if proc.is_alive():
                        proc.kill()
                raise
            pool.shutdown()
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    ordered = [results[i] for i in range(n_chunks)]
    names = [k for k in ordered[0] if k not in scalars]
    arrays = {k: np.concatenate([r[k] for r in ordered]) for k in names}
    errors: dict[str, int] = {}
    for r in ordered:
        for msg, count in json.loads(str(r["errors"])).items():
            errors[msg] = errors.get(msg, 0) + count
    seconds = sum(float(r["seconds"]) for r in ordered)
    summary = {
        "sigma_pb": float(np.mean([float(r["sigma_pb"]) for r in ordered])),
        "n_failed": int(sum(int(r["n_failed"]) for r in ordered)),
        "errors": errors,
        "events_per_s_per_core": n_events / seconds if seconds > 0 else 0.0,
        "wall_s": elapsed,
        "workers": workers,
    }
    return arrays, summary


# ------------------------------------------------------------- pp → tt̄ → 6 quarks
#: Order of the six quarks of a tt̄ event: t → b (W⁺ → q q̄'), t̄ → b̄ (W⁻ → q q̄').
#: Within each W the quark comes first: W⁺ → u-type quark and d-type antiquark,
#: W⁻ → d-type quark and u-type antiquark.
TTBAR_ORDER = ("b", "q(W+)", "qbar(W+)", "bbar", "q(W-)", "qbar(W-)")


def ttbar_settings(seed: int, sqrt_s: float = 13000.0, pdf_path: str | Path | None = None) -> list[str]:
    """Pythia8 settings for parton-level pp → tt̄ (``Top:gg2ttbar``, ``Top:qqbar2ttbar``),
    t → W b only, both W → u d̄, u s̄, c d̄, c s̄ (no showers, no hadronisation)."""
    settings = [
        f"Beams:eCM = {sqrt_s}",
        "Top:gg2ttbar = on",
        "Top:qqbar2ttbar = on",
        "6:onMode = off",
        "6:onIfMatch = 24 5",
        "24:onMode = off",
        "24:onIfMatch = 1 2",
        "24:onIfMatch = 3 2",
        "24:onIfMatch = 1 4",
        "24:onIfMatch = 3 4",
        "PartonLevel:all = off",
        "HadronLevel:all = off",
        "Random:setSeed = on",
        f"Random:seed = {seed}",
        "Next:numberCount = 0",
        "Next:numberShowInfo = 0",
        "Next:numberShowProcess = 0",
        "Next:numberShowEvent = 0",
        "Init:showChangedSettings = off",
        "Init:showChangedParticleData = off",
        "Init:showProcesses = off",
    ]
    if pdf_path is not None:
        settings.append(f"PDF:pSet = LHAGrid1:{pdf_path}")
    return settings


def _ttbar_quarks(process) -> tuple[list, list, list] | None:
    """The six quarks (E, px, py, pz) and ids in :data:`TTBAR_ORDER`, and the ids of
    the two incoming partons, from Pythia's hard-process record."""
    incoming = [process[3].id(), process[4].id()]
    slots: dict[int, tuple] = {}
    for i in range(process.size()):
        p = process[i]
        if p.status() != 23:
            continue
        mother = process[p.mother1()].id()
        pid = p.id()
        four = (p.e(), p.px(), p.py(), p.pz())
        if abs(mother) == 6 and abs(pid) == 5:
            slots[0 if pid > 0 else 3] = (pid, four)
        elif abs(mother) == 24:
            base = 1 if mother > 0 else 4
            slots[base + (0 if pid > 0 else 1)] = (pid, four)
    if len(slots) != 6:
        return None
    return [slots[k][1] for k in range(6)], [slots[k][0] for k in range(6)], incoming


def ttbar_chunk(task: dict) -> dict:
    """Generate one chunk of parton-level pp → tt̄ → 6 quarks (one Pythia instance).

    ``task`` holds ``n_events`` and ``settings`` (from :func:`ttbar_settings`).
    Returns ``quarks`` (n, 6, 4) as Pythia made them (its quark masses), ``ids``
    (n, 6), ``incoming`` (n, 2) parton ids, and ``sigma_pb``, ``n_failed``,
    ``errors``, ``seconds``."""
    import numpy as np

    n = task["n_events"]
    out = {"quarks": np.zeros((n, 6, 4)), "ids": np.zeros((n, 6), dtype=np.int64), "incoming": np.zeros((n, 2), dtype=np.int64)}

    def record(py, k: int) -> bool:
        found = _ttbar_quarks(py.process)
        if found is None:
            return False
        out["quarks"][k], out["ids"][k], out["incoming"][k] = found
        return True

    out.update(_pythia_events(task["settings"], n, "pp → tt̄", record))
    return out


def simulate_ttbar(
    n_events: int,
    seed: int,
    sqrt_s: float = 13000.0,
    pdf_path: str | Path | None = None,
    workers: int = 0,
    chunk_size: int = 20_000,
    progress: bool = True,
    scratch: str | Path | None = None,
) -> tuple[dict, dict]:
    """Parton-level pp → tt̄ → 6 quarks from Pythia8, in parallel and resumable
    (as :func:`simulate_zw`). Returns the arrays of :func:`ttbar_chunk` and a summary."""
    return run_chunks(
        ttbar_chunk, lambda i, n: {"n_events": n, "settings": ttbar_settings(_chunk_seed(seed, i), sqrt_s, pdf_path)},
        n_events, workers, chunk_size, progress, scratch, "Pythia8 pp→tt̄", "simulate_ttbar",
    )
