"""Cards: validation messages name the field, the bad value and what is allowed;
overrides; the command line and the run folder."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from partonic.cards import CardError, apply_overrides, load_card, parse_card
from partonic.cli import main
from partonic.jobs.common import JobError, RunFolder, atomic_write_json, resolve_device

CARDS = sorted(Path("cards").glob("*.yaml"))


@pytest.mark.parametrize("path", CARDS, ids=[p.stem for p in CARDS])
def test_shipped_cards_validate(path):
    card = load_card(path)
    assert card.job in ("unfold", "unweight", "generate")
    assert main(["check-card", str(path), "--quiet"]) == 0


def test_unknown_key_suggests_the_right_one(tmp_path):
    raw = yaml.safe_load(Path("cards/zw.yaml").read_text())
    raw["trainig"] = {"epochs": 3}
    with pytest.raises(CardError) as err:
        parse_card(raw, "x.yaml")
    text = str(err.value)
    assert "trainig: unknown key; did you mean 'training'?" in text
    assert "Allowed keys here:" in text and "physics" in text


def test_wrong_type_and_range_name_field_value_and_rule():
    with pytest.raises(CardError) as err:
        load_card("cards/zw.yaml", ["training.batch_size=-4", "model.subnet_width=big", "data.detector.jet_radius=2.0", "device=gpu"])
    text = str(err.value)
    assert "training.batch_size = -4: Input should be greater than 0" in text
    assert 'model.subnet_width = "big": Input should be a valid integer' in text
    assert "data.detector.jet_radius = 2.0: Input should be less than or equal to 1.5" in text
    assert "device = \"gpu\": Input should be 'auto', 'cpu' or 'cuda'" in text
    with pytest.raises(CardError, match="data.channel_balance = 1.5: Input should be less than or equal to 1"):
        load_card("cards/zw.yaml", ["data.channel_balance=1.5"])
    with pytest.raises(CardError, match="model.gradient_penalty = -1: Input should be greater than or equal to 0"):
        load_card("cards/drell_yan.yaml", ["model.gradient_penalty=-1"])
    with pytest.raises(CardError, match="data.resmear = 2 re-simulates the detector, so it needs data.source = pythia"):
        load_card("cards/zw.yaml", ["data.resmear=2", "data.source=hdf5", "data.files=[a.h5]"])


def test_check_card_finds_the_pdf_set(capsys):
    """An unknown PDF set fails check-card, as it would fail the job, naming the sets found."""
    assert main(["check-card", "cards/zw.yaml", "--quiet", "--set", "physics.pdf.set=NoSuchSet"]) == 2
    err = capsys.readouterr().err
    assert "physics.pdf.set = 'NoSuchSet'" in err and "NNPDF23_lo_as_0130_qed" in err
    assert main(["check-card", "cards/zw.yaml", "--quiet", "--set", "physics.pdf.set=NNPDF31_lo_as_0118"]) == 0


def test_section_missing_and_cross_field_errors_speak_card_terms(tmp_path):
    """No pydantic internals: a section given a value names its keys, a missing field is
    'required', a check across a section's keys is its own message."""
    with pytest.raises(CardError) as err:
        load_card("cards/zw.yaml", ["model.refine=classifier"])
    text = str(err.value)
    assert 'model.refine = "classifier": must be a section of keys (method, ' in text and "RefineSection" not in text
    with pytest.raises(CardError) as err:
        load_card("cards/zw.yaml", ["model.mmd.foo=1"])
    assert "model.mmd.foo: unknown key. Allowed keys here: weight, widths" in str(err.value)
    with pytest.raises(CardError) as err:
        load_card("cards/zw.yaml", ["data.source=hdf5"])
    assert "  data: data.source = 'hdf5' needs data.files" in str(err.value) and "Value error" not in str(err.value)
    bare = tmp_path / "bare.yaml"
    bare.write_text("job: unfold\n")
    with pytest.raises(CardError, match="name: required, and missing"):
        load_card(bare)
    with pytest.raises(CardError, match="model.rapidity = \"eta\": Input should be 'y' or 'bounded'"):
        load_card("cards/drell_yan.yaml", ["model.rapidity=eta"])
    with pytest.raises(CardError, match="training.keep_best = true .* needs training.validation_fraction > 0"):
        load_card("cards/zw.yaml", ["training.keep_best=true", "training.validation_fraction=0"])
    with pytest.raises(CardError, match="model.refine.independent_events simulates events for the refiner, so it needs data.source = pythia, not 'hdf5'"):
        load_card("cards/zw.yaml", ["model.refine.independent_events=1000", "data.resmear=0", "data.source=hdf5", "data.files=[a.h5]"])
    with pytest.raises(CardError, match="model.refine.independent_events are events for the refiner: set model.refine.method = classifier"):
        load_card("cards/zw.yaml", ["model.refine.independent_events=1000", "model.refine.method=none"])
    with pytest.raises(CardError, match="evaluation.refine_oversample = 4 draws samples for the refiner to resample: set model.refine.method = classifier"):
        load_card("cards/zw.yaml", ["evaluation.refine_oversample=4", "model.refine.method=none", "model.refine.independent_events=0"])
    with pytest.raises(CardError, match="model.refine.inputs = \"detector\": Input should be 'partons', 'jets' or 'partons_then_jets'"):
        load_card("cards/zw.yaml", ["model.refine.inputs=detector"])
    with pytest.raises(CardError, match="model.z_azimuth = 'balance' is the reference of the Z system's azimuth: it needs model.leptons = system, not 'momenta'"):
        load_card("cards/zw.yaml", ["model.z_azimuth=balance", "model.leptons=momenta"])
    with pytest.raises(CardError, match="model.z_azimuth.*'leptons'.*'balance'"):
        load_card("cards/zw.yaml", ["model.z_azimuth=jets"])
    with pytest.raises(CardError, match="model.w_coordinates = jets takes the Z's pT from the W's: it needs model.leptons = system, not 'momenta'"):
        load_card("cards/zw.yaml", ["model.w_coordinates=jets", "model.leptons=momenta"])
    with pytest.raises(CardError, match="model.w_coordinates = jets takes the Z's azimuth from the W's: model.z_azimuth has nothing to set"):
        load_card("cards/zw.yaml", ["model.w_coordinates=jets", "model.z_azimuth=balance"])
    with pytest.raises(CardError, match="model.w_coordinates = jets makes m_jj a coordinate of its own: set model.mmd.weight = 0"):
        load_card("cards/zw.yaml", ["model.w_coordinates=jets", "model.mmd.weight=0.5"])
    with pytest.raises(CardError, match="model.w_coordinates.*'decay'.*'jets'"):
        load_card("cards/zw.yaml", ["model.w_coordinates=quarks"])
    assert load_card("cards/zw.yaml", ["model.w_coordinates=jets"]).model.w_coordinates == "jets"
    with pytest.raises(CardError, match="model.system_pt = w measures the W's pT from its jets and lets the Z's follow: it needs model.leptons = system and model.w_coordinates = decay, not 'system' and 'jets'"):
        load_card("cards/zw.yaml", ["model.system_pt=w", "model.w_coordinates=jets"])
    with pytest.raises(CardError, match="model.system_pt = w takes the Z's azimuth from the W's"):
        load_card("cards/zw.yaml", ["model.system_pt=w", "model.z_azimuth=balance"])
    with pytest.raises(CardError, match="model.system_pt.*'z'.*'w'"):
        load_card("cards/zw.yaml", ["model.system_pt=W"])


def test_job_and_cross_field_checks():
    with pytest.raises(CardError, match=r"job = \"unfolding\": must be one of unfold, unweight, generate"):
        parse_card({"job": "unfolding", "name": "x"})
    with pytest.raises(CardError, match="data.m_max = 40.0 must exceed data.m_min = 50.0"):
        load_card("cards/drell_yan.yaml", ["data.m_max=40"])
    with pytest.raises(CardError, match="needs data.files"):
        load_card("cards/zw.yaml", ["data.source=delphes"])


def test_overrides_parse_yaml_values_and_reject_bad_forms():
    raw = {"a": {"b": 1}}
    out = apply_overrides(raw, ["a.c=[1, 2]", "a.b=2.5", "d.e=true"])
    assert out == {"a": {"b": 2.5, "c": [1, 2]}, "d": {"e": True}} and raw == {"a": {"b": 1}}
    with pytest.raises(CardError, match="expected the form"):
        apply_overrides(raw, ["a.b"])
    with pytest.raises(CardError, match="a.b is a value, not a section"):
        apply_overrides(raw, ["a.b.c=1"])
    card = load_card("cards/ttbar.yaml", ["training.optimizer.betas=[0.5, 0.9]", "model.mmd_weight=0"])
    assert card.training.optimizer.betas == (0.5, 0.9) and card.model.mmd_weight == 0.0


def test_bad_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: unfold\nname: x\ntraining:\n  epochs: [1, 2\n")
    with pytest.raises(CardError, match=r"not valid YAML at line \d+"):
        load_card(bad)
    with pytest.raises(CardError, match="does not exist"):
        load_card(tmp_path / "none.yaml")
    with pytest.raises(CardError, match="is a folder"):
        load_card(tmp_path)
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("job: unfold\nname: x\n# m_µµ > 50 GeV\n".encode("latin-1"))
    with pytest.raises(CardError, match="not UTF-8 text: byte 0xb5 on line 3"):
        load_card(latin)


def test_cli_errors_are_one_paragraph_without_traceback(tmp_path):
    exe = [sys.executable, "-m", "partonic.cli"]
    out = subprocess.run([*exe, "check-card", "cards/zw.yaml", "--set", "model.blocs=3"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "did you mean 'blocks'" in out.stderr
    ok = subprocess.run([*exe, "check-card", "cards/zw.yaml", "--set", "training.epochs=3"], capture_output=True, text=True)
    assert ok.returncode == 0 and yaml.safe_load(ok.stdout)["training"]["epochs"] == 3
    wrong = subprocess.run([*exe, "unweight", "--card", "cards/zw.yaml"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "is a 'unfold' card" in wrong.stderr and "Traceback" not in wrong.stderr


def test_console_scripts_help():
    top = subprocess.run(["partonic", "--help"], capture_output=True, text=True)
    assert top.returncode == 0 and "check-card" in top.stdout and "unweight" in top.stdout
    for cmd in (["unfold", "--help"], ["partonic", "unfold", "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True)
        assert out.returncode == 0 and "--card" in out.stdout and "--resume" in out.stdout and "--input" in out.stdout


def test_run_folder_keeps_card_version_seed_device(tmp_path):
    card = load_card("cards/zw.yaml", ["seed=7"])
    run = RunFolder.create(card, resolve_device("cpu"), output=str(tmp_path / "run"))
    info = json.loads((run.path / "run.json").read_text())
    assert info["seed"] == 7 and info["device"] == "cpu" and info["partonic_version"]
    assert yaml.safe_load((run.path / "card.yaml").read_text())["seed"] == 7
    # a run that failed before it kept anything leaves its card and run.json: taken over
    retry = load_card("cards/zw.yaml", ["seed=7", "data.n_events=1000"])
    assert RunFolder.create(retry, torch.device("cpu"), output=str(tmp_path / "run")).path == tmp_path / "run"
    assert yaml.safe_load((run.path / "card.yaml").read_text())["data"]["n_events"] == 1000
    run = RunFolder.create(card, torch.device("cpu"), output=str(tmp_path / "run"), resume=True)
    (run.path / "checkpoint.pt").write_bytes(b"a started run")
    with pytest.raises(JobError, match="already holds a run"):
        RunFolder.create(card, torch.device("cpu"), output=str(tmp_path / "run"))
    other = load_card("cards/zw.yaml", ["seed=8"])
    with pytest.raises(JobError, match="'seed' section differs"):
        RunFolder.create(other, torch.device("cpu"), output=str(tmp_path / "run"), resume=True)
    longer = load_card("cards/zw.yaml", ["seed=7", "training.epochs=50"])
    assert RunFolder.create(longer, torch.device("cpu"), output=str(tmp_path / "run"), resume=True).path == tmp_path / "run"
    # a folder in use by a live run elsewhere is refused, even one that has kept nothing yet
    import platform

    (run.path / "checkpoint.pt").unlink()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        info = json.loads((run.path / "run.json").read_text())
        assert info["status"] == "running" and info["pid"]
        info.update(pid=other.pid, host=platform.node())
        (run.path / "run.json").write_text(json.dumps(info))
        with pytest.raises(JobError, match=f"in use by a run in progress \\(pid {other.pid} on this host\\)"):
            RunFolder.create(card, torch.device("cpu"), output=str(tmp_path / "run"), resume=True)
    finally:
        other.kill()
        other.wait()
    # that process gone (killed without a word): the folder is free again
    assert RunFolder.create(card, torch.device("cpu"), output=str(tmp_path / "run")).path == tmp_path / "run"
    run.write_report(run.report_base())
    assert json.loads((run.path / "run.json").read_text())["status"] == "finished"
    (tmp_path / "notes.txt").write_text("a file")
    with pytest.raises(JobError, match="is a file"):
        RunFolder.create(card, torch.device("cpu"), output=str(tmp_path / "notes.txt"))
    for change in ("training.batch_size=256", "training.validation_fraction=0.2"):
        with pytest.raises(JobError, match=f"training.{change.split('.')[1].split('=')[0]} differs"):
            RunFolder.create(load_card("cards/zw.yaml", ["seed=7", "training.epochs=50", change]), torch.device("cpu"),
                             output=str(tmp_path / "run"), resume=True)
    report = run.report_base()
    for key in ("partonic_version", "card", "device", "seed", "created", "outputs", "timing"):
        assert key in report


def test_device_choice():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(JobError, match="no CUDA device"):
            resolve_device("cuda")


def test_report_json_is_strict_json(tmp_path):
    """NaN and ±inf (an empty bin's ratio) become null: Python's NaN literal is not JSON,
    and strict readers (JavaScript, Go, serde) refuse the whole file."""
    import numpy as np

    target = tmp_path / "report.json"
    atomic_write_json(target, {"ratio": [1.0, float("nan"), np.float64("inf")], "t": torch.tensor([0.5, float("-inf")]),
                               "n": np.int64(3), "nested": ({"x": np.nan},), "path": tmp_path})

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    back = json.loads(target.read_text(), parse_constant=refuse)
    assert back == {"ratio": [1.0, None, None], "t": [0.5, None], "n": 3, "nested": [{"x": None}], "path": str(tmp_path)}



def test_written_files_follow_the_umask(tmp_path, monkeypatch):
    """Atomic writes go through mkstemp, whose files are private (0600): the result
    must follow the umask (read once, at import) like any file the user writes
    (colleagues read run folders)."""
    import stat

    from partonic.io import store
    from partonic.io.store import DatasetCache

    monkeypatch.setattr(store, "_UMASK", 0o022)
    atomic_write_json(tmp_path / "report.json", {"a": 1})
    cache = DatasetCache(tmp_path / "cache")
    cache.save("k", {"x": torch.zeros(3).numpy()})
    monkeypatch.setattr(store, "_UMASK", 0o027)
    atomic_write_json(tmp_path / "group.json", {"a": 1})
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o644
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert cached and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in cached)
    assert stat.S_IMODE((tmp_path / "group.json").stat().st_mode) == 0o640
