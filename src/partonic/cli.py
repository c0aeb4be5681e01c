"""Command line: ``partonic <command>`` and the ``unfold`` shortcut.

Every job takes ``--card FILE [--set a.b=value ...] [--output DIR]
[--device auto|cpu|cuda] [--resume]``. User errors end with a one-paragraph
message and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from contextlib import contextmanager

from . import __version__
from .cards import CardError, load_card

__all__ = ["main", "unfold_main", "build_parser"]

JOB_HELP = {
    "unfold": "unfold detector-level events to parton level with a conditional INN",
    "unweight": "turn weighted Monte Carlo events into unweighted events with a GAN or flow",
    "generate": "generate resonant events (pp -> ttbar -> 6 quarks) with an MMD-regularised GAN",
}


def _add_job_arguments(p: argparse.ArgumentParser, job: str) -> None:
    p.add_argument("--card", required=True, help="process card (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a card entry, e.g. --set training.epochs=5 (repeatable)")
    p.add_argument("--output", help="run folder (default: the card's output, else runs/<name>)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the card's device")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    if job == "unfold":
        p.add_argument("--model", action="append", help="trained model (RUN/model.pt): unfold --input without retraining; "
                       "repeat it for an ensemble: each model draws its share of the samples per event")
        p.add_argument("--input", action="extend", nargs="+", metavar="FILE",
                       help="detector-level events to unfold (HDF5 or Delphes ROOT; several files are read in order, "
                       "e.g. --input part_*.root), with --model")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="partonic",
        description="Generative networks for collider physics, each job run from a YAML process card.",
    )
    parser.add_argument("--version", action="version", version=f"partonic {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for job, text in JOB_HELP.items():
        _add_job_arguments(sub.add_parser(job, help=text, description=text), job)
    check = sub.add_parser("check-card", help="validate a card without running it",
                           description="Validate a process card (with optional --set overrides) and print it resolved.")
    check.add_argument("card", help="process card (YAML)")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a card entry before validating it, e.g. --set training.epochs=5 (repeatable)")
    check.add_argument("--quiet", action="store_true", help="print only 'ok' or the errors")
    return parser


def _fail(message: str, code: int = 2) -> int:
    print(f"partonic: error: {message}", file=sys.stderr)
    return code


def _check_card(args) -> int:
    import yaml

    from .cards import card_to_dict

    card = load_card(args.card, args.overrides)
    _check_pdf_set(card, args.card)
    if args.quiet:
        print(f"ok: {args.card} ({card.job})")
    else:
        print(f"# {args.card}: valid {card.job} card, resolved with defaults")
        print(yaml.safe_dump(card_to_dict(card), sort_keys=False), end="")
    return 0


def _check_pdf_set(card, source) -> None:
    """The card's PDF set member must be found as the job will look for it (the lhapdf
    module for backend lhapdf; the module or the grid files for auto; the grid files for
    grid): an unknown set is a card error. An unfolding card that reads its events from
    files needs no PDF."""
    from .physics.pdf import PDFError, find_pdf_member

    if card.job == "unfold" and getattr(card.data, "source", "pythia") != "pythia":
        return
    pdf = card.physics.pdf
    problem = None
    if pdf.backend in ("auto", "lhapdf"):
        try:
            import lhapdf  # type: ignore

            lhapdf.setVerbosity(0)
            lhapdf.mkPDF(pdf.set, pdf.member)
            return
        except ImportError:
            problem = "backend 'lhapdf' asks for the lhapdf Python module, which is not importable"
        except Exception as exc:  # noqa: BLE001 - the module does not know the set
            problem = f"the lhapdf module cannot open it ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        if pdf.backend == "lhapdf":
            raise CardError(f"invalid card {source}:\n  physics.pdf.set = {pdf.set!r} (member {pdf.member}): {problem}")
    try:
        find_pdf_member(pdf.set, pdf.member)
    except PDFError as exc:
        raise CardError(f"invalid card {source}:\n  physics.pdf.set = {pdf.set!r} (member {pdf.member}): {exc}") from None


def _mark_ended(status: str) -> None:
    """run.json of the run this job made, if any, says how it ended (so that a folder whose
    run failed before keeping anything can be taken over, and a live one cannot)."""
    from .jobs import common

    common.mark_ended(status)


def _run_job(args) -> int:
    from .jobs import common
    from .jobs.common import JobError

    common._ACTIVE = None  # noqa: SLF001 - this job's folder, not an earlier one's in the same process

    card = load_card(args.card, args.overrides)
    if card.job != args.command:
        raise CardError(f"{args.card} is a {card.job!r} card; run it with 'partonic {card.job}'")
    if args.device:
        card.device = args.device
    try:
        module = importlib.import_module(f".jobs.{args.command}", __package__)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.endswith(f"jobs.{args.command}"):
            raise JobError(f"the {args.command!r} job is not available in partonic {__version__}") from None
        raise
    return int(module.run(card, args) or 0)


_KEPT = ("what was finished is kept (training checkpoints, simulation and unfolding chunks): "
         "rerun the same command with --resume to continue")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch system's end of the job, ``kill``) raised in the job as an
    interruption, so that it ends as Ctrl-C does: files being written are removed,
    finished checkpoints and chunks are kept."""


@contextmanager
def _sigterm_interrupts():
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    from .jobs.common import JobError
    from .physics.pdf import PDFError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "check-card":
            return _check_card(args)
        with _sigterm_interrupts():
            try:
                return _run_job(args)
            except KeyboardInterrupt:
                _mark_ended("interrupted")
                raise
            except BaseException:
                _mark_ended("failed")
                raise
    except CardError as exc:
        return _fail(str(exc))
    except (JobError, PDFError, FileNotFoundError) as exc:
        return _fail(str(exc), code=1)
    except Terminated:
        return _fail(f"terminated (SIGTERM); {_KEPT}", code=143)
    except KeyboardInterrupt:
        return _fail(f"interrupted; {_KEPT}", code=130)


def unfold_main(argv: list[str] | None = None) -> int:
    """The ``unfold`` shortcut: ``unfold ARGS`` is ``partonic unfold ARGS``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("--version",):
        return main(argv)
    parser = argparse.ArgumentParser(prog="unfold", description=JOB_HELP["unfold"] + " (same as 'partonic unfold')")
    _add_job_arguments(parser, "unfold")
    parser.parse_args(argv)  # --help and argument errors here, with this program's name
    return main(["unfold", *argv])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
