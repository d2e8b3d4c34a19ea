"""Residual networks (He et al. 2015): the CIFAR family and the ImageNet family.

* `CifarResNet`: 6n+2 layers, three stages of 16/32/64 channels on 32x32 inputs,
  option-A shortcuts (stride-2 subsampling and zero-padded channels, no
  parameters). n = 3, 5, 7, 9, 18 gives ResNet-20/32/44/56/110.
* `ResNet`: the ImageNet networks, a 7x7 stem and four stages of basic (18, 34)
  or bottleneck (50, 101, 152) blocks with projection shortcuts; parameter counts
  match torchvision's. Stride sits on the 3x3 convolution of a bottleneck (v1.5).

Conv, norm and activation are injected (the convolutions and the stem pool in
the model's `lowering`, `cnnjax.nn.lowering`); padding is explicit and symmetric
(k // 2 on each side) so that shapes and arithmetic match the PyTorch layouts.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cnnjax.nn import Conv, GlobalPool, MaxPool, Norm
from cnnjax.nn.initializers import kaiming_normal_fan_out

ModuleDef = Callable[..., nn.Module]

# He et al. initialize convolutions with fan-out normal scaling, as torchvision does.
conv_kernel_init = kaiming_normal_fan_out


def _padding(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
  return ((kernel // 2, kernel // 2), (kernel // 2, kernel // 2))


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with an identity or projection shortcut."""

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable[[jax.Array], jax.Array]
  shortcut: str = "projection"  # 'projection' (1x1 conv + norm) or 'zero_pad' (option A)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(self.features, (3, 3), (self.strides, self.strides), padding=_padding(3), name="conv1")(x)
    y = self.act(self.norm(name="norm1")(y))
    y = self.conv(self.features, (3, 3), padding=_padding(3), name="conv2")(y)
    y = self.norm(name="norm2")(y)
    return self.act(y + _shortcut(x, y.shape[-1], self.strides, self.shortcut, self.conv, self.norm))


class PlainBlock(nn.Module):
  """A BasicBlock without its shortcut: the plain baseline of He et al. 2015."""

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable[[jax.Array], jax.Array]
  shortcut: str = "none"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(self.features, (3, 3), (self.strides, self.strides), padding=_padding(3), name="conv1")(x)
    y = self.act(self.norm(name="norm1")(y))
    y = self.conv(self.features, (3, 3), padding=_padding(3), name="conv2")(y)
    return self.act(self.norm(name="norm2")(y))


class BottleneckBlock(nn.Module):
  """1x1 reduce -> 3x3 (strided) -> 1x1 expand by 4, with a projection shortcut."""

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable[[jax.Array], jax.Array]
  expansion: int = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.act(self.norm(name="norm1")(self.conv(self.features, (1, 1), name="conv1")(x)))
    y = self.conv(self.features, (3, 3), (self.strides, self.strides), padding=_padding(3), name="conv2")(y)
    y = self.act(self.norm(name="norm2")(y))
    y = self.norm(name="norm3")(self.conv(self.features * self.expansion, (1, 1), name="conv3")(y))
    return self.act(y + _shortcut(x, y.shape[-1], self.strides, "projection", self.conv, self.norm))


def _shortcut(x: jax.Array, features: int, strides: int, kind: str, conv: ModuleDef,
              norm: ModuleDef) -> jax.Array:
  if x.shape[-1] == features and strides == 1:
    return x
  if kind == "zero_pad":
    x = x[:, ::strides, ::strides, :]
    missing = features - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (missing // 2, missing - missing // 2)))
  x = conv(features, (1, 1), (strides, strides), name="shortcut_conv")(x)
  return norm(name="shortcut_norm")(x)


class CifarResNet(nn.Module):
  """ResNet for 32x32 inputs: conv3x3(16) then three stages of `blocks_per_stage` blocks."""

  num_classes: int
  blocks_per_stage: int = 3
  stage_features: Sequence[int] = (16, 32, 64)
  residual: bool = True  # False gives the "plain" network of the degradation experiment
  norm: Norm = Norm(kind="batch")
  act: Callable[[jax.Array], jax.Array] = nn.relu
  dtype: Any = jnp.float32
  lowering: str = "auto"  # how convolutions and max pooling are computed: cnnjax.nn.lowering

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = functools.partial(Conv, use_bias=False, dtype=self.dtype, kernel_init=conv_kernel_init,
                             lowering=self.lowering)
    norm = self.norm(train)
    x = conv(self.stage_features[0], (3, 3), padding=_padding(3), name="stem_conv")(x.astype(self.dtype))
    x = self.act(norm(name="stem_norm")(x))
    block = BasicBlock if self.residual else PlainBlock
    for stage, features in enumerate(self.stage_features):
      for index in range(self.blocks_per_stage):
        strides = 2 if stage > 0 and index == 0 else 1
        x = block(features, strides, conv, norm, self.act, shortcut="zero_pad",
                  name=f"stage{stage + 1}_block{index + 1}")(x)
    x = GlobalPool("avg", name="global_pool")(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
    return x.astype(jnp.float32)


class ResNet(nn.Module):
  """ImageNet ResNet: 7x7/2 stem, 3x3/2 max pool, four stages, global average pool."""

  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  bottleneck: bool = False
  stage_features: Sequence[int] = (64, 128, 256, 512)
  norm: Norm = Norm(kind="batch")
  act: Callable[[jax.Array], jax.Array] = nn.relu
  dtype: Any = jnp.float32
  lowering: str = "auto"  # how convolutions and max pooling are computed: cnnjax.nn.lowering

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = functools.partial(Conv, use_bias=False, dtype=self.dtype, kernel_init=conv_kernel_init,
                             lowering=self.lowering)
    norm = self.norm(train)
    x = conv(self.stage_features[0], (7, 7), (2, 2), padding=_padding(7), name="stem_conv")(x.astype(self.dtype))
    x = self.act(norm(name="stem_norm")(x))
    x = MaxPool(3, 2, padding=_padding(3), lowering=self.lowering, name="stem_pool")(x)
    block = BottleneckBlock if self.bottleneck else BasicBlock
    for stage, (blocks, features) in enumerate(zip(self.stage_sizes, self.stage_features)):
      for index in range(blocks):
        strides = 2 if stage > 0 and index == 0 else 1
        x = block(features, strides, conv, norm, self.act, name=f"stage{stage + 1}_block{index + 1}")(x)
    x = GlobalPool("avg", name="global_pool")(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
    return x.astype(jnp.float32)
