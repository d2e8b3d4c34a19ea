"""Image geometry shared by host preprocessing (NumPy) and the in-model augmentation layer (jax.numpy).

Every function takes the array module `xp` (`numpy` or `jax.numpy`), so that the
augmentation applied in the input pipeline and the one applied inside a model
at train time are the same arithmetic, tested once against each other. Images
are batches (B, H, W, C); masks (B, H, W) follow with `order='nearest'`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ORDERS = ("bilinear", "nearest")


def rotate_batch(images: Any, angles_degrees: Any, *, order: str = "bilinear", fill: float = 0.0,
                 xp: Any = np) -> Any:
  """Rotates each image (B, H, W, ...) about its center by its own angle; `fill` outside.

  `order='bilinear'` interpolates (images); `'nearest'` copies the closest pixel
  (class masks, whose values must not be blended).
  """
  if order not in ORDERS:
    raise ValueError(f"unknown interpolation order {order!r}; choose one of {', '.join(ORDERS)}")
  batch, height, width = images.shape[:3]
  trailing = (None,) * (images.ndim - 3)
  # Coordinates in float32 on both sides: the host pipeline and the in-model layer agree, and
  # the host moves half the bytes it would in float64.
  theta = xp.deg2rad(xp.asarray(angles_degrees, xp.float32))[:, None, None]
  cos, sin = xp.cos(theta), xp.sin(theta)
  center_y, center_x = (height - 1) / 2.0, (width - 1) / 2.0
  yy, xx = xp.meshgrid(xp.arange(height, dtype=xp.float32) - center_y, xp.arange(width, dtype=xp.float32) - center_x,
                       indexing="ij")
  # Inverse map: the output pixel (y, x) reads the input at the point rotated back.
  src_y = cos * yy - sin * xx + center_y
  src_x = sin * yy + cos * xx + center_x
  batch_index = xp.arange(batch)[:, None, None]

  if order == "nearest":
    # One flat gather: on NumPy several times faster than indexing three axes at once.
    flat = images.reshape((batch * height * width,) + images.shape[3:])
    y, x = xp.round(src_y).astype(xp.int32), xp.round(src_x).astype(xp.int32)
    inside = ((y >= 0) & (y < height) & (x >= 0) & (x < width))[(Ellipsis,) + trailing]
    index = (batch_index * height + xp.clip(y, 0, height - 1)) * width + xp.clip(x, 0, width - 1)
    return xp.where(inside, flat[index], fill).astype(images.dtype)
  # Bilinear: a border of `fill` (one pixel before, two after) and source points clamped to
  # [-1, size] make every corner a valid index, so the four gathers need no masks; a point
  # clamped to the border gets weight 0 on its inner neighbour, as if it read `fill` there.
  padded = xp.pad(images, ((0, 0), (1, 2), (1, 2)) + ((0, 0),) * (images.ndim - 3), constant_values=fill)
  padded_height, padded_width = height + 3, width + 3
  flat = padded.reshape((batch * padded_height * padded_width,) + images.shape[3:])
  src_y, src_x = xp.clip(src_y, -1.0, float(height)), xp.clip(src_x, -1.0, float(width))
  y0, x0 = xp.floor(src_y).astype(xp.int32), xp.floor(src_x).astype(xp.int32)
  wy, wx = (src_y - y0)[(Ellipsis,) + trailing], (src_x - x0)[(Ellipsis,) + trailing]
  corner = (batch_index * padded_height + y0 + 1) * padded_width + x0 + 1
  out = (flat[corner] * ((1 - wy) * (1 - wx)) + flat[corner + 1] * ((1 - wy) * wx)
         + flat[corner + padded_width] * (wy * (1 - wx)) + flat[corner + padded_width + 1] * (wy * wx))
  return out.astype(images.dtype)


def crop_batch(images: Any, padding: int, offsets: Any, *, fill: float = 0.0, xp: Any = np) -> Any:
  """Pads images (B, H, W, ...) by `padding` with `fill`; crops the original size at offsets (B, 2) in [0, 2p]."""
  batch, height, width = images.shape[:3]
  pad = ((0, 0), (padding, padding), (padding, padding)) + ((0, 0),) * (images.ndim - 3)
  padded = xp.pad(images, pad, constant_values=fill)
  rows = offsets[:, 0:1] + xp.arange(height)[None, :]
  cols = offsets[:, 1:2] + xp.arange(width)[None, :]
  return padded[xp.arange(batch)[:, None, None], rows[:, :, None], cols[:, None, :]]


def flip_batch(images: Any, flipped: Any, *, xp: Any = np) -> Any:
  """Mirrors left-right the images (B, H, W, ...) whose entry of the boolean `flipped` (B,) is set."""
  where = flipped.reshape((-1,) + (1,) * (images.ndim - 1))
  return xp.where(where, images[:, :, ::-1], images)
