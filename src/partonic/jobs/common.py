"""What every job shares: device choice, the run folder and its provenance files,
atomic writes, and the report."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import __version__
from ..cards import card_to_dict
from ..io.lhe import LHEInit, LHEProcess
from ..io.store import atomic_target
from ..physics.pdf import lhapdf_id

__all__ = ["JobError", "resolve_device", "atomic_write_text", "atomic_write_json", "json_ready", "lhe_init", "mark_ended", "RunFolder"]


class JobError(RuntimeError):
    """A user-facing failure of a job (bad input, missing file, impossible request)."""


def resolve_device(choice: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise JobError("device 'cuda' was asked for, but torch sees no CUDA device; use --device auto or cpu")
    if choice not in ("cpu", "cuda"):
        raise JobError(f"device {choice!r} is not one of auto, cpu, cuda")
    return torch.device(choice)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary file in the same folder and rename it into place,
    so a reader never sees a half-written file."""
    with atomic_target(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, data: Any) -> None:
    """Strict JSON: NaN and ±inf (an empty bin's ratio, an undefined figure) are written
    as null, which every JSON reader accepts; Python's NaN literal is not JSON and stops
    JavaScript's, Go's or serde's parsers."""
    text = json.dumps(json_ready(data), indent=2, sort_keys=False, allow_nan=False)
    atomic_write_text(path, text + "\n")


def lhe_init(card, cross_section: float, error: float = 0.0, version: str = __version__) -> LHEInit:
    """The ``<init>`` block of a job's LHE file: the card's beams and energies, its PDF
    set member's LHAPDF id (PDFSUP; 0 where unknown), unweighted events (IDWTUP 3) of
    one process with this cross section in pb."""
    pdf = lhapdf_id(card.physics.pdf.set, card.physics.pdf.member)
    return LHEInit(beams=tuple(card.physics.beams), energies=(card.physics.sqrt_s / 2,) * 2, pdf_set=(pdf, pdf), weighting=3,
                   processes=[LHEProcess(cross_section, error, cross_section, 1)],
                   generator_version=version)


def json_ready(obj: Any) -> Any:
    """``obj`` with tensors and arrays as lists, paths as text, and every non-finite
    float as None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if hasattr(obj, "tolist"):  # tensors, arrays and numpy scalars
        return json_ready(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def _without(card: dict, dotted: tuple[str, ...]) -> dict:
    """A copy of the card dictionary without the dotted entries (absent ones ignored)."""
    out = json.loads(json.dumps(card, default=str))
    for key in dotted:
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def _differences(old, new, prefix: str) -> list[str]:
    """The dotted entries in which two card sections differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in list(old) + [k for k in new if k not in old]:
            if old.get(k) != new.get(k):
                out += _differences(old.get(k), new.get(k), f"{prefix}.{k}")
        return out
    return [f"{prefix}: {old!r} → {new!r}"]


@dataclass
class RunFolder:
    """The output folder of one run: the resolved card, provenance and outputs.

    ``run.json`` holds the package version, seed, device, command line and times.
    """

    path: Path
    card: Any
    device: torch.device

    @classmethod
    def create(cls, card, device: torch.device, output: str | None = None, resume: bool = False,
               may_change: tuple[str, ...] = ()) -> "RunFolder":
        """The run folder of ``card`` (``output``, else the card's, else runs/<name>).
        With ``resume``, the folder's card must have the same job, physics, data, model
        and seed, except the dotted entries ``may_change`` (what the job redoes on a
        resumed run anyway, e.g. the unfold job's refiner fit)."""
        path = Path(output or card.output or Path("runs") / card.name)
        card_file = path / "card.yaml"
        if path.exists() and not path.is_dir():
            raise JobError(f"the output folder {path} is a file; choose another --output")
        running = _running_elsewhere(path / "run.json")
        if running:
            raise JobError(f"output folder {path} is in use by a run in progress ({running}); "
                           "wait for it, or choose another --output")
        # a run that failed or was stopped before it kept anything (bad input, unknown PDF
        # set) leaves only its card and run.json: the folder is taken over, with or without --resume
        started = path.exists() and any(p.name not in ("card.yaml", "run.json") for p in path.iterdir())
        if started:
            if resume:
                if card_file.exists():
                    old = _without(yaml.safe_load(card_file.read_text()), may_change)
                    new = _without(card_to_dict(card), may_change)
                    # A resumed run must keep the physics, data and model; training
                    # length and output options may change, but not the split or batch.
                    for key in ("job", "physics", "data", "model", "seed"):
                        if old.get(key) != new.get(key):
                            changed = ", ".join(_differences(old.get(key), new.get(key), key)[:4])
                            raise JobError(
                                f"--resume: the card's {key!r} section differs from the one in {card_file} ({changed}); "
                                "resume with the same card or start a new output folder"
                            )
                    # the training split and the position within an epoch follow from these
                    for key in ("validation_fraction", "batch_size"):
                        before, after = old.get("training", {}).get(key), new.get("training", {}).get(key)
                        if before != after:
                            raise JobError(
                                f"--resume: training.{key} differs from the one in {card_file} ({before!r} → {after!r}); "
                                "the checkpoint's split of the events and its place in the epoch depend on it, "
                                "so resume with the same value or start a new output folder"
                            )
            elif (path / "run.json").exists():
                raise JobError(f"output folder {path} already holds a run; pass --resume to continue it or choose another --output")
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path, card, device)
        atomic_write_text(card_file, yaml.safe_dump(card_to_dict(card), sort_keys=False))
        info = run.provenance()
        previous = path / "run.json"
        if resume and started and previous.exists():
            try:
                info["resumed_from"] = json.loads(previous.read_text())
            except json.JSONDecodeError:
                pass
        info.update(status="running", pid=os.getpid(), host=platform.node())
        atomic_write_json(previous, info)
        global _ACTIVE
        _ACTIVE = run
        return run

    def set_status(self, status: str) -> None:
        """Record in run.json how the run ended: finished, failed or interrupted."""
        target = self.path / "run.json"
        try:
            info = json.loads(target.read_text())
        except (OSError, json.JSONDecodeError):
            return
        info["status"] = status
        atomic_write_json(target, info)

    def provenance(self) -> dict:
        return {
            "partonic_version": __version__,
            "job": self.card.job,
            "seed": self.card.seed,
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or platform.machine(),
            "torch_version": torch.__version__,
            "python": sys.version.split()[0],
            "command": sys.argv,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def report_base(self) -> dict:
        """The keys every report.json starts with (ARCHITECTURE.md contract)."""
        info = self.provenance()
        return {
            "partonic_version": info["partonic_version"],
            "card": card_to_dict(self.card),
            "device": info["device"],
            "seed": self.card.seed,
            "created": info["created"],
            "outputs": {"lhe": None, "plots": [], "model": None},
            "timing": {},
        }

    def write_report(self, report: dict) -> Path:
        target = self.path / "report.json"
        atomic_write_json(target, report)
        self.set_status("finished")
        return target


#: the run folder this process works in (for ``mark_ended``)
_ACTIVE: RunFolder | None = None


def mark_ended(status: str) -> None:
    """Record in this process's run folder that its run ``status`` (failed, interrupted)
    unless it finished: the command line calls this on its way out of an error."""
    if _ACTIVE is not None:
        try:
            current = json.loads((_ACTIVE.path / "run.json").read_text()).get("status")
        except (OSError, json.JSONDecodeError):
            return
        if current == "running":
            _ACTIVE.set_status(status)


def _running_elsewhere(run_json: Path) -> str | None:
    """'pid N on HOST' when run.json belongs to a run still in progress in another
    process: running on this host with that process alive, or running on another host
    (which cannot be checked from here). None otherwise."""
    try:
        info = json.loads(run_json.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("status") != "running" or "pid" not in info:
        return None
    pid, host = int(info["pid"]), info.get("host")
    if host != platform.node():
        return f"pid {pid} on {host}; if that run is dead, set \"status\" in {run_json} to \"failed\""
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # ended without saying how (killed): nothing runs there
    except PermissionError:
        pass  # alive, another user's
    return f"pid {pid} on this host"
