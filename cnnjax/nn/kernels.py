"""The notes' classic fixed kernels as a non-trainable filter bank.

Identity, the two ridge/edge-detection kernels, sharpen, box blur and the 3x3
and 5x5 Gaussian-blur approximations, exactly as tabulated in the notes. The
kernels are constants, not parameters: a `FilterBank` adds nothing to the
trainable count and no gradient ever changes it. Every kernel is applied to
every input channel separately (a depthwise convolution), so an RGB image
filtered by the whole bank gives 3 x 7 maps.

The convolution is a cross-correlation, as in every deep-learning library;
all these kernels are symmetric, so it equals the true convolution here.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

BINOMIAL_5 = np.array([1.0, 4.0, 6.0, 4.0, 1.0])  # row 4 of Pascal's triangle: the 5x5 Gaussian's profile

CLASSIC_KERNELS: dict[str, np.ndarray] = {
    "identity": np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]], np.float32),
    "edge_4": np.array([[0, -1, 0], [-1, 4, -1], [0, -1, 0]], np.float32),
    "edge_8": np.array([[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]], np.float32),
    "sharpen": np.array([[0, -1, 0], [-1, 5, -1], [0, -1, 0]], np.float32),
    "box_blur": np.ones((3, 3), np.float32) / 9.0,
    "gaussian_blur_3x3": np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 16.0,
    "gaussian_blur_5x5": (np.outer(BINOMIAL_5, BINOMIAL_5) / 256.0).astype(np.float32),
}
BOUNDARIES = ("zeros", "reflect", "edge")
_NUMPY_PAD_MODE = {"zeros": "constant", "reflect": "symmetric", "edge": "edge"}


def stacked_kernels(names: Sequence[str]) -> np.ndarray:
  """The named kernels centred in one (S, S, K) array, S the largest size (smaller ones zero-padded)."""
  unknown = [name for name in names if name not in CLASSIC_KERNELS]
  if unknown:
    raise ValueError(f"unknown kernel(s) {unknown}; choose from {', '.join(CLASSIC_KERNELS)}")
  size = max(CLASSIC_KERNELS[name].shape[0] for name in names)
  stacked = np.zeros((size, size, len(names)), np.float32)
  for index, name in enumerate(names):
    kernel = CLASSIC_KERNELS[name]
    offset = (size - kernel.shape[0]) // 2
    stacked[offset:offset + kernel.shape[0], offset:offset + kernel.shape[1], index] = kernel
  return stacked


class FilterBank(nn.Module):
  """Applies fixed kernels to each channel: (B, H, W, C) -> (B, H, W, C x K), channel c's maps first.

  `boundary` says what lies outside the image for the 'same'-size output:
  'zeros' (a CNN's zero padding), 'reflect' (mirrored, no dark frame on photos)
  or 'edge' (the border pixel repeated).
  """

  names: Sequence[str] = tuple(CLASSIC_KERNELS)
  boundary: str = "zeros"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.boundary not in BOUNDARIES:
      raise ValueError(f"unknown boundary {self.boundary!r}; choose one of {', '.join(BOUNDARIES)}")
    kernels = stacked_kernels(tuple(self.names))
    size, channels = kernels.shape[0], x.shape[-1]
    half = size // 2
    x = jnp.pad(x, ((0, 0), (half, half), (half, half), (0, 0)), mode=_NUMPY_PAD_MODE[self.boundary])
    # Depthwise: group c holds the K kernels for channel c (HWIO with I = 1).
    weights = jnp.tile(jnp.asarray(kernels, x.dtype)[:, :, None, :], (1, 1, 1, channels))
    return jax.lax.conv_general_dilated(x, jax.lax.stop_gradient(weights), (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=channels)
