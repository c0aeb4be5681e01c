"""LHE writing and reading: round trip, Pythia8 showers what we write, clear errors."""

import gzip

import pylhe
import pytest
import torch

from conftest import drell_yan_lhe_events
from partonic.io.lhe import LHEError, LHEEvents, LHEInit, LHEProcess, read_lhe, write_lhe
from partonic.physics import kinematics as kin
from partonic.simulate.pythia import shower_lhe


def dy_init(weighting=3):
    return LHEInit(energies=(6500.0, 6500.0), weighting=weighting, processes=[LHEProcess(1523.4, 2.5, 1.0, 1)])


@pytest.mark.parametrize("suffix", [".lhe", ".lhe.gz"])
def test_round_trip(tmp_path, suffix):
    ev = drell_yan_lhe_events(300)
    path = write_lhe(tmp_path / f"dy{suffix}", ev, dy_init())
    if suffix.endswith(".gz"):
        with open(path, "rb") as fh:
            assert fh.read(2) == b"\x1f\x8b"
    init, back = read_lhe(path)
    assert init.beams == (2212, 2212) and init.energies == (6500.0, 6500.0)
    assert init.weighting == 3 and init.processes[0].cross_section == pytest.approx(1523.4)
    for name in ("pid", "status", "mother1", "mother2", "color1", "color2", "process_id"):
        assert torch.equal(getattr(back, name), getattr(ev, name)), name
    torch.testing.assert_close(back.momenta, ev.momenta, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(back.mass, ev.mass, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(back.weight, ev.weight)
    # pylhe, an independent reader, sees the same file
    events = list(pylhe.LHEFile.fromfile(str(path)).events)
    assert len(events) == 300
    assert [p.id for p in events[0].particles] == [2, -2, 23, 13, -13]


def test_written_events_balance_momentum_and_colour(tmp_path):
    ev = drell_yan_lhe_events(200)
    _, back = read_lhe(write_lhe(tmp_path / "dy.lhe", ev, dy_init()))
    incoming = back.momenta[:, :2].sum(1)
    outgoing = back.momenta[:, 3:].sum(1)
    assert ((incoming - outgoing).abs().max(dim=1).values / incoming[:, 0]).max() < 1e-10
    # mass of the resonance consistent with its daughters
    torch.testing.assert_close(kin.mass(back.momenta[:, 3] + back.momenta[:, 4]), back.mass[:, 2], rtol=1e-9, atol=1e-7)
    assert torch.equal(back.color1[:, 0], back.color2[:, 1])


def test_pythia_showers_and_hadronises_every_event(tmp_path):
    ev = drell_yan_lhe_events(300)
    path = write_lhe(tmp_path / "dy.lhe.gz", ev, dy_init())
    summary = shower_lhe(path)
    assert summary.n_events == 300 and summary.n_accepted == 300 and summary.n_failed == 0
    assert summary.errors == {}, summary.errors
    assert summary.n_final > 20  # hadronised, not just the two muons
    assert summary.sigma_pb == pytest.approx(1523.4, rel=1e-6)


def test_pythia_reports_broken_events(tmp_path):
    """The Pythia check is not blind: broken colour flow is caught."""
    ev = drell_yan_lhe_events(20)
    ev.color1[:5, 0] = 502
    summary = shower_lhe(write_lhe(tmp_path / "bad.lhe", ev, dy_init()))
    assert summary.n_failed == 5
    assert any("colour" in message for message in summary.errors)


def test_weighted_negative_weights(tmp_path):
    ev = drell_yan_lhe_events(50)
    ev.weight = torch.where(torch.arange(50) % 5 == 0, -1.0, 1.0).double()
    with pytest.raises(LHEError, match="negative IDWTUP"):
        write_lhe(tmp_path / "w.lhe", ev, dy_init(weighting=4))
    init, back = read_lhe(write_lhe(tmp_path / "w.lhe", ev, dy_init(weighting=-4)))
    assert init.weighting == -4
    assert torch.equal(back.weight, ev.weight)
    with pytest.raises(LHEError, match="IDWTUP = 3"):
        write_lhe(tmp_path / "u.lhe", ev, dy_init(weighting=3))


def test_truncated_file_names_the_line(tmp_path):
    path = write_lhe(tmp_path / "dy.lhe", drell_yan_lhe_events(20), dy_init())
    lines = path.read_text().splitlines()
    cut = tmp_path / "cut.lhe"
    cut.write_text("\n".join(lines[:60]) + "\n")
    with pytest.raises(LHEError, match=r"cut.lhe: malformed or truncated LHE file at line 6\d"):
        read_lhe(cut)
    # a truncated gzip stream
    data = gzip.compress(path.read_bytes())
    gz = tmp_path / "cut.lhe.gz"
    gz.write_bytes(data[: len(data) // 2])
    with pytest.raises(LHEError, match="cut.lhe.gz"):
        read_lhe(gz)


def test_malformed_event_names_event_and_line(tmp_path):
    path = write_lhe(tmp_path / "dy.lhe", drell_yan_lhe_events(5), dy_init())
    text = path.read_text().splitlines()
    # third event: drop one column of its first particle line
    starts = [i for i, line in enumerate(text) if line.strip() == "<event>"]
    victim = starts[2] + 2
    text[victim] = " ".join(text[victim].split()[:8])
    bad = tmp_path / "bad.lhe"
    bad.write_text("\n".join(text) + "\n")
    with pytest.raises(LHEError, match=rf"event 3, starting at line {starts[2] + 1}"):
        read_lhe(bad)
    # NUP that disagrees with the particle lines
    text = path.read_text().splitlines()
    text[starts[1] + 1] = text[starts[1] + 1].replace("  5 ", "  6 ", 1)
    bad.write_text("\n".join(text) + "\n")
    with pytest.raises(LHEError, match="event 2 .*NUP = 6"):
        read_lhe(bad)
    with pytest.raises(LHEError, match="does not exist"):
        read_lhe(tmp_path / "missing.lhe")


def test_bad_event_tensors_are_rejected(tmp_path):
    ev = drell_yan_lhe_events(4)
    with pytest.raises(LHEError, match="momenta has shape"):
        LHEEvents(**{**ev.__dict__, "momenta": ev.momenta[:, :, :3]})
    ev.momenta[0, 0, 0] = float("nan")
    with pytest.raises(LHEError, match="non-finite"):
        write_lhe(tmp_path / "x.lhe", ev, dy_init())
    with pytest.raises(LHEError, match="at least one process"):
        write_lhe(tmp_path / "x.lhe", drell_yan_lhe_events(2), LHEInit())
