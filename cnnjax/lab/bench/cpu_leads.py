"""Candidate CPU rewrites of the ResNet-20 train step, measured by `scripts/bench_cpu_leads.py`.

Issue 18 names three leads against the largest cost of the step on XLA CPU
(the transpose fusions that move activations and their gradients into a
batch-last layout for each convolution's weight gradient). Each is written
here once, so that the measurement can be rerun; none is used by a model
(none was kept for `cnnjax.nn.lowering`: the numbers are in
docs/results/cpu_leads.json):

* `weight_grad_matmul`: a convolution with a custom JVP whose weight term is
  the patch matrix of the input times the kernel's tangent, so that reverse
  mode computes the weight gradient as one large matrix product (the patch
  matrix, materialized, transposed against the output gradient) instead of
  XLA's batch-last convolution;
* `patch_layout`: the forward is that same matrix product (an im2col
  convolution), so one materialized layout, the patch matrix, serves both the
  forward and the weight gradient; the input gradient stays XLA's convolution;
* `ynn_eltwise`: the step compiled with XLA CPU's YNNPACK fusion extended to
  elementwise operations, which lets the BatchNorm backward's elementwise work
  join the library fusions next to the convolutions (fewer, larger programs);
  a compiler option rather than a change of the computation.

The two convolution candidates take every channels-last, ungrouped,
input-undilated convolution with more than one tap on maps with at least as
many pixels as taps; anything else goes to `cpu_tuned` unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp

from cnnjax.nn import lowering
from cnnjax.nn.conv import effective_kernel_size

WEIGHT_GRAD_MATMUL, PATCH_LAYOUT, YNN_ELTWISE = "weight_grad_matmul", "patch_layout", "ynn_eltwise"
LEADS = (WEIGHT_GRAD_MATMUL, PATCH_LAYOUT, YNN_ELTWISE)
# XLA CPU's library fusion kinds: its default set (convolutions, reductions and dots, as the compiled
# step shows) plus elementwise operations.
YNN_ELTWISE_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ",".join(
    f"LIBRARY_FUSION_TYPE_{kind}" for kind in ("INDIVIDUAL_CONVOLUTION", "REDUCE", "DOT", "ELTWISE"))}


def _xla_conv(x: jax.Array, w: jax.Array, strides: tuple[int, ...], pads: tuple[tuple[int, int], ...],
              dilations: tuple[int, ...], dimension_numbers: Any, precision: Any) -> jax.Array:
  return jax.lax.conv_general_dilated(x, w, strides, pads, rhs_dilation=dilations,
                                      dimension_numbers=dimension_numbers, precision=precision)


def _weight_term(x: jax.Array, w_dot: jax.Array, strides: tuple[int, ...], pads: tuple[tuple[int, int], ...],
                 dilations: tuple[int, ...], precision: Any, matrix: jax.Array | None = None) -> jax.Array:
  """The convolution's tangent in its kernel: patches(x) @ w_dot, whose transpose is patches(x)^T @ dy."""
  if matrix is None:
    matrix = lowering.patches(x, w_dot.shape[:-2], strides, pads, dilations)
  return jnp.dot(matrix, w_dot.reshape(-1, w_dot.shape[-1]), precision=precision)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5, 6))
def weight_grad_matmul_conv(x: jax.Array, w: jax.Array, strides: tuple[int, ...], pads: tuple[tuple[int, int], ...],
                            dilations: tuple[int, ...], dimension_numbers: Any, precision: Any) -> jax.Array:
  """XLA's convolution forward; its kernel derivative a matrix product with the input's patch matrix."""
  return _xla_conv(x, w, strides, pads, dilations, dimension_numbers, precision)


@weight_grad_matmul_conv.defjvp
def _weight_grad_matmul_jvp(strides, pads, dilations, dimension_numbers, precision, primals, tangents):
  (x, w), (x_dot, w_dot) = primals, tangents
  y = _xla_conv(x, w, strides, pads, dilations, dimension_numbers, precision)
  y_dot = (_xla_conv(x_dot, w, strides, pads, dilations, dimension_numbers, precision)
           + _weight_term(x, w_dot, strides, pads, dilations, precision))
  return y, y_dot


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5, 6))
def patch_layout_conv(x: jax.Array, w: jax.Array, strides: tuple[int, ...], pads: tuple[tuple[int, int], ...],
                      dilations: tuple[int, ...], dimension_numbers: Any, precision: Any) -> jax.Array:
  """The convolution as patches(x) @ w; the same patch matrix gives the kernel derivative."""
  del dimension_numbers  # channels-last by construction (see `candidate_conv`)
  return _weight_term(x, w, strides, pads, dilations, precision)


@patch_layout_conv.defjvp
def _patch_layout_jvp(strides, pads, dilations, dimension_numbers, precision, primals, tangents):
  (x, w), (x_dot, w_dot) = primals, tangents
  matrix = lowering.patches(x, w.shape[:-2], strides, pads, dilations)
  y = _weight_term(x, w, strides, pads, dilations, precision, matrix)
  # The input term stays XLA's convolution, whose transpose is XLA's input-gradient convolution.
  y_dot = (_xla_conv(x_dot, w, strides, pads, dilations, dimension_numbers, precision)
           + _weight_term(x, w_dot, strides, pads, dilations, precision, matrix))
  return y, y_dot


CANDIDATE_CONVS = {WEIGHT_GRAD_MATMUL: weight_grad_matmul_conv, PATCH_LAYOUT: patch_layout_conv}


def candidate_conv(lead: str) -> Callable[..., jax.Array]:
  """A `conv_general_dilated` that routes the convolutions the lead covers to its formulation."""
  formulation = CANDIDATE_CONVS[lead]

  def conv(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
           lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
           dimension_numbers: Any = None, feature_group_count: int = 1, precision: Any = None,
           **kwargs: Any) -> jax.Array:
    kwargs.pop("lowering", None)
    ndim = lhs.ndim
    taps = math.prod(rhs.shape[:-2])
    covered = (feature_group_count == 1 and not kwargs and all(d == 1 for d in (lhs_dilation or ()))
               and lowering._is_channels_last(dimension_numbers, ndim)  # pylint: disable=protected-access
               and taps > 1 and math.prod(lhs.shape[1:-1]) >= taps)
    if not covered:
      return lowering.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                           rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                           feature_group_count=feature_group_count, precision=precision,
                                           lowering=lowering.CPU_TUNED, **kwargs)
    dilations = tuple(rhs_dilation or (1,) * (ndim - 2))
    if isinstance(padding, str):
      extents = [effective_kernel_size(k, d) for k, d in zip(rhs.shape[:-2], dilations)]
      padding = jax.lax.padtype_to_pads(lhs.shape[1:-1], extents, window_strides, padding)
    numbers = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return formulation(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding), dilations, numbers,
                       precision)

  return conv


@contextlib.contextmanager
def convolutions_of(lead: str | None) -> Iterator[None]:
  """While tracing inside, `cpu_tuned` convolutions compute through the lead's formulation (None: unchanged).

  Flax layers look their convolution function up when the model is traced, so
  a step traced (lowered) inside the block keeps the candidate afterwards.
  """
  if lead not in CANDIDATE_CONVS:
    yield
    return
  functions = lowering._CONV_FUNCTIONS  # pylint: disable=protected-access
  saved = functions[lowering.CPU_TUNED]
  functions[lowering.CPU_TUNED] = candidate_conv(lead)
  try:
    yield
  finally:
    functions[lowering.CPU_TUNED] = saved


def compiler_options(lead: str | None) -> dict[str, Any] | None:
  """The XLA options the lead compiles the step with (None: XLA's defaults)."""
  return dict(YNN_ELTWISE_COMPILER_OPTIONS) if lead == YNN_ELTWISE else None
