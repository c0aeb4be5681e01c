"""partonic: generative networks for collider physics.

Unfolding with conditional invertible networks, unweighting of weighted Monte
Carlo samples with weighted GANs and flows, and resonance-aware event
generation with MMD-regularised GANs, each driven by a YAML process card.
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("partonic")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
