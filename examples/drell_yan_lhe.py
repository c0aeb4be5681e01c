"""A first tour of the library: PDFs, the weighted generator, unweighting, LHE, Pythia8.

Generates LO pp -> gamma*/Z -> mu+ mu- events by Monte Carlo with the torch PDF
reader (multichannel sampling of the momentum fractions, RAMBO on diet for the
decay), compares σ with the quadrature, unweights a few thousand events by
hit-or-miss, writes them as LHE and lets Pythia8 shower them.

    python examples/drell_yan_lhe.py [--events 500000] [--output runs/example]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from partonic.evaluate.metrics import hit_or_miss, unweighting_efficiency
from partonic.io.lhe import LHEInit, LHEProcess, write_lhe
from partonic.jobs.unweight import lhe_events_from_kinematics
from partonic.physics.pdf import GridPDF
from partonic.simulate.pythia import shower_lhe
from partonic.simulate.weighted import DrellYanGenerator, DrellYanSetup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=500_000)
    ap.add_argument("--unweighted", type=int, default=2000)
    ap.add_argument("--output", default="runs/example")
    args = ap.parse_args()
    rng = torch.Generator().manual_seed(1)
    generator = DrellYanGenerator(DrellYanSetup(sqrt_s=13000.0, m_min=50.0, mapping="multichannel"), GridPDF("NNPDF23_lo_as_0130_qed"))
    events = generator.generate(args.events, rng)
    sigma = events.weight.mean().item()
    error = events.weight.std().item() / math.sqrt(args.events)
    print(f"sigma(pp -> mu mu, m > 50 GeV, 13 TeV, LO) = {sigma:.1f} +- {error:.1f} pb (quadrature: {generator.integrate():.1f} pb)")
    print(f"unweighting efficiency of this sample: {unweighting_efficiency(events.weight).efficiency:.3f}")

    kept = hit_or_miss(events.weight, generator=rng)[: args.unweighted]
    x = torch.stack([events.m, events.y, events.cos_theta], 1)[kept]
    phi = 2 * math.pi * torch.rand(len(kept), generator=rng, dtype=torch.float64)
    lhe = lhe_events_from_kinematics(x, phi, generator, sigma, rng)
    path = write_lhe(Path(args.output) / "drell_yan.lhe.gz", lhe, LHEInit(weighting=3, processes=[LHEProcess(sigma, error, sigma, 1)]))
    print(f"wrote {len(kept)} unweighted events to {path}")
    summary = shower_lhe(path)
    print(f"Pythia8 showered {summary.n_accepted}/{summary.n_events} events, errors: {summary.errors or 'none'}, "
          f"{summary.n_final:.0f} final-state particles per event")


if __name__ == "__main__":
    main()
