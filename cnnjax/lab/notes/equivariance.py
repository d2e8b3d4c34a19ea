"""Translation equivariance of convolution layers, measured: f(shift(x)) against shift(f(x)).

A stack of convolutions (random weights, ReLU between them) is applied to a
random image and to the same image shifted by k pixels; the relative error
||f(shift_k x) - shift_{k/S} f(x)|| / ||f(x)|| says how far the stack is from
equivariant. The shift is circular (`jnp.roll`), so that only the network can
break the symmetry:

* circular padding, stride 1: exact (float round-off);
* zero padding ('same'), stride 1: wrong only near the border, where zeros
  enter instead of the wrapped-around pixels (the interior error is round-off);
* stride S: a shift by a multiple of S is an output shift by k / S (exact with
  circular padding); any other shift has no output shift to match, the error
  is large everywhere (the subsampling aliases).

The classifier-level counterpart (does the predicted class survive a shift,
with and without pooling) is `cnnjax.lab.notes.shift_study`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cnnjax.nn import conv

KERNEL = 3
DEFAULT_CASES = (("circular", 1), ("same", 1), ("circular", 2), ("same", 2))
EXACT_FLOOR = 1e-9  # where a log-scale plot draws an error of exactly 0


class ConvStack(nn.Module):
  """`depth` 3x3 convolutions with ReLU between them; the first has the stride."""

  features: int
  depth: int
  padding: str
  stride: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for index in range(self.depth):
      x = conv(self.features, KERNEL, strides=self.stride if index == 0 else 1, padding=self.padding,
               name=f"conv{index}")(x)
      if index < self.depth - 1:
        x = nn.relu(x)
    return x


@dataclasses.dataclass(frozen=True)
class EquivarianceRow:
  padding: str
  stride: int
  shift: int
  error: float  # relative error over the whole output
  interior_error: float  # the same, away from the border that padding reaches


def _relative(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def measure(cases: Sequence[tuple[str, int]] = DEFAULT_CASES, shifts: Sequence[int] = (1, 2, 3, 4), *,
            size: int = 32, channels: int = 3, features: int = 8, depth: int = 3, seed: int = 0
            ) -> list[EquivarianceRow]:
  """Equivariance errors of conv stacks with each (padding, stride) for each horizontal shift."""
  key_x, key_w = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(key_x, (1, size, size, channels))
  rows = []
  for padding, stride in cases:
    stack = ConvStack(features, depth, padding, stride)
    variables = stack.init(key_w, x)
    apply = jax.jit(stack.apply)
    base = np.asarray(apply(variables, x))
    # Output pixels within this many of the border can see padding (the stack's receptive-field radius).
    border = math.ceil(depth * (KERNEL // 2) / stride) + max(shifts)
    for shift in shifts:
      moved = np.asarray(apply(variables, jnp.roll(x, shift, axis=2)))
      candidates = sorted({math.floor(shift / stride), math.ceil(shift / stride)})
      errors = []
      for out_shift in candidates:
        expected = np.roll(base, out_shift, axis=2)
        interior = (slice(None), slice(border, -border), slice(border, -border))
        errors.append((_relative(moved, expected), _relative(moved[interior], expected[interior])))
      error, interior_error = min(errors)
      rows.append(EquivarianceRow(padding, stride, shift, error, interior_error))
  return rows


def format_rows(rows: Sequence[EquivarianceRow]) -> str:
  lines = ["padding   stride  shift  relative error  interior error"]
  for row in rows:
    lines.append(f"{row.padding:9s} {row.stride:6d} {row.shift:6d}  {row.error:14.2e}  {row.interior_error:14.2e}")
  return "\n".join(lines)


def plot_rows(rows: Sequence[EquivarianceRow], axis) -> None:
  """Bars of the relative error per (padding, stride) case and shift, on a log scale."""
  cases = list(dict.fromkeys((row.padding, row.stride) for row in rows))
  shifts = sorted({row.shift for row in rows})
  width = 0.8 / len(cases)
  for index, case in enumerate(cases):
    errors = [next(r.error for r in rows if (r.padding, r.stride) == case and r.shift == s) for s in shifts]
    axis.bar(np.arange(len(shifts)) + index * width, np.maximum(errors, EXACT_FLOOR), width,
             label=f"{case[0]} padding, stride {case[1]}")
  axis.set_yscale("log")
  axis.set_xticks(np.arange(len(shifts)) + 0.4 - width / 2)
  axis.set_xticklabels([str(s) for s in shifts])
  axis.set_xlabel("input shift (pixels, circular)")
  axis.set_ylabel("||f(shift x) - shift f(x)|| / ||f(x)||  (exact 0 drawn at 1e-9)")
  axis.legend(fontsize=8)
  axis.grid(alpha=0.3, axis="y")
