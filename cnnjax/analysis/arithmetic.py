"""CNN arithmetic of the notes: output sizes, parameter counts and multiply-accumulates, as formulas.

These are the closed forms the notes teach; `cnnjax.analysis.profile` measures
the same quantities on real models, and the tests check one against the other.

* Convolution output: floor((W - F_eff + P_low + P_high) / S) + 1, with
  F_eff = D (F - 1) + 1 for dilation D (the notes' (W - F + 2P) / S + 1 for
  symmetric padding P and D = 1). Padding 'valid' is P = 0, 'full' is
  P = F_eff - 1, and 'same' (and 'circular') gives ceil(W / S).
* Pooling output: floor((W - F) / S) + 1 (ceil with `ceil_mode`).
* Convolution parameters: K (F^2 C + 1), in general K (prod(F) C / groups + 1).
* Multiply-accumulates of a convolution: (output positions x K) x (prod(F) C / groups),
  the notes' (2x2) x (3x3) = 36 for a 3x3 filter over a 4x4 input.
* Dense parameters: (inputs + 1) x outputs.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

from cnnjax.nn.conv import effective_kernel_size

Padding = Union[str, int, tuple[int, int]]


def _prod(values: Sequence[int]) -> int:
  return math.prod(int(v) for v in values)


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: Padding = 0, dilation: int = 1) -> int:
  """Output length along one axis of a convolution (padding: 'valid', 'same', 'full', 'circular', P or (lo, hi))."""
  extent = effective_kernel_size(kernel, dilation)
  if isinstance(padding, str):
    mode = padding.lower()
    if mode in ("same", "circular"):
      return math.ceil(size / stride)
    if mode == "valid":
      low = high = 0
    elif mode == "full":
      low = high = extent - 1
    else:
      raise ValueError(f"unknown padding {padding!r}; choose 'valid', 'same', 'full', 'circular', an int or a pair")
  elif isinstance(padding, int):
    low = high = padding
  else:
    low, high = padding
  span = size + low + high - extent
  if span < 0:
    raise ValueError(f"a kernel of extent {extent} does not fit an input of {size} padded by ({low}, {high})")
  return span // stride + 1


def pool_output_size(size: int, window: int, stride: int | None = None, padding: int = 0,
                     ceil_mode: bool = False) -> int:
  """Output length of pooling along one axis: (W + 2P - F) / S + 1, rounded down (up with `ceil_mode`)."""
  stride = window if stride is None else stride
  span = size + 2 * padding - window
  if span < 0:
    raise ValueError(f"a pooling window of {window} does not fit an input of {size} padded by {padding}")
  if not ceil_mode:
    return span // stride + 1
  out = math.ceil(span / stride) + 1
  return out - 1 if (out - 1) * stride >= size + padding else out


def conv_params(in_channels: int, out_channels: int, kernel: int | Sequence[int], *, groups: int = 1,
                bias: bool = True, ndim: int = 2) -> int:
  """Trainable parameters of a convolution: K (prod(F) C / groups + 1); the notes' K(F^2 C + 1)."""
  kernel = (kernel,) * ndim if isinstance(kernel, int) else tuple(kernel)
  return out_channels * (_prod(kernel) * in_channels // groups + int(bias))


def conv_macs(output_spatial: Sequence[int], out_channels: int, kernel: int | Sequence[int], in_channels: int,
              *, groups: int = 1) -> int:
  """Multiply-accumulates of a convolution: (output positions x K) x (prod(F) C / groups), bias excluded."""
  kernel = (kernel,) * len(output_spatial) if isinstance(kernel, int) else tuple(kernel)
  return _prod(output_spatial) * out_channels * _prod(kernel) * in_channels // groups


def dense_params(inputs: int, outputs: int, bias: bool = True) -> int:
  """Trainable parameters of a fully connected layer: (inputs + 1) x outputs."""
  return (inputs + int(bias)) * outputs


def same_padding(kernel: int, dilation: int = 1) -> int:
  """The notes' P = (F - 1) / 2 that keeps W' = W at stride 1 (odd effective kernels)."""
  extent = effective_kernel_size(kernel, dilation)
  if extent % 2 == 0:
    raise ValueError(f"an even kernel extent {extent} has no symmetric 'same' padding; use an odd kernel")
  return (extent - 1) // 2
