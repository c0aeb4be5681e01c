"""PDF evaluations per second: partonic's torch grid reader (CPU, and GPU when present)
against Pythia8's LHAGrid1 called point by point from Python.

One "evaluation" is x·f(x, Q²) of one flavour at one point; the torch reader gives
all flavours of the set at once, so both figures are reported.

    python benchmarks/pdf_throughput.py [--set NNPDF23_lo_as_0130_qed] [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from _common import device_description, write_result
from partonic.physics.pdf import GridPDF
from partonic.simulate.pythia import new_pythia


def time_torch(pdf: GridPDF, n: int, repeats: int, device: str, pid: int | None = None) -> float:
    gen = torch.Generator().manual_seed(1)
    x = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(pdf.x_min), math.log(pdf.x_max), generator=gen)).to(device)
    q = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(pdf.q_min), math.log(pdf.q_max), generator=gen)).to(device)
    evaluate = pdf.xfxQ2_all if pid is None else (lambda a, b: pdf.xfxQ2(pid, a, b))
    evaluate(x[:1000], (q * q)[:1000])  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        evaluate(x, q * q)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--set", default="NNPDF23_lo_as_0130_qed")
    ap.add_argument("--points", type=int, default=1_000_000)
    ap.add_argument("--pythia-points", type=int, default=20_000)
    ap.add_argument("--out")
    args = ap.parse_args()

    results: dict = {"pdf_set": args.set, "ours": {}}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for interp in ("logbicubic", "lagrange"):
            for dtype in (torch.float64, torch.float32):
                pdf = GridPDF(args.set, interpolation=interp, device=device, dtype=dtype)
                n = args.points if device == "cpu" else 10 * args.points
                dt = time_torch(pdf, n, repeats=3, device=device)
                dt_one = time_torch(pdf, n, repeats=3, device=device, pid=21)
                key = f"{device}/{interp}/{str(dtype).split('.')[-1]}"
                results["ours"][key] = {
                    "device": device_description(device),
                    "points": n,
                    "all_flavours_points_per_s": n / dt,
                    "flavour_evaluations_per_s": n * len(pdf.pids) / dt,
                    "one_flavour_points_per_s": n / dt_one,
                    "flavours": len(pdf.pids),
                }

    pdf = GridPDF(args.set)
    py = new_pythia()  # finds Pythia's settings wherever the wheel was installed
    py.readString(f"PDF:pSet = LHAGrid1:{pdf.path}")
    ref = py.getPDFPtr(2212)
    rng = np.random.default_rng(1)
    x = np.exp(rng.uniform(math.log(pdf.x_min), math.log(pdf.x_max), args.pythia_points))
    q2 = np.exp(rng.uniform(2 * math.log(pdf.q_min), 2 * math.log(pdf.q_max), args.pythia_points))
    t0 = time.perf_counter()
    for a, b in zip(x.tolist(), q2.tolist()):
        ref.xf(21, a, b)
    one = time.perf_counter() - t0
    flavours = (-5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 21, 22)
    t0 = time.perf_counter()
    for a, b in zip(x.tolist(), q2.tolist()):
        for f in flavours:
            ref.xf(f, a, b)
    every = time.perf_counter() - t0
    results["pythia_lhagrid1_python"] = {
        "device": device_description("cpu") + " (one core, Python loop)",
        "points": args.pythia_points,
        "one_flavour_points_per_s": args.pythia_points / one,
        "all_flavours_points_per_s": args.pythia_points / every,
        "flavour_evaluations_per_s": args.pythia_points * len(flavours) / every,
    }
    write_result("pdf_throughput", results, args.out)


if __name__ == "__main__":
    main()
