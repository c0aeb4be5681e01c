"""What every job shares: device choice, the run folder and its provenance files,
atomic writes, and the report."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import __version__
from ..cards import card_to_dict

__all__ = ["JobError", "resolve_device", "atomic_write_text", "atomic_write_json", "RunFolder"]


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


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
        if path.exists() and any(path.iterdir()):
            if resume:
                if card_file.exists():
                    old = _without(yaml.safe_load(card_file.read_text()), may_change)
                    new = _without(card_to_dict(card), may_change)
                    # A resumed run must keep the physics, data and model; training
                    # length and output options may change.
                    for key in ("job", "physics", "data", "model", "seed"):
                        if old.get(key) != new.get(key):
                            changed = ", ".join(_differences(old.get(key), new.get(key), key)[:4])
                            raise JobError(
                                f"--resume: the card's {key!r} section differs from the one in {card_file} ({changed}); "
                                "resume with the same card or start a new output folder"
                            )
            elif (path / "run.json").exists():
                raise JobError(f"output folder {path} already holds a run; pass --resume to continue it or choose another --output")
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path, card, device)
        atomic_write_text(card_file, yaml.safe_dump(card_to_dict(card), sort_keys=False))
        info = run.provenance()
        previous = path / "run.json"
        if resume and previous.exists():
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
