"""Backend-specific lowerings of convolution and max/min pooling, chosen in one place.

Each layer computation that XLA runs well on one backend and badly on another
has two lowerings here, computing the same function and the same derivatives:

* `plain`: `jax.lax.conv_general_dilated` and `jax.lax.reduce_window` with
  JAX's own derivatives, the forms that cuDNN, XLA GPU and XLA TPU have their
  convolution and pooling kernels for;
* `cpu_tuned`: three rewrites measured on XLA CPU (how much each gains:
  docs/results/design_choices.json, from scripts/bench_design_choices.py, quoted
  in docs/performance.md):
  - a convolution on maps with fewer pixels than its kernel has taps (a 3x3
    convolution on the 2x2 maps at the end of ResNet-18 at 64x64, U-Net's
    bottleneck on 32x32 inputs) is the matrix product of the input's patches
    with the kernel: XLA's algebraic simplifier swaps such a convolution's
    operands (the kernel becomes the image), and XLA CPU runs the swapped form
    through a slow generic loop, far slower than the matrix product;
  - an unpadded 1x1 convolution (ResNet-50's bottlenecks, projection shortcuts)
    is a matrix product over channels: XLA CPU computes its weight gradient as
    a convolution more slowly than the matrix product's;
  - max and min pooling carry their own derivative (`extremum_pool`): XLA CPU
    runs the generic gradient (select-and-scatter) slowly.

`model.lowering` chooses (`LOWERINGS`): 'plain' and 'cpu_tuned' force one, for
comparison; 'auto' (the default) takes `cpu_tuned` on CPU and `plain` on every
other backend (`choose`). The rewrites have never been measured on a GPU or
TPU, and the plain forms are what those compilers are built for (the issue's
rule: plain there unless a rewrite is measured faster).

'auto' is resolved when a layer is traced, from the backend the computation
will be placed on (`placement_backend`): the platform of `jax.default_device`
when one is set, else `jax.default_backend()`. A traced function does not know
its devices, but every cnnjax run places its state and batches on
`jax.devices()` (`cnnjax.parallel.select_devices`), which are the default
backend's, so the two agree there. A computation placed explicitly on another
platform's devices (CPU devices in a process whose default backend is a GPU,
say) gets the default backend's lowering: the same numbers, only possibly
slower; `jax.default_device` or `model.lowering` chooses the other.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

AUTO, PLAIN, CPU_TUNED = "auto", "plain", "cpu_tuned"
LOWERINGS = (AUTO, PLAIN, CPU_TUNED)
# The backends whose compiler the `cpu_tuned` rewrites were measured on (jax.default_backend() names).
CPU_TUNED_BACKENDS = ("cpu",)


def check(lowering: str) -> str:
  """`lowering`, or a ValueError naming the choices."""
  if lowering not in LOWERINGS:
    raise ValueError(f"unknown lowering {lowering!r}; choose one of {', '.join(LOWERINGS)}")
  return lowering


def choose(lowering: str, backend: str) -> str:
  """The lowering a layer uses on `backend` ('cpu', 'gpu', 'tpu', ...): 'plain' or 'cpu_tuned'."""
  if check(lowering) != AUTO:
    return lowering
  return CPU_TUNED if backend in CPU_TUNED_BACKENDS else PLAIN


def placement_backend() -> str:
  """The platform a computation traced now is placed on: `jax.default_device`'s, else the default backend."""
  device = jax.config.jax_default_device
  if device is None:
    return jax.default_backend()
  return device if isinstance(device, str) else device.platform


def resolve(lowering: str) -> str:
  """`choose` for the backend of the computation being traced (see the module docstring)."""
  return choose(lowering, placement_backend())


def _extents(kernel_shape: Sequence[int], dilations: Sequence[int]) -> list[int]:
  """The input extent of each kernel axis: D (F - 1) + 1 (`cnnjax.nn.conv.effective_kernel_size`)."""
  return [d * (k - 1) + 1 for k, d in zip(kernel_shape, dilations)]


def _is_channels_last(dimension_numbers: Any, ndim: int) -> bool:
  """Whether the convolution reads (B, spatial..., C) with (spatial..., C_in, C_out) kernels, as flax does."""
  spatial = tuple(range(1, ndim - 1))
  wanted = jax.lax.ConvDimensionNumbers((0, ndim - 1) + spatial, (ndim - 1, ndim - 2) + tuple(range(ndim - 2)),
                                        (0, ndim - 1) + spatial)
  return jax.lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dimension_numbers) == wanted


def output_shape(lhs_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int],
                 pads: Sequence[tuple[int, int]], dilations: Sequence[int]) -> tuple[int, ...]:
  """The spatial output shape of a channels-last convolution (not positive where the kernel does not fit)."""
  return tuple((size + low + high - extent) // s + 1
               for size, (low, high), extent, s in zip(lhs_shape[1:-1], pads, _extents(kernel_shape, dilations),
                                                        strides))


def patches(lhs: jax.Array, kernel_shape: Sequence[int], strides: Sequence[int], pads: Sequence[tuple[int, int]],
            dilations: Sequence[int]) -> jax.Array | None:
  """The patch matrix of a channels-last input: (B, out..., taps x C_in), taps in the kernel's row-major order.

  Row (b, o...) holds the input values that output position o of image b sees,
  in the order of a (spatial..., C_in, C_out) kernel's reshape to (taps x C_in,
  C_out), so that a convolution is this matrix times that reshaped kernel.
  None where the kernel does not fit in the padded input (an empty output).
  """
  out_shape = output_shape(lhs.shape, kernel_shape, strides, pads, dilations)
  if min(out_shape) <= 0:
    return None
  padded = jax.lax.pad(lhs, jnp.zeros((), lhs.dtype),
                       [(0, 0, 0)] + [(low, high, 0) for low, high in pads] + [(0, 0, 0)])
  taps = []
  for tap in itertools.product(*(range(k) for k in kernel_shape)):
    start = [0] + [t * d for t, d in zip(tap, dilations)] + [0]
    limit = ([lhs.shape[0]] + [t * d + (o - 1) * s + 1 for t, d, o, s in zip(tap, dilations, out_shape, strides)]
             + [lhs.shape[-1]])
    taps.append(jax.lax.slice(padded, start, limit, [1] + list(strides) + [1]))
  return jnp.stack(taps, axis=-2).reshape(*taps[0].shape[:-1], -1)


def _patch_conv(lhs: jax.Array, rhs: jax.Array, strides: Sequence[int], pads: Sequence[tuple[int, int]],
                dilations: Sequence[int], precision: Any) -> jax.Array:
  """A channels-last convolution as one matrix product of the input's patches with the kernel."""
  matrix = patches(lhs, rhs.shape[:-2], strides, pads, dilations)
  if matrix is None:  # the kernel does not fit: an empty output, as XLA gives
    out_shape = output_shape(lhs.shape, rhs.shape[:-2], strides, pads, dilations)
    return jnp.zeros((lhs.shape[0], *(max(o, 0) for o in out_shape), rhs.shape[-1]), lhs.dtype)
  return jnp.dot(matrix, rhs.reshape(-1, rhs.shape[-1]), precision=precision)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1, precision: Any = None,
                         lowering: str = AUTO, **kwargs: Any) -> jax.Array:
  """`jax.lax.conv_general_dilated` in the lowering `lowering` resolves to.

  Under `cpu_tuned`, unpadded 1x1 convolutions are a matrix product over
  channels, and where XLA would swap the operands (the kernel has more taps
  than the unpadded input has pixels) the kernel multiplies the input's
  patches. Grouped, input-dilated or non-channels-last convolutions, any other
  keyword, and everything under `plain` go to `jax.lax.conv_general_dilated`
  unchanged.
  """
  ndim = lhs.ndim
  kernel_taps = math.prod(rhs.shape[:-2])
  rewritable = (resolve(lowering) == CPU_TUNED and feature_group_count == 1 and not kwargs
                and all(d == 1 for d in (lhs_dilation or ())) and _is_channels_last(dimension_numbers, ndim))
  dilations = tuple(rhs_dilation or (1,) * (ndim - 2))
  if rewritable and isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:-1], _extents(rhs.shape[:-2], dilations), window_strides,
                                      padding)
  if rewritable and kernel_taps == 1 and all(low == 0 and high == 0 for low, high in padding):
    # A 1x1 convolution is a matrix product over channels of the (strided) input.
    sampled = jax.lax.slice(lhs, (0,) * ndim, lhs.shape, (1, *window_strides, 1))
    return jnp.dot(sampled, rhs.reshape(rhs.shape[-2:]), precision=precision)
  if not rewritable or math.prod(lhs.shape[1:-1]) >= kernel_taps:
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                        feature_group_count=feature_group_count, precision=precision, **kwargs)
  return _patch_conv(lhs, rhs, window_strides, padding, dilations, precision)


# One function object per choice, so that layers built with the same choice compare equal.
_CONV_FUNCTIONS = {choice: functools.partial(conv_general_dilated, lowering=choice) for choice in LOWERINGS}


def conv_function(lowering: str) -> Callable[..., jax.Array]:
  """The `conv_general_dilated` a `flax.linen.Conv` computes through under `lowering`."""
  return _CONV_FUNCTIONS[check(lowering)]


def _reduce_extremum(x: jax.Array, kind: str, window: tuple[int, ...], strides: tuple[int, ...],
                     pads: tuple[tuple[int, int], ...]) -> jax.Array:
  init, reduce = (-jnp.inf, jax.lax.max) if kind == "max" else (jnp.inf, jax.lax.min)
  return jax.lax.reduce_window(x, init, reduce, (1,) + window + (1,), (1,) + strides + (1,),
                               ((0, 0),) + pads + ((0, 0),))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def extremum_pool(x: jax.Array, kind: str, window: tuple[int, ...], strides: tuple[int, ...],
                  pads: tuple[tuple[int, int], ...]) -> jax.Array:
  """Max or min (`kind`) over windows of x (B, *spatial, C), padded by `pads` with -inf / +inf: `cpu_tuned`.

  Its derivative takes each window's tangent from the first element (in
  row-major window order) that attains the window's extremum, as XLA's own
  select-and-scatter gradient does, as one masked strided slice per window tap;
  JAX transposes those slices into strided pads for the gradient, which XLA CPU
  runs far faster than select-and-scatter. Forward and reverse mode both work.
  """
  return _reduce_extremum(x, kind, window, strides, pads)


@extremum_pool.defjvp
def _extremum_pool_jvp(kind, window, strides, pads, primals, tangents):
  (x,), (x_dot,) = primals, tangents
  y = _reduce_extremum(x, kind, window, strides, pads)
  fill = jnp.asarray(-jnp.inf if kind == "max" else jnp.inf, x.dtype)
  spatial_pads = [(0, 0, 0)] + [(low, high, 0) for low, high in pads] + [(0, 0, 0)]
  padded = jax.lax.pad(x, fill, spatial_pads)
  padded_dot = jax.lax.pad(x_dot, jnp.zeros((), x_dot.dtype), spatial_pads)
  y_dot = jnp.zeros(y.shape, x_dot.dtype)
  unclaimed = jnp.ones(y.shape, bool)
  for tap in itertools.product(*(range(f) for f in window)):
    start = (0,) + tap + (0,)
    limit = (x.shape[0], *(t + (o - 1) * s + 1 for t, o, s in zip(tap, y.shape[1:-1], strides)), x.shape[-1])
    step = (1,) + strides + (1,)
    hit = (jax.lax.slice(padded, start, limit, step) == y) & unclaimed
    unclaimed = unclaimed & ~hit
    y_dot = y_dot + jnp.where(hit, jax.lax.slice(padded_dot, start, limit, step), jnp.zeros((), x_dot.dtype))
  return y, y_dot


def window_extremum(x: jax.Array, kind: str, window: tuple[int, ...], strides: tuple[int, ...],
                    pads: tuple[tuple[int, int], ...], lowering: str = AUTO) -> jax.Array:
  """Max or min pooling of x (B, *spatial, C) with explicit `pads`, in the lowering `lowering` resolves to.

  Reverse mode gives the same gradient under both (the first extremum of each
  window in row-major order receives it). Forward mode agrees wherever each
  window's extremum is unique; on ties `plain` (JAX's rule for reduce_window)
  picks among the tied elements by their tangents, `cpu_tuned` takes the first.
  """
  if resolve(lowering) == CPU_TUNED:
    return extremum_pool(x, kind, window, strides, pads)
  return _reduce_extremum(x, kind, window, strides, pads)
