"""Throughput of the unfolding chain, CPU and GPU when present:

- Pythia8 pp → ZW with ISR/FSR/hadronisation + FastJet + isolation on one core
  (events/s, with and without data.lepton_veto), and the vectorised detector response and selection (events/s);
- cINN training time per epoch at a card's network size (for the card's
  training-set size, measured over a number of steps on real selected events);
- unfolding throughput in parton-level samples/s at that size, in large batches.

    python benchmarks/unfold_throughput.py [--card cards/zw.yaml] [--events 3000] [--out FILE]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import device_description, write_result
from partonic.cards import load_card
from partonic.jobs.unfold import lepton_veto_cuts
from partonic.models.cinn import Unfolder
from partonic.simulate.detector import apply_detector
from partonic.simulate.pythia import zw_chunk, zw_settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--card", default="cards/zw.yaml")
    ap.add_argument("--events", type=int, default=3000, help="Pythia8 events to time (one core)")
    ap.add_argument("--steps", type=int, default=100, help="training steps to time")
    ap.add_argument("--samples", type=int, default=2_000_000, help="parton-level samples to time")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out")
    args = ap.parse_args()
    card = load_card(args.card)
    d = card.data
    result: dict = {"card": args.card, "device": device_description(args.device)}

    # ---- Pythia8 + FastJet on one core ---------------------------------------
    # with and without data.lepton_veto (the same events: the veto leaves Pythia's random
    # sequence alone); the card's setting is the one that goes on below
    objects = {"radius": d.detector.jet_radius, "isolation_dr": d.detector.isolation_dr, "isolation_ratio": d.detector.isolation_ratio}
    for veto in (False, True):
        extra = {"lepton_veto": lepton_veto_cuts(d.detector)} if veto else {}
        run = zw_chunk({"n_events": args.events, "settings": zw_settings(card.seed, sqrt_s=card.physics.sqrt_s), "objects": {**objects, **extra}})
        result[f"pythia_fastjet_events_per_s_one_core{'_lepton_veto' if veto else ''}"] = args.events / run["seconds"]
        if veto:
            result["lepton_vetoed_fraction"] = float(run["vetoed"].mean())
        if veto == d.lepton_veto:
            chunk = run
    t0 = time.perf_counter()
    reps = 20
    for k in range(reps):
        events = apply_detector(chunk["leptons"], chunk["lepton_ids"], chunk["jets"], d.detector, np.random.default_rng(k), chunk["partons"], chunk["parton_ids"])
    result["detector_events_per_s"] = reps * args.events / (time.perf_counter() - t0)
    result["selection_efficiency"] = len(events) / args.events

    # ---- training step time at the card's size ---------------------------------
    torch.manual_seed(card.seed)
    unfolder = Unfolder(d.detector.max_jets, card.model).fit(events)
    data = unfolder.training_data(events)
    unfolder.to(args.device)
    opt = torch.optim.Adam([p for p in unfolder.parameters() if p.requires_grad], card.training.optimizer.lr)
    bs = card.training.batch_size
    idx = torch.randint(0, len(data[0]), (args.steps + 10, bs))
    on_device = [d.to(args.device) for d in data]

    def step(i):
        out = unfolder.loss([d[idx[i]] for d in on_device])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    for i in range(10):  # warm-up
        step(i)
    if args.device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(10, args.steps + 10):
        step(i)
    if args.device == "cuda":
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - t0) / args.steps
    n_train = int(0.15 * d.n_events * (1 - d.test_fraction) * (1 - card.training.validation_fraction))
    # every further detector realisation adds about as many events; the rotation doubles them
    n_train *= (1 + d.resmear) * (2 if d.symmetrise else 1)
    result["train_step_s"] = per_step
    result["train_events_assumed"] = n_train
    result["train_s_per_epoch"] = per_step * (n_train // bs)
    result["parameters"] = sum(p.numel() for p in unfolder.parameters() if p.requires_grad)

    # ---- unfolding throughput ---------------------------------------------------
    unfolder.eval()
    s = card.evaluation.samples_per_event
    n_ev = max(1, args.samples // s)
    pick = torch.randint(0, len(data[1]), (n_ev,))
    c = data[1][pick]
    valid = data[3][pick] if unfolder.pairs else None
    gen = torch.Generator(device=args.device).manual_seed(1)
    m = max(1, n_ev // 20)
    unfolder.sample_features(c[:m], s, card.evaluation.batch_size, gen, valid=None if valid is None else valid[:m])  # warm-up
    if args.device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    unfolder.sample_features(c, s, card.evaluation.batch_size, gen, valid=valid)
    if args.device == "cuda":
        torch.cuda.synchronize()
    result["unfold_samples_per_s"] = n_ev * s / (time.perf_counter() - t0)
    result["unfold_batch_size"] = card.evaluation.batch_size
    write_result(f"unfold_throughput_{'gpu' if args.device == 'cuda' else 'cpu'}", result, args.out)


if __name__ == "__main__":
    main()
