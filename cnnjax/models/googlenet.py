"""GoogLeNet / Inception v1 (Szegedy et al. 2014) in torchvision's layout, without the auxiliary heads.

Stem (7x7/2 conv, max pool, 1x1 conv, 3x3 conv, max pool), nine Inception
modules (3a-3b, 4a-4e, 5a-5b) with max pools between the groups, global
average pooling, dropout and a linear classifier.
Each Inception module runs four branches side by side and concatenates their
channels:

  1x1 | 1x1 reduce -> 3x3 | 1x1 reduce -> "5x5" | 3x3 max pool -> 1x1 projection

The 1x1 reductions are what keeps the module affordable: the notes' example, a
5x5 convolution from 28x28x192 to 32 channels, costs (28x28x32) x (5x5x192),
about 120 million multiplications, and about a tenth of that behind a 1x1
reduction to 16 channels (see `cnnjax.analysis`).

Every convolution is conv (no bias) -> norm -> act. torchvision's layout, whose
count this model reproduces (6,624,904 trainable parameters at 1000 classes on
224x224x3), uses a 3x3 kernel in the "5x5" branch; `wide_kernel=5` gives the
paper's 5x5. Max pools round up (`ceil_mode`), as torchvision's do.

Also torchvision's: BatchNorm epsilon 1e-3 (set `model.bn_epsilon=0.001` in a
config, whose default is 1e-5; `experiments/googlenet_imagenet.py` does), and
its initialization, convolution and classifier weights truncated normal with
standard deviation 0.01 (`cnnjax.nn.initializers`), the classifier's bias
PyTorch's default uniform on +-1/sqrt(1024). `transform_input=True` does what
torchvision's option of that name does, and what its pretrained weights
expect: inputs normalized with ImageNet's mean and standard deviation are
mapped to (x - 0.5) / 0.5, the scaling the weights were trained with.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cnnjax.nn import GlobalPool, MaxPool, Norm, conv
from cnnjax.nn.initializers import googlenet_truncated_normal, torch_default_bias

ModuleDef = Callable[..., nn.Module]

# Inception modules: name -> (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection), the paper's Table 1.
INCEPTION_MODULES = (
    ("3a", (64, 96, 128, 16, 32, 32)), ("3b", (128, 128, 192, 32, 96, 64)),
    ("4a", (192, 96, 208, 16, 48, 64)), ("4b", (160, 112, 224, 24, 64, 64)),
    ("4c", (128, 128, 256, 24, 64, 64)), ("4d", (112, 144, 288, 32, 64, 64)),
    ("4e", (256, 160, 320, 32, 128, 128)),
    ("5a", (256, 160, 320, 32, 128, 128)), ("5b", (384, 192, 384, 48, 128, 128)),
)
# Max pools (window, stride) that close the stem and each group of modules, after the named module.
POOLS_AFTER = {"3b": (3, 2), "4e": (2, 2)}
TORCHVISION_WIDE_KERNEL = 3
TORCHVISION_BN_EPSILON = 1e-3
# transform_input: torchvision's pretrained GoogLeNet saw each channel as (x - 0.5) / 0.5 for x in
# [0, 1]; inputs normalized with ImageNet's statistics are mapped back to that scale.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PRETRAINED_CENTER, PRETRAINED_SCALE = 0.5, 0.5


class ConvNormAct(nn.Module):
  """conv (no bias) -> norm -> act: torchvision's BasicConv2d."""

  features: int
  kernel: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable[[jax.Array], jax.Array]
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv(self.features, self.kernel, strides=self.strides, padding=self.kernel // 2,
                  kernel_init=googlenet_truncated_normal, name="conv")(x)
    return self.act(self.norm(name="norm")(x))


class Inception(nn.Module):
  """Four parallel branches concatenated along channels."""

  widths: Sequence[int]  # (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection)
  conv: ModuleDef
  norm: ModuleDef
  act: Callable[[jax.Array], jax.Array]
  wide_kernel: int = TORCHVISION_WIDE_KERNEL
  lowering: str = "auto"  # how convolutions and max pooling are computed: cnnjax.nn.lowering

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ones, reduce3, threes, reduce5, fives, projection = self.widths
    block = functools.partial(ConvNormAct, conv=self.conv, norm=self.norm, act=self.act)
    branch1 = block(ones, 1, name="branch1")(x)
    branch2 = block(threes, 3, name="branch2_conv")(block(reduce3, 1, name="branch2_reduce")(x))
    branch3 = block(fives, self.wide_kernel, name="branch3_conv")(block(reduce5, 1, name="branch3_reduce")(x))
    pooled = MaxPool(3, 1, padding=1, ceil_mode=True, lowering=self.lowering, name="branch4_pool")(x)
    branch4 = block(projection, 1, name="branch4_proj")(pooled)
    return jnp.concatenate([branch1, branch2, branch3, branch4], axis=-1)


class GoogLeNet(nn.Module):
  """Stem, nine Inception modules, global average pooling, dropout, linear classifier."""

  num_classes: int
  inception_modules: Sequence[tuple[str, Sequence[int]]] = INCEPTION_MODULES
  wide_kernel: int = TORCHVISION_WIDE_KERNEL
  dropout_rate: float = 0.2  # torchvision's value (the paper used 0.4)
  transform_input: bool = False  # torchvision's option; its pretrained weights need True
  norm: Norm = Norm(kind="batch", epsilon=TORCHVISION_BN_EPSILON)
  act: Callable[[jax.Array], jax.Array] = nn.relu
  dtype: Any = jnp.float32
  lowering: str = "auto"  # how convolutions and max pooling are computed: cnnjax.nn.lowering

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.transform_input:
      x = (x * jnp.asarray(IMAGENET_STD) + jnp.asarray(IMAGENET_MEAN) - PRETRAINED_CENTER) / PRETRAINED_SCALE
    conv_def = functools.partial(conv, use_bias=False, dtype=self.dtype, lowering=self.lowering)
    norm = self.norm(train)
    block = functools.partial(ConvNormAct, conv=conv_def, norm=norm, act=self.act)
    x = block(64, 7, strides=2, name="stem_conv1")(x.astype(self.dtype))
    x = MaxPool(3, 2, ceil_mode=True, lowering=self.lowering, name="stem_pool1")(x)
    x = block(64, 1, name="stem_conv2")(x)
    x = block(192, 3, name="stem_conv3")(x)
    x = MaxPool(3, 2, ceil_mode=True, lowering=self.lowering, name="stem_pool2")(x)
    for name, widths in self.inception_modules:
      x = Inception(widths, conv_def, norm, self.act, self.wide_kernel, self.lowering, name=f"inception{name}")(x)
      if name in POOLS_AFTER:
        window, stride = POOLS_AFTER[name]
        x = MaxPool(window, stride, ceil_mode=True, lowering=self.lowering, name=f"pool_after_{name}")(x)
    x = GlobalPool("avg", name="global_pool")(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=googlenet_truncated_normal,
                 bias_init=torch_default_bias(x.shape[-1]), name="classifier")(x)
    return x.astype(jnp.float32)
