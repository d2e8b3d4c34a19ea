"""The notes' Keras-style classifier: Conv2D, MaxPooling2D, BatchNorm, Flatten, Dense, Dropout.

The notes place BatchNorm after max pooling ("the author uses it after
maxpooling"); this model does the same. The notes' "augmentation_layer -> Input
-> Conv2D" order is available too: the `augment_*` options put a
`cnnjax.nn.RandomAugment` in front of the first convolution (train time only).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cnnjax.nn import MaxPool, Norm, RandomAugment


class SimpleCNN(nn.Module):
  """Conv -> act -> max pool -> norm per stage, then Dense -> act -> Dropout -> Dense."""

  num_classes: int
  features: Sequence[int] = (32, 64)
  kernel_size: int = 3
  dense_features: int = 128
  dropout_rate: float = 0.5
  augment_crop_padding: int = 0  # in-model augmentation (train only); 0 / False / 0.0: off
  augment_flip: bool = False
  augment_rotation_degrees: float = 0.0
  norm: Norm = Norm(kind="batch")
  act: Callable[[jax.Array], jax.Array] = nn.relu
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    norm = self.norm(train)
    x = RandomAugment(self.augment_crop_padding, self.augment_flip, self.augment_rotation_degrees,
                      name="augment")(x.astype(self.dtype), train)
    for i, width in enumerate(self.features):
      x = nn.Conv(width, (self.kernel_size, self.kernel_size), padding="SAME",
                  dtype=self.dtype, name=f"conv{i}")(x)
      x = MaxPool(2, name=f"pool{i}")(self.act(x))
      x = norm(name=f"norm{i}")(x)
    x = x.reshape((x.shape[0], -1))
    x = self.act(nn.Dense(self.dense_features, dtype=self.dtype, name="dense")(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
    return x.astype(jnp.float32)
