"""LHE write and read speed (events/s) of partonic.io.lhe, plain and gzip.

Events are 5-particle Drell-Yan parton-level events (u ubar -> Z -> mu mu).

    python benchmarks/lhe_io.py [--events 50000] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _common import device_description, write_result  # noqa: E402
from conftest import drell_yan_lhe_events  # noqa: E402
from partonic.io.lhe import LHEInit, LHEProcess, read_lhe, write_lhe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--out")
    args = ap.parse_args()
    events = drell_yan_lhe_events(args.events)
    init = LHEInit(processes=[LHEProcess(1500.0, 1.0, 1.0, 1)])
    results = {"device": device_description("cpu"), "events": args.events, "particles_per_event": 5}
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in (".lhe", ".lhe.gz"):
            path = Path(tmp) / f"bench{suffix}"
            t0 = time.perf_counter()
            write_lhe(path, events, init)
            write_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            _, back = read_lhe(path)
            read_s = time.perf_counter() - t0
            assert len(back) == args.events
            results[suffix.lstrip(".")] = {
                "write_events_per_s": args.events / write_s,
                "read_events_per_s": args.events / read_s,
                "bytes_per_event": path.stat().st_size / args.events,
            }
    write_result("lhe_io", results, args.out)


if __name__ == "__main__":
    main()
