"""PDF grids against Pythia8's own LHAGrid1, interpolation against closed forms,
α_s against Pythia8's AlphaStrong."""

import math
import os

import numpy as np
import pytest
import pythia8mc
import torch

from partonic.physics.pdf import AlphaS, GridPDF, PDFError, find_pdf_member, lhapdf_id, load_pdf

PYTHIA_FLAVOURS = (-5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 21, 22)


def pythia_lhagrid1(path):
    py = pythia8mc.Pythia("", False)
    py.readString(f"PDF:pSet = LHAGrid1:{path}")
    return py.getPDFPtr(2212), py


@pytest.mark.parametrize("set_name", ["NNPDF23_lo_as_0130_qed", "NNPDF31_nnlo_as_0118_luxqed"])
def test_grid_matches_pythia_lhagrid1(set_name):
    """≥ 1000 random (x, Q) inside the grid, every parton flavour, 1e-4 relative.

    Pythia's LHAGrid1 interpolates with 4-point Lagrange cubics in ln x and ln Q;
    our 'lagrange' mode implements the same scheme independently."""
    pdf = GridPDF(set_name, interpolation="lagrange")
    ref, _keep = pythia_lhagrid1(pdf.path)
    rng = np.random.default_rng(7)
    n = 1500
    x = np.exp(rng.uniform(math.log(pdf.x_min), math.log(pdf.x_max), n))
    q = np.exp(rng.uniform(math.log(pdf.q_min), math.log(pdf.q_max), n))
    ours = pdf.xfxQ2_all(torch.from_numpy(x), torch.from_numpy(q * q)).numpy()
    for pid in PYTHIA_FLAVOURS:
        if pid not in pdf.pids:
            continue
        expected = np.array([ref.xf(pid, a, b * b) for a, b in zip(x, q)])
        got = np.maximum(ours[:, pdf.pids.index(pid)], 0.0)  # Pythia clips at zero
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-14, err_msg=f"flavour {pid}")


def test_logbicubic_close_to_pythia_in_the_bulk():
    """The LHAPDF log-bicubic scheme is a different cubic; on this grid the two
    interpolations agree to a few 1e-5 typically (the grid's interpolation uncertainty)."""
    pdf = GridPDF("NNPDF23_lo_as_0130_qed", interpolation="logbicubic")
    ref, _keep = pythia_lhagrid1(pdf.path)
    rng = np.random.default_rng(3)
    x = np.exp(rng.uniform(math.log(1e-5), math.log(0.5), 1000))
    q = np.exp(rng.uniform(math.log(5.0), math.log(3000.0), 1000))
    ours = pdf.xfxQ2_all(torch.from_numpy(x), torch.from_numpy(q * q)).numpy()
    for pid in (21, 2, -1):
        expected = np.array([ref.xf(pid, a, b * b) for a, b in zip(x, q)])
        rel = np.abs(ours[:, pdf.pids.index(pid)] / expected - 1)
        assert np.median(rel) < 2e-4 and rel.max() < 1e-2, (pid, np.median(rel), rel.max())


def write_grid(path, x, q_blocks, pids, func):
    lines = ["PdfType: central", "Format: lhagrid1", "---"]
    for q in q_blocks:
        lines.append(" ".join(f"{v:.17e}" for v in x))
        lines.append(" ".join(f"{v:.17e}" for v in q))
        lines.append(" ".join(str(p) for p in pids))
        for xv in x:
            for qv in q:
                lines.append(" ".join(f"{func(p, xv, qv):.17e}" for p in pids))
        lines.append("---")
    path.write_text("\n".join(lines) + "\n")


def test_interpolation_reproduces_polynomials(tmp_path):
    """Hermite with finite-difference slopes is exact for quadratics on uniform knots
    (interior intervals); Lagrange cubics are exact for cubics everywhere."""
    x = np.exp(np.linspace(math.log(1e-5), 0.0, 25))
    q1 = np.exp(np.linspace(0.0, math.log(10.0), 8))
    q2 = np.exp(np.linspace(math.log(10.0), math.log(1000.0), 12))

    def quad(pid, xv, qv):
        L, M = math.log(xv), math.log(qv * qv)
        return (1.0 + 0.3 * L + 0.02 * L * L) * (2.0 - 0.1 * M + 0.01 * M * M) * (1 + 0.1 * pid)

    def cubic(pid, xv, qv):
        L, M = math.log(xv), math.log(qv)
        return (1.0 + 0.3 * L + 0.02 * L**2 + 0.001 * L**3) * (2.0 - 0.1 * M + 0.03 * M**3)

    write_grid(tmp_path / "quad_0000.dat", x, [q1, q2], [-1, 1, 21], quad)
    write_grid(tmp_path / "cubic_0000.dat", x, [q1, q2], [21], cubic)
    rng = np.random.default_rng(5)
    # interior of the x range and of each Q subgrid
    lx = rng.uniform(math.log(x[1]), math.log(x[-2]), 2000)
    lq = np.concatenate([rng.uniform(math.log(q1[1]), math.log(q1[-2]), 1000), rng.uniform(math.log(q2[1]), math.log(q2[-2]), 1000)])
    xs, qs = torch.from_numpy(np.exp(lx)), torch.from_numpy(np.exp(lq))
    herm = GridPDF(str(tmp_path / "quad_0000.dat"), interpolation="logbicubic")
    for pid in (-1, 1, 21):
        exact = torch.tensor([quad(pid, a, b) for a, b in zip(xs.tolist(), qs.tolist())], dtype=torch.float64)
        torch.testing.assert_close(herm.xfxQ2(pid, xs, qs**2), exact, rtol=1e-10, atol=1e-12)
    lag = GridPDF(str(tmp_path / "cubic_0000.dat"), interpolation="lagrange")
    xs_all = torch.from_numpy(np.exp(rng.uniform(math.log(x[0]), 0.0, 2000)))
    qs_all = torch.from_numpy(np.exp(rng.uniform(0.0, math.log(1000.0), 2000)))
    exact = torch.tensor([cubic(21, a, b) for a, b in zip(xs_all.tolist(), qs_all.tolist())], dtype=torch.float64)
    torch.testing.assert_close(lag.xfxQ2(21, xs_all, qs_all**2), exact, rtol=1e-10, atol=1e-12)
    # flavours not in the set are zero; id 0 is the gluon
    assert float(lag.xfxQ2(2, xs_all[:3], qs_all[:3] ** 2).abs().max()) == 0.0
    torch.testing.assert_close(lag.xfxQ2(0, xs_all, qs_all**2), lag.xfxQ2(21, xs_all, qs_all**2))
    # per-point flavour ids
    pid = torch.tensor([21, 2, 0])
    torch.testing.assert_close(lag.xfxQ2(pid, xs_all[:3], qs_all[:3] ** 2), torch.stack([exact[0], torch.tensor(0.0, dtype=torch.float64), exact[2]]))


def test_grid_on_other_dtype_and_device_agrees():
    pdf = GridPDF("NNPDF23_lo_as_0130_qed", dtype=torch.float32)
    ref = GridPDF("NNPDF23_lo_as_0130_qed")
    x = torch.logspace(-6, -0.2, 200, dtype=torch.float64)
    q2 = torch.logspace(1, 6, 200, dtype=torch.float64)
    torch.testing.assert_close(pdf.xfxQ2_all(x, q2).double(), ref.xfxQ2_all(x, q2), rtol=1e-4, atol=1e-6)
    if torch.cuda.is_available():
        gpu = GridPDF("NNPDF23_lo_as_0130_qed", device="cuda")
        torch.testing.assert_close(gpu.xfxQ2_all(x, q2).cpu(), ref.xfxQ2_all(x, q2), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_alpha_s_matches_pythia_alphastrong(order):
    ref = pythia8mc.AlphaStrong()
    ref.init(0.118, order, 5, False)
    ours = AlphaS(0.118, order=order, mz=91.188, thresholds=(1.5, 4.8, 171.0))
    q = np.exp(np.linspace(math.log(1.0), math.log(1e4), 300))
    expected = np.array([ref.alphaS(v * v) for v in q])
    np.testing.assert_allclose(ours(torch.from_numpy(q * q)).numpy(), expected, rtol=1e-6)


def test_alpha_s_fixed_and_value_at_mz():
    assert float(AlphaS(0.13, order=0)(torch.tensor([1.0, 1e6])).unique()) == pytest.approx(0.13)
    assert float(AlphaS(0.118, order=2)(torch.tensor(91.1876**2, dtype=torch.float64))) == pytest.approx(0.118, rel=1e-9)
    with pytest.raises(ValueError, match="order must be"):
        AlphaS(0.118, order=4)


def test_missing_set_and_truncated_file_have_clear_errors(tmp_path):
    with pytest.raises(PDFError, match="not found.*Available lhagrid1 sets:.*NNPDF23_lo_as_0130_qed"):
        GridPDF("NoSuchSet_v1")
    good = find_pdf_member("NNPDF23_lo_as_0130_qed").read_text().splitlines()
    bad = tmp_path / "cut_0000.dat"
    bad.write_text("\n".join(good[:2000]) + "\n")
    with pytest.raises(PDFError, match=r"cut_0000.dat: .*line 4"):
        GridPDF(str(bad))
    with pytest.raises(PDFError, match="backend"):
        load_pdf("NNPDF23_lo_as_0130_qed", backend="magic")


def test_lhapdf_data_path_is_searched(tmp_path, monkeypatch):
    src = find_pdf_member("NNPDF23_lo_as_0130_qed")
    (tmp_path / "MySet").mkdir()
    (tmp_path / "MySet" / "MySet_0000.dat").write_text(src.read_text())
    monkeypatch.setenv("LHAPDF_DATA_PATH", str(tmp_path))
    pdf = load_pdf("MySet")
    assert pdf.path == tmp_path / "MySet" / "MySet_0000.dat"


def test_lhapdf_id_from_the_set_metadata(tmp_path, monkeypatch):
    """PDFSUP of the LHE files: SetIndex + member from an LHAPDF layout's .info file, or
    a pdfsets.index on the path; the card's default set is known; else 0 (not given)."""
    monkeypatch.delitem(__import__("sys").modules, "lhapdf", raising=False)
    monkeypatch.setattr("builtins.__import__", _without_lhapdf(__import__))
    src = find_pdf_member("NNPDF23_lo_as_0130_qed").read_text()
    (tmp_path / "MySet").mkdir()
    (tmp_path / "MySet" / "MySet_0002.dat").write_text(src)
    (tmp_path / "MySet" / "MySet.info").write_text("SetDesc: a test set\nSetIndex: 123400\nNumMembers: 3\n")
    (tmp_path / "Other_0000.dat").write_text(src)
    (tmp_path / "pdfsets.index").write_text("555000 Other 1\n")
    monkeypatch.setenv("LHAPDF_DATA_PATH", str(tmp_path))
    assert lhapdf_id("MySet", 2) == 123402
    assert lhapdf_id("Other", 0) == 555000
    assert lhapdf_id("NNPDF23_lo_as_0130_qed", 1) == 247001
    assert lhapdf_id("NNPDF31_lo_as_0118") == 0


def _without_lhapdf(real_import):
    def guarded(name, *args, **kwargs):
        if name == "lhapdf":
            raise ImportError("no lhapdf in this test")
        return real_import(name, *args, **kwargs)

    return guarded


@pytest.mark.parametrize("interpolation", ["logbicubic", "lagrange"])
def test_per_point_flavours_single_flavour_and_chunking_agree(interpolation):
    pdf = GridPDF("NNPDF31_nnlo_as_0118_luxqed", interpolation=interpolation)
    gen = torch.Generator().manual_seed(2)
    n = 3 * pdf.chunk_size + 17
    x = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(1e-6), 0.0, generator=gen))
    q2 = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(0.5, 15.0, generator=gen))
    full = pdf.xfxQ2_all(x, q2)
    pids = torch.tensor(pdf.pids)[torch.randint(len(pdf.pids), (n,), generator=gen)]
    cols = torch.tensor([pdf.pids.index(int(p)) for p in pids])
    torch.testing.assert_close(pdf.xfxQ2(pids, x, q2), full.gather(1, cols[:, None])[:, 0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pdf.xfxQ2(21, x, q2), full[:, pdf.pids.index(21)], rtol=1e-12, atol=1e-14)
    small = GridPDF("NNPDF31_nnlo_as_0118_luxqed", interpolation=interpolation)
    small.chunk_size = 1000
    torch.testing.assert_close(small.xfxQ2_all(x[:5000], q2[:5000]), full[:5000], rtol=1e-13, atol=1e-15)


def test_card_section_and_lhapdf_module_dispatch(monkeypatch):
    """With an importable `lhapdf` module, backend 'auto' evaluates through it on CPU.
    The C++ LHAPDF cannot be installed here, so a stand-in module with LHAPDF's
    Python API (mkPDF, xfxQ2, flavors, xMin...) serves, backed by an independent
    evaluator: Pythia8's LHAGrid1."""
    import sys
    import types

    from partonic.cards import load_card
    from partonic.physics.pdf import LHAPDFModulePDF, from_card

    card = load_card("cards/drell_yan.yaml")
    pdf, alpha_s = from_card(card.physics)
    assert isinstance(pdf, GridPDF) and pdf.interpolation == "logbicubic"
    assert float(alpha_s(torch.tensor(91.1876**2, dtype=torch.float64))) == pytest.approx(0.130, rel=1e-9)

    path = find_pdf_member("NNPDF23_lo_as_0130_qed")
    ref, keep = pythia_lhagrid1(path)

    class StandIn:
        xMin, xMax, q2Min, q2Max = 1e-9, 1.0, 1.0, 1e10

        def flavors(self):
            return [-5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 21, 22]

        def xfxQ2(self, pid, x, q2):
            return ref.xf(pid, x, q2)

    module = types.SimpleNamespace(setVerbosity=lambda v: None, mkPDF=lambda name, member: StandIn(), paths=lambda: [])
    monkeypatch.setitem(sys.modules, "lhapdf", module)
    via_module = load_pdf("NNPDF23_lo_as_0130_qed")
    assert isinstance(via_module, LHAPDFModulePDF)
    x = torch.tensor([1e-4, 0.01, 0.3], dtype=torch.float64)
    q2 = torch.tensor([10.0, 1e3, 1e5], dtype=torch.float64)
    ours = GridPDF("NNPDF23_lo_as_0130_qed", interpolation="lagrange")
    torch.testing.assert_close(via_module.xfxQ2(21, x, q2), ours.xfxQ2(21, x, q2), rtol=1e-10, atol=0)
    torch.testing.assert_close(via_module.xfxQ2(torch.tensor([2, -1, 0]), x, q2), ours.xfxQ2(torch.tensor([2, -1, 0]), x, q2), rtol=1e-10, atol=0)
    assert isinstance(load_pdf("NNPDF23_lo_as_0130_qed", backend="grid"), GridPDF)


def test_pythia_data_found_beside_a_target_installation(tmp_path, monkeypatch):
    """``pip install --target DIR`` puts the wheel's share/Pythia8 beside the module, where
    Pythia itself does not look: its settings and PDF grids are found there all the same."""
    import importlib.machinery
    import importlib.util
    import sys

    from partonic.physics import pdf as pdf_module
    from partonic.simulate.pythia import new_pythia

    real = next(f for f in pdf_module.pythia_share_folders() if (f / "xmldoc" / "Index.xml").is_file())
    site = tmp_path / "site"
    (site / "share").mkdir(parents=True)
    (site / "share" / "Pythia8").symlink_to(real, target_is_directory=True)
    (site / "pythia8mc.so").touch()
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "elsewhere"))
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path / "elsewhere"))
    spec = importlib.machinery.ModuleSpec("pythia8mc", None, origin=str(site / "pythia8mc.so"))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "pythia8mc" else find_spec(name, *a))
    monkeypatch.setenv("PYTHIA8DATA", "")
    monkeypatch.delenv("LHAPDF_DATA_PATH", raising=False)
    monkeypatch.delenv("LHAPATH", raising=False)
    py = new_pythia()
    assert os.environ["PYTHIA8DATA"] == str(site / "share" / "Pythia8" / "xmldoc")
    assert py.readString("Beams:eCM = 13000.")
    assert find_pdf_member("NNPDF23_lo_as_0130_qed", 0).is_relative_to(site)
