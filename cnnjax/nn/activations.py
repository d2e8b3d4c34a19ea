"""Activation functions by name, so that configs can choose them.

Maxout is a layer (it has parameters) and lives with the other layers.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
from flax import linen as nn

# The slope the source notes use for leaky ReLU: max(0.1 x, x).
LEAKY_RELU_SLOPE = 0.1


def identity(x: jax.Array) -> jax.Array:
  """The activation of a linear classifier."""
  return x


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "identity": identity,
    "sigmoid": nn.sigmoid,
    "tanh": nn.tanh,
    "relu": nn.relu,
    "leaky_relu": functools.partial(nn.leaky_relu, negative_slope=LEAKY_RELU_SLOPE),
    "elu": nn.elu,
    "softmax": nn.softmax,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Returns the activation called `name`, or raises naming the choices."""
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
  return ACTIVATIONS[name]
