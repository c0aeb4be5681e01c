"""Write a card's selected detector-level events, with their parton truth, as HDF5.

The file is what ``unfold --card … --model RUN/model.pt --input FILE`` reads. With a
seed other than the one the model was trained with, every event is independent of
its training, so a model can be evaluated on many more events than its own test
split (a quarter of its card's events): the ratio to the truth of a bin holding 1% of
the events has a statistical error of 1/√(0.01 N).

    PARTONIC_CACHE=runs/cache_s2 python examples/zw_export_events.py --card cards/zw.yaml \
        --set seed=2 --output runs/zw_seed2_detector.h5

The events are simulated (Pythia8 + FastJet, cached as by ``unfold``) or read from the
cache, and the card's detector response is applied exactly as ``unfold`` does.
"""

from __future__ import annotations

import argparse

from partonic.cards import CardError, load_card
from partonic.jobs.unfold import CHANNELS, load_events


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--card", required=True, help="unfolding process card (YAML)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--output", required=True, help="HDF5 file to write")
    args = ap.parse_args()
    try:
        card = load_card(args.card, overrides=args.overrides)
    except CardError as exc:
        raise SystemExit(str(exc)) from None
    if card.job != "unfold":
        raise SystemExit(f"{args.card}: an unfolding card is needed (job: unfold), not job: {card.job}")
    events, meta = load_events(card)
    path = events.to_hdf5(args.output)
    channels = ", ".join(f"{c}: {int(events.channel_mask(c).sum())}" for c in CHANNELS)
    print(f"{path}: {len(events)} selected events ({channels}) of {events.n_generated} generated, seed {card.seed}, "
          f"{'from the cache' if meta.get('cached') else 'simulated'}")


if __name__ == "__main__":
    main()
