"""Convolution with the notes' options: padding valid / same / full, stride, dilation, groups; 1D, 2D, 3D.

Layers stay `flax.linen.Conv` (parameters `kernel` and `bias`, so counts and
checkpoints are the standard ones); this module turns the notes' vocabulary into
flax arguments:

* padding `'valid'`: none, output floor((W - F_eff) / S) + 1;
* `'same'`: flax/TensorFlow SAME, output ceil(W / S) (= W at stride 1, where the
  notes' P = (F - 1) / 2);
* `'full'`: F_eff - 1 zeros on each side, so that every input pixel meets every
  kernel tap (output W + F_eff - 1 at stride 1);
* `'circular'`: wrap-around padding of SAME's amount (exact translation
  equivariance on a torus);
* an int P (P on every side) or explicit (low, high) pairs per spatial axis.

F_eff = D (F - 1) + 1 is the extent of a kernel of size F with dilation D.
The number of spatial axes is the length of `kernel_size` (an int means
`ndim` axes): a 1D conv reads (B, L, C), a 3D conv (B, D, H, W, C).

`Conv` is `flax.linen.Conv` computing through `conv_general_dilated` below,
which every model uses: when a feature map has fewer pixels than the kernel
has taps (a 3x3 convolution on the 2x2 maps at the end of ResNet-18 at 64x64,
or U-Net's bottleneck on 32x32 inputs), XLA's algebraic simplifier swaps the
convolution's operands (the kernel becomes the image), and XLA CPU runs the
swapped form through a slow generic loop: 197 ms for one 3x3, 512-channel
convolution on 32 maps of 2x2 that costs 1.9 ms as a matrix product. Those
convolutions are written here as the matrix product of the kernel with the
input's patches, which computes the same sums. (`cnnjax.analysis` reports the
receptive field of such a layer as global: its window covers the whole map.)
Unpadded 1x1 convolutions (ResNet-50's bottlenecks, projection shortcuts) are a
plain matrix product over channels: XLA CPU computes their weight gradient as a
convolution about twice as slowly (7.9 s against 3.8 s for all of ResNet-50's
1x1 layers, forward and backward, on 32 images of 224x224).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Sequence, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

PADDING_MODES = ("valid", "same", "full", "circular")
Padding = Union[str, int, Sequence[Union[int, tuple[int, int]]]]
FlaxPadding = Union[str, tuple[tuple[int, int], ...]]


def per_axis(value: int | Sequence[int], ndim: int, what: str) -> tuple[int, ...]:
  values = (value,) * ndim if isinstance(value, int) else tuple(value)
  if len(values) != ndim:
    raise ValueError(f"{what}={value} has {len(values)} entries for {ndim} spatial axes; give one per axis")
  return values


def effective_kernel_size(kernel: int, dilation: int = 1) -> int:
  """The input extent of a kernel of size F with dilation D: D (F - 1) + 1."""
  return dilation * (kernel - 1) + 1


def conv_padding(padding: Padding, kernel_size: Sequence[int], dilation: int | Sequence[int] = 1) -> FlaxPadding:
  """Turns a padding of the notes (a mode, an int, or pairs) into what `flax.linen.Conv` takes."""
  ndim = len(kernel_size)
  dilations = per_axis(dilation, ndim, "dilation")
  if isinstance(padding, str):
    mode = padding.lower()
    if mode not in PADDING_MODES:
      raise ValueError(f"unknown padding {padding!r}; choose one of {', '.join(PADDING_MODES)}, an int or pairs")
    if mode == "full":
      return tuple((effective_kernel_size(k, d) - 1,) * 2 for k, d in zip(kernel_size, dilations))
    return mode.upper()
  if isinstance(padding, int):
    return ((padding, padding),) * ndim
  pairs = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  if len(pairs) != ndim:
    raise ValueError(f"padding {padding} has {len(pairs)} entries for {ndim} spatial axes; give one per axis")
  return pairs


def _is_channels_last(dimension_numbers: Any, ndim: int) -> bool:
  """Whether the convolution reads (B, spatial..., C) with (spatial..., C_in, C_out) kernels, as flax does."""
  spatial = tuple(range(1, ndim - 1))
  wanted = jax.lax.ConvDimensionNumbers((0, ndim - 1) + spatial, (ndim - 1, ndim - 2) + tuple(range(ndim - 2)),
                                        (0, ndim - 1) + spatial)
  return jax.lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dimension_numbers) == wanted


def _patch_conv(lhs: jax.Array, rhs: jax.Array, strides: Sequence[int], pads: Sequence[tuple[int, int]],
                dilations: Sequence[int], precision: Any) -> jax.Array:
  """A channels-last convolution as one matrix product of the input's patches with the kernel."""
  kernel_shape = rhs.shape[:-2]
  padded = jax.lax.pad(lhs, jnp.zeros((), lhs.dtype),
                       [(0, 0, 0)] + [(low, high, 0) for low, high in pads] + [(0, 0, 0)])
  out_shape = [(size - effective_kernel_size(k, d)) // s + 1
               for size, k, d, s in zip(padded.shape[1:-1], kernel_shape, dilations, strides)]
  if min(out_shape) <= 0:  # the kernel does not fit: an empty output, as XLA gives
    return jnp.zeros((lhs.shape[0], *(max(o, 0) for o in out_shape), rhs.shape[-1]), lhs.dtype)
  taps = []
  for tap in itertools.product(*(range(k) for k in kernel_shape)):
    start = [0] + [t * d for t, d in zip(tap, dilations)] + [0]
    limit = ([lhs.shape[0]] + [t * d + (o - 1) * s + 1 for t, d, o, s in zip(tap, dilations, out_shape, strides)]
             + [lhs.shape[-1]])
    taps.append(jax.lax.slice(padded, start, limit, [1] + list(strides) + [1]))
  # (B, out..., taps, C_in) against (taps, C_in, C_out): the order of the kernel's own reshape.
  patches = jnp.stack(taps, axis=-2).reshape(*taps[0].shape[:-1], -1)
  return jnp.dot(patches, rhs.reshape(-1, rhs.shape[-1]), precision=precision)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1, precision: Any = None,
                         **kwargs: Any) -> jax.Array:
  """`jax.lax.conv_general_dilated`, as a matrix product where XLA CPU's convolution is slow.

  Unpadded 1x1 convolutions are a matrix product over channels; where XLA would
  swap the operands (the kernel has more taps than the unpadded input has
  pixels) the kernel multiplies the input's patches. Grouped, input-dilated or
  non-channels-last convolutions, and any other keyword, go to
  `jax.lax.conv_general_dilated` unchanged.
  """
  ndim = lhs.ndim
  kernel_taps = math.prod(rhs.shape[:-2])
  plain = (feature_group_count == 1 and not kwargs and all(d == 1 for d in (lhs_dilation or ()))
           and _is_channels_last(dimension_numbers, ndim))
  dilations = tuple(rhs_dilation or (1,) * (ndim - 2))
  if plain and isinstance(padding, str):
    extents = [effective_kernel_size(k, d) for k, d in zip(rhs.shape[:-2], dilations)]
    padding = jax.lax.padtype_to_pads(lhs.shape[1:-1], extents, window_strides, padding)
  if plain and kernel_taps == 1 and all(low == 0 and high == 0 for low, high in padding):
    # A 1x1 convolution is a matrix product over channels of the (strided) input.
    sampled = jax.lax.slice(lhs, (0,) * ndim, lhs.shape, (1, *window_strides, 1))
    return jnp.dot(sampled, rhs.reshape(rhs.shape[-2:]), precision=precision)
  if not plain or math.prod(lhs.shape[1:-1]) >= kernel_taps:
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                        feature_group_count=feature_group_count, precision=precision, **kwargs)
  return _patch_conv(lhs, rhs, window_strides, padding, dilations, precision)


# What every cnnjax model builds its convolutions with (flax.linen.Conv, same parameters).
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


def conv(features: int, kernel_size: int | Sequence[int], *, strides: int | Sequence[int] = 1,
         padding: Padding = "valid", dilation: int | Sequence[int] = 1, groups: int = 1, ndim: int = 2,
         **kwargs: Any) -> nn.Conv:
  """A `flax.linen.Conv` with the notes' options; `kernel_size` as an int means `ndim` spatial axes.

  `groups` splits input and output channels into that many independent groups
  (`groups` = input channels with features = k x channels is a depthwise conv);
  other keyword arguments (name, use_bias, dtype, kernel_init) go to flax.
  """
  kernel = per_axis(kernel_size, ndim if isinstance(kernel_size, int) else len(kernel_size), "kernel_size")
  if features % groups:
    raise ValueError(f"{features} output channels do not split into {groups} groups; use a multiple of {groups}")
  return Conv(features, kernel, strides=per_axis(strides, len(kernel), "strides"),
                 padding=conv_padding(padding, kernel, dilation),
                 kernel_dilation=per_axis(dilation, len(kernel), "dilation"), feature_group_count=groups,
                 **kwargs)


def depthwise_conv(channels: int, kernel_size: int | Sequence[int], *, multiplier: int = 1,
                   **kwargs: Any) -> nn.Conv:
  """One (or `multiplier`) filter per input channel, each seeing only its own channel: groups = channels."""
  return conv(channels * multiplier, kernel_size, groups=channels, **kwargs)
