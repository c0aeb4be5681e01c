"""Pythia8 (pythia8mc) runs: showering LHE files, and the truth samples of the jobs."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ShowerSummary", "shower_lhe", "capture_c_stdout"]


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
    import pythia8mc

    path = Path(path)
    summary = ShowerSummary()
    with capture_c_stdout() as text:
        py = pythia8mc.Pythia("", False)
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

    import pythia8mc

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
        py = pythia8mc.Pythia("", False)
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
