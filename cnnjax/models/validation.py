"""Checking that an input shape fits a model before anything is compiled or written.

A too-small input does not fail cleanly in a convolutional net: a layer quietly
produces an empty output (or a later one fails with an unrelated message).
`check_input_shape` traces the model abstractly (`jax.eval_shape`, no compute),
finds the first layer whose output is empty or that cannot be applied, and names
it, with the smallest square input that works.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
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
