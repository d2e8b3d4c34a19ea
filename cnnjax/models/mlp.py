"""Multilayer perceptron: the fully connected baseline the CNN notes compare against.

The notes' scenario: a 32x32x3 image flattened to 3072 inputs and one hidden layer
of 128 units has (3072 + 1) x 128 = 393,344 parameters in that layer alone.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cnnjax.nn import Norm


class MLP(nn.Module):
  """Flatten, then Dense -> norm -> act per hidden layer, then a linear classifier."""

  num_classes: int
  hidden_sizes: Sequence[int] = (128,)
  norm: Norm = Norm(kind="none")
  act: Callable[[jax.Array], jax.Array] = nn.relu
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    norm = self.norm(train)
    x = x.reshape((x.shape[0], -1)).astype(self.dtype)
    for i, width in enumerate(self.hidden_sizes):
      x = nn.Dense(width, dtype=self.dtype, name=f"hidden{i}")(x)
      x = self.act(norm(name=f"norm{i}")(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
    return x.astype(jnp.float32)
