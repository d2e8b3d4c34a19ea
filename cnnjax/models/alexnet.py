"""AlexNet (Krizhevsky, Sutskever and Hinton 2012) in torchvision's single-tower layout.

CONV1 64@11x11/4 -> POOL1 -> CONV2 192@5x5 -> POOL2 -> CONV3 384@3x3 -> CONV4
256@3x3 -> CONV5 256@3x3 -> POOL3 (3x3/2 max pools) -> adaptive average pool to
6x6 -> FC6 4096 -> FC7 4096 -> FC8, with dropout before FC6 and FC7. At 1000
classes on 224x224x3 it has 61,100,840 trainable parameters (torchvision's
count; the paper's two-GPU version with 48/128/192/192/128 split filters differs
slightly). The paper's local response normalization is left out, as in
torchvision; `norm` can put a normalization after every convolution instead.

Initialized as torchvision's AlexNet is, which keeps PyTorch's defaults: every
weight and bias uniform on +-1/sqrt(fan_in), fan_in being the layer's inputs per
output (kernel positions x input channels for a convolution).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cnnjax.nn import AdaptiveAvgPool, MaxPool, Norm, conv
from cnnjax.nn.initializers import torch_default_bias, torch_default_kernel

# (features, kernel, stride, padding, max pool after) for CONV1..CONV5.
ALEXNET_CONVS = ((64, 11, 4, 2, True), (192, 5, 1, 2, True), (384, 3, 1, 1, False), (256, 3, 1, 1, False),
                 (256, 3, 1, 1, True))
POOL_WINDOW, POOL_STRIDE = 3, 2  # overlapping pooling, the paper's choice
GRID = 6  # spatial size the classifier expects (6x6x256 = 9216 inputs to FC6)


class AlexNet(nn.Module):
  """Five convolutions and three max pools, then three fully connected layers."""

  num_classes: int
  convs: Sequence[tuple[int, int, int, int, bool]] = ALEXNET_CONVS
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
    pools = 0
    for index, (features, kernel, stride, padding, pool_after) in enumerate(self.convs, start=1):
      fan_in = kernel * kernel * x.shape[-1]
      x = conv(features, kernel, strides=stride, padding=padding, dtype=self.dtype, lowering=self.lowering,
               kernel_init=torch_default_kernel, bias_init=torch_default_bias(fan_in), name=f"conv{index}")(x)
      x = self.act(norm(name=f"norm{index}")(x))
      if pool_after:
        pools += 1
        x = MaxPool(POOL_WINDOW, POOL_STRIDE, lowering=self.lowering, name=f"pool{pools}")(x)
    x = AdaptiveAvgPool(GRID, name="avgpool")(x)
    x = x.reshape((x.shape[0], -1))
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=torch_default_kernel)
    for index in (6, 7):
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      x = self.act(dense(self.classifier_features, bias_init=torch_default_bias(x.shape[-1]), name=f"fc{index}")(x))
    x = dense(self.num_classes, bias_init=torch_default_bias(x.shape[-1]), name="fc8")(x)
    return x.astype(jnp.float32)
