"""A first tour of the foundation: PDFs, phase space, LHE, Pythia8.

Generates LO pp -> gamma*/Z -> mu+ mu- events by naive Monte Carlo with the torch
PDF reader and RAMBO on diet, prints the weighted cross section, unweights a few
thousand events by hit-or-miss, writes them as LHE and lets Pythia8 shower them.

    python examples/drell_yan_lhe.py [--events 200000] [--output runs/example]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from partonic.io.lhe import LHEEvents, LHEInit, LHEProcess, write_lhe
from partonic.physics import kinematics as kin
from partonic.physics.constants import ALPHA_EM_MZ, GAMMA_Z, GEV2_TO_PB, M_Z, SIN2_THETA_W
from partonic.physics.pdf import GridPDF
from partonic.physics.phasespace import breit_wigner_map, rambo_diet
from partonic.simulate.pythia import shower_lhe


def dsigma_dcos(shat, cos_t, q_charge, t3_q):
    """LO q qbar -> gamma*/Z -> l- l+ (PHYSICS.md): dσ̂/dcosθ in GeV⁻²."""
    kappa = 1.0 / (4 * SIN2_THETA_W * (1 - SIN2_THETA_W))
    d = (shat - M_Z**2) ** 2 + (GAMMA_Z * M_Z) ** 2
    chi1 = kappa * shat * (shat - M_Z**2) / d
    chi2 = kappa**2 * shat**2 / d
    v_l, a_l = -0.5 + 2 * SIN2_THETA_W, -0.5
    v_q, a_q = t3_q - 2 * q_charge * SIN2_THETA_W, t3_q
    a0 = q_charge**2 - 2 * q_charge * v_l * v_q * chi1 + (v_l**2 + a_l**2) * (v_q**2 + a_q**2) * chi2
    a1 = -4 * q_charge * a_l * a_q * chi1 + 8 * v_l * a_l * v_q * a_q * chi2
    return 2 * math.pi * ALPHA_EM_MZ**2 / (4 * shat) / 3 * (a0 * (1 + cos_t**2) + a1 * cos_t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--unweighted", type=int, default=2000)
    ap.add_argument("--output", default="runs/example")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(1)
    roots, n = 13000.0, args.events
    pdf = GridPDF("NNPDF23_lo_as_0130_qed")

    # m_ll from a Breit-Wigner around the Z, rapidity flat, decay from RAMBO on diet
    s_hat, jac_s = breit_wigner_map(torch.rand(n, generator=gen, dtype=torch.float64), M_Z, GAMMA_Z, 50.0**2, roots**2)
    tau = s_hat / roots**2
    y = 0.5 * torch.log(tau) * (1 - 2 * torch.rand(n, generator=gen, dtype=torch.float64))
    x1, x2 = torch.sqrt(tau) * torch.exp(y), torch.sqrt(tau) * torch.exp(-y)
    decay, _ = rambo_diet(torch.sqrt(s_hat), 2, generator=gen)  # isotropic: cos θ flat in [-1, 1]
    cos_t = decay[:, 0, 3] / decay[:, 0, 0]  # angle of the l- to the +z beam
    q2 = s_hat
    f1, f2 = pdf.xfxQ2_all(x1, q2) / x1[:, None], pdf.xfxQ2_all(x2, q2) / x2[:, None]
    col = {p: i for i, p in enumerate(pdf.pids)}
    channels, parts = [], []
    for q, (charge, t3) in {1: (-1 / 3, -0.5), 2: (2 / 3, 0.5), 3: (-1 / 3, -0.5), 4: (2 / 3, 0.5), 5: (-1 / 3, -0.5)}.items():
        # quark from beam 1: θ as drawn; quark from beam 2: θ → π − θ
        parts.append(f1[:, col[q]] * f2[:, col[-q]] * dsigma_dcos(s_hat, cos_t, charge, t3))
        parts.append(f1[:, col[-q]] * f2[:, col[q]] * dsigma_dcos(s_hat, -cos_t, charge, t3))
        channels += [(q, -q), (-q, q)]
    contributions = torch.stack(parts, 1)
    weight = contributions.sum(1)
    # dx1 dx2 = dτ dy with dτ = dŝ/S (Breit–Wigner Jacobian), dy over a range −ln τ,
    # and ∫ dcos θ = 2 × the mean over the flat cos θ
    weight = weight * jac_s / roots**2 * (-torch.log(tau)) * 2.0 * GEV2_TO_PB
    sigma = weight.mean().item()
    error = weight.std().item() / math.sqrt(n)
    print(f"sigma(pp -> mu mu, m > 50 GeV, 13 TeV, LO) = {sigma:.1f} +- {error:.1f} pb")
    print(f"naive unweighting efficiency <w>/max w = {sigma / weight.max().item():.2e}")

    keep = torch.rand(n, generator=gen, dtype=torch.float64) < weight / weight.max()
    idx = torch.nonzero(keep)[:, 0][: args.unweighted]
    beta = torch.stack([torch.zeros_like(y), torch.zeros_like(y), torch.tanh(y)], 1)[idx]
    leptons = kin.boost(decay[idx], beta[:, None, :].expand(-1, 2, 3))
    m = len(idx)
    e1, e2 = x1[idx] * roots / 2, x2[idx] * roots / 2
    zero = torch.zeros(m, dtype=torch.float64)
    pa, pb = torch.stack([e1, zero, zero, e1], 1), torch.stack([e2, zero, zero, -e2], 1)
    z = leptons.sum(1)
    mom = torch.stack([pa, pb, z, leptons[:, 0], leptons[:, 1]], 1)
    row = lambda v: torch.tensor(v).expand(m, 5).clone()
    # incoming flavours drawn in proportion to their share of each event's weight
    pick = torch.multinomial(contributions[idx].clamp(min=0), 1, generator=gen)[:, 0]
    beam_a = torch.tensor([c[0] for c in channels])[pick]
    pid = row([0, 0, 23, 13, -13])
    pid[:, 0], pid[:, 1] = beam_a, -beam_a
    color1, color2 = row([0, 0, 0, 0, 0]), row([0, 0, 0, 0, 0])
    quark_first = beam_a > 0
    color1[:, 0] = torch.where(quark_first, 501, 0)
    color2[:, 0] = torch.where(quark_first, 0, 501)
    color1[:, 1] = torch.where(quark_first, 0, 501)
    color2[:, 1] = torch.where(quark_first, 501, 0)
    mass = torch.zeros(m, 5, dtype=torch.float64)
    mass[:, 2] = kin.mass(z)
    events = LHEEvents(
        pid=pid, status=row([-1, -1, 2, 1, 1]), mother1=row([0, 0, 1, 3, 3]), mother2=row([0, 0, 2, 3, 3]),
        color1=color1, color2=color2, momenta=mom, mass=mass,
        weight=torch.full((m,), sigma, dtype=torch.float64), scale=mass[:, 2].clone(),
        aqed=torch.tensor(ALPHA_EM_MZ, dtype=torch.float64), aqcd=torch.tensor(0.13, dtype=torch.float64),
        process_id=torch.tensor(1),
    )
    out = Path(args.output)
    path = write_lhe(out / "drell_yan.lhe.gz", events, LHEInit(energies=(roots / 2, roots / 2), weighting=3,
                                                               processes=[LHEProcess(sigma, error, sigma, 1)]))
    print(f"wrote {m} unweighted events to {path}")
    summary = shower_lhe(path)
    print(f"Pythia8 showered {summary.n_accepted}/{summary.n_events} events, errors: {summary.errors or 'none'}, "
          f"{summary.n_final:.0f} final-state particles per event")


if __name__ == "__main__":
    main()
