"""torchvision's weight initializers, for the models that follow its layouts.

Flax's defaults (LeCun normal kernels, zero biases) are not what torchvision
uses, so a model that claims torchvision's layout also takes its initializers
from here:

* `kaiming_normal_fan_out`: normal with variance 2 / fan_out, fan_out = kernel
  positions x output channels (`nn.init.kaiming_normal_(mode='fan_out',
  nonlinearity='relu')`): torchvision's ResNet and VGG convolutions (He et al. 2015).
* `classifier_normal`: normal(0, 0.01), torchvision's VGG linear layers.
* `googlenet_truncated_normal`: torchvision's GoogLeNet convolutions and linear
  layers, `nn.init.trunc_normal_(mean=0, std=0.01, a=-2, b=2)`. The bounds are
  absolute, so at std 0.01 they sit 200 standard deviations out and the draw is
  in effect normal(0, 0.01). (torchvision's older code drew from
  `scipy.stats.truncnorm(-2, 2, scale=0.01)`, truncated at 2 standard deviations.)
* `torch_default_kernel` and `torch_default_bias(fan_in)`: PyTorch's own default
  for `nn.Conv2d` and `nn.Linear`, uniform on +-1/sqrt(fan_in) for weights and
  biases, fan_in = kernel positions x input channels. torchvision's AlexNet
  keeps these, and its GoogLeNet keeps the default for its classifier's bias.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

Initializer = Callable[..., jax.Array]

# ReLU's gain squared: He et al.'s variance 2 / fan.
RELU_VARIANCE_SCALE = 2.0
CLASSIFIER_STD = 0.01
GOOGLENET_STD = 0.01
GOOGLENET_BOUND = 2.0  # absolute, as torchvision passes it to trunc_normal_
# PyTorch's default kaiming_uniform_(a=sqrt(5)) gives bound gain * sqrt(3 / fan_in) with
# gain^2 = 2 / (1 + a^2) = 1/3: a variance of 1 / (3 fan_in), uniform on +-1/sqrt(fan_in).
TORCH_DEFAULT_VARIANCE_SCALE = 1.0 / 3.0

kaiming_normal_fan_out = nn.initializers.variance_scaling(RELU_VARIANCE_SCALE, "fan_out", "normal")
classifier_normal = nn.initializers.normal(CLASSIFIER_STD)
googlenet_truncated_normal = nn.initializers.truncated_normal(
    GOOGLENET_STD, lower=-GOOGLENET_BOUND / GOOGLENET_STD, upper=GOOGLENET_BOUND / GOOGLENET_STD)
torch_default_kernel = nn.initializers.variance_scaling(TORCH_DEFAULT_VARIANCE_SCALE, "fan_in", "uniform")


def torch_default_bias(fan_in: int) -> Initializer:
  """PyTorch's default bias: uniform on +-1/sqrt(fan_in) (the layer's inputs per output)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init
