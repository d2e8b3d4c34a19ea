"""The notes' Keras-style classifier: Conv2D, MaxPooling2D, BatchNorm, Flatten, Dense, Dropout.

The notes place BatchNorm after max pooling ("the author uses it after
maxpooling"); this model does the same. The notes' "augmentation_layer -> Input
-> Conv2D" order is available too: the `augment_*` options put a
`cnnjax.nn.RandomAugment` in front of the first convolution (train time only).

Two options vary what the notes say makes a CNN shift-invariant (see
`scripts/equivariance.py`): `pool` chooses the 2x2 pooling of each stage
('max', 'avg', or 'none' to keep full resolution), and `head` chooses how the
last feature map reaches the dense layers ('flatten', position by position, or
'global' average pooling, which forgets positions).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cnnjax.nn import Conv, GlobalPool, Norm, Pool, RandomAugment

POOLS = ("max", "avg", "none")
HEADS = ("flatten", "global")


class SimpleCNN(nn.Module):
  """Conv -> act -> max pool -> norm per stage, then flatten -> Dense -> act -> Dropout -> Dense."""

  num_classes: int
  features: Sequence[int] = (32, 64)
  kernel_size: int = 3
  dense_features: int = 128
  dropout_rate: float = 0.5
  pool: str = "max"  # one of POOLS
  head: str = "flatten"  # one of HEADS
  augment_crop_padding: int = 0  # in-model augmentation (train only); 0 / False / 0.0: off
  augment_flip: bool = False
  augment_rotation_degrees: float = 0.0
  norm: Norm = Norm(kind="batch")
  act: Callable[[jax.Array], jax.Array] = nn.relu
  dtype: Any = jnp.float32
  lowering: str = "auto"  # how convolutions and max pooling are computed: cnnjax.nn.lowering

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.pool not in POOLS or self.head not in HEADS:
      raise ValueError(f"simple_cnn pool={self.pool!r}, head={self.head!r}: choose pool from {', '.join(POOLS)} "
                       f"and head from {', '.join(HEADS)}")
    norm = self.norm(train)
    x = RandomAugment(self.augment_crop_padding, self.augment_flip, self.augment_rotation_degrees,
                      name="augment")(x.astype(self.dtype), train)
    for i, width in enumerate(self.features):
      x = Conv(width, (self.kernel_size, self.kernel_size), padding="SAME", dtype=self.dtype,
               lowering=self.lowering, name=f"conv{i}")(x)
      x = self.act(x)
      if self.pool != "none":
        x = Pool(2, kind=self.pool, lowering=self.lowering, name=f"pool{i}")(x)
      x = norm(name=f"norm{i}")(x)
    if self.head == "global":
      x = GlobalPool("avg", name="global_pool")(x)
    x = x.reshape((x.shape[0], -1))
    x = self.act(nn.Dense(self.dense_features, dtype=self.dtype, name="dense")(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
    return x.astype(jnp.float32)
