"""Layers: normalization (with explicit BatchNorm statistic groups) and activations."""

from cnnjax.nn.activations import ACTIVATIONS, get_activation
from cnnjax.nn.norm import NORM_KINDS, BatchNorm, GroupNorm, Identity, Norm

__all__ = ["ACTIVATIONS", "NORM_KINDS", "BatchNorm", "GroupNorm", "Identity", "Norm",
           "get_activation"]
