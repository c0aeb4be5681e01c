"""A GAN trained on weighted events.

References: M. Backes, A. Butter, T. Plehn, R. Winterhalder, "How to GAN event
unweighting", arXiv:2012.07873, eq. (4): the discriminator sees the truth weights,

    L_D = ⟨−w log D(x)⟩_truth / ⟨w⟩ + ⟨−log(1 − D(G(z)))⟩,    L_G = ⟨−log D(G(z))⟩

(the generator loss is the non-saturating one). At the optimum G follows the
weighted distribution, so it produces unweighted events directly. Negative weights
enter L_D with their sign.

Both networks are trained by the project's single training loop: the returned
loss is L_D + L_G, with the fake events detached in L_D and the discriminator's
parameters detached in L_G, so one backward pass gives each network its own
gradient (simultaneous updates).
"""

from __future__ import annotations

import copy

import numpy as np

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .flows import mlp

__all__ = ["WeightedGAN", "ResidualGenerator", "SampleQuantiles", "MarginalMap", "marginal_distance", "gan_losses", "gan_optimizer_groups", "latent_batches", "weight_average", "update_weight_average"]


class WeightedGAN(nn.Module):
    """Generator and discriminator MLPs in a preprocessed space.

    Arguments:
        preprocessing: invertible map physics variables ↔ ℝᵈ (``forward``/``inverse``).
        dim: data dimension; latent_dim: noise dimension.
        width, layers: both MLPs.
        gradient_penalty: weight of a zero-centred gradient penalty on D at the
            truth points (R1, arXiv:1801.04406), which stabilises training.
        discriminator_lr_factor: D's learning rate in units of G's (two time-scale
            updates, arXiv:1706.08500), through :meth:`optimizer_groups`.
        ema_decay: when > 0, an exponential moving average of the generator's weights
            (decay per training step, arXiv:1806.04498) is kept and :meth:`sample` uses
            it. The simultaneous updates make the generator circle around the
            equilibrium; on the Drell–Yan input the average sits much closer to it
            than the last iterate (docs/results.md).
        generator: "mlp", a plain MLP from the noise to the events, or "residual",
            the first ``dim`` noise coordinates plus a learned correction
            (:class:`ResidualGenerator`): it starts as the standard normal, which in
            the Gaussianised coordinates of the preprocessing is the analytic model
            with its tails, and learns only the difference.
        fixed_coordinates: coordinates the residual generator leaves uncorrected
            (:class:`ResidualGenerator`): behind a quantile-map preprocessing their
            marginal is the training input's by construction.
        marginal_weight: λ of a term λ · Σ_k W₂²(generated, weighted truth) in the
            generator's loss, on every coordinate's marginal (:func:`marginal_distance`):
            it holds the generator on the input's marginals, which the discriminator
            alone leaves a few per cent off. 0: off.
        marginal_target: what the generated batch's marginals are held on: "batch",
            W₂² to the weighted quantiles of the true batch of the same step (noisy
            for weighted events: a batch of 1024 holds about 250 effective events), or
            "input", the Cramér distance (:meth:`SampleQuantiles.cramer`) to the
            quantile function of the whole weighted training input, fitted once by
            :meth:`fit_marginal_targets` before training.
        marginal_calibration: when True, :meth:`calibrate_marginals` fits, after
            training, a monotone map per coordinate (:class:`MarginalMap`) that carries
            the generated marginal onto the weighted training input's, and
            :meth:`sample` applies it. Fixed coordinates keep the identity (their
            marginal is the input's already). The joint structure (the copula) stays
            the network's.

    Example:
        >>> gan = WeightedGAN(pre, dim=3)
        >>> loss = gan.loss((x, w))          # inside the training loop
        >>> events = gan.sample(100_000)     # physics variables
    """

    def __init__(self, preprocessing: nn.Module, dim: int, latent_dim: int = 8, width: int = 128, layers: int = 4, gradient_penalty: float = 0.0,
                 discriminator_lr_factor: float = 1.0, ema_decay: float = 0.0, generator: str = "mlp", marginal_weight: float = 0.0,
                 marginal_target: str = "batch", fixed_coordinates: tuple[int, ...] = (), marginal_calibration: bool = False):
        super().__init__()
        self.preprocessing = preprocessing
        self.dim, self.latent_dim = dim, latent_dim
        if fixed_coordinates and generator != "residual":
            raise ValueError(f"fixed_coordinates needs generator='residual', got {generator!r}")
        if generator == "mlp":
            self.generator = _generator(latent_dim, dim, width, layers)
        elif generator == "residual":
            self.generator = ResidualGenerator(latent_dim, dim, width, layers, fixed=fixed_coordinates)
        else:
            raise ValueError(f"generator must be 'mlp' or 'residual', got {generator!r}")
        self.discriminator = _discriminator(dim, width, layers)
        self.gradient_penalty = gradient_penalty
        self.discriminator_lr_factor = float(discriminator_lr_factor)
        self.ema_decay = float(ema_decay)
        self.generator_ema = weight_average(self.generator, ema_decay)
        self.marginal_weight = float(marginal_weight)
        if marginal_target not in ("batch", "input"):
            raise ValueError(f"marginal_target must be 'batch' or 'input', got {marginal_target!r}")
        self.marginal_target = marginal_target
        self.input_quantiles = SampleQuantiles(dim) if marginal_target == "input" else None
        self.marginal_map = MarginalMap(dim) if marginal_calibration else None

    def fit_marginal_targets(self, x: torch.Tensor, w: torch.Tensor) -> None:
        """The quantile functions of the whole weighted training input (physics
        variables x, weights w) in the network's coordinates, for ``marginal_target =
        "input"``; kept in the checkpoint."""
        if self.input_quantiles is None:
            raise ValueError("fit_marginal_targets needs marginal_target='input'")
        self.input_quantiles.fit(self._coordinates(x), w)

    @torch.no_grad()
    def _coordinates(self, x: torch.Tensor, batch_size: int = 262_144) -> torch.Tensor:
        """Physics variables x in the network's coordinates (the preprocessing), in batches."""
        return torch.cat([self.preprocessing(x[i:i + batch_size])[0] for i in range(0, len(x), batch_size)])

    @torch.no_grad()
    def calibrate_marginals(self, x: torch.Tensor, w: torch.Tensor, n_generated: int = 4_000_000, generator: torch.Generator | None = None) -> dict:
        """Fit the marginal map (``marginal_calibration``) after training: the quantiles of
        ``n_generated`` events of the averaged generator against those of the weighted
        training input (physics variables x, weights w), in the network's coordinates.
        Returns, per coordinate, the largest shift the map applies within the central
        99% of the generated marginal (in units of the coordinate)."""
        if self.marginal_map is None:
            raise ValueError("calibrate_marginals needs marginal_calibration=True")
        net = self.generator_ema if self.generator_ema is not None else self.generator
        target = SampleQuantiles(self.dim).fit(self._coordinates(x), w)
        generated = SampleQuantiles(self.dim).fit(torch.cat([net(z) for z in latent_batches(net, self.latent_dim, n_generated, generator, 262_144)]))
        # a residual generator's fixed coordinates keep the identity
        return self.marginal_map.fit(generated.quantiles, target.quantiles, identity=getattr(self.generator, "fixed", ()))

    def optimizer_groups(self) -> list[dict]:
        return gan_optimizer_groups(self.generator, self.discriminator, self.discriminator_lr_factor)

    def generate_latent(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    def loss(self, batch) -> dict[str, torch.Tensor]:
        x, w = batch
        dtype = next(self.generator.parameters()).dtype
        u, _ = self.preprocessing(x)
        u = u.to(dtype)
        w = w.to(dtype)
        w = w / w.mean()
        z = torch.randn(u.shape[0], self.latent_dim, dtype=dtype, device=u.device)
        fake = self.generator(z)
        loss_d, loss_g = gan_losses(self.discriminator, u, fake, w, self.gradient_penalty)
        out = {"loss_d": loss_d.detach(), "loss_g": loss_g.detach()}
        loss = loss_d + loss_g
        if self.marginal_weight > 0:
            if self.input_quantiles is not None:
                marg, key = self.input_quantiles.cramer(fake), "marginal_cramer"
            else:
                marg, key = marginal_distance(fake, u.detach(), w), "marginal_w2"
            loss = loss + self.marginal_weight * marg
            out[key] = marg.detach()
        if torch.is_grad_enabled() and self.training:
            update_weight_average(self.generator_ema, self.generator, self.ema_decay)
        out["loss"] = loss
        return out

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, batch_size: int = 262_144, calibrated: bool = True) -> torch.Tensor:
        """n events in physics variables, from the averaged generator when there is one,
        through the marginal map when there is one (``calibrated=False``: without it)."""
        net = self.generator_ema if self.generator_ema is not None else self.generator
        use_map = self.marginal_map is not None and calibrated
        if use_map and not self.marginal_map.fitted:
            raise RuntimeError("marginal_calibration is on but calibrate_marginals has not been called")

        def latent(z: torch.Tensor) -> torch.Tensor:
            u = net(z).double()
            return self.marginal_map(u) if use_map else u
        return torch.cat([self.preprocessing.inverse(latent(z))[0] for z in latent_batches(net, self.latent_dim, n, generator, batch_size)])


class ResidualGenerator(nn.Module):
    """G(z) = z₁…z_d + f(z): the identity on the first ``dim`` noise coordinates plus an
    MLP correction whose last layer starts at zero.

    At the start G(z) is standard normal. Behind a preprocessing that maps the events
    to nearly standard normal coordinates (Φ⁻¹ of an analytic CDF), that is already
    close to the truth, tails included; the network learns a small correction instead
    of the whole map. A plain MLP has to build the tails from the few events the
    discriminator sees there, and on the Drell–Yan input it never did (0.08 of the
    m_μμ ∈ [500, 1000] GeV truth, docs/results.md).

    With ``fixed`` coordinates the correction is left off those: each passes its noise
    coordinate through unchanged, so behind a quantile map of the training input
    (``marginals = "quantile"``) its generated marginal is the input's, whatever the
    training does, and the correction of the others, a function of all the noise, learns
    their distribution given it. One fixed coordinate keeps the generator general (a
    joint density is a marginal times a conditional); two would make them independent.

    Arguments:
        latent: noise dimension (≥ dim); dim: event dimension; width, layers: the MLP.
        fixed: indices of the coordinates without correction (at most one).
    """

    def __init__(self, latent: int, dim: int, width: int, layers: int, fixed: tuple[int, ...] = ()):
        super().__init__()
        if latent < dim:
            raise ValueError(f"a residual generator needs latent_dim ≥ {dim} (the event dimension), got {latent}")
        fixed = tuple(sorted(set(int(k) for k in fixed)))
        if len(fixed) > 1 or any(not 0 <= k < dim for k in fixed):
            raise ValueError(f"fixed must name at most one coordinate in [0, {dim}), got {fixed}")
        self.dim, self.fixed = dim, fixed
        self.correction = mlp(latent, dim, width, layers, activation=nn.LeakyReLU)
        mask = torch.ones(dim)
        mask[list(fixed)] = 0.0
        # not in the state dict: the card says which coordinate is fixed
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        correction = self.correction(z)
        if self.fixed:
            correction = correction * self.mask.to(correction.dtype)
        return z[:, : self.dim] + correction


class SampleQuantiles(nn.Module):
    """The quantile function of every coordinate of a whole (weighted) sample, on a
    grid of ``levels`` probabilities (j + ½)/levels, and the Cramér distance of a batch
    to it.

    Negative weights enter the cumulative weight through a running maximum, which
    keeps the quantile function monotone.

    :meth:`cramer` is Σ_k ∫ (F̂_k − F_k)² dx, half the energy distance, between the
    batch's and the sample's marginals, estimated without bias (the batch's own pairs
    as a U-statistic): its expectation is minimal exactly where the batch follows the
    sample, and its gradient moves every generated value x by 2 (F(x) − F̂(x))/n. The
    sorted-value distance W₂² (:func:`marginal_distance`) against a fixed target is
    not like that: its expectation contains the variance of the batch's extreme
    values, which the generator lowers by thinning its tails (on the Drell–Yan GAN,
    0.66 and 0.18 of the m_μμ tails; docs/results.md).
    """

    def __init__(self, dim: int, levels: int = 8192):
        super().__init__()
        if levels < 16:
            raise ValueError(f"levels must be at least 16, got {levels}")
        self.register_buffer("quantiles", torch.zeros(levels, dim, dtype=torch.float64))

    def fit(self, u: torch.Tensor, weights: torch.Tensor | None = None) -> "SampleQuantiles":
        n, dim = u.shape
        if dim != self.quantiles.shape[1]:
            raise ValueError(f"expected {self.quantiles.shape[1]} coordinates, got {dim}")
        u = u.detach().double().cpu()
        w = torch.ones(n, dtype=torch.float64) if weights is None else weights.detach().double().cpu()
        if w.shape != (n,) or not float(w.sum()) > 0:
            raise ValueError(f"weights must have shape ({n},) and a positive sum")
        levels = self.quantiles.shape[0]
        p = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
        us, idx = torch.sort(u, dim=0)
        cw = torch.cumsum(w[idx], dim=0).cummax(dim=0).values
        cdf = ((cw - 0.5 * w[idx].clamp(min=0.0)) / cw[-1:]).cummax(dim=0).values
        for k in range(dim):
            self.quantiles[:, k] = torch.from_numpy(np.interp(p.numpy(), cdf[:, k].numpy(), us[:, k].numpy()))
        return self

    def cramer(self, x: torch.Tensor) -> torch.Tensor:
        """Σ_k ∫ (F̂_k − F_k)² dx for a batch x (n ≥ 2, dim); differentiable in x."""
        n, dim = x.shape
        if dim != self.quantiles.shape[1] or n < 2:
            raise ValueError(f"cramer needs a batch of shape (n ≥ 2, {self.quantiles.shape[1]}), got {tuple(x.shape)}")
        q = self.quantiles.t().to(x).contiguous()  # (dim, M), increasing
        m = q.shape[1]
        xt = x.t().contiguous()
        below = torch.searchsorted(q, xt.detach())  # grid points below each value
        csum = torch.cat([torch.zeros_like(q[:, :1]), q.cumsum(1)], 1)
        s_below = csum.gather(1, below)
        e_xy = (xt * (2 * below - m) - 2 * s_below + csum[:, -1:]) / m  # E|x − Y| for every x
        xs = torch.sort(xt, dim=1).values
        i = torch.arange(n, dtype=x.dtype, device=x.device)
        e_xx = 2 * (xs * (2 * i - n + 1)).sum(1) / (n * (n - 1))  # E|X − X'| over distinct pairs
        j = torch.arange(m, dtype=x.dtype, device=x.device)
        e_yy = 2 * (q * (2 * j - m + 1)).sum(1) / (m * m)
        return (e_xy.mean(1) - 0.5 * e_xx - 0.5 * e_yy).sum()


class MarginalMap(nn.Module):
    """A monotone map per coordinate that carries one marginal onto another: the
    piecewise-linear function through the points (q_from[j], q_to[j]) of two quantile
    tables on the same probability grid, continued beyond the outermost points by a
    shift (slope 1). Applied to events of the ``from`` distribution, each coordinate
    then follows the ``to`` marginal (empirical quantile mapping), while the
    dependence between coordinates (their copula) is unchanged, since every map is
    increasing.

    The tables are buffers (in the checkpoint); ``fitted`` says whether :meth:`fit` ran.
    """

    def __init__(self, dim: int, levels: int = 8192):
        super().__init__()
        self.register_buffer("q_from", torch.zeros(levels, dim, dtype=torch.float64))
        self.register_buffer("q_to", torch.zeros(levels, dim, dtype=torch.float64))
        self.register_buffer("is_fitted", torch.zeros((), dtype=torch.bool))

    @property
    def fitted(self) -> bool:
        return bool(self.is_fitted)

    @torch.no_grad()
    def fit(self, q_from: torch.Tensor, q_to: torch.Tensor, identity: tuple[int, ...] = ()) -> dict:
        """Set the tables (levels, dim) each; coordinates in ``identity`` map to themselves.
        Returns {"max_shift": [...]}: per coordinate the largest |map(u) − u| over the
        central 99% of the ``from`` quantiles."""
        if q_from.shape != self.q_from.shape or q_to.shape != self.q_to.shape:
            raise ValueError(f"quantile tables must have shape {tuple(self.q_from.shape)}, got {tuple(q_from.shape)} and {tuple(q_to.shape)}")
        q_from, q_to = q_from.double().to(self.q_from.device), q_to.double().to(self.q_to.device).clone()
        if bool((q_from[1:] < q_from[:-1]).any()) or bool((q_to[1:] < q_to[:-1]).any()):
            raise ValueError("quantile tables must be non-decreasing")
        for k in identity:
            q_to[:, k] = q_from[:, k]
        self.q_from.copy_(q_from)
        self.q_to.copy_(q_to)
        self.is_fitted.fill_(True)
        levels = q_from.shape[0]
        central = slice(int(0.005 * levels), levels - int(0.005 * levels))
        return {"max_shift": [round(float(v), 5) for v in (q_to[central] - q_from[central]).abs().max(0).values]}

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        qf, qt = self.q_from.to(u.dtype), self.q_to.to(u.dtype)
        out = torch.empty_like(u)
        for k in range(u.shape[1]):
            a, b, x = qf[:, k].contiguous(), qt[:, k].contiguous(), u[:, k].contiguous()
            hi = torch.searchsorted(a, x).clamp(1, len(a) - 1)
            lo = hi - 1
            step = (a[hi] - a[lo]).clamp(min=torch.finfo(u.dtype).tiny)
            t = ((x - a[lo]) / step).clamp(0.0, 1.0)
            y = b[lo] + t * (b[hi] - b[lo])
            y = torch.where(x < a[0], x - a[0] + b[0], y)
            out[:, k] = torch.where(x > a[-1], x - a[-1] + b[-1], y)
        return out


def marginal_distance(fake: torch.Tensor, real: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_k W₂² between the marginals of a generated batch and a (weighted) true batch in
    every coordinate k: the mean squared difference between the generated batch's sorted
    values and the true batch's weighted quantiles at the same levels (i + ½)/n. Without
    weights (or equal ones) the quantiles are the true batch's sorted values. Negative
    weights enter through a running maximum of the cumulative weights, which keeps the
    quantile function monotone. Differentiable in ``fake`` through the sort."""
    n = fake.shape[0]
    if fake.shape[1:] != real.shape[1:]:
        raise ValueError(f"marginal_distance: coordinates differ, {tuple(fake.shape)} and {tuple(real.shape)}")
    fs = torch.sort(fake, dim=0).values
    if weights is None:
        if real.shape[0] != n:
            raise ValueError(f"marginal_distance needs batches of equal size without weights, got {n} and {real.shape[0]}")
        return ((fs - torch.sort(real, dim=0).values) ** 2).mean(0).sum()
    rs, idx = torch.sort(real, dim=0)
    cw = torch.cumsum(weights.to(real.dtype)[idx], dim=0).cummax(dim=0).values
    cw = cw / cw[-1:].clamp(min=torch.finfo(cw.dtype).tiny)
    levels = (torch.arange(n, dtype=real.dtype, device=real.device) + 0.5) / n
    pick = torch.searchsorted(cw.T.contiguous(), levels.expand(real.shape[1], n).contiguous()).clamp(max=real.shape[0] - 1)
    quantiles = torch.gather(rs, 0, pick.T)
    return ((fs - quantiles) ** 2).mean(0).sum()


def weight_average(generator: nn.Module, decay: float) -> nn.Module | None:
    """A frozen copy of ``generator`` that :func:`update_weight_average` keeps as the
    exponential moving average of its weights; None when ``decay`` is 0 (off)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ema_decay must lie in [0, 1), got {decay}")
    return copy.deepcopy(generator).requires_grad_(False) if decay > 0 else None


@torch.no_grad()
def update_weight_average(average: nn.Module | None, live: nn.Module, decay: float) -> None:
    """ā ← d ā + (1 − d) a for every floating-point parameter (called once per training
    step, with the weights the previous optimizer step left). Integer parameters, such
    as the index permutations of FrEIA's ``PermuteRandom``, are fixed and copied."""
    if average is None:
        return
    for avg, p in zip(average.parameters(), live.parameters()):
        if avg.is_floating_point():
            avg.lerp_(p, 1.0 - decay)
        else:
            avg.copy_(p)


def latent_batches(net: nn.Module, latent_dim: int, n: int, generator: torch.Generator | None, batch_size: int):
    """Standard-normal noise for ``n`` events in batches, on ``net``'s device and dtype.
    With a (CPU) ``generator`` the noise is drawn on the CPU, so a seed gives the same
    events on every device."""
    p = next(net.parameters())
    for start in range(0, n, batch_size):
        k = min(batch_size, n - start)
        yield torch.randn(k, latent_dim, generator=generator, dtype=p.dtype, device="cpu" if generator is not None else p.device).to(p.device)


def gan_optimizer_groups(generator: nn.Module, discriminator: nn.Module, discriminator_lr_factor: float) -> list[dict]:
    """Generator and discriminator parameters as optimizer groups for the training
    loop, the discriminator's with its learning-rate factor."""
    return [{"params": list(generator.parameters()), "lr_factor": 1.0},
            {"params": list(discriminator.parameters()), "lr_factor": float(discriminator_lr_factor)}]


def gan_losses(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor, weights: torch.Tensor | None = None, gradient_penalty: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_D, L_G) of a binary cross-entropy GAN, arranged for simultaneous updates.

    L_D = ⟨−w log D(x)⟩_real + ⟨−log(1 − D(x))⟩_fake (+ R1 penalty ½γ⟨|w| |∇ₓ logit D|²⟩_real,
    arXiv:1801.04406) sees the fake events detached; L_G = ⟨−log D(G(z))⟩ (non-saturating)
    sees the discriminator's parameters detached. ``weights`` (default 1) are the
    truth-event weights of arXiv:2012.07873, normalised to mean 1 by the caller.
    """
    penalise = gradient_penalty > 0 and torch.is_grad_enabled()
    if penalise:
        real = real.detach().requires_grad_(True)
    logit_real = discriminator(real)[:, 0]
    logit_fake = discriminator(fake.detach())[:, 0]
    w = torch.ones_like(logit_real) if weights is None else weights
    # −log D = softplus(−logit), −log(1 − D) = softplus(logit)
    loss_d = (w * F.softplus(-logit_real)).mean() + F.softplus(logit_fake).mean()
    if penalise:
        grad = torch.autograd.grad(logit_real.sum(), real, create_graph=True)[0]
        loss_d = loss_d + 0.5 * gradient_penalty * (w.abs() * (grad**2).sum(1)).mean()
    frozen = {k: v.detach() for k, v in discriminator.named_parameters()}
    frozen.update({k: v for k, v in discriminator.named_buffers()})
    logit_gen = functional_call(discriminator, frozen, (fake,))[:, 0]
    return loss_d, F.softplus(-logit_gen).mean()


def _generator(latent: int, dim: int, width: int, layers: int) -> nn.Sequential:
    net = mlp(latent, dim, width, layers, activation=nn.LeakyReLU)
    nn.init.normal_(net[-1].weight, std=0.1)  # not the identity-at-start of flow couplings
    return net


def _discriminator(dim: int, width: int, layers: int) -> nn.Sequential:
    net = mlp(dim, 1, width, layers, activation=nn.LeakyReLU)
    nn.init.normal_(net[-1].weight, std=0.1)
    return net
