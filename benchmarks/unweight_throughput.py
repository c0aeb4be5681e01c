"""Throughput of the unweighting chain (events/s), CPU and GPU when present:

- the naive weighted Drell-Yan generator (flat sampling, PDFs included);
- unweighted events from a weighted GAN, a weighted flow, and the exact mode
  (flow samples reweighted to dσ and unweighted; its rate includes the rejections),
  each after a short training (throughput does not depend on the training length,
  except the exact mode's through its efficiency, which is reported alongside);
- LHE writing of unweighted events;
- Pythia8's own parton-level Drell-Yan generation on one core, the reference a user
  would otherwise run.

    python benchmarks/unweight_throughput.py [--events 1000000] [--out FILE]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from _common import device_description, write_result
from partonic.cards import TrainingSection
from partonic.jobs.unweight import DEFENSIVE_FRACTION, lhe_events_from_kinematics, unweight_with_copies
from partonic.evaluate.metrics import unweighting_efficiency
from partonic.io.lhe import LHEInit, LHEProcess, write_lhe
from partonic.models.weighted_flow import DrellYanPreprocessing, WeightedFlow
from partonic.models.weighted_gan import WeightedGAN
from partonic.physics.pdf import GridPDF
from partonic.simulate.pythia import pythia_drell_yan
from partonic.simulate.weighted import DrellYanGenerator, DrellYanSetup
from partonic.train import train


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--devices", default="cpu,cuda", help="comma-separated; cuda is skipped where there is none")
    ap.add_argument("--gpu-events", type=int, help="naive events on the GPU (default 20 × --events), in one batch")
    ap.add_argument("--pythia-events", type=int, default=100_000, help="Pythia8 Drell-Yan events of the reference")
    ap.add_argument("--out")
    args = ap.parse_args()
    results: dict = {}
    devices = [d for d in args.devices.split(",") if d == "cpu" or (d == "cuda" and torch.cuda.is_available())] or ["cpu"]
    for device in devices:
        r: dict = {"device": device_description(device)}
        pdf = GridPDF("NNPDF23_lo_as_0130_qed", device=device)
        gen = DrellYanGenerator(DrellYanSetup(mapping="flat"), pdf, device=device)
        n = args.events if device == "cpu" else (args.gpu_events or 20 * args.events)
        rng = torch.Generator(device=device).manual_seed(1) if device == "cuda" else torch.Generator().manual_seed(1)
        gen.generate(1000, rng)
        ev, dt = timed(lambda: gen.generate(n, rng, batch_size=n if device == "cuda" else 1_000_000), device)
        r["naive_weighted_events_per_s"] = n / dt
        r["naive_unweighting_efficiency"] = unweighting_efficiency(ev.weight.cpu()).efficiency
        # short trainings on Breit-Wigner-mapped weighted events
        train_gen = DrellYanGenerator(DrellYanSetup(mapping="breit_wigner"), pdf, device=device)
        tr = train_gen.generate(200_000, torch.Generator().manual_seed(2))
        keep = tr.weight != 0
        x, w = torch.stack([tr.m, tr.y, tr.cos_theta], 1)[keep], tr.weight[keep]
        pre = DrellYanPreprocessing(50.0, 13000.0, 91.188, 2.4414).fit(x.cpu(), w.cpu()).to(device)
        cfg = TrainingSection(batch_size=4096, epochs=1, max_steps=args.train_steps, log_every=100, validation_fraction=0)
        with tempfile.TemporaryDirectory() as tmp:
            flow = WeightedFlow(pre, dim=3, blocks=6, bins=16, width=128, layers=2)
            train(flow, lambda m, b: m.loss(b), (x, w), cfg, Path(tmp) / "f", seed=1, device=device, progress=False)
            gan = WeightedGAN(pre, dim=3, latent_dim=8, width=128, layers=4)
            train(gan, lambda m, b: m.loss(b), (x, w), cfg, Path(tmp) / "g", seed=1, device=device, progress=False)
        m = min(n, 2_000_000)
        _, dt = timed(lambda: gan.sample(m), device)
        r["gan_unweighted_events_per_s"] = m / dt
        _, dt = timed(lambda: flow.sample(m // 4), device)
        r["flow_unweighted_events_per_s"] = (m // 4) / dt

        def exact():
            xs, lq = flow.sample_defensive(m // 4, DEFENSIVE_FRACTION)
            wt = train_gen.density(xs[:, 0], xs[:, 1], xs[:, 2]) / lq.exp()
            eff = unweighting_efficiency(wt.cpu())
            return len(unweight_with_copies(wt, eff.w_max, torch.Generator().manual_seed(3))), eff

        (kept, eff), dt = timed(exact, device)
        r["flow_exact_unweighted_events_per_s"] = kept / dt
        r["flow_exact_efficiency_after_short_training"] = eff.efficiency
        results[device] = r

    xs, _ = flow.sample(50_000)
    events = lhe_events_from_kinematics(xs.cpu(), torch.zeros(len(xs), dtype=torch.float64), DrellYanGenerator(DrellYanSetup(), GridPDF("NNPDF23_lo_as_0130_qed")), 1500.0, torch.Generator().manual_seed(4))
    with tempfile.TemporaryDirectory() as tmp:
        _, dt = timed(lambda: write_lhe(Path(tmp) / "u.lhe", events, LHEInit(processes=[LHEProcess(1500.0, 1.0, 1500.0, 1)])), "cpu")
    results["lhe_write_events_per_s"] = len(events) / dt
    ref = pythia_drell_yan(n_events=args.pythia_events)
    results["pythia8_parton_level_dy_events_per_s_one_core"] = ref["events_per_s"]
    write_result("unweight_throughput", results, args.out)


if __name__ == "__main__":
    main()
