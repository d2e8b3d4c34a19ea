"""U-Net (Ronneberger, Fischer and Brox 2015) and its 3D extension (Cicek et al. 2016) for segmentation.

A contracting path of double 3x3 convolutions and 2x2 max pools, a bottleneck,
and an expanding path of 2x2 up-convolutions (transposed, stride 2), each
concatenated with the contracting path's map of the same size (the skip
connection) and followed by a double convolution; a 1x1 convolution gives
per-pixel class logits (B, *spatial, K). The same module is 2D (`ndim=2`,
inputs (B, H, W, C)) or 3D (`ndim=3`, inputs (B, D, H, W, C)).

Convolutions use 'same' padding, so the output has the input's size (the
paper used 'valid' convolutions and cropped the skips; 'same' is the common
practice and keeps labels aligned with pixels). Each spatial size must divide
by 2^(levels - 1).

`unet`: the paper's widths 64-128-256-512-1024 with no normalization (as in
2015); `unet3d`: widths 32-64-128-256 with BatchNorm, as the 3D paper used.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cnnjax.nn import MaxPool, Norm, conv

ModuleDef = Callable[..., nn.Module]
DOWNSAMPLE = 2  # each level halves every spatial axis


class DoubleConv(nn.Module):
  """(3x3 conv -> norm -> act) twice, 'same' padding."""

  features: int
  ndim: int
  norm: ModuleDef
  act: Callable[[jax.Array], jax.Array]
  dtype: Any = jnp.float32
  lowering: str = "auto"  # how convolutions and max pooling are computed: cnnjax.nn.lowering

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for index in (1, 2):
      x = conv(self.features, 3, padding="same", ndim=self.ndim, dtype=self.dtype, lowering=self.lowering,
               name=f"conv{index}")(x)
      x = self.act(self.norm(name=f"norm{index}")(x))
    return x


class UNet(nn.Module):
  """Encoder-decoder with skip connections; per-pixel (per-voxel) logits of `num_classes`."""

  num_classes: int
  features: Sequence[int] = (64, 128, 256, 512, 1024)
  ndim: int = 2
  norm: Norm = Norm(kind="none")
  act: Callable[[jax.Array], jax.Array] = nn.relu
  dtype: Any = jnp.float32
  lowering: str = "auto"  # how convolutions and max pooling are computed: cnnjax.nn.lowering

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if x.ndim != self.ndim + 2:
      raise ValueError(f"a {self.ndim}D U-Net takes inputs (batch, {self.ndim} spatial axes, channels), "
                       f"got shape {x.shape}; use unet3d for volumes or unet for images")
    factor = DOWNSAMPLE ** (len(self.features) - 1)
    if any(size % factor for size in x.shape[1:-1]):
      raise ValueError(f"input size {x.shape[1:-1]} must divide by {factor} ({len(self.features)} levels); "
                       f"resize (data.image_size) to a multiple of {factor}")
    norm = self.norm(train)
    x = x.astype(self.dtype)
    skips = []
    for level, width in enumerate(self.features[:-1]):
      x = DoubleConv(width, self.ndim, norm, self.act, self.dtype, self.lowering, name=f"down{level}")(x)
      skips.append(x)
      x = MaxPool(DOWNSAMPLE, lowering=self.lowering, name=f"pool{level}")(x)
    x = DoubleConv(self.features[-1], self.ndim, norm, self.act, self.dtype, self.lowering, name="bottleneck")(x)
    for level in reversed(range(len(self.features) - 1)):
      window = (DOWNSAMPLE,) * self.ndim
      x = nn.ConvTranspose(self.features[level], window, strides=window, dtype=self.dtype, name=f"upconv{level}")(x)
      x = jnp.concatenate([skips[level], x], axis=-1)
      x = DoubleConv(self.features[level], self.ndim, norm, self.act, self.dtype, self.lowering,
                     name=f"up{level}")(x)
    x = conv(self.num_classes, 1, ndim=self.ndim, dtype=self.dtype, lowering=self.lowering, name="classifier")(x)
    return x.astype(jnp.float32)
