"""LeNet-5 (LeCun et al. 1998): 32x32x1 -> C1 6@28x28 -> S2 -> C3 16@10x10 -> S4 -> C5 120 -> F6 84 -> 10.

With 10 classes on 32x32x1 inputs it has 61,706 trainable parameters. The
subsampling layers are plain average pools (the original's trainable coefficients
are left out, as in the usual 61,706 count) and the activation is tanh by default.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from cnnjax.nn import AvgPool, Conv, Norm


class LeNet5(nn.Module):
  """Conv(6, 5x5) -> pool -> Conv(16, 5x5) -> pool -> Conv(120, 5x5) -> Dense(84) -> Dense."""

  num_classes: int
  norm: Norm = Norm(kind="none")
  act: Callable[[jax.Array], jax.Array] = nn.tanh
  dtype: Any = jnp.float32
  lowering: str = "auto"  # how convolutions and max pooling are computed: cnnjax.nn.lowering

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    norm = self.norm(train)
    x = x.astype(self.dtype)
    x = self.act(norm(name="norm1")(Conv(6, (5, 5), padding="VALID", dtype=self.dtype, lowering=self.lowering,
                                          name="c1")(x)))
    x = AvgPool(2, name="s2")(x)
    x = self.act(norm(name="norm3")(Conv(16, (5, 5), padding="VALID", dtype=self.dtype, lowering=self.lowering,
                                          name="c3")(x)))
    x = AvgPool(2, name="s4")(x)
    x = self.act(norm(name="norm5")(Conv(120, (5, 5), padding="VALID", dtype=self.dtype, lowering=self.lowering,
                                          name="c5")(x)))
    x = x.reshape((x.shape[0], -1))
    x = self.act(nn.Dense(84, dtype=self.dtype, name="f6")(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
    return x.astype(jnp.float32)
