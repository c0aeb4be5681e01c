"""The 1-D MMD's fused pair sums against autograd through the kernel matrices."""

import pytest
import torch

from partonic.models import mmd as mmd_module
from partonic.models.mmd import kernel, mmd2


def _reference(x, y, widths, name):
    n, m = len(x), len(y)
    kxx, kyy, kxy = kernel(x, x, widths, name), kernel(y, y, widths, name), kernel(x, y, widths, name)
    return (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)) - 2 * kxy.mean()


@pytest.mark.parametrize("name", ["breit_wigner", "gaussian"])
@pytest.mark.parametrize("block", [1 << 20, 37])  # one block, and rows split over many blocks
def test_fused_mmd_matches_autograd_through_the_kernel_matrices(name, block, monkeypatch):
    monkeypatch.setattr(mmd_module, "_BLOCK", block)
    g = torch.Generator().manual_seed(3)
    x0 = 80.0 + 2.0 * torch.randn(301, generator=g, dtype=torch.float64)
    y0 = 80.4 + 2.5 * torch.randn(217, generator=g, dtype=torch.float64)
    widths = [2.1, 6.3]
    results = []
    for fn in (mmd2, _reference):
        x, y = x0.clone().requires_grad_(True), y0.clone().requires_grad_(True)
        value = fn(x, y, widths, name)
        value.backward()
        results.append((value.detach(), x.grad, y.grad))
    (v, gx, gy), (v_ref, gx_ref, gy_ref) = results
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(gy, gy_ref, rtol=1e-9, atol=1e-14)
    assert float(gx.abs().max()) > 0  # a test of something: the gradient is not zero


def test_fused_mmd_needs_no_gradient_and_keeps_float32():
    x = torch.randn(500) * 2 + 80
    y = torch.randn(400) * 2 + 80
    with torch.no_grad():
        value = mmd2(x, y, [2.0], "breit_wigner")
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(float(_reference(x.double(), y.double(), [2.0], "breit_wigner")), abs=1e-6)
    with pytest.raises(ValueError, match="allowed"):
        mmd2(x, y, [2.0], "cauchy")
