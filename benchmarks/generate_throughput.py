"""Throughput of the tt̄ generation chain, CPU and GPU when present:

- Pythia8 parton-level pp → tt̄ → 6 quarks on one core (events/s): the reference a
  user would otherwise run;
- MMD-GAN training step and time per epoch at a card's network size (for the card's
  training-set size), with and without the MMD term;
- generated events/s (six quark four-momenta) in large batches.

    python benchmarks/generate_throughput.py [--card cards/ttbar.yaml] [--out FILE]
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import device_description, write_result
from partonic.cards import load_card
from partonic.jobs.generate import _build, on_shell
from partonic.models.mmd_gan import TopQuarkRepresentation
from partonic.simulate.pythia import ttbar_chunk, ttbar_settings


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--card", default="cards/ttbar.yaml")
    ap.add_argument("--events", type=int, default=20_000, help="Pythia8 events to time (one core)")
    ap.add_argument("--steps", type=int, default=50, help="training steps to time")
    ap.add_argument("--generate", type=int, default=2_000_000, help="events to generate")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out")
    args = ap.parse_args()
    card = load_card(args.card)
    result: dict = {"card": args.card, "device": device_description(args.device)}

    chunk = ttbar_chunk({"n_events": args.events, "settings": ttbar_settings(card.seed, card.physics.sqrt_s)})
    result["pythia_parton_level_events_per_s_one_core"] = args.events / chunk["seconds"]
    quarks = on_shell(torch.from_numpy(chunk["quarks"]))
    rep = TopQuarkRepresentation(card.model.representation, angles=card.model.decay_angles, marginals=card.model.marginals).fit(quarks)
    bs = card.training.batch_size
    n_train = int(card.data.n_events * (1 - card.training.validation_fraction))
    data = quarks.to(args.device)
    idx = torch.randint(0, len(quarks), (args.steps + 5, bs))
    for label, weight in (("mmd", card.model.mmd_weight), ("no_mmd", 0.0)):
        torch.manual_seed(card.seed)
        gan = _build(card, rep, weight).to(args.device)
        opt = torch.optim.Adam(gan.parameters(), card.training.optimizer.lr, betas=card.training.optimizer.betas)
        # as the job feeds it: the truth's coordinates and masses, computed once
        inputs = gan.training_inputs(data) if rep.coordinate_training else (data,)

        def step(i):
            opt.zero_grad(set_to_none=True)
            gan.loss(tuple(t[idx[i]] for t in inputs))["loss"].backward()
            opt.step()

        for i in range(5):
            step(i)
        _sync(args.device)
        t0 = time.perf_counter()
        for i in range(5, args.steps + 5):
            step(i)
        _sync(args.device)
        per_step = (time.perf_counter() - t0) / args.steps
        result[f"train_step_s_{label}"] = per_step
        result[f"train_s_per_epoch_{label}"] = per_step * (n_train // bs)
    result["train_events_per_epoch"] = n_train
    result["parameters"] = sum(p.numel() for p in gan.parameters() if p.requires_grad)  # not the frozen weight average

    gan.eval()
    gan.sample(10_000)
    _sync(args.device)
    t0 = time.perf_counter()
    out = gan.sample(args.generate, batch_size=min(args.generate, 1_000_000))
    _sync(args.device)
    result["generate_events_per_s"] = args.generate / (time.perf_counter() - t0)
    result["generated_events"] = int(out.shape[0])
    write_result(f"generate_throughput_{'gpu' if args.device == 'cuda' else 'cpu'}", result, args.out)


if __name__ == "__main__":
    main()
