"""How the weighted Drell–Yan GAN moves during training: the live generator against
the moving average of its weights (``model.ema_decay``).

Generates the card's weighted training input, trains the card's GAN with its own
loop for a fixed number of steps, and every ``--every`` steps prints the largest
deviation from the weighted input over 20 equal-probability bins of each of the
three network coordinates (Φ⁻¹(F(m_μμ)), rapidity, Φ⁻¹((1 + cos θ*)/2)), for the
live generator and for the averaged one (4 × 10⁵ generated events each).

    python examples/dy_gan_study.py --card cards/drell_yan_gan.yaml --steps 6000

The findings are in docs/results.md (Unweighting, Flow and GAN modes).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from partonic.cards import load_card
from partonic.jobs.unweight import drell_yan_setup, network_preprocessing
from partonic.models.weighted_gan import WeightedGAN, gan_losses, update_weight_average, weight_average
from partonic.physics.pdf import from_card
from partonic.simulate.weighted import DrellYanGenerator
from partonic.train import lr_factor


def equal_probability_edges(u: torch.Tensor, w: torch.Tensor, bins: int) -> list[torch.Tensor]:
    """Per coordinate, the edges of ``bins`` bins that each hold 1/bins of the weight."""
    edges = []
    for d in range(u.shape[1]):
        order = torch.argsort(u[:, d])
        cum = torch.cumsum(w[order], 0)
        cut = torch.searchsorted(cum / cum[-1], torch.linspace(0, 1, bins + 1)[1:-1].to(cum))
        inner = u[order[cut], d]
        edges.append(torch.cat([inner.new_tensor([-1e9]), inner, inner.new_tensor([1e9])]))
    return edges


def largest_deviation(net: torch.nn.Module, latent_dim: int, edges: list[torch.Tensor], n: int = 400_000) -> list[float]:
    with torch.no_grad():
        g = net(torch.randn(n, latent_dim)).double()
    out = []
    for d, e in enumerate(edges):
        frac = torch.histogram(g[:, d].clamp(-1e8, 1e8), e)[0] / n
        out.append(round(float((frac * (len(e) - 1) - 1).abs().max()), 4))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--card", default="cards/drell_yan_gan.yaml")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=None, help="generator learning rate (default: the card's)")
    ap.add_argument("--ema", type=float, default=None, help="decay of the weight average (default: the card's, else 0.999)")
    args = ap.parse_args()

    card = load_card(args.card)
    m, t = card.model, card.training
    lr = args.lr if args.lr is not None else t.optimizer.lr
    decay = args.ema if args.ema is not None else (m.ema_decay or 0.999)
    pdf, _ = from_card(card.physics)
    generator = DrellYanGenerator(drell_yan_setup(card), pdf)
    ev = generator.generate(card.data.n_events, torch.Generator().manual_seed(card.seed))
    keep = ev.weight != 0
    x, w = torch.stack([ev.m, ev.y, ev.cos_theta], 1)[keep], ev.weight[keep]
    pre = network_preprocessing(generator, m.rapidity, m.marginals).fit(x, w)
    u = pre(x)[0].float()
    w = w.float()
    edges = equal_probability_edges(u.double(), w.double(), 20)

    torch.manual_seed(card.seed)
    gan = WeightedGAN(pre, dim=3, latent_dim=m.latent_dim, width=m.width, layers=m.layers, gradient_penalty=m.gradient_penalty, generator=m.generator)
    average = weight_average(gan.generator, decay)
    opt = torch.optim.Adam([{"params": gan.generator.parameters(), "lr": lr},
                            {"params": gan.discriminator.parameters(), "lr": lr * m.discriminator_lr_factor}], betas=tuple(t.optimizer.betas))
    base = [g["lr"] for g in opt.param_groups]
    start = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.every == 0:
            print(json.dumps({"step": step, "live": largest_deviation(gan.generator, m.latent_dim, edges),
                              "average": largest_deviation(average, m.latent_dim, edges), "s": round(time.perf_counter() - start, 1)}), flush=True)
        if step == args.steps:
            break
        factor = lr_factor(step, args.steps, t)  # the card's schedule over the study's steps
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * factor
        idx = torch.randint(0, len(u), (t.batch_size,))
        wb = w[idx] / w[idx].mean()
        loss_d, loss_g = gan_losses(gan.discriminator, u[idx], gan.generator(torch.randn(t.batch_size, m.latent_dim)), wb, m.gradient_penalty)
        opt.zero_grad()
        (loss_d + loss_g).backward()
        opt.step()
        update_weight_average(average, gan.generator, decay)


if __name__ == "__main__":
    main()
