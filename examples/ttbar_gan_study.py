"""Short MMD-GAN studies on Pythia8 tt̄ events: train one configuration for a fixed
number of steps and print the fitted W/top peaks (position, width, FWHM), the mean
pT imbalance of the six quarks, the largest bulk deviation of each quark's pT and η,
and pT/η percentiles of the first three quarks (a collapsed generator shows at once).

    python examples/ttbar_gan_study.py --representation momenta --mmd-weight 1 \
        --widths 1,5,25 --steps 1500 --batch-statistics

The studies behind the choices of cards/ttbar.yaml are listed in docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np
import torch

from partonic.cards import TrainingSection
from partonic.evaluate.metrics import compare_histograms, fit_breit_wigner
from partonic.jobs.generate import on_shell
from partonic.models.mmd_gan import RESONANCES, MMDGAN, TopQuarkRepresentation, resonance_masses
from partonic.physics import kinematics as kin
from partonic.simulate.pythia import simulate_ttbar
from partonic.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--representation", default="momenta", choices=["momenta", "ptetaphi", "logpt", "decay"])
    ap.add_argument("--generator", default="mlp", choices=["mlp", "residual"])
    ap.add_argument("--decay-angles", default="lab", choices=["lab", "helicity"])
    ap.add_argument("--marginals", default="standard", choices=["standard", "quantile"])
    ap.add_argument("--mmd-weight", type=float, default=1.0)
    ap.add_argument("--widths", default="1", help="MMD kernel widths in units of each resonance's width, comma-separated")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--gradient-penalty", type=float, default=1.0)
    ap.add_argument("--discriminator-masses", action="store_true")
    ap.add_argument("--batch-statistics", action="store_true")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--mmd-start", type=int, default=0, help="steps without the MMD term")
    ap.add_argument("--mmd-ramp", type=int, default=0, help="steps over which the MMD weight ramps up")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.0, help="decay of the generator's weight average (0: none)")
    ap.add_argument("--d-lr-factor", type=float, default=1.0, help="discriminator learning rate / generator learning rate")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    arrays, _ = simulate_ttbar(args.events, args.seed, progress=False)
    truth = on_shell(torch.from_numpy(arrays["quarks"]))
    torch.manual_seed(args.seed)
    gan = MMDGAN(
        TopQuarkRepresentation(args.representation, angles=args.decay_angles, marginals=args.marginals).fit(truth), width=args.width, layers=args.layers,
        mmd_weight=args.mmd_weight, mmd_width_factors=[float(w) for w in args.widths.split(",")],
        gradient_penalty=args.gradient_penalty, discriminator_masses=args.discriminator_masses,
        batch_statistics=args.batch_statistics, mmd_start_step=args.mmd_start, mmd_ramp_steps=args.mmd_ramp,
        discriminator_lr_factor=args.d_lr_factor, ema_decay=args.ema, generator=args.generator,
    )
    cfg = TrainingSection(batch_size=1024, max_steps=args.steps, optimizer={"name": "adam", "lr": args.lr, "betas": (0.5, 0.9)},
                          schedule={"name": "constant"}, log_every=max(args.steps // 10, 1), checkpoint_every=10**9, validation_fraction=0)
    with tempfile.TemporaryDirectory() as tmp:
        result = train(gan, lambda mod, batch: mod.loss(batch), (truth,), cfg, tmp, seed=args.seed, progress=False)
    gan.eval()
    gen = gan.sample(len(truth))
    out = {"config": vars(args), "s_per_step": result.train_s / args.steps,
           "history": [{k: round(r[k], 4) for k in ("step", "loss_d", "loss_g", "mmd") if k in r} for r in result.history]}
    m_truth, m_gen = resonance_masses(truth).numpy(), resonance_masses(gen).numpy()
    for k, (name, (_, mass, width)) in enumerate(RESONANCES.items()):
        t, g = fit_breit_wigner(m_truth[:, k], mass, width), fit_breit_wigner(m_gen[:, k], mass, width)
        out[f"m_{name}"] = {"truth_position": t.position, "truth_width": t.width, "position": g.position, "width": g.width, "fwhm": g.fwhm}
    out["mean_pt_imbalance_gev"] = float(kin.pt(gen.sum(1)).mean())
    dev = {}
    for j in range(6):
        dev[f"pt_{j}"] = compare_histograms(kin.pt(gen[:, j]), kin.pt(truth[:, j]), np.linspace(0, 300, 31)).max_bulk_deviation
        dev[f"eta_{j}"] = compare_histograms(kin.eta(gen[:, j]), kin.eta(truth[:, j]), np.linspace(-5, 5, 31)).max_bulk_deviation
    out["max_bulk_deviation"] = dev
    out["percentiles_10_50_90"] = {
        f"quark_{j}": {"pt_truth": np.percentile(kin.pt(truth[:, j]), [10, 50, 90]).tolist(), "pt_gen": np.percentile(kin.pt(gen[:, j]), [10, 50, 90]).tolist(),
                       "eta_gen": np.percentile(kin.eta(gen[:, j]), [10, 50, 90]).tolist()}
        for j in range(3)
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
