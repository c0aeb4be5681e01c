"""Parton densities from LHAPDF6 grid files (``Format: lhagrid1``) in torch, and α_s.

The grid reader needs no LHAPDF installation: it parses the ``.dat`` member files
(from ``LHAPDF_DATA_PATH`` or the grids that ship with the pythia8mc wheel) and
interpolates them in batches on CPU or GPU. Two interpolation schemes are offered:

- ``"logbicubic"`` (default): LHAPDF 6's log-bicubic scheme, a cubic Hermite
  interpolation in (ln x, ln Q²) with finite-difference knot derivatives, the
  upper subgrid at a flavour-threshold boundary (LHAPDF ``LogBicubicInterpolator``).
- ``"lagrange"``: Pythia 8.3's ``LHAGrid1`` scheme, a separable four-point Lagrange
  cubic in ln x and ln Q (linear in ln Q for subgrids of ≤ 3 Q knots), the lower
  subgrid at a boundary.

Both freeze at the grid edges outside its range. When the C++ LHAPDF Python module
is importable, :func:`load_pdf` with ``backend="auto"`` evaluates through it.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "PDFError",
    "GridPDF",
    "LHAPDFModulePDF",
    "AlphaS",
    "load_pdf",
    "pdf_search_paths",
    "find_pdf_member",
    "available_pdf_sets",
    "lhapdf_id",
    "from_card",
]

PARTON_IDS = (-5, -4, -3, -2, -1, 21, 1, 2, 3, 4, 5)


class PDFError(ValueError):
    """A PDF set that cannot be found or read."""


def pythia_share_folders() -> list[Path]:
    """Folders that may hold the pythia8mc wheel's ``share/Pythia8`` (``xmldoc``,
    ``pdfdata``), in order: ``PYTHIA8DATA``'s parent, the interpreter's prefixes, the
    prefix above the extension module (``<prefix>/lib/pythia3.X/site-packages``), and
    the extension module's own folder (``pip install --target DIR`` puts ``share/``
    beside the module)."""
    found = []
    env = os.environ.get("PYTHIA8DATA")
    if env:
        found.append(Path(env).parent)
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        found.append(Path(prefix) / "share" / "Pythia8")
    try:
        import importlib.util

        spec = importlib.util.find_spec("pythia8mc")
    except ImportError:
        spec = None
    if spec and spec.origin:
        module = Path(spec.origin).resolve()
        if len(module.parents) > 3:
            found.append(module.parents[3] / "share" / "Pythia8")
        found.append(module.parent / "share" / "Pythia8")
    return found


def _pythia_pdfdata() -> list[Path]:
    return [folder / "pdfdata" for folder in pythia_share_folders()]


def pdf_search_paths() -> list[Path]:
    """Folders searched for PDF sets, in order: ``LHAPDF_DATA_PATH``, ``LHAPATH``,
    the lhapdf module's paths (when importable), then the pythia8mc wheel's pdfdata."""
    paths: list[Path] = []
    for var in ("LHAPDF_DATA_PATH", "LHAPATH"):
        for part in os.environ.get(var, "").split(os.pathsep):
            if part:
                paths.append(Path(part))
    try:
        import lhapdf  # type: ignore

        paths.extend(Path(p) for p in lhapdf.paths())
    except Exception:  # noqa: BLE001 - the module is optional
        pass
    paths.extend(_pythia_pdfdata())
    unique: list[Path] = []
    for p in paths:
        if p.is_dir() and p.resolve() not in [u.resolve() for u in unique]:
            unique.append(p)
    return unique


def available_pdf_sets() -> list[str]:
    """Names of the lhagrid1 sets found on the search path."""
    names = set()
    for folder in pdf_search_paths():
        for f in folder.glob("*_0000.dat"):
            names.add(f.name[: -len("_0000.dat")])
        for d in folder.iterdir():
            if d.is_dir() and (d / f"{d.name}_0000.dat").exists():
                names.add(d.name)
    return sorted(names)


def find_pdf_member(name: str, member: int = 0) -> Path:
    """Locate the ``.dat`` file of a set member, by file path or set name."""
    direct = Path(name).expanduser()
    if direct.is_file():
        return direct
    stem = f"{name}_{member:04d}.dat"
    for folder in pdf_search_paths():
        for candidate in (folder / name / stem, folder / stem):
            if candidate.is_file():
                return candidate
    searched = ", ".join(str(p) for p in pdf_search_paths()) or "(no folder exists)"
    sets = ", ".join(available_pdf_sets()) or "none"
    raise PDFError(
        f"PDF set {name!r} member {member} not found. Searched: {searched}. "
        f"Available lhagrid1 sets: {sets}. Set LHAPDF_DATA_PATH to add a folder."
    )


# LHAPDF's numeric ids (pdfsets.index) of sets the pythia8mc wheel ships without their
# .info files; other sets are looked up in LHAPDF's own metadata.
_KNOWN_LHAPDF_IDS = {"NNPDF23_lo_as_0130_qed": 247000}


def lhapdf_id(name: str, member: int = 0) -> int:
    """The LHAPDF id of a set member (the set's SetIndex + member), as LHE files'
    PDFSUP: from the lhapdf module when importable, else the set's ``.info`` file, a
    ``pdfsets.index`` on the search path, or the ids of the card's default set; 0
    (not given) when none of them knows the set."""
    try:
        import lhapdf  # type: ignore

        return int(lhapdf.getPDFSet(name).lhapdfID) + int(member)
    except Exception:  # noqa: BLE001 - the module is optional, and may not know the set
        pass
    try:
        index = _read_info(find_pdf_member(name, member)).get("SetIndex")
    except PDFError:
        index = None
    if index is None:
        for folder in pdf_search_paths():
            table = folder / "pdfsets.index"
            if table.is_file():
                for line in table.read_text().splitlines():
                    parts = line.split()
                    if len(parts) >= 2 and parts[1] == name and parts[0].lstrip("-").isdigit():
                        index = int(parts[0])
                        break
            if index is not None:
                break
    if index is None:
        index = _KNOWN_LHAPDF_IDS.get(name)
    return 0 if index is None else int(index) + int(member)


def _read_info(dat: Path) -> dict:
    """The set's ``.info`` metadata when it sits beside the member file (LHAPDF layout)."""
    set_name = dat.name.rsplit("_", 1)[0]
    info = dat.parent / f"{set_name}.info"
    if not info.is_file():
        return {}
    import yaml

    try:
        return yaml.safe_load(info.read_text()) or {}
    except yaml.YAMLError:
        return {}


@dataclass
class _Subgrid:
    x: np.ndarray
    q: np.ndarray
    pids: list[int]
    values: np.ndarray  # (nx, nq, nflav)


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _numbers(text: str) -> np.ndarray:
    try:
        return np.array(text.split(), dtype=np.float64)
    except ValueError:
        # Some published grids have fused fixed-width fields such as
        # '0.00000000e+000.00000000e+00'; split them as a C++ stream does.
        tokens = _NUMBER.findall(text)
        if not tokens or len(_NUMBER.sub("", text).split()) != 0:
            raise
        return np.array(tokens, dtype=np.float64)


def _parse_lhagrid1(path: Path) -> tuple[dict, list[_Subgrid]]:
    text = path.read_text()
    lines = text.splitlines()
    blocks: list[tuple[int, list[str]]] = []
    start, current = 1, []
    for i, line in enumerate(lines, start=1):
        if line.strip() == "---":
            blocks.append((start, current))
            start, current = i + 1, []
        else:
            current.append(line)
    if current and any(s.strip() for s in current):
        raise PDFError(f"{path}: data after the last '---' separator at line {start} (truncated file?)")
    if len(blocks) < 2:
        raise PDFError(f"{path}: not an LHAPDF6 lhagrid1 file (no '---'-separated subgrids)")
    header = {}
    for line in blocks[0][1]:
        if ":" in line:
            key, _, value = line.partition(":")
            header[key.strip()] = value.strip()
    if header.get("Format", "lhagrid1") != "lhagrid1":
        raise PDFError(f"{path}: format {header.get('Format')!r} is not supported, only lhagrid1")
    subgrids = []
    for first_line, block in blocks[1:]:
        rows = [b for b in block if b.strip()]
        if len(rows) < 4:
            raise PDFError(f"{path}: subgrid starting at line {first_line} has only {len(rows)} lines")
        try:
            x = np.array(rows[0].split(), dtype=np.float64)
            q = np.array(rows[1].split(), dtype=np.float64)
            pids = [int(v) for v in rows[2].split()]
            values = _numbers(" ".join(rows[3:]))
        except ValueError as err:
            raise PDFError(f"{path}: unreadable number in the subgrid starting at line {first_line}: {err}") from None
        expected = len(x) * len(q) * len(pids)
        if values.size != expected:
            raise PDFError(
                f"{path}: subgrid starting at line {first_line} holds {values.size} values, "
                f"expected {len(x)} x × {len(q)} Q × {len(pids)} flavours = {expected}"
            )
        if len(x) < 4:
            raise PDFError(f"{path}: subgrid at line {first_line} has {len(x)} x knots; at least 4 are needed")
        values = values.reshape(len(x), len(q), len(pids))
        # A repeated x knot (seen in published grids) carries no information and
        # would divide by zero in the interpolation: keep its last copy.
        keep = np.append(np.diff(x) > 0, True)
        if not keep.all():
            x, values = x[keep], values[keep]
        if np.any(np.diff(x) <= 0) or np.any(np.diff(q) <= 0):
            raise PDFError(f"{path}: the x or Q knots of the subgrid at line {first_line} are not increasing")
        subgrids.append(_Subgrid(x, q, [21 if p == 0 else p for p in pids], values))
    return header, subgrids


def _lagrange4(u: torch.Tensor, knots: torch.Tensor) -> torch.Tensor:
    """Weights of the cubic Lagrange polynomial through 4 knots: u (B,), knots (B, 4)."""
    w = []
    for a in range(4):
        wa = torch.ones_like(u)
        for b in range(4):
            if a != b:
                wa = wa * (u - knots[:, b]) / (knots[:, a] - knots[:, b])
        w.append(wa)
    return torch.stack(w, dim=1)


class GridPDF:
    """A PDF set member read from an LHAPDF6 ``lhagrid1`` file, evaluated in torch.

    References: A. Buckley et al., "LHAPDF6", arXiv:1412.7420 (grid format and
    log-bicubic interpolation); T. Sjöstrand et al., arXiv:2203.11601 (Pythia 8.3).

    Arguments:
        name: set name (e.g. ``"NNPDF23_lo_as_0130_qed"``) or path of a ``.dat`` file.
        member: member number (0 = central).
        interpolation: ``"logbicubic"`` (LHAPDF) or ``"lagrange"`` (Pythia ``LHAGrid1``).
        device, dtype: where and in which precision the grid lives.

    Example:
        >>> pdf = GridPDF("NNPDF23_lo_as_0130_qed")
        >>> xg = pdf.xfxQ2(21, torch.tensor([1e-3, 0.1]), torch.tensor([100.0, 1e4]))
    """

    def __init__(
        self,
        name: str,
        member: int = 0,
        interpolation: str = "logbicubic",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float64,
    ):
        if interpolation not in ("logbicubic", "lagrange"):
            raise PDFError(f"interpolation {interpolation!r} is not one of 'logbicubic', 'lagrange'")
        self.path = find_pdf_member(name, member)
        self.name = name
        self.member = member
        self.interpolation = interpolation
        self.info = _read_info(self.path)
        self.header, subgrids = _parse_lhagrid1(self.path)
        x0 = subgrids[0].x
        for sg in subgrids[1:]:
            if sg.x.shape != x0.shape or not np.allclose(np.log(sg.x), np.log(x0), atol=1e-5, rtol=0):
                raise PDFError(f"{self.path}: subgrids with different x knots are not supported")
        pid_union: list[int] = []
        for sg in subgrids:
            for p in sg.pids:
                if p not in pid_union:
                    pid_union.append(p)
        self.pids = pid_union
        self._pid_index = {p: i for i, p in enumerate(self.pids)}
        blocks = []
        for sg in subgrids:
            v = np.zeros((len(x0), len(sg.q), len(self.pids)))
            for j, p in enumerate(sg.pids):
                v[:, :, self._pid_index[p]] = sg.values[:, :, j]
            blocks.append(v)
        self.x_min, self.x_max = float(x0[0]), float(x0[-1])
        self.q_min, self.q_max = float(subgrids[0].q[0]), float(subgrids[-1].q[-1])
        self.q_bounds = [float(sg.q[-1]) for sg in subgrids[:-1]]
        sizes = [len(sg.q) for sg in subgrids]
        starts = np.cumsum([0] + sizes[:-1])
        self._device, self._dtype = torch.device(device), dtype
        t = lambda a, dt=dtype: torch.as_tensor(np.asarray(a), dtype=dt, device=self._device)
        self._logx = t(np.log(x0))
        self._logq2 = t(np.concatenate([2.0 * np.log(sg.q) for sg in subgrids]))
        self._grid = t(np.concatenate(blocks, axis=1))  # (nx, NQ, F)
        self._sub_start = t(starts, torch.long)
        self._sub_end = t(starts + np.array(sizes) - 1, torch.long)  # inclusive
        self._bounds_logq2 = t(2.0 * np.log(self.q_bounds)) if self.q_bounds else None
        # ∂f/∂ln x at every knot (LHAPDF KnotArray): mean of the neighbouring slopes,
        # one-sided at the ends. With it, each x cell of each Q row is a cubic in
        # t = (ln x − ln x_i)/Δ: store its coefficients (a0, a1, a2, a3), so that an
        # evaluation is one gather and one contraction.
        g, lx = self._grid, self._logx
        dx = (lx[1:] - lx[:-1])[:, None, None]
        slopes = (g[1:] - g[:-1]) / dx
        deriv = torch.empty_like(g)
        deriv[0], deriv[-1] = slopes[0], slopes[-1]
        deriv[1:-1] = 0.5 * (slopes[1:] + slopes[:-1])
        vl, vh = g[:-1], g[1:]
        vdl, vdh = deriv[:-1] * dx, deriv[1:] * dx
        cubic = torch.stack([vl, vdl, 3 * (vh - vl) - 2 * vdl - vdh, 2 * (vl - vh) + vdl + vdh], dim=2)
        self._cell = cubic.contiguous()  # (nx − 1, NQ, 4, F)
        linear = torch.stack([vl, vh - vl, torch.zeros_like(vl), torch.zeros_like(vl)], dim=2)
        self._cell_linear = linear.contiguous()

    # ------------------------------------------------------------------ public
    #: points evaluated per chunk: bounds the temporary memory (16 × F values per point)
    chunk_size = 1 << 15

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: str | torch.device) -> "GridPDF":
        """Move the grid to another device (returns self)."""
        self._device = torch.device(device)
        for attr in ("_logx", "_logq2", "_grid", "_cell", "_cell_linear", "_sub_start", "_sub_end", "_bounds_logq2"):
            value = getattr(self, attr)
            if value is not None:
                setattr(self, attr, value.to(self._device))
        return self

    def _inputs(self, x, q2):
        x = torch.as_tensor(x, dtype=self._dtype, device=self._device).reshape(-1)
        q2 = torch.as_tensor(q2, dtype=self._dtype, device=self._device).reshape(-1)
        if x.shape != q2.shape:
            raise ValueError(f"x and Q2 need the same length, got {x.shape[0]} and {q2.shape[0]}")
        return x, q2

    def xfxQ2_all(self, x: torch.Tensor, q2: torch.Tensor) -> torch.Tensor:
        """x·f(x, Q²) for every flavour of the set: shape (B, len(self.pids))."""
        x, q2 = self._inputs(x, q2)
        return self._chunked(x, q2, None)

    def xfxQ2(self, pid: int | torch.Tensor, x: torch.Tensor, q2: torch.Tensor) -> torch.Tensor:
        """x·f(x, Q²) for one PDG id, or one id per point (a tensor like x). 0 means gluon;
        flavours absent from the set give 0."""
        x, q2 = self._inputs(x, q2)
        missing = len(self.pids)
        if isinstance(pid, int):
            col = self._pid_index.get(21 if pid == 0 else pid, missing)
            if col == missing:
                return torch.zeros_like(x)
            return self._chunked(x, q2, col)
        pid_t = torch.as_tensor(pid, device=self._device).reshape(-1).long()
        if pid_t.shape != x.shape:
            raise ValueError(f"one flavour per point needs {x.shape[0]} ids, got {pid_t.shape[0]}")
        lookup = torch.full((45,), missing, dtype=torch.long, device=self._device)
        for p, i in self._pid_index.items():
            if -22 <= p <= 22:
                lookup[p + 22] = i
        lookup[22] = lookup[21 + 22]  # id 0 is the gluon
        cols = lookup[torch.clamp(pid_t + 22, 0, 44)]
        cols = torch.where((pid_t < -22) | (pid_t > 22), missing, cols)
        known = cols < missing
        out = self._chunked(x, q2, torch.where(known, cols, 0))
        return torch.where(known, out, torch.zeros_like(out))

    def xfxQ(self, pid, x, q):
        """x·f(x, Q) with the scale Q instead of Q²."""
        q = torch.as_tensor(q, dtype=self._dtype, device=self._device)
        return self.xfxQ2(pid, x, q * q)

    # ------------------------------------------------------------- internals
    def _chunked(self, x, q2, cols):
        n = x.shape[0]
        step = self.chunk_size if self._device.type == "cpu" else 1 << 22
        if n <= step:
            return self._evaluate(x, q2, cols)
        parts = []
        for s in range(0, n, step):
            c = cols[s : s + step] if torch.is_tensor(cols) else cols
            parts.append(self._evaluate(x[s : s + step], q2[s : s + step], c))
        return torch.cat(parts)

    def _evaluate(self, x, q2, cols):
        if self.interpolation == "logbicubic":
            return self._logbicubic(x, q2, cols)
        return self._lagrange(x, q2, cols)

    def _subgrid_of(self, logq2: torch.Tensor, upper_at_boundary: bool) -> torch.Tensor:
        if self._bounds_logq2 is None:
            return torch.zeros_like(logq2, dtype=torch.long)
        b = self._bounds_logq2
        above = (logq2[:, None] >= b[None, :]) if upper_at_boundary else (logq2[:, None] > b[None, :])
        return above.sum(1)

    def _x_interval(self, logx: torch.Tensor) -> torch.Tensor:
        nx = self._logx.shape[0]
        return torch.clamp(torch.searchsorted(self._logx, logx.contiguous(), right=True) - 1, 0, nx - 2)

    def _q_interval(self, logq2: torch.Tensor, k: torch.Tensor):
        lo, hi = self._sub_start[k], self._sub_end[k]
        j = torch.searchsorted(self._logq2, logq2.contiguous(), right=True) - 1
        # searchsorted over the concatenated knots can land in a neighbouring subgrid
        # when knots repeat at the boundary: bring it back into the chosen one.
        j = torch.minimum(torch.maximum(j, lo), hi - 1)
        return j, lo, hi

    def _logbicubic(self, x, q2, cols):
        lx, lq = self._logx, self._logq2
        logx = torch.clamp(torch.log(x), lx[0], lx[-1])
        logq2 = torch.clamp(torch.log(q2), lq[0], lq[-1])
        ix = self._x_interval(logx)
        k = self._subgrid_of(logq2, upper_at_boundary=True)
        j, lo, hi = self._q_interval(logq2, k)
        tx = (logx - lx[ix]) / (lx[ix + 1] - lx[ix])
        jm, jp = torch.maximum(j - 1, lo), torch.minimum(j + 2, hi)
        d1 = lq[j + 1] - lq[j]
        lower = (j == lo).to(x.dtype)
        upper = (j + 1 == hi).to(x.dtype)
        r0 = d1 / torch.where(j == lo, torch.ones_like(d1), lq[j] - lq[jm])
        r2 = d1 / torch.where(j + 1 == hi, torch.ones_like(d1), lq[jp] - lq[j + 1])
        tq = (logq2 - lq[j]) / d1
        t2, t3 = tq * tq, tq * tq * tq
        h00, h10, h01, h11 = 2 * t3 - 3 * t2 + 1, t3 - 2 * t2 + tq, -2 * t3 + 3 * t2, t3 - t2
        # The Q-direction Hermite (LHAPDF: finite-difference slopes from the rows
        # j−1 … j+2, one-sided at subgrid edges) is linear in the four row values.
        a, b = 0.5 * (1 - lower), 0.5 * (1 - upper)
        w_ll = -h10 * a * r0
        w_l = h00 + h10 * (-lower - a + a * r0) + h11 * (-upper - b)
        w_h = h01 + h10 * (lower + a) + h11 * (upper + b - b * r2)
        w_hh = h11 * b * r2
        wq = torch.stack([w_ll, w_l, w_h, w_hh], dim=1)
        rows = torch.stack([jm, j, j + 1, jp], dim=1)
        tpow = torch.stack([torch.ones_like(tx), tx, tx * tx, tx * tx * tx], dim=1)
        two_knot = (lower * upper) > 0
        if bool(two_knot.any()):
            # LHAPDF falls back to bilinear in (ln x, ln Q²) on two-knot subgrids.
            wq = torch.where(two_knot[:, None], torch.stack([torch.zeros_like(tq), 1 - tq, tq, torch.zeros_like(tq)], 1), wq)
            out_cubic = _contract(self._cell, ix, rows, cols, wq, tpow)
            out_linear = _contract(self._cell_linear, ix, rows, cols, wq, tpow)
            mask = two_knot[:, None] if out_cubic.dim() == 2 else two_knot
            return torch.where(mask, out_linear, out_cubic)
        return _contract(self._cell, ix, rows, cols, wq, tpow)

    def _lagrange(self, x, q2, cols):
        lx, lq = self._logx, self._logq2
        nx = lx.shape[0]
        logx = torch.clamp(torch.log(x), lx[0], lx[-1])
        logq2 = torch.clamp(torch.log(q2), lq[0], lq[-1])
        ix = self._x_interval(logx)
        sx = torch.clamp(ix - 1, 0, nx - 4)
        kx = sx[:, None] + torch.arange(4, device=x.device)
        wx = _lagrange4(logx, lx[kx])  # (B, 4)
        k = self._subgrid_of(logq2, upper_at_boundary=False)
        j, lo, hi = self._q_interval(logq2, k)
        size = hi - lo + 1
        sq = torch.minimum(torch.maximum(j - 1, lo), torch.clamp(hi - 3, min=0))
        kq = torch.minimum(sq[:, None] + torch.arange(4, device=x.device), hi[:, None])
        wq_cubic = _lagrange4(logq2, lq[kq])
        # Subgrids with ≤ 3 Q knots: linear in ln Q between the bracketing knots.
        tq = (logq2 - lq[j]) / (lq[j + 1] - lq[j])
        kq_lin = torch.stack([j, j + 1, j + 1, j + 1], dim=1)
        wq_lin = torch.stack([1 - tq, tq, torch.zeros_like(tq), torch.zeros_like(tq)], dim=1)
        small = (size <= 3)[:, None]
        kq = torch.where(small, kq_lin, kq)
        wq = torch.where(small, wq_lin, wq_cubic)
        g = self._grid
        if cols is None:
            vals = g[kx[:, :, None], kq[:, None, :]]  # (B, 4x, 4q, F)
            return torch.einsum("ba,bc,bacf->bf", wx, wq, vals)
        if isinstance(cols, int):
            vals = g[..., cols][kx[:, :, None], kq[:, None, :]]
        else:
            vals = g[kx[:, :, None], kq[:, None, :], cols[:, None, None]]
        return torch.einsum("ba,bc,bac->b", wx, wq, vals)


def _contract(cell, ix, rows, cols, wq, tpow):
    """Σ_rows Σ_powers wq · t^c · cell[ix, row, c, flavour] for every point."""
    first = ix[:, None].expand_as(rows)
    if cols is None:
        vals = cell[first, rows]  # (B, 4 rows, 4 powers, F)
        return torch.einsum("br,bc,brcf->bf", wq, tpow, vals)
    if isinstance(cols, int):
        vals = cell[..., cols][first, rows]  # (B, 4, 4)
    else:
        vals = cell[first, rows, :, cols[:, None]]  # (B, 4, 4)
    return torch.einsum("br,bc,brc->b", wq, tpow, vals)


class LHAPDFModulePDF:
    """The same interface as :class:`GridPDF`, evaluated by the C++ LHAPDF library
    through its Python module (used when importable)."""

    def __init__(self, name: str, member: int = 0, device="cpu", dtype=torch.float64):
        import lhapdf  # type: ignore

        lhapdf.setVerbosity(0)
        self._pdf = lhapdf.mkPDF(name, member)
        self.name, self.member, self.interpolation = name, member, "lhapdf"
        self.pids = list(self._pdf.flavors())
        self._device, self._dtype = torch.device(device), dtype
        self.info = {}
        self.x_min, self.x_max = self._pdf.xMin, self._pdf.xMax
        self.q_min, self.q_max = math.sqrt(self._pdf.q2Min), math.sqrt(self._pdf.q2Max)

    @property
    def device(self):
        return self._device

    def xfxQ2_all(self, x, q2):
        xs = torch.as_tensor(x).reshape(-1).double().cpu().numpy()
        qs = torch.as_tensor(q2).reshape(-1).double().cpu().numpy()
        out = np.array([[self._pdf.xfxQ2(p, a, b) for p in self.pids] for a, b in zip(xs, qs)])
        return torch.as_tensor(out, dtype=self._dtype, device=self._device).reshape(len(xs), len(self.pids))

    def xfxQ2(self, pid, x, q2):
        all_f = self.xfxQ2_all(x, q2)
        index = {p: i for i, p in enumerate(self.pids)}
        if isinstance(pid, int):
            pid = 21 if pid == 0 else pid
            return all_f[:, index[pid]] if pid in index else torch.zeros_like(all_f[:, 0])
        cols = [index.get(21 if int(p) == 0 else int(p), -1) for p in torch.as_tensor(pid).reshape(-1).tolist()]
        padded = torch.cat([all_f, torch.zeros_like(all_f[:, :1])], 1)
        idx = torch.tensor([c if c >= 0 else len(self.pids) for c in cols], device=all_f.device)
        return padded.gather(1, idx[:, None])[:, 0]

    def xfxQ(self, pid, x, q):
        q = torch.as_tensor(q, dtype=self._dtype)
        return self.xfxQ2(pid, x, q * q)


def load_pdf(
    name: str,
    member: int = 0,
    backend: str = "auto",
    interpolation: str = "logbicubic",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
):
    """Open a PDF set member.

    ``backend="auto"`` uses the lhapdf Python module when it is importable and the
    request is for CPU, otherwise the torch grid reader; ``"lhapdf"`` and ``"grid"``
    force one or the other.
    """
    if backend not in ("auto", "lhapdf", "grid"):
        raise PDFError(f"PDF backend {backend!r} is not one of 'auto', 'lhapdf', 'grid'")
    if backend in ("auto", "lhapdf"):
        try:
            import lhapdf  # type: ignore  # noqa: F401

            if backend == "lhapdf" or torch.device(device).type == "cpu":
                return LHAPDFModulePDF(name, member, device=device, dtype=dtype)
        except ImportError:
            if backend == "lhapdf":
                raise PDFError("backend 'lhapdf' asked for, but the lhapdf Python module is not importable") from None
    return GridPDF(name, member, interpolation=interpolation, device=device, dtype=dtype)


class AlphaS:
    """Running strong coupling α_s(Q²) at 0 (fixed), 1, 2 or 3 loops, fixed by α_s(M_Z).

    Uses the asymptotic solution in Λ (PDG QCD review, eq. 9.5) with Λ^(nf) matched
    for continuity of α_s at the quark-mass thresholds, the scheme of Pythia 8's
    ``AlphaStrong``.

    Arguments:
        alpha_s_mz: α_s at M_Z.
        order: loops in the running (0 = fixed value).
        mz: Z mass in GeV.
        thresholds: (m_c, m_b, m_t) flavour thresholds in GeV.
        nf_max: largest number of active flavours.

    Example:
        >>> round(float(AlphaS(0.118, order=2)(torch.tensor(91.1876**2))), 6)
        0.118
    """

    def __init__(
        self,
        alpha_s_mz: float = 0.118,
        order: int = 2,
        mz: float = 91.1876,
        thresholds: Sequence[float] = (1.5, 4.8, 171.0),
        nf_max: int = 5,
    ):
        if order not in (0, 1, 2, 3):
            raise ValueError(f"alpha_s order must be 0, 1, 2 or 3, got {order}")
        if not 0.0 < alpha_s_mz < 1.0:
            raise ValueError(f"alpha_s(M_Z) must lie in (0, 1), got {alpha_s_mz}")
        self.alpha_s_mz, self.order, self.mz, self.nf_max = alpha_s_mz, order, mz, nf_max
        self.thresholds = tuple(float(t) for t in thresholds)
        self.lambdas: dict[int, float] = {}
        if order > 0:
            lam5 = self._solve_lambda(alpha_s_mz, mz**2, 5)
            self.lambdas[5] = lam5
            mc, mb, mt = self.thresholds
            self.lambdas[4] = self._solve_lambda(self._formula(mb**2, lam5, 5), mb**2, 4)
            self.lambdas[3] = self._solve_lambda(self._formula(mc**2, self.lambdas[4], 4), mc**2, 3)
            self.lambdas[6] = self._solve_lambda(self._formula(mt**2, lam5, 5), mt**2, 6)

    def _formula(self, q2: float, lam: float, nf: int) -> float:
        return float(self._alpha(torch.tensor(q2, dtype=torch.float64), lam, nf))

    def _alpha(self, q2, lam, nf):
        b0 = (33.0 - 2.0 * nf) / (12.0 * math.pi)
        b1 = (153.0 - 19.0 * nf) / (24.0 * math.pi**2)
        b2 = (2857.0 - 5033.0 * nf / 9.0 + 325.0 * nf**2 / 27.0) / (128.0 * math.pi**3)
        t = torch.log(q2 / lam**2)
        a = 1.0 / (b0 * t)
        if self.order == 1:
            return a
        lt = torch.log(t)
        corr = 1.0 - b1 * lt / (b0**2 * t)
        if self.order == 3:
            corr = corr + (b1**2 * (lt**2 - lt - 1.0) + b0 * b2) / (b0**4 * t**2)
        return a * corr

    def _solve_lambda(self, alpha: float, q2: float, nf: int) -> float:
        # α_s decreases monotonically with ln(Q²/Λ²) in the perturbative region:
        # bisection in ln Λ on a bracket far below Q.
        lo, hi = math.log(1e-6), math.log(math.sqrt(q2)) - 1.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if self._formula(q2, math.exp(mid), nf) > alpha:
                hi = mid
            else:
                lo = mid
        return math.exp(0.5 * (lo + hi))

    def __call__(self, q2: torch.Tensor) -> torch.Tensor:
        """α_s at the squared scale Q² (tensor of any shape)."""
        q2 = torch.as_tensor(q2)
        if not q2.is_floating_point():
            q2 = q2.to(torch.float64)
        if self.order == 0:
            return torch.full_like(q2, self.alpha_s_mz)
        mc, mb, mt = self.thresholds
        # Below ~2Λ the asymptotic formula has no meaning: freeze α_s there.
        q2 = torch.clamp(q2, min=4.0 * self.lambdas[3] ** 2)
        out = torch.empty_like(q2)
        nf = torch.full_like(q2, 5, dtype=torch.long)
        nf = torch.where(q2 < mb**2, 4, nf)
        nf = torch.where(q2 < mc**2, 3, nf)
        if self.nf_max >= 6:
            nf = torch.where(q2 >= mt**2, 6, nf)
        for n in (3, 4, 5, 6):
            mask = nf == n
            if bool(mask.any()):
                out[mask] = self._alpha(q2[mask], self.lambdas[n], n).to(q2.dtype)
        return out


def from_card(physics, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64):
    """The PDF and α_s a card's ``physics`` section asks for: (pdf, alpha_s)."""
    pdf = load_pdf(
        physics.pdf.set, physics.pdf.member, backend=physics.pdf.backend,
        interpolation=physics.pdf.interpolation, device=device, dtype=dtype,
    )
    return pdf, AlphaS(physics.alpha_s.value_mz, order=physics.alpha_s.order)
