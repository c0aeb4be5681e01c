import os

import pytest
import torch

# Two cores in CI: keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


def drell_yan_lhe_events(n, seed=3):
    """Physically sensible u ubar -> Z -> mu- mu+ parton-level events for LHE tests:
    m_ll Breit-Wigner around M_Z, rapidity |y| < 2, isotropic decay."""
    import math

    from partonic.io.lhe import LHEEvents
    from partonic.physics import kinematics as kin
    from partonic.physics.phasespace import breit_wigner_map, rambo_diet

    gen = torch.Generator().manual_seed(seed)
    s, _ = breit_wigner_map(torch.rand(n, generator=gen, dtype=torch.float64), 91.188, 2.4414, 60.0**2, 120.0**2)
    m = torch.sqrt(s)
    y = (torch.rand(n, generator=gen, dtype=torch.float64) * 4 - 2)
    roots = 13000.0
    x1, x2 = m / roots * torch.exp(y), m / roots * torch.exp(-y)
    decay, _ = rambo_diet(m, 2, generator=gen)
    beta = torch.stack([torch.zeros_like(y), torch.zeros_like(y), torch.tanh(y)], dim=1)
    leptons = kin.boost(decay, beta[:, None, :].expand(n, 2, 3))
    e1, e2 = x1 * roots / 2, x2 * roots / 2
    zero = torch.zeros_like(e1)
    p1 = torch.stack([e1, zero, zero, e1], 1)
    p2 = torch.stack([e2, zero, zero, -e2], 1)
    z = p1 + p2
    momenta = torch.stack([p1, p2, z, leptons[:, 0], leptons[:, 1]], 1)
    row = lambda vals: torch.tensor(vals, dtype=torch.int64).expand(n, 5).clone()
    mass = torch.zeros(n, 5, dtype=torch.float64)
    mass[:, 2] = m
    mass[:, 3:] = 0.105658
    # put the muons on their mass shell at fixed 3-momentum
    momenta[:, 3:, 0] = torch.sqrt((momenta[:, 3:, 1:] ** 2).sum(-1) + 0.105658**2)
    momenta[:, 2] = momenta[:, 3] + momenta[:, 4]
    mass[:, 2] = kin.mass(momenta[:, 2])
    # incoming partons fixed by the final state: E ± pz of the system
    tot = momenta[:, 2]
    momenta[:, 0] = torch.stack([(tot[:, 0] + tot[:, 3]) / 2, zero, zero, (tot[:, 0] + tot[:, 3]) / 2], 1)
    momenta[:, 1] = torch.stack([(tot[:, 0] - tot[:, 3]) / 2, zero, zero, -(tot[:, 0] - tot[:, 3]) / 2], 1)
    return LHEEvents(
        pid=row([2, -2, 23, 13, -13]), status=row([-1, -1, 2, 1, 1]),
        mother1=row([0, 0, 1, 3, 3]), mother2=row([0, 0, 2, 3, 3]),
        color1=row([501, 0, 0, 0, 0]), color2=row([0, 501, 0, 0, 0]),
        momenta=momenta, mass=mass, weight=torch.ones(n, dtype=torch.float64),
        scale=mass[:, 2].clone(), aqed=torch.full((n,), 1 / 132.507, dtype=torch.float64),
        aqcd=torch.full((n,), 0.118, dtype=torch.float64), process_id=torch.ones(n, dtype=torch.int64),
    )
