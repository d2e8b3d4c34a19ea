"""Pooling: max, average and min over windows with a stride; global and adaptive pooling.

Pooling layers have no parameters. They are flax modules (not bare functions)
so that `cnnjax.analysis` lists them as layers with their window and stride.
Inputs are (B, *spatial, C) with any number of spatial axes.

Output size per axis: floor((W + P_low + P_high - F) / S) + 1, the notes'
(W - F) / S + 1 without padding; `ceil_mode` rounds up instead (PyTorch's
option, which GoogLeNet's torchvision layout uses), never starting a window in
the padding.

Max and min pooling compute through the lowering that `lowering` chooses for
the backend (`cnnjax.nn.lowering`): plain `reduce_window` with JAX's gradient
on GPU and TPU, and on XLA CPU a custom derivative that avoids its slow
select-and-scatter. Average pooling has one lowering.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cnnjax.nn import lowering as lowering_lib
from cnnjax.nn.conv import Padding, per_axis

POOL_KINDS = ("max", "avg", "min")


def pool_pads(sizes: Sequence[int], window: Sequence[int], strides: Sequence[int], padding: Padding,
              ceil_mode: bool) -> tuple[tuple[int, int], ...]:
  """Explicit (low, high) padding per spatial axis; `ceil_mode` adds what the last partial window needs."""
  ndim = len(sizes)
  if isinstance(padding, str):
    mode = padding.lower()
    if mode == "valid":
      pairs = ((0, 0),) * ndim
    elif mode == "same":  # output ceil(W / S), as TensorFlow's SAME
      pairs = []
      for size, f, s in zip(sizes, window, strides):
        total = max((math.ceil(size / s) - 1) * s + f - size, 0)
        pairs.append((total // 2, total - total // 2))
      pairs = tuple(pairs)
    else:
      raise ValueError(f"unknown pooling padding {padding!r}; choose 'valid', 'same', an int or pairs")
  elif isinstance(padding, int):
    pairs = ((padding, padding),) * ndim
  else:
    pairs = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  if not ceil_mode:
    return pairs
  extended = []
  for size, f, s, (low, high) in zip(sizes, window, strides, pairs):
    span = size + low + high - f
    out = math.ceil(span / s) + 1
    if (out - 1) * s >= size + low:  # the last window would start in the padding: drop it (PyTorch's rule)
      out -= 1
    extended.append((low, max(high, (out - 1) * s + f - size - low)))
  return tuple(extended)


def pool(x: jax.Array, kind: str, window: int | Sequence[int], strides: int | Sequence[int] | None = None, *,
         padding: Padding = "valid", ceil_mode: bool = False, count_include_pad: bool = True,
         lowering: str = lowering_lib.AUTO) -> jax.Array:
  """Max, average or min pooling over the spatial axes of x (B, *spatial, C).

  `strides` defaults to the window (non-overlapping, the notes' F = S). Average
  pooling divides by the window size when `count_include_pad` (explicit zero
  padding counts, as in PyTorch), else by the number of input pixels it covers;
  windows that only `ceil_mode` extends never count the extension. `lowering`
  ('auto', 'plain', 'cpu_tuned') chooses how max and min pooling are computed.
  """
  if kind not in POOL_KINDS:
    raise ValueError(f"unknown pooling {kind!r}; choose one of {', '.join(POOL_KINDS)}")
  lowering_lib.check(lowering)
  ndim = x.ndim - 2
  window = per_axis(window, ndim, "window")
  strides = window if strides is None else per_axis(strides, ndim, "strides")
  explicit = pool_pads(x.shape[1:-1], window, strides, padding, False)
  pads = pool_pads(x.shape[1:-1], window, strides, padding, ceil_mode)
  for size, f, (low, high) in zip(x.shape[1:-1], window, pads):
    if size + low + high < f:
      raise ValueError(f"a pooling window of {f} does not fit an input of {size} padded by ({low}, {high}); "
                       "use a larger input or a smaller window")
  if kind in ("max", "min"):
    return lowering_lib.window_extremum(x, kind, window, strides, pads, lowering)
  dims, steps = (1,) + window + (1,), (1,) + strides + (1,)
  full_pads = ((0, 0),) + pads + ((0, 0),)
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, steps, full_pads)
  # Count what each window covers: input pixels, plus explicit padding when it is included.
  ones = jnp.ones((1,) + x.shape[1:-1] + (1,), x.dtype)
  if count_include_pad:
    ones = jnp.pad(ones, ((0, 0),) + explicit + ((0, 0),), constant_values=1)
    extra = tuple((low - e_low, high - e_high) for (low, high), (e_low, e_high) in zip(pads, explicit))
    count_pads = ((0, 0),) + extra + ((0, 0),)
  else:
    count_pads = full_pads
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, dims, steps, count_pads)
  return total / count


class Pool(nn.Module):
  """Pooling of `kind` ('max', 'avg', 'min') with a window and stride (default: the window)."""

  window: int | Sequence[int] = 2
  strides: int | Sequence[int] | None = None
  padding: Padding = "valid"
  ceil_mode: bool = False
  kind: str = "max"
  lowering: str = lowering_lib.AUTO  # see cnnjax.nn.lowering

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return pool(x, self.kind, self.window, self.strides, padding=self.padding, ceil_mode=self.ceil_mode,
                lowering=self.lowering)


class MaxPool(Pool):
  """Max pooling: the largest value in each window."""

  kind: str = "max"


class AvgPool(Pool):
  """Average pooling: the mean of each window."""

  kind: str = "avg"


class MinPool(Pool):
  """Min pooling: the smallest value in each window."""

  kind: str = "min"


class GlobalPool(nn.Module):
  """Pools every spatial axis away: (B, *spatial, C) -> (B, C); 'avg' is global average pooling."""

  kind: str = "avg"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    axes = tuple(range(1, x.ndim - 1))
    if self.kind == "avg":
      return jnp.mean(x, axis=axes)
    if self.kind == "max":
      return jnp.max(x, axis=axes)
    if self.kind == "min":
      return jnp.min(x, axis=axes)
    raise ValueError(f"unknown pooling {self.kind!r}; choose one of {', '.join(POOL_KINDS)}")


def adaptive_bins(size: int, output_size: int) -> list[tuple[int, int]]:
  """PyTorch's adaptive pooling bins: bin i covers [floor(i W / n), ceil((i + 1) W / n))."""
  return [(math.floor(i * size / output_size), math.ceil((i + 1) * size / output_size))
          for i in range(output_size)]


class AdaptiveAvgPool(nn.Module):
  """Averages into a fixed spatial grid whatever the input size (AlexNet's 6x6, VGG's 7x7).

  When the input already has that size (224x224 inputs for AlexNet and VGG) it is
  the identity; smaller inputs are spread over the grid by repeating bins.
  """

  output_size: int | Sequence[int]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ndim = x.ndim - 2
    targets = per_axis(self.output_size, ndim, "output_size")
    for axis, (size, target) in enumerate(zip(x.shape[1:-1], targets), start=1):
      if size == target:
        continue
      if size % target == 0:  # equal bins: a plain average pool (and a local receptive field)
        window = (1,) * (axis - 1) + (size // target,) + (1,) * (ndim - axis)
        x = pool(x, "avg", window)
        continue
      x = jnp.stack([jnp.mean(jax.lax.slice_in_dim(x, start, stop, axis=axis), axis=axis)
                     for start, stop in adaptive_bins(size, target)], axis=axis)
    return x
