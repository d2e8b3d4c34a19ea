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

`Conv` is `flax.linen.Conv` (same parameters) computing through the lowering
that its `lowering` argument chooses for the backend (`cnnjax.nn.lowering`:
plain `lax` convolutions on GPU and TPU, matrix-product rewrites of small-map
and unpadded 1x1 convolutions on XLA CPU); every model builds its convolutions
with it. (`cnnjax.analysis` reports the receptive field of a small-map
convolution rewritten for CPU as global: its window covers the whole map.)
"""

from __future__ import annotations

from typing import Any, Sequence, Union

from flax import linen as nn

from cnnjax.nn import lowering as lowering_lib

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


def Conv(*args: Any, lowering: str = lowering_lib.AUTO, **kwargs: Any) -> nn.Conv:  # pylint: disable=invalid-name
  """What every cnnjax model builds its convolutions with: `flax.linen.Conv` in the chosen lowering.

  Arguments other than `lowering` ('auto', 'plain' or 'cpu_tuned', see
  `cnnjax.nn.lowering`) are flax's; parameters and their names are flax's.
  """
  return nn.Conv(*args, conv_general_dilated=lowering_lib.conv_function(lowering), **kwargs)


def conv(features: int, kernel_size: int | Sequence[int], *, strides: int | Sequence[int] = 1,
         padding: Padding = "valid", dilation: int | Sequence[int] = 1, groups: int = 1, ndim: int = 2,
         **kwargs: Any) -> nn.Conv:
  """A `flax.linen.Conv` with the notes' options; `kernel_size` as an int means `ndim` spatial axes.

  `groups` splits input and output channels into that many independent groups
  (`groups` = input channels with features = k x channels is a depthwise conv);
  `lowering` is `Conv`'s; other keyword arguments (name, use_bias, dtype,
  kernel_init) go to flax.
  """
  kernel = per_axis(kernel_size, ndim if isinstance(kernel_size, int) else len(kernel_size), "kernel_size")
  if features % groups:
    raise ValueError(f"{features} output channels do not split into {groups} groups; use a multiple of {groups}")
  return Conv(features, kernel, strides=per_axis(strides, len(kernel), "strides"),
              padding=conv_padding(padding, kernel, dilation),
              kernel_dilation=per_axis(dilation, len(kernel), "dilation"), feature_group_count=groups, **kwargs)


def depthwise_conv(channels: int, kernel_size: int | Sequence[int], *, multiplier: int = 1,
                   **kwargs: Any) -> nn.Conv:
  """One (or `multiplier`) filter per input channel, each seeing only its own channel: groups = channels."""
  return conv(channels * multiplier, kernel_size, groups=channels, **kwargs)
