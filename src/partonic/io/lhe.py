"""Les Houches Event files (hep-ph/0609017, LHEF 3.0 arXiv:1405.1067) to and from
tensors, through pylhe.

Events are held as padded tensors in :class:`LHEEvents` (one row per event, one
column per particle, padding has ``pid == 0``). :func:`write_lhe` writes them with
an ``<init>`` block from :class:`LHEInit`: IDWTUP 3 (unweighted) or ±4 (weighted;
−4 allows negative weights). Files ending in ``.gz`` are gzip-compressed. Writes
are atomic: the file appears complete or not at all.
"""

from __future__ import annotations

import gzip
import re
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import pylhe
import torch

from partonic.io.store import atomic_target

__all__ = ["LHEError", "LHEEvents", "LHEInit", "LHEProcess", "write_lhe", "read_lhe", "iter_lhe_chunks"]

# More digits than pylhe's default so that momentum balances to ~1e-10 relative.
_FORMAT = pylhe.LHEXMLFormat(
    particle=(
        "{id:9d} {status:3d} {mother1:4d} {mother2:4d} {color1:4d} {color2:4d} "
        "{px: 18.11e} {py: 18.11e} {pz: 18.11e} {e: 18.11e} {m: 18.11e} {lifetime: 10.4e} {spin: 5.1f}"
    ),
    eventinfo="{nparticles:3d} {pid:6d} {weight: 18.11e} {scale: 15.8e} {aqed: 15.8e} {aqcd: 15.8e}",
)


class LHEError(ValueError):
    """An LHE file that cannot be read or events that cannot be written."""


@dataclass
class LHEProcess:
    """One process of the ``<init>`` block: XSECUP, XERRUP, XMAXUP (pb), LPRUP."""

    cross_section: float
    error: float
    max_weight: float
    process_id: int = 1


@dataclass
class LHEInit:
    """The ``<init>`` block: beams, energies, PDF ids, weighting strategy, processes."""

    beams: tuple[int, int] = (2212, 2212)
    energies: tuple[float, float] = (6500.0, 6500.0)
    pdf_group: tuple[int, int] = (0, 0)
    pdf_set: tuple[int, int] = (247000, 247000)
    weighting: int = 3
    processes: list[LHEProcess] = field(default_factory=list)
    generator: str = "partonic"
    generator_version: str = ""

    def __post_init__(self):
        if self.weighting not in (1, 2, 3, 4, -1, -2, -3, -4):
            raise LHEError(f"IDWTUP {self.weighting} is not one of ±1, ±2, ±3, ±4")


_EVENT_FIELDS = ("pid", "status", "mother1", "mother2", "color1", "color2", "momenta", "mass")


@dataclass
class LHEEvents:
    """A batch of LHE events as padded tensors.

    Arguments (N events, P particle slots):
        pid, status, mother1, mother2, color1, color2: (N, P) integers; mothers are
            1-based indices into the event (0 = none), padding rows have pid 0.
        momenta: (N, P, 4) as (E, px, py, pz) in GeV.
        mass: (N, P) generated masses in GeV.
        weight: (N,) event weights XWGTUP; scale: (N,) SCALUP in GeV;
        aqed, aqcd: (N,) couplings; process_id: (N,) IDPRUP.
        spin: (N, P) helicities (9 = unknown), lifetime: (N, P) VTIMUP in mm.
    """

    pid: torch.Tensor
    status: torch.Tensor
    mother1: torch.Tensor
    mother2: torch.Tensor
    color1: torch.Tensor
    color2: torch.Tensor
    momenta: torch.Tensor
    mass: torch.Tensor
    weight: torch.Tensor
    scale: torch.Tensor
    aqed: torch.Tensor
    aqcd: torch.Tensor
    process_id: torch.Tensor
    spin: torch.Tensor | None = None
    lifetime: torch.Tensor | None = None

    def __post_init__(self):
        n, p = self.pid.shape
        for name in ("status", "mother1", "mother2", "color1", "color2", "mass"):
            if tuple(getattr(self, name).shape) != (n, p):
                raise LHEError(f"LHEEvents.{name} has shape {tuple(getattr(self, name).shape)}, expected ({n}, {p})")
        if tuple(self.momenta.shape) != (n, p, 4):
            raise LHEError(f"LHEEvents.momenta has shape {tuple(self.momenta.shape)}, expected ({n}, {p}, 4)")
        for name in ("weight", "scale", "aqed", "aqcd", "process_id"):
            value = getattr(self, name)
            if value.dim() == 0:
                setattr(self, name, value.expand(n).clone())
            elif tuple(value.shape) != (n,):
                raise LHEError(f"LHEEvents.{name} has shape {tuple(value.shape)}, expected ({n},)")
        if self.spin is None:
            self.spin = torch.full((n, p), 9.0, dtype=torch.float64)
        if self.lifetime is None:
            self.lifetime = torch.zeros((n, p), dtype=torch.float64)

    def __len__(self) -> int:
        return self.pid.shape[0]

    @property
    def n_particles(self) -> torch.Tensor:
        """Number of real (non-padding) particles per event."""
        return (self.pid != 0).sum(1)

    def __getitem__(self, index) -> "LHEEvents":
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @classmethod
    def concatenate(cls, parts: list["LHEEvents"]) -> "LHEEvents":
        if not parts:
            raise LHEError("no events to concatenate")
        width = max(p.pid.shape[1] for p in parts)

        def pad(t, value):
            if t.dim() >= 2 and t.shape[1] < width:
                shape = list(t.shape)
                shape[1] = width - t.shape[1]
                t = torch.cat([t, torch.full(shape, value, dtype=t.dtype)], dim=1)
            return t

        out = {}
        for f in fields(cls):
            fill = 9.0 if f.name == "spin" else 0
            out[f.name] = torch.cat([pad(getattr(p, f.name), fill) for p in parts], dim=0)
        return cls(**out)


# ----------------------------------------------------------------------- write
def _event_objects(events: LHEEvents) -> Iterator[pylhe.LHEEvent]:
    ints = {k: getattr(events, k).to(torch.int64).cpu().numpy() for k in ("pid", "status", "mother1", "mother2", "color1", "color2")}
    mom = events.momenta.detach().to(torch.float64).cpu().numpy()
    mass = events.mass.detach().to(torch.float64).cpu().numpy()
    spin = events.spin.detach().to(torch.float64).cpu().numpy()
    life = events.lifetime.detach().to(torch.float64).cpu().numpy()
    weight = events.weight.detach().to(torch.float64).cpu().numpy()
    scale = events.scale.detach().to(torch.float64).cpu().numpy()
    aqed = events.aqed.detach().to(torch.float64).cpu().numpy()
    aqcd = events.aqcd.detach().to(torch.float64).cpu().numpy()
    proc = events.process_id.to(torch.int64).cpu().numpy()
    for i in range(len(events)):
        real = np.nonzero(ints["pid"][i])[0]
        particles = [
            pylhe.LHEParticle(
                id=int(ints["pid"][i, j]), status=int(ints["status"][i, j]),
                mother1=int(ints["mother1"][i, j]), mother2=int(ints["mother2"][i, j]),
                color1=int(ints["color1"][i, j]), color2=int(ints["color2"][i, j]),
                px=float(mom[i, j, 1]), py=float(mom[i, j, 2]), pz=float(mom[i, j, 3]), e=float(mom[i, j, 0]),
                m=float(mass[i, j]), lifetime=float(life[i, j]), spin=float(spin[i, j]),
            )
            for j in real
        ]
        info = pylhe.LHEEventInfo(
            nparticles=len(particles), pid=int(proc[i]), weight=float(weight[i]),
            scale=float(scale[i]), aqed=float(aqed[i]), aqcd=float(aqcd[i]),
        )
        yield pylhe.LHEEvent(eventinfo=info, particles=particles)


def _check_writable(events: LHEEvents, init: LHEInit) -> None:
    if not init.processes:
        raise LHEError("the <init> block needs at least one process (cross section, error, max weight)")
    if len(events) == 0:
        return
    if not torch.isfinite(events.momenta).all() or not torch.isfinite(events.weight).all():
        raise LHEError("events with non-finite momenta or weights cannot be written")
    if abs(init.weighting) == 3 and not torch.allclose(events.weight, events.weight[:1].expand_as(events.weight)):
        raise LHEError("IDWTUP = 3 (unweighted) needs equal event weights; use weighting = -4 or 4")
    if init.weighting > 0 and bool((events.weight < 0).any()):
        raise LHEError(f"negative event weights need a negative IDWTUP (-{abs(init.weighting)}), got {init.weighting}")
    n_part = events.n_particles
    m1 = events.mother1.to(torch.int64)
    if bool((m1 > n_part[:, None]).any()) or bool((m1 < 0).any()):
        raise LHEError("a mother index points outside its event (indices are 1-based)")


def write_lhe(path: str | Path, events: LHEEvents, init: LHEInit, comment: str | None = None) -> Path:
    """Write events to an LHE file (``.lhe`` or ``.lhe.gz``) with pylhe, atomically."""
    path = Path(path)
    _check_writable(events, init)
    compress = path.suffix == ".gz"
    init_block = pylhe.LHEInit(
        initInfo=pylhe.LHEInitInfo(
            beamA=int(init.beams[0]), beamB=int(init.beams[1]),
            energyA=float(init.energies[0]), energyB=float(init.energies[1]),
            PDFgroupA=int(init.pdf_group[0]), PDFgroupB=int(init.pdf_group[1]),
            PDFsetA=int(init.pdf_set[0]), PDFsetB=int(init.pdf_set[1]),
            weightingStrategy=int(init.weighting), numProcesses=len(init.processes),
        ),
        procInfo=[
            pylhe.LHEProcInfo(xSection=float(p.cross_section), error=float(p.error), unitWeight=float(p.max_weight), procId=int(p.process_id))
            for p in init.processes
        ],
        generators=[pylhe.LHEGenerator(name=init.generator, version=init.generator_version or "", description="")] if init.generator else [],
    )
    lhe_file = pylhe.LHEFile(init=init_block, events=_event_objects(events), comment=comment)
    # gzip level 6: close to the size of level 9 at a fraction of the time
    fmt = replace(_FORMAT, compress=compress, compresslevel=6)
    with atomic_target(path, fsync=False) as tmp:
        lhe_file.tofile(str(tmp), lheformat=fmt)
    return path


# ------------------------------------------------------------------------ read
def _open_text(path: Path):
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt")
    return open(path, "rt")


def _line_of_event(path: Path, index: int) -> int | None:
    """1-based line number of the start of the index-th <event> block (0-based index)."""
    seen = -1
    try:
        with _open_text(path) as fh:
            for number, line in enumerate(fh, start=1):
                if "<event" in line and "<eventgroup" not in line:
                    seen += 1
                    if seen == index:
                        return number
    except (OSError, EOFError):
        return None
    return None


def _init_from_pylhe(block) -> LHEInit:
    info = block.initInfo
    procs = [LHEProcess(p.xSection, p.error, p.unitWeight, int(p.procId)) for p in block.procInfo]
    gen = block.generators[0] if getattr(block, "generators", None) else None
    return LHEInit(
        beams=(int(info.beamA), int(info.beamB)), energies=(float(info.energyA), float(info.energyB)),
        pdf_group=(int(info.PDFgroupA), int(info.PDFgroupB)), pdf_set=(int(info.PDFsetA), int(info.PDFsetB)),
        weighting=int(info.weightingStrategy), processes=procs,
        generator=getattr(gen, "name", "") or "" if gen else "", generator_version=getattr(gen, "version", "") or "" if gen else "",
    )


def _to_tensors(rows: list, width: int) -> LHEEvents:
    n = len(rows)
    ints = np.zeros((6, n, width), dtype=np.int64)
    floats = np.zeros((7, n, width), dtype=np.float64)  # E px py pz m lifetime spin
    floats[6] = 9.0
    header = np.zeros((5, n), dtype=np.float64)
    for i, (info, parts) in enumerate(rows):
        k = len(parts)
        if k:
            a = np.asarray(parts, dtype=np.float64)  # (k, 13)
            ints[:, i, :k] = a[:, :6].T.astype(np.int64)
            floats[0, i, :k] = a[:, 9]
            floats[1:4, i, :k] = a[:, 6:9].T
            floats[4:7, i, :k] = a[:, 10:13].T
        header[:, i] = info
    t = torch.from_numpy
    return LHEEvents(
        pid=t(ints[0]), status=t(ints[1]), mother1=t(ints[2]), mother2=t(ints[3]), color1=t(ints[4]), color2=t(ints[5]),
        momenta=t(np.ascontiguousarray(np.moveaxis(floats[0:4], 0, -1))), mass=t(floats[4]),
        lifetime=t(floats[5]), spin=t(floats[6]),
        process_id=t(header[0].astype(np.int64)), weight=t(header[1]), scale=t(header[2]), aqed=t(header[3]), aqcd=t(header[4]),
    )


def iter_lhe_chunks(path: str | Path, chunk_size: int = 100_000) -> Iterator[tuple[LHEInit, LHEEvents]]:
    """Read an LHE file in chunks of events (memory stays bounded for large files)."""
    path = Path(path)
    if not path.is_file():
        raise LHEError(f"LHE file {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="Parse Error", category=RuntimeWarning)
            lhe = pylhe.LHEFile.fromfile(str(path), with_attributes=False, generator=True)
            init = _init_from_pylhe(lhe.init)
    except RuntimeWarning as exc:
        raise LHEError(f"{path}: malformed or truncated LHE file before the first event: {exc}") from None
    except ET.ParseError as exc:
        raise LHEError(f"{path}: malformed or truncated LHE file at line {exc.position[0]}, column {exc.position[1]}") from None
    except (EOFError, gzip.BadGzipFile) as exc:
        raise LHEError(f"{path}: the gzip stream is truncated or corrupt ({exc})") from None
    except (ValueError, IndexError, KeyError, AttributeError, TypeError) as exc:
        raise LHEError(f"{path}: cannot read the <init> block: {exc}") from None
    rows, width, index = [], 0, 0
    events = iter(lhe.events)
    while True:
        try:
            with warnings.catch_warnings():
                # pylhe reports XML parse errors (a truncated file) as a warning and
                # stops early; a silently short read is worse than an error.
                warnings.filterwarnings("error", message="Parse Error", category=RuntimeWarning)
                ev = next(events)
        except StopIteration:
            break
        except RuntimeWarning as exc:
            found = re.search(r"line (\d+), column (\d+)", str(exc))
            where = f" at line {found.group(1)}, column {found.group(2)}" if found else ""
            raise LHEError(f"{path}: malformed or truncated LHE file{where} (after {index} complete events): {exc}") from None
        except ET.ParseError as exc:
            raise LHEError(
                f"{path}: malformed or truncated LHE file at line {exc.position[0]}, column {exc.position[1]} "
                f"(after {index} complete events)"
            ) from None
        except (EOFError, gzip.BadGzipFile) as exc:
            raise LHEError(f"{path}: the gzip stream is truncated or corrupt after {index} events ({exc})") from None
        except (ValueError, IndexError, TypeError) as exc:
            line = _line_of_event(path, index)
            where = f" (event {index + 1}, starting at line {line})" if line else f" (event {index + 1})"
            raise LHEError(f"{path}: malformed event{where}: {exc}") from None
        info = ev.eventinfo
        if int(info.nparticles) != len(ev.particles):
            line = _line_of_event(path, index)
            raise LHEError(
                f"{path}: event {index + 1} (line {line}) declares NUP = {int(info.nparticles)} particles but lists {len(ev.particles)}"
            )
        parts = [
            (p.id, p.status, p.mother1, p.mother2, p.color1, p.color2, p.px, p.py, p.pz, p.e, p.m, p.lifetime, p.spin)
            for p in ev.particles
        ]
        rows.append(((info.pid, info.weight, info.scale, info.aqed, info.aqcd), parts))
        width = max(width, len(parts))
        index += 1
        if len(rows) == chunk_size:
            yield init, _to_tensors(rows, width)
            rows, width = [], 0
    if rows or index == 0:
        yield init, _to_tensors(rows, width)


def read_lhe(path: str | Path) -> tuple[LHEInit, LHEEvents]:
    """Read a whole LHE file (``.lhe`` or gzip) into an :class:`LHEInit` and tensors."""
    init, chunks = None, []
    for init, chunk in iter_lhe_chunks(path):
        chunks.append(chunk)
    assert init is not None
    return init, LHEEvents.concatenate(chunks) if len(chunks) > 1 else chunks[0]
