"""A GAN for pp → tt̄ → 6 quarks with an MMD term on the W and top masses.

References: A. Butter, T. Plehn, R. Winterhalder, "How to GAN LHC events",
arXiv:1907.03764. The generator maps noise to the three-momenta of the six quarks
(18 numbers; masses fixed by flavour), the discriminator tells them from truth,
and the generator loss carries λ Σ MMD²(m_gen, m_truth) over the two W and the two
top masses with Breit–Wigner kernels of the W and top widths (Sec. 3), which
restores the narrow peaks a plain GAN smears out. PHYSICS.md notes that the public
code of that paper appears to swap the widths; here W masses get Γ_W and top
masses Γ_t.

The later precision ingredients are options: the (pT, η, φ) or (log pT, η, φ)
representation, spectral normalisation of the discriminator (arXiv:1802.05957),
batch statistics in the discriminator (the minibatch standard deviation of
arXiv:1710.10196), and the resonance masses as extra discriminator inputs.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from torch import nn

from ..physics import kinematics as kin
from ..physics.constants import GAMMA_TOP, GAMMA_W, M_B, M_TOP, M_W
from .flows import mlp
from .mmd import KernelName, mmd2
from .weighted_gan import gan_losses, gan_optimizer_groups, latent_batches, update_weight_average, weight_average

__all__ = ["QUARK_MASSES", "TopQuarkRepresentation", "MMDGAN", "resonance_masses", "RESONANCES"]

Representation = Literal["momenta", "ptetaphi", "logpt"]

#: Fixed masses of the six quarks in the order of :data:`partonic.simulate.pythia.TTBAR_ORDER`
#: (b 4.7 GeV, light quarks massless, as in arXiv:1907.03764).
QUARK_MASSES = (M_B, 0.0, 0.0, M_B, 0.0, 0.0)

#: The four resonances: name → (indices of its daughters among the six quarks, mass, width).
RESONANCES = {
    "W+": ((1, 2), M_W, GAMMA_W),
    "W-": ((4, 5), M_W, GAMMA_W),
    "t": ((0, 1, 2), M_TOP, GAMMA_TOP),
    "tbar": ((3, 4, 5), M_TOP, GAMMA_TOP),
}


def resonance_masses(quarks: torch.Tensor) -> torch.Tensor:
    """(N, 4) invariant masses of W⁺, W⁻, t, t̄ from the (N, 6, 4) quark momenta.

    Sums of on-shell momenta are time-like; the clamp keeps the gradient of √m²
    finite for exactly collinear massless pairs."""
    m2 = torch.stack([kin.mass2(quarks[:, list(idx)].sum(1)) for idx, _, _ in RESONANCES.values()], 1)
    return torch.sqrt(torch.clamp(m2, min=1e-6))


class TopQuarkRepresentation(nn.Module):
    """Invertible map between six quark momenta (N, 6, 4) and 18 standardised numbers.

    ``momenta``: (px, py, pz) per quark; ``ptetaphi``: (pT, η, φ); ``logpt``:
    (log pT, η, φ). The inverse puts every quark on its mass shell
    (:data:`QUARK_MASSES`); a negative pT from the network is read as its modulus,
    and φ needs no range (cos and sin take care of it).

    Example:
        >>> rep = TopQuarkRepresentation("logpt").fit(quarks)
        >>> u = rep(quarks)                # (N, 18)
        >>> back = rep.inverse(u)          # (N, 6, 4), equal to quarks up to the masses
    """

    def __init__(self, representation: Representation = "momenta", masses: Sequence[float] = QUARK_MASSES):
        super().__init__()
        if representation not in ("momenta", "ptetaphi", "logpt"):
            raise ValueError(f"unknown representation {representation!r} (allowed: 'momenta', 'ptetaphi', 'logpt')")
        self.representation = representation
        self.register_buffer("masses", torch.tensor(masses, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(18, dtype=torch.float64))
        self.register_buffer("std", torch.ones(18, dtype=torch.float64))

    def _raw(self, quarks: torch.Tensor) -> torch.Tensor:
        if self.representation == "momenta":
            return quarks[..., 1:].reshape(-1, 18)
        pt = kin.pt(quarks)
        first = torch.log(torch.clamp(pt, min=1e-6)) if self.representation == "logpt" else pt
        return torch.stack([first, kin.eta(quarks), kin.phi(quarks)], -1).reshape(-1, 18)

    def fit(self, quarks: torch.Tensor) -> "TopQuarkRepresentation":
        raw = self._raw(quarks.to(self.mean.device, torch.float64))
        self.mean.copy_(raw.mean(0))
        self.std.copy_(raw.std(0).clamp(min=1e-8))
        return self

    def forward(self, quarks: torch.Tensor) -> torch.Tensor:
        raw = self._raw(quarks)
        return (raw - self.mean.to(raw.dtype)) / self.std.to(raw.dtype)

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        raw = (u * self.std.to(u.dtype) + self.mean.to(u.dtype)).reshape(-1, 6, 3)
        if self.representation == "momenta":
            p3 = raw.clamp(-2e4, 2e4)
        else:
            # bounded (pT ≤ 20 TeV): an unstable generator must not overflow into inf/NaN
            pt = torch.exp(raw[..., 0].clamp(max=10.0)) if self.representation == "logpt" else raw[..., 0].abs().clamp(max=2e4)
            eta, phi = raw[..., 1].clamp(-20, 20), raw[..., 2]
            p3 = torch.stack([pt * torch.cos(phi), pt * torch.sin(phi), pt * torch.sinh(eta)], -1)
        m = self.masses.to(u.dtype)
        e = torch.sqrt((p3 * p3).sum(-1) + m * m)
        return torch.cat([e[..., None], p3], -1)


class _BatchStatistics(nn.Module):
    """Appends the batch's standard deviation of every input (averaged over the batch,
    the same for every event): a discriminator that sees it spots a generator whose
    events are too alike (minibatch standard deviation, arXiv:1710.10196, Sec. 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        std = x.std(0, keepdim=True).expand_as(x) if x.shape[0] > 1 else torch.zeros_like(x)
        return torch.cat([x, std], 1)


class MMDGAN(nn.Module):
    """Generator and discriminator for six-quark events, with an MMD term on the
    resonance masses in the generator loss.

    Arguments:
        representation: a fitted :class:`TopQuarkRepresentation` (its space is the
            generator's output and the discriminator's input).
        latent_dim, width, layers: noise dimension and both MLPs (LeakyReLU).
        gradient_penalty: R1 weight on the discriminator (arXiv:1801.04406).
        mmd_weight: λ of the MMD term (0 switches it off: the ablation).
        mmd_kernel: ``breit_wigner`` or ``gaussian``; widths are each resonance's
            width times ``mmd_width_factors``.
        spectral_norm, batch_statistics, discriminator_masses: precision options.
        mmd_start_step, mmd_ramp_steps: the MMD weight is 0 for the first
            ``mmd_start_step`` training steps and then grows linearly to ``mmd_weight``
            over ``mmd_ramp_steps``; the GAN first learns the phase space, then the
            peaks are sharpened (an MMD at full weight from the start lets the
            generator satisfy it by collapsing onto a few configurations).
        discriminator_lr_factor: the discriminator's learning rate in units of the
            generator's (two time-scale updates, arXiv:1706.08500); the training loop
            reads it through :meth:`optimizer_groups`.
        ema_decay: when > 0, an exponential moving average of the generator's weights
            (decay per step) is kept and :meth:`sample` uses it. Simultaneous GAN
            updates circle around the equilibrium, and over long training the average
            can sit closer to it than any single iterate (arXiv:1806.04498); measured
            here after 3000 CPU steps with decay 0.999 it was worse, and over the CPU
            card's 6125 steps it shifted the top peaks down by 5 GeV: the MMD holds the
            last iterate's masses, not the average's (docs/results.md). Off by default.

    Example:
        >>> gan = MMDGAN(TopQuarkRepresentation().fit(quarks), mmd_weight=1.0)
        >>> out = gan.loss((quarks_batch,))     # inside the training loop
        >>> events = gan.sample(100_000)        # (N, 6, 4) momenta
    """

    def __init__(
        self,
        representation: TopQuarkRepresentation,
        latent_dim: int = 18,
        width: int = 512,
        layers: int = 10,
        gradient_penalty: float = 1.0,
        mmd_weight: float = 1.0,
        mmd_kernel: KernelName = "breit_wigner",
        mmd_width_factors: Sequence[float] = (1.0,),
        spectral_norm: bool = False,
        batch_statistics: bool = False,
        discriminator_masses: bool = False,
        mmd_start_step: int = 0,
        mmd_ramp_steps: int = 0,
        discriminator_lr_factor: float = 1.0,
        ema_decay: float = 0.0,
    ):
        super().__init__()
        self.representation = representation
        self.latent_dim = latent_dim
        self.gradient_penalty, self.mmd_weight, self.mmd_kernel = gradient_penalty, mmd_weight, mmd_kernel
        self.mmd_width_factors = tuple(float(f) for f in mmd_width_factors)
        self.discriminator_masses = discriminator_masses
        self.mmd_start_step, self.mmd_ramp_steps = int(mmd_start_step), int(mmd_ramp_steps)
        self.discriminator_lr_factor = float(discriminator_lr_factor)
        # training steps seen (a buffer: saved in checkpoints, so a resumed run keeps its MMD schedule)
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))
        self.generator = mlp(latent_dim, 18, width, layers, activation=lambda: nn.LeakyReLU(0.2))
        nn.init.normal_(self.generator[-1].weight, std=0.1)
        self.ema_decay = float(ema_decay)
        # the averaged generator: not trained (no gradients), saved with the model
        self.generator_ema = weight_average(self.generator, ema_decay)
        n_in = 18 + (4 if discriminator_masses else 0)
        net = mlp(n_in * (2 if batch_statistics else 1), 1, width, layers, activation=lambda: nn.LeakyReLU(0.2))
        nn.init.normal_(net[-1].weight, std=0.1)
        if spectral_norm:
            for i, mod in enumerate(net):
                if isinstance(mod, nn.Linear):
                    net[i] = nn.utils.parametrizations.spectral_norm(mod)
        self.discriminator = nn.Sequential(_BatchStatistics(), net) if batch_statistics else net
        # Resonance-mass standardisation for the discriminator: mass − M in units of 10 Γ.
        self.register_buffer("_res_mass", torch.tensor([m for _, m, _ in RESONANCES.values()]))
        self.register_buffer("_res_scale", torch.tensor([10.0 * g for _, _, g in RESONANCES.values()]))

    def optimizer_groups(self) -> list[dict]:
        """Generator and discriminator parameters as optimizer groups, the latter with
        its learning-rate factor."""
        return gan_optimizer_groups(self.generator, self.discriminator, self.discriminator_lr_factor)

    def _features(self, quarks: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if not self.discriminator_masses:
            return u
        m = resonance_masses(quarks)
        return torch.cat([u, (m - self._res_mass.to(m.dtype)) / self._res_scale.to(m.dtype)], 1)

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """(N, 6, 4) quark momenta from noise ``z`` (differentiable)."""
        return self.representation.inverse(self.generator(z))

    def mmd(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Σ over W⁺, W⁻, t, t̄ of MMD² between generated and true masses."""
        m_fake, m_real = resonance_masses(fake), resonance_masses(real)
        total = m_fake.new_zeros(())
        for k, (_, _, gamma) in enumerate(RESONANCES.values()):
            widths = [gamma * f for f in self.mmd_width_factors]
            total = total + mmd2(m_fake[:, k], m_real[:, k], widths, self.mmd_kernel)
        return total

    def current_mmd_weight(self) -> float:
        """λ at the current training step (the warm-up schedule applied)."""
        step = int(self.steps_seen)
        if step < self.mmd_start_step:
            return 0.0
        if self.mmd_ramp_steps <= 0:
            return self.mmd_weight
        return self.mmd_weight * min(1.0, (step - self.mmd_start_step + 1) / self.mmd_ramp_steps)

    def loss(self, batch) -> dict[str, torch.Tensor]:
        (quarks,) = batch
        dtype = next(self.generator.parameters()).dtype
        real = quarks.to(dtype)
        u_real = self.representation(real)
        z = torch.randn(real.shape[0], self.latent_dim, dtype=dtype, device=real.device)
        fake = self.generate(z)
        # the discriminator sees generated events in the same coordinates as the truth
        u_fake = self.representation(fake)
        loss_d, loss_g = gan_losses(self.discriminator, self._features(real, u_real), self._features(fake, u_fake), None, self.gradient_penalty)
        out = {"loss_d": loss_d.detach(), "loss_g": loss_g.detach()}
        loss = loss_d + loss_g
        weight = self.current_mmd_weight() if torch.is_grad_enabled() else self.mmd_weight
        if weight > 0:  # during the warm-up the MMD is not even computed (it costs half a step)
            mmd = self.mmd(fake, real)
            loss = loss + weight * mmd
            out["mmd"] = mmd.detach()
        if self.mmd_weight > 0:
            out["mmd_weight"] = torch.tensor(weight)
        if torch.is_grad_enabled() and self.training:
            self.steps_seen += 1
            update_weight_average(self.generator_ema, self.generator, self.ema_decay)
        out["loss"] = loss
        return out

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, batch_size: int = 262_144) -> torch.Tensor:
        """``n`` events as (n, 6, 4) momenta in float64 (masses exact), from the averaged
        generator when there is one."""
        net = self.generator_ema if self.generator_ema is not None else self.generator
        out = [self.representation.inverse(net(z).double()) for z in latent_batches(net, self.latent_dim, n, generator, batch_size)]
        return torch.cat(out) if out else torch.zeros(0, 6, 4, dtype=torch.float64, device=next(self.parameters()).device)
