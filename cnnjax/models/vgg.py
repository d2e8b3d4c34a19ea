"""VGG (Simonyan and Zisserman 2014): configurations A, B, D, E (VGG-11/13/16/19), with or without BatchNorm.

Five stages of 3x3 convolutions (padding 1) of 64, 128, 256, 512, 512 channels,
each stage closed by a 2x2/2 max pool, so the size halves while the depth
grows; then an adaptive average pool to 7x7 and FC 4096 -> FC 4096 -> FC K with
dropout, in torchvision's layout. At 1000 classes on 224x224x3, VGG-16 has
138,357,544 trainable parameters. The `_bn` variants put BatchNorm after every
convolution (convolutions keep their bias, as in torchvision).

Initialized as torchvision does: convolutions He normal over fan-out
(variance 2 / (9 x output channels)), linear layers normal(0, 0.01), biases 0.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cnnjax.nn import AdaptiveAvgPool, MaxPool, Norm, conv
from cnnjax.nn.initializers import classifier_normal, kaiming_normal_fan_out

# Convolutions per stage of each configuration (the paper's Table 1).
VGG_STAGES = {"vgg11": (1, 1, 2, 2, 2), "vgg13": (2, 2, 2, 2, 2), "vgg16": (2, 2, 3, 3, 3),
              "vgg19": (2, 2, 4, 4, 4)}
STAGE_FEATURES = (64, 128, 256, 512, 512)
GRID = 7  # spatial size the classifier expects (7x7x512 = 25,088 inputs)


class VGG(nn.Module):
  """Stages of 3x3 conv -> norm -> act, each followed by 2x2 max pooling; then three dense layers."""

  num_classes: int
  stage_sizes: Sequence[int] = VGG_STAGES["vgg16"]
  stage_features: Sequence[int] = STAGE_FEATURES
  classifier_features: int = 4096
  dropout_rate: float = 0.5
  norm: Norm = Norm(kind="none")
  act: Callable[[jax.Array], jax.Array] = nn.relu
  dtype: Any = jnp.float32
  lowering: str = "auto"  # how convolutions and max pooling are computed: cnnjax.nn.lowering

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    norm = self.norm(train)
    x = x.astype(self.dtype)
    for stage, (convs, features) in enumerate(zip(self.stage_sizes, self.stage_features), start=1):
      for index in range(1, convs + 1):
        x = conv(features, 3, padding=1, dtype=self.dtype, kernel_init=kaiming_normal_fan_out,
                 lowering=self.lowering, name=f"conv{stage}_{index}")(x)
        x = self.act(norm(name=f"norm{stage}_{index}")(x))
      x = MaxPool(2, lowering=self.lowering, name=f"pool{stage}")(x)
    x = AdaptiveAvgPool(GRID, name="avgpool")(x)
    x = x.reshape((x.shape[0], -1))
    for index in (6, 7):
      x = self.act(nn.Dense(self.classifier_features, dtype=self.dtype, kernel_init=classifier_normal,
                            name=f"fc{index}")(x))
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=classifier_normal, name="fc8")(x)
    return x.astype(jnp.float32)
