"""Classifier refinement of a generative network's events.

References: A. Diefenbacher, E. Eren, G. Kasieczka, A. Korol, B. Nachman, D. Shih,
"DCTRGAN: improving the precision of generative models with reweighting",
arXiv:2009.03796; the likelihood-ratio trick: a classifier trained with the
binary cross entropy to separate data (label 1) from generated events (label 0),
the two classes carrying equal total weight, converges to

    D(x) = p_data(x) / (p_data(x) + p_gen(x)),   so   r(x) = D / (1 − D) = exp(logit D)

is the density ratio by which generated events must be weighted to follow the data.
Here the data are the weighted training events (their weights, negative ones
included, enter the loss), so r corrects the generator towards the same input it
was trained on: no information is added, the network's smooth approximation is
only made closer. Hit-or-miss on r / r_max then turns the generated events back into
unweighted events that follow p_gen · r = p_data, with efficiency ⟨r⟩ / r_max. The
rare events with r > r_max are repeated (⌊r/r_max⌋ copies plus one with the
remaining probability), so the output is unbiased for any r_max.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn

from ..evaluate.metrics import unweighting_efficiency
from .flows import mlp

__all__ = ["ClassifierRefiner", "systematic_resample", "unweight_with_copies", "validation_split"]


def systematic_resample(log_weights: torch.Tensor, generator: torch.Generator, n_out: int | None = None) -> torch.Tensor:
    """Indices (N, n_out) that resample each row of S weighted draws, log-weights (N, S),
    into n_out (default S) unweighted ones: systematic resampling (one uniform u per row,
    the points (u + k)/n_out, k = 0 … n_out − 1, on the cumulative normalised weights), so
    draw k is kept ⌊n_out w_k⌋ or ⌈n_out w_k⌉ times: less added noise than multinomial
    resampling, and every draw kept once when the weights are equal and n_out = S."""
    n, s = log_weights.shape
    m = s if n_out is None else int(n_out)
    if m < 1:
        raise ValueError(f"systematic_resample: n_out must be at least 1, got {n_out}")
    w = torch.softmax(log_weights.double(), 1)
    u = (torch.rand(n, 1, generator=generator, dtype=torch.float64, device=generator.device) + torch.arange(m, dtype=torch.float64, device=generator.device)) / m
    return torch.searchsorted(w.to(u.device).cumsum(1), u).clamp(max=s - 1)


def unweight_with_copies(weights: torch.Tensor, w_max: float, gen: torch.Generator) -> torch.Tensor:
    """Unbiased unweighting at any w_max: event i is kept ⌊w_i/w_max⌋ times plus once
    more with probability frac(w_i/w_max). Below w_max this is plain hit-or-miss; the
    rare over-weights come back as repeated events instead of a bias."""
    ratio = (weights.clamp(min=0) / w_max).cpu()
    copies = torch.floor(ratio) + (torch.rand(ratio.shape, generator=gen, dtype=ratio.dtype) < ratio - torch.floor(ratio)).to(ratio.dtype)
    return torch.repeat_interleave(torch.arange(len(ratio)), copies.long()).to(weights.device)


def validation_split(n_data: int, n_generated: int, fraction: float, generator: torch.Generator,
                     groups: torch.Tensor | None = None, generated_groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation and training rows of the data rows 0 … n_data − 1 followed by the
    generated rows: a random ``fraction`` of the rows, or, with group ids for both
    (``groups``, ``generated_groups``), every row of a random ``fraction`` of the
    groups, so that no group has rows on both sides."""
    n = n_data + n_generated
    if (groups is None) != (generated_groups is None):
        raise ValueError("ClassifierRefiner.fit: give groups for both the data and the generated events, or for neither")
    if groups is None:
        order = torch.randperm(n, generator=generator)
        n_val = int(fraction * n)
        return order[:n_val], order[n_val:]
    if len(groups) != n_data or len(generated_groups) != n_generated:
        raise ValueError(f"ClassifierRefiner.fit: {n_data} data and {n_generated} generated events, but {len(groups)} and {len(generated_groups)} group ids")
    _, ids = torch.unique(torch.cat([torch.as_tensor(groups).long().cpu(), torch.as_tensor(generated_groups).long().cpu()]), return_inverse=True)
    n_groups = int(ids.max()) + 1 if n else 0
    held = torch.zeros(n_groups, dtype=torch.bool)
    held[torch.randperm(n_groups, generator=generator)[: int(fraction * n_groups)]] = True
    in_val = held[ids]
    # shuffled within each side, as the row split is
    val, tr = torch.nonzero(in_val)[:, 0], torch.nonzero(~in_val)[:, 0]
    return val[torch.randperm(len(val), generator=generator)], tr[torch.randperm(len(tr), generator=generator)]


class ClassifierRefiner(nn.Module):
    """A classifier between weighted data and generated events, and the unweighting
    of generated events by its density ratio (module docstring).

    Arguments:
        dim: number of input features (use the network's preprocessed coordinates:
            they are already standardised).
        width, layers: the classifier MLP. Its last layer starts at zero, so an
            untrained refiner has r = 1 everywhere.
        fits: classifiers of that shape, each fitted with its own seed (initial
            weights, batch order, validation split); ln r is their mean (bagging). The
            ratio of one fit scatters from fit to fit by a few percent where the
            correction is large (docs/results.md, "The refiner's fit scatter"), and
            the mean of K fits by 1/√K of that.

    Example:
        >>> ref = ClassifierRefiner(3)
        >>> info = ref.fit(u_data, w_data, u_gen)               # u: features (N, 3)
        >>> x = ref.sample(lambda n, g: gan.sample(n, g), features, 100_000, gen)
    """

    #: the log-ratio is clipped here: a handful of events far outside the data must
    #: not set r_max (they are kept with their copies, see :meth:`sample`)
    MAX_LOG_RATIO = 10.0

    #: seed step between the fits of a refiner with ``fits`` > 1 (fit k: seed + k · step)
    FIT_SEED_STEP = 7919

    def __init__(self, dim: int, width: int = 128, layers: int = 3, fits: int = 1):
        super().__init__()
        if fits < 1:
            raise ValueError(f"ClassifierRefiner: fits must be ≥ 1, got {fits}")
        self.net = mlp(dim, 1, width, layers)
        #: the classifiers after the first (fits > 1); empty for one, so that a single
        #: refiner's saved state is what it always was. Their initial weights come from
        #: seeds of their own, so the global random state (and whatever is drawn after,
        #: e.g. a cINN's training) is that of a single refiner
        self.more = nn.ModuleList()
        seed = torch.initial_seed()
        for k in range(1, fits):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((seed + self.FIT_SEED_STEP * k) % 2**63)
                self.more.append(mlp(dim, 1, width, layers))
        self.register_buffer("r_max", torch.tensor(1.0, dtype=torch.float64))

    @property
    def nets(self) -> list[nn.Module]:
        """Every classifier: ln r is the mean of their outputs."""
        return [self.net, *self.more]

    def log_ratio(self, features: torch.Tensor, batch_size: int = 262_144) -> torch.Tensor:
        """ln r(x) per event (float64; the mean over the fits), in batches, without gradients."""
        p = next(self.net.parameters())
        nets = self.nets
        with torch.no_grad():
            out = []
            for c in features.split(batch_size):
                c = c.to(p.device, p.dtype)
                out.append(sum(net(c)[:, 0].double() for net in nets) / len(nets))
        return torch.cat(out).clamp(-self.MAX_LOG_RATIO, self.MAX_LOG_RATIO) if out else torch.zeros(0, dtype=torch.float64, device=p.device)

    def fit(self, data: torch.Tensor, weights: torch.Tensor, generated: torch.Tensor, epochs: int = 20, batch_size: int = 4096, lr: float = 1e-3,
            validation_fraction: float = 0.1, seed: int = 0, progress: bool | None = None, generated_weights: torch.Tensor | None = None,
            groups: torch.Tensor | None = None, generated_groups: torch.Tensor | None = None) -> dict:
        """Train on data features with their weights (label 1) against generated
        features (label 0) with theirs (``generated_weights``, default equal; positive),
        each class normalised to the same total weight; keep the epoch with the lowest
        validation loss, then set r_max. With several fits each classifier is trained
        so in turn, fit k with ``seed`` + k · :data:`FIT_SEED_STEP`. Returns a summary
        (of the first fit; with several, "members" holds each fit's).

        ``groups`` and ``generated_groups`` (integer ids per row, both or neither) hold
        out whole groups for validation instead of single rows: rows that share
        something the classifier can memorise (one parton event under several detector
        realisations, and the samples drawn for it) must not be split between training
        and validation, or the validation loss rewards memorising them."""
        from tqdm.auto import tqdm

        if len(data) != len(weights):
            raise ValueError(f"ClassifierRefiner.fit: {len(data)} data events but {len(weights)} weights")
        if len(data) < 10 or len(generated) < 10:
            raise ValueError("ClassifierRefiner.fit needs at least 10 data and 10 generated events")
        p = next(self.net.parameters())
        w = weights.detach().double().cpu()
        if w.sum() <= 0:
            raise ValueError("ClassifierRefiner.fit: the data weights sum to ≤ 0")
        n_d, n_g = len(data), len(generated)
        if generated_weights is None:
            wg = torch.ones(n_g, dtype=torch.float64)
        else:
            wg = generated_weights.detach().double().cpu()
            if len(wg) != n_g:
                raise ValueError(f"ClassifierRefiner.fit: {n_g} generated events but {len(wg)} generated weights")
            if not bool((wg > 0).all()) or not bool(torch.isfinite(wg).all()):
                raise ValueError("ClassifierRefiner.fit: the generated weights must be positive and finite")
        half = 0.5 * (n_d + n_g)
        # everything on the network's device once: no host-device copy per batch
        x = torch.cat([data.detach().float().to(p.device), generated.detach().float().to(p.device)])
        y = torch.cat([torch.ones(n_d), torch.zeros(n_g)]).to(p.device)
        # equal total weight per class; the mean |weight| of an event is about 1
        cw = torch.cat([(w * (half / w.sum())).float(), (wg * (half / wg.sum())).float()]).to(p.device)
        loss_fn = nn.BCEWithLogitsLoss(reduction="none")
        nets = self.nets

        def fit_one(net: nn.Module, k: int) -> dict:
            gen = torch.Generator().manual_seed(seed + self.FIT_SEED_STEP * k)
            val, tr = validation_split(n_d, n_g, validation_fraction, gen, groups, generated_groups)
            val, tr, n_val = val.to(p.device), tr.to(p.device), len(val)

            def mean_loss(idx) -> float:
                total = 0.0
                with torch.no_grad():
                    for c in idx.split(262_144):
                        total += float((cw[c] * loss_fn(net(x[c])[:, 0], y[c])).sum())
                return total / max(len(idx), 1)

            opt = torch.optim.Adam(net.parameters(), lr=lr)
            steps = epochs * math.ceil(len(tr) / batch_size)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
            history, best, best_state = [], float("inf"), None
            # the validation loss before training: for a new refiner (last layer zero) that of
            # r = 1; the classifier has found a difference only if it ends below this
            before = mean_loss(val) if n_val else mean_loss(tr)
            desc = "classifier refinement" + (f" {k + 1}/{len(nets)}" if len(nets) > 1 else "")
            bar = tqdm(range(epochs), desc=desc, disable=not progress if progress is not None else None, leave=False)
            for epoch in bar:
                net.train()
                perm = tr[torch.randperm(len(tr), generator=gen).to(p.device)]
                for c in perm.split(batch_size):
                    opt.zero_grad()
                    loss = (cw[c] * loss_fn(net(x[c])[:, 0], y[c])).mean()
                    loss.backward()
                    opt.step()
                    sched.step()
                net.eval()
                v = mean_loss(val) if n_val else mean_loss(tr)
                history.append(v)
                bar.set_postfix(val_loss=f"{v:.5f}")
                if v < best:
                    best, best_state, best_epoch = v, copy.deepcopy(net.state_dict()), epoch + 1
            if best_state is None:
                raise ValueError(f"ClassifierRefiner.fit: the validation loss was never finite ({history})")
            net.load_state_dict(best_state)
            return {"epochs": epochs, "best_epoch": best_epoch, "val_loss": history, "best_val_loss": best,
                    "val_loss_before_training": before, "validation": "rows" if groups is None else "groups", "validation_rows": int(n_val)}

        fits = [fit_one(net, k) for k, net in enumerate(nets)]
        # r_max: the robust maximum (median of sub-sample maxima) of r over the generated events
        r = self.log_ratio(generated).exp().cpu()
        eff = unweighting_efficiency(r)
        self.r_max.fill_(eff.w_max)
        info = {**fits[0], "data_events": n_d, "generated_events": n_g, "r_max": eff.w_max, "mean_r": float(r.mean()),
                "r_std": float(r.std()), "expected_efficiency": float(r.mean()) / eff.w_max,
                "overweight_fraction": eff.overweight_fraction}
        if len(fits) > 1:
            info["fits"] = len(fits)
            info["members"] = fits
        return info

    def sample(self, draw: Callable[[int, torch.Generator], torch.Tensor], features: Callable[[torch.Tensor], torch.Tensor], n: int,
               generator: torch.Generator, batch_size: int = 262_144) -> tuple[torch.Tensor, dict]:
        """n unweighted events: ``draw(k, generator)`` generated events (physics
        variables), weighted by r(``features(x)``) and unweighted with copies at r_max.
        Returns the events and the efficiency and over-weight figures."""
        kept, n_kept, tried, over, sum_r = [], 0, 0, 0, 0.0
        r_max = float(self.r_max)
        while n_kept < n:
            x = draw(batch_size, generator)
            r = self.log_ratio(features(x)).exp()
            idx = unweight_with_copies(r, r_max, generator)
            kept.append(x[idx])
            n_kept += len(idx)
            tried += len(x)
            over += int((r > r_max).sum())
            sum_r += float(r.sum())
        out = torch.cat(kept)
        out = out[torch.randperm(len(out), generator=generator)[:n].to(out.device)]
        return out, {"efficiency": n_kept / tried, "events_tried": tried, "duplicated_fraction": over / tried, "mean_r": sum_r / tried, "r_max": r_max}
