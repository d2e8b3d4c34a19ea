"""Checking that an input shape fits a model, and that a step fits memory, before anything is compiled
or written.

A too-small input does not fail cleanly in a convolutional net: a layer quietly
produces an empty output (or a later one fails with an unrelated message).
`check_input_shape` traces the model abstractly (`jax.eval_shape`, no compute),
finds the first layer whose output is empty or that cannot be applied, and names
it, with the smallest square input that works. `check_memory` estimates one
training step's memory from the model's shapes (parameters, optimizer state and
the batch's activations, also traced abstractly) and refuses a run that clearly
cannot fit a device.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

# The largest square side tried when looking for the smallest input that works.
LARGEST_SIDE_TRIED = 1024


class InputTooSmallError(ValueError):
  """The input shape is too small for the model; the message names the layer."""


def _layer_name(module: nn.Module) -> str:
  path = getattr(module.scope, "path", ()) if module.scope is not None else ()
  return "/".join(path) or type(module).__name__


def first_failing_layer(model: nn.Module, input_shape: Sequence[int]) -> tuple[str, str] | None:
  """(layer path, reason) of the first layer with an empty output or an error, else None."""
  failure: list[tuple[str, str]] = []

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    try:
      outputs = next_fun(*args, **kwargs)
    except Exception as error:  # pylint: disable=broad-except
      if not failure:  # the innermost module raises first
        failure.append((_layer_name(context.module), " ".join(str(error).split())[:200]))
      raise
    for leaf in jax.tree.leaves(outputs):
      if hasattr(leaf, "shape") and 0 in leaf.shape and not failure:
        failure.append((_layer_name(context.module), f"its output would be empty, shape {tuple(leaf.shape)}"))
        raise InputTooSmallError(failure[0][1])
    return outputs

  def init():
    return model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(input_shape), jnp.float32), train=False)

  try:
    with nn.intercept_methods(interceptor):
      jax.eval_shape(init)
  except Exception:  # pylint: disable=broad-except
    if failure:
      return failure[0]
    raise
  return failure[0] if failure else None


def smallest_square_input(model: nn.Module, input_shape: Sequence[int]) -> int | None:
  """The smallest side s such that an (s, s, C) input fits, searched up to LARGEST_SIDE_TRIED."""
  channels = input_shape[-1]
  low, high = input_shape[0], input_shape[0]
  while first_failing_layer(model, (high, high, channels)) is not None:
    low, high = high, high * 2
    if high > LARGEST_SIDE_TRIED:
      return None
  while low + 1 < high:
    middle = (low + high) // 2
    if first_failing_layer(model, (middle, middle, channels)) is None:
      high = middle
    else:
      low = middle
  return high


def check_input_shape(model: nn.Module, input_shape: Sequence[int], name: str = "the model") -> None:
  """Raises InputTooSmallError naming the layer that cannot take `input_shape`."""
  failure = first_failing_layer(model, input_shape)
  if failure is None:
    return
  layer, reason = failure
  hint = ""
  if len(input_shape) == 3:
    side = smallest_square_input(model, input_shape)
    if side is not None:
      hint = f"; the smallest square input that fits is {side}x{side}, e.g. --config.data.image_size={side}"
  raise InputTooSmallError(
      f"input {tuple(input_shape)} does not fit {name}: layer {layer} fails ({reason}){hint}")


# How many copies of each value a step holds at its peak. The innermost layers' outputs are kept for the
# backward pass (their gradients live briefly, and XLA fuses many of the layers, so one copy is already
# an upper bound); parameters have a gradient and a new value beside them. The estimate is meant to
# refuse only what clearly cannot fit, never a run that would.
ACTIVATION_COPIES = 1
PARAMETER_COPIES = 3
GIGABYTE = 2 ** 30


class TooLargeError(ValueError):
  """A run whose training step cannot fit the devices' memory; the message gives the estimate."""


def _nbytes(tree: Any) -> int:
  return sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def leaf_activation_bytes(model: nn.Module, input_shape: Sequence[int], dtype: Any = jnp.float32) -> int:
  """Bytes of the outputs of the model's innermost layers for one example (traced abstractly).

  Only layers that call no other layer count, so that a block's output is not
  counted again beside its last layer's.
  """
  stack: list[list[int]] = []  # per open module call: [number of nested calls, its output bytes]
  total = [0]

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if stack:
      stack[-1][0] += 1
    stack.append([0])
    try:
      outputs = next_fun(*args, **kwargs)
    finally:
      nested = stack.pop()[0]
    if not nested:
      total[0] += _nbytes(outputs)
    return outputs

  def init():
    return model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(input_shape), dtype), train=False)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(init)
  return total[0]


def step_memory_bytes(model: nn.Module, tx: Any, input_shape: Sequence[int], per_device_batch: int) -> dict[str, int]:
  """An estimate of one training step's memory on one device: parameters, BatchNorm statistics and the
  optimizer state (with the gradient and the update beside them), and the activations of the batch."""
  variables = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(input_shape), jnp.float32), train=False))
  params = variables["params"]
  saved = _nbytes(params) + _nbytes(jax.eval_shape(tx.init, params))
  saved += _nbytes({k: v for k, v in variables.items() if k != "params"})
  state = saved + _nbytes(params) * (PARAMETER_COPIES - 1)
  activations = leaf_activation_bytes(model, input_shape) * per_device_batch * ACTIVATION_COPIES
  return {"state": state, "activations": activations, "saved": saved, "total": state + activations}


def device_memory_bytes(devices: Sequence[Any]) -> int:
  """The memory of one of `devices` (an accelerator's own; for CPU devices, the host's RAM)."""
  stats = devices[0].memory_stats() if devices[0].platform != "cpu" else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(model: nn.Module, tx: Any, input_shape: Sequence[int], per_device_batch: int,
                 devices: Sequence[Any], *, replicas: int = 1, host_copies: int = 1, step: str = "training step",
                 batch_key: str = "batch_size") -> None:
  """Raises TooLargeError when one training step clearly cannot fit the devices' memory.

  `replicas`: models each device holds (a vectorized population's members per
  device). On CPU devices, which share the host's RAM, the step of every local
  device and `host_copies` host copies of the state (what a checkpoint saves)
  must fit the RAM together. The message calls the step `step` and names
  `batch_key`, the config key that sets `per_device_batch`, as the fix.
  """
  need = step_memory_bytes(model, tx, input_shape, per_device_batch)
  per_device = need["total"] * replicas
  what = f"one {step} needs about"
  if devices[0].platform == "cpu":
    local = sum(d.process_index == devices[0].process_index for d in devices)
    per_device = per_device * local + need["saved"] * host_copies
    what = f"the {step} on {local} CPU device(s) needs about" if local > 1 else what
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  else:
    have = device_memory_bytes(devices)
  if per_device > have:
    raise TooLargeError(
        f"{what} {per_device / GIGABYTE:.1f} GiB (parameters, gradients and optimizer state "
        f"{need['state'] * replicas / GIGABYTE:.1f} GiB, activations of {per_device_batch} examples "
        f"{need['activations'] * replicas / GIGABYTE:.1f} GiB per device) but there is {have / GIGABYTE:.1f} GiB; "
        f"use a smaller data.image_size, {batch_key} or model")
