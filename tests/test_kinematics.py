"""Kinematics checked against the scikit-hep `vector` package on random momenta."""

import math

import numpy as np
import pytest
import torch
import vector

from partonic.physics import kinematics as kin


def random_momenta(n, gen, massive=True):
    p3 = torch.randn(n, 3, generator=gen, dtype=torch.float64) * 80.0
    m = torch.rand(n, generator=gen, dtype=torch.float64) * 50.0 if massive else torch.zeros(n, dtype=torch.float64)
    e = torch.sqrt((p3**2).sum(-1) + m**2)
    return torch.cat([e[:, None], p3], dim=1)


def as_vector(p):
    a = p.numpy()
    return vector.array({"E": a[:, 0], "px": a[:, 1], "py": a[:, 2], "pz": a[:, 3]})


def test_pt_eta_phi_mass_rapidity_match_vector(rng):
    p = random_momenta(5000, rng)
    v = as_vector(p)
    np.testing.assert_allclose(kin.pt(p).numpy(), v.pt, rtol=1e-12)
    np.testing.assert_allclose(kin.eta(p).numpy(), v.eta, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(kin.phi(p).numpy(), v.phi, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(kin.mass(p).numpy(), v.mass, rtol=1e-7, atol=1e-6)
    np.testing.assert_allclose(kin.rapidity(p).numpy(), v.rapidity, rtol=1e-10, atol=1e-12)


def test_ptetaphim_round_trip(rng):
    p = random_momenta(5000, rng)
    back = kin.from_ptetaphim(kin.to_ptetaphim(p))
    torch.testing.assert_close(back, p, rtol=1e-9, atol=1e-8)
    # and against vector's own constructor from (pt, eta, phi, m)
    q = kin.to_ptetaphim(p).numpy()
    v = vector.array({"pt": q[:, 0], "eta": q[:, 1], "phi": q[:, 2], "mass": q[:, 3]})
    np.testing.assert_allclose(kin.from_ptetaphim(torch.from_numpy(q))[:, 0].numpy(), v.E, rtol=1e-10)
    np.testing.assert_allclose(kin.from_ptetaphim(torch.from_numpy(q))[:, 3].numpy(), v.pz, rtol=1e-10, atol=1e-9)


def test_invariant_mass_of_pairs_matches_vector(rng):
    p, q = random_momenta(3000, rng), random_momenta(3000, rng)
    np.testing.assert_allclose(kin.invariant_mass(p, q).numpy(), (as_vector(p) + as_vector(q)).mass, rtol=1e-9)


def test_boost_matches_vector(rng):
    p = random_momenta(3000, rng)
    beta = torch.randn(3000, 3, generator=rng, dtype=torch.float64)
    beta = beta / beta.norm(dim=1, keepdim=True) * torch.rand(3000, 1, generator=rng, dtype=torch.float64) * 0.99
    b = beta.numpy()
    ref = as_vector(p).boost_beta3(vector.array({"x": b[:, 0], "y": b[:, 1], "z": b[:, 2]}))
    out = kin.boost(p, beta).numpy()
    np.testing.assert_allclose(out[:, 0], ref.E, rtol=1e-9)
    np.testing.assert_allclose(out[:, 1], ref.px, rtol=1e-8, atol=1e-7)
    np.testing.assert_allclose(out[:, 3], ref.pz, rtol=1e-8, atol=1e-7)
    # invariance of the mass under the boost
    torch.testing.assert_close(kin.mass(kin.boost(p, beta)), kin.mass(p), rtol=1e-7, atol=1e-6)


def test_boost_to_rest_frame_gives_zero_momentum(rng):
    p = random_momenta(1000, rng)
    rest = kin.boost_to_rest_frame(p, p)
    torch.testing.assert_close(rest[:, 1:], torch.zeros_like(rest[:, 1:]), rtol=0, atol=1e-8)
    torch.testing.assert_close(rest[:, 0], kin.mass(p), rtol=1e-9, atol=1e-8)


def test_delta_phi_wrapped_and_delta_r_match_vector(rng):
    p, q = random_momenta(3000, rng), random_momenta(3000, rng)
    dphi = kin.delta_phi(kin.phi(p), kin.phi(q))
    assert dphi.min() >= -math.pi and dphi.max() < math.pi
    np.testing.assert_allclose(dphi.numpy(), as_vector(p).deltaphi(as_vector(q)), atol=1e-12)
    np.testing.assert_allclose(kin.delta_r(p, q).numpy(), as_vector(p).deltaR(as_vector(q)), rtol=1e-10)


def test_wrong_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="last dimension of size 4"):
        kin.pt(torch.zeros(3, 3))
