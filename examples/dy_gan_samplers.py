"""Which sampler of a trained weighted Drell–Yan GAN is closest to the truth: the last
iterate, moving averages of the generator's weights with several decays, or a mixture
of the live generator's snapshots (an average of distributions, not of weights).

Trains the card's GAN through the project's training loop (the job's batches and
schedule), keeps averages with decays 0.99 and 0.9999 next to the card's own, and
snapshots of the live generator every ``--snap-every`` steps over the last
``--snap-last`` steps. At the end it draws 10⁶ events from each sampler and prints the
largest bulk deviation of every observable from the quadrature truth, and the m_μμ
ratio in the bins between 54 and 80 GeV (also every ``--every`` steps during training).

    python examples/dy_gan_samplers.py --card cards/drell_yan_gan.yaml --out samplers.json

The findings are in docs/results.md (Unweighting, Flow and GAN modes).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time

import numpy as np
import torch

from partonic.cards import load_card
from partonic.evaluate.metrics import compare_to_expected
from partonic.jobs.unweight import OBSERVABLES, drell_yan_setup, network_model, network_preprocessing, observables
from partonic.models.weighted_gan import latent_batches, update_weight_average, weight_average
from partonic.physics.pdf import from_card
from partonic.simulate.weighted import DrellYanGenerator, exact_histograms
from partonic.train import seed_everything, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--card", default="cards/drell_yan_gan.yaml")
    ap.add_argument("--set", action="append", default=[], help="card overrides, as for partonic")
    ap.add_argument("--every", type=int, default=2500)
    ap.add_argument("--snap-every", type=int, default=50)
    ap.add_argument("--snap-last", type=int, default=4000)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--out", default=None, help="JSON file for the figures")
    args = ap.parse_args()

    card = load_card(args.card, overrides=args.set)
    m = card.model
    if m.method != "gan" or m.ema_decay == 0:
        raise SystemExit(f"{args.card}: needs model.method = gan with a weight average (ema_decay > 0), got {m.method}, {m.ema_decay}")
    seed_everything(card.seed)
    pdf, _ = from_card(card.physics)
    setup = drell_yan_setup(card)
    gen = DrellYanGenerator(setup, pdf)
    ev = gen.generate(card.data.n_events, torch.Generator().manual_seed(card.seed), batch_size=card.data.batch_size)
    keep = ev.weight != 0
    x, w = torch.stack([ev.m, ev.y, ev.cos_theta], 1)[keep], ev.weight[keep]
    edges = {name: f(setup.m_min) for name, (_, f, _) in OBSERVABLES.items()}
    exact = exact_histograms(gen, edges)
    pre = network_preprocessing(gen, m.rapidity, m.marginals).fit(x, w)
    gan = network_model(pre, m)  # the job's GAN, every card option included
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(card.seed + 2))
    tr = perm[int(card.training.validation_fraction * len(perm)):]
    total = card.training.epochs * (len(tr) // card.training.batch_size)
    extra = {d: weight_average(gan.generator, d) for d in (0.99, 0.9999)}
    snapshots: list[torch.nn.Module] = []
    centres = np.sqrt(edges["m_ll"][1:] * edges["m_ll"][:-1])
    window = (centres > 54) & (centres < 80)

    def draw(nets, n, seed):
        g = torch.Generator().manual_seed(seed)
        per = n // len(nets)
        return torch.cat([pre.inverse(net(z).double())[0] for net in nets for z in latent_batches(net, m.latent_dim, per, g, 262_144)])

    def m_window(sample):
        h = np.histogram(sample[:, 0].numpy(), edges["m_ll"])[0] / len(sample)
        return [round(float(v), 3) for v in (h / (exact["m_ll"] / exact["m_ll"].sum()))[window]]

    def samplers():
        return {"average (card)": [gan.generator_ema], "last iterate": [gan.generator], "average 0.99": [extra[0.99]], "average 0.9999": [extra[0.9999]]}

    step = {"n": 0}
    log = []

    def loss_fn(model, batch):
        out = model.loss(batch)
        if torch.is_grad_enabled() and model.training:
            s = step["n"]
            for d, avg in extra.items():
                update_weight_average(avg, model.generator, d)
            if s >= total - args.snap_last and s % args.snap_every == 0:
                snapshots.append(copy.deepcopy(model.generator).requires_grad_(False))
            if s and s % args.every == 0:
                model.eval()
                with torch.no_grad():
                    row = {"step": s, **{k: m_window(draw(v, args.events, 11)) for k, v in samplers().items()}}
                model.train()
                print(json.dumps(row), flush=True)
                log.append(row)
            step["n"] = s + 1
        return out

    print(json.dumps({"training_events": len(tr), "steps": total, "m_window_bin_centres_GeV": [round(float(c), 1) for c in centres[window]]}), flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        train(gan, loss_fn, (x[tr], w[tr]), card.training, folder, seed=card.seed, progress=False)
    final = {"train_s": round(time.perf_counter() - t0, 1)}
    gan.eval()
    choices = samplers()
    choices[f"mixture of the last {args.snap_last} steps"] = snapshots
    choices[f"mixture of the last {args.snap_last // 4} steps"] = snapshots[-max(1, len(snapshots) // 4):]
    with torch.no_grad():
        for name, nets in choices.items():
            sample = draw(nets, args.events, 12)
            obs = observables(sample, 2 * math.pi * torch.rand(len(sample), generator=torch.Generator().manual_seed(13), dtype=torch.float64), gen.lepton_mass)
            devs = {}
            for o, e in edges.items():
                c = compare_to_expected(obs[o], exact[o], e)
                devs[o] = [round(c.max_bulk_deviation, 4), round(c.max_bulk_deviation_error, 4), round(c.chi2_ndf, 2)]
            final[name] = {"max_bulk_deviation_error_chi2ndf": devs, "m_window": m_window(sample)}
            print(name, json.dumps(final[name]), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"card": args.card, "overrides": args.set, "during": log, "final": final}, fh, indent=1)


if __name__ == "__main__":
    main()
