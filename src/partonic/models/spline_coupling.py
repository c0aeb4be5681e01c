"""A conditional rational-quadratic spline coupling block for FrEIA networks.

References: C. Durkan, A. Bekasov, I. Murray, G. Papamakarios, "Neural Spline
Flows", arXiv:1906.04032 (the monotonic rational-quadratic spline; the spline
itself is :func:`partonic.models.flows.rq_spline`); FrEIA 0.2's
``InvertibleModule`` interface, so the block goes into a ``SequenceINN`` like an
``AllInOneBlock``.

An affine coupling moves and stretches one half of the coordinates; a posterior
with two separated modes needs many of them. A spline coupling bends each
coordinate's map into any monotone shape with ``bins`` pieces, so one block can
already split probability between two modes (tests/test_unfold.py,
``test_spline_cinn_learns_a_two_mode_posterior``).
"""

from __future__ import annotations

from collections.abc import Callable

import FrEIA.modules as Fm
import torch
from torch import nn

from .flows import rq_spline

__all__ = ["SplineCouplingBlock"]


class SplineCouplingBlock(Fm.InvertibleModule):
    """y₁ = x₁, y₂ = s(x₂; θ(x₁, c)): an elementwise monotone spline of the second half
    of the coordinates, its bins, heights and knot derivatives predicted from the first
    half and the condition. The spline covers [−bound, bound] and is the identity
    outside it. Put a permutation between two blocks so that every coordinate is
    moved (:class:`partonic.models.cinn.ConditionalINN` does).

    Arguments:
        dims_in: [(dim,)]; dims_c: [(condition,)] or [] without a condition.
        subnet_constructor: (n_in, n_out) → module; its last layer should start at
            zero, which makes the block start as the identity.
        bins: spline pieces K (3K − 1 parameters per moved coordinate).
        bound: half-width of the spline interval, in the (standardised) coordinates.
    """

    def __init__(self, dims_in, dims_c=None, subnet_constructor: Callable[[int, int], nn.Module] | None = None, bins: int = 10, bound: float = 5.0):
        dims_c = dims_c or []
        super().__init__(dims_in, dims_c)
        if len(dims_in) != 1 or len(dims_in[0]) != 1:
            raise ValueError(f"SplineCouplingBlock takes one flat input, got {dims_in}")
        if subnet_constructor is None:
            raise ValueError("SplineCouplingBlock needs a subnet_constructor")
        if bins < 2 or not bound > 0:
            raise ValueError(f"SplineCouplingBlock needs bins ≥ 2 and bound > 0, got {bins}, {bound}")
        dim = dims_in[0][0]
        if dim < 2:
            raise ValueError(f"a coupling needs at least 2 coordinates, got {dim}")
        self.split = dim // 2
        self.moved = dim - self.split
        self.bins, self.bound = int(bins), float(bound)
        n_cond = sum(c[0] for c in dims_c)
        self.subnet = subnet_constructor(self.split + n_cond, self.moved * (3 * self.bins - 1))

    def forward(self, x, c=None, rev: bool = False, jac: bool = True):
        x = x[0]
        x1, x2 = x[:, : self.split], x[:, self.split :]
        inp = torch.cat([x1, *c], 1) if c else x1
        params = self.subnet(inp).view(x.shape[0], self.moved, 3 * self.bins - 1)
        y2, log_jac = rq_spline(x2, params, self.bound, inverse=rev)
        return (torch.cat([x1, y2], 1),), log_jac.sum(1)

    def output_dims(self, input_dims):
        return input_dims
