"""Maxout (Goodfellow et al. 2013): the notes' max(w1^T x + b1, w2^T x + b2), a learned piecewise-linear activation.

Unlike the activations in `cnnjax.nn.activations` it has parameters, so it is a
layer: `num_pieces` affine maps of the last axis computed as one Dense layer, then
the maximum over the pieces. On a feature map (B, H, W, C) it acts per pixel, a
1x1 convolution followed by a max over channel groups.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

NOTES_PIECES = 2  # the notes' maxout takes the larger of two affine maps


class Maxout(nn.Module):
  """`features` outputs, each the maximum of `num_pieces` affine maps of the input's last axis."""

  features: int
  num_pieces: int = NOTES_PIECES
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # One Dense layer holds every piece; output unit j, piece k is column j * num_pieces + k.
    y = nn.Dense(self.features * self.num_pieces, dtype=self.dtype, name="affine")(x)
    return jnp.max(y.reshape(y.shape[:-1] + (self.features, self.num_pieces)), axis=-1)
