"""What every job shares: device choice, the run folder and its provenance files,
atomic writes, and the report."""

from __future__ import annotations

import json
import math
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

__all__ = ["JobError", "resolve_device", "atomic_write_text", "atomic_write_json", "json_ready", "lhe_init", "RunFolder"]


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
    text = json.dumps(json_ready(data), indent=2, sort_keys=False, allow_nan=False, default=_json_default)
    atomic_write_text(path, text + "\n")


def lhe_init(card, cross_section: float, error: float = 0.0, max_weight: float | None = None, version: str = __version__) -> LHEInit:
    """The ``<init>`` block of a job's LHE file: the card's beams and energies, its PDF
    set member's LHAPDF id (PDFSUP; 0 where unknown), unweighted events (IDWTUP 3) of
    one process with this cross section in pb."""
    pdf = lhapdf_id(card.physics.pdf.set, card.physics.pdf.member)
    return LHEInit(beams=tuple(card.physics.beams), energies=(card.physics.sqrt_s / 2,) * 2, pdf_set=(pdf, pdf), weighting=3,
                   processes=[LHEProcess(cross_section, error, cross_section if max_weight is None else max_weight, 1)],
                   generator_version=version)


def json_ready(obj: Any) -> Any:
    """``obj`` with tensors and arrays as lists, and every non-finite float as None."""
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
    return obj


def _json_default(obj):
    if isinstance(obj, (torch.Tensor,)):
        return obj.tolist()
    if hasattr(obj, "tolist"):
        return obj.tolist()
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
        # a run that failed before it kept anything (bad input, unknown PDF set) leaves only
        # its card and run.json: the folder is taken over, with or without --resume
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
        atomic_write_json(previous, info)
        return run

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
        return target
