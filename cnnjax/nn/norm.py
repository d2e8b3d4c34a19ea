"""Normalization layers and the factory that injects them into models.

Models never construct a normalization layer directly: they receive a `Norm`
(a small frozen dataclass) and call `norm(train)` to get the layer constructor.
That keeps BatchNorm's device synchronization, GroupNorm, LayerNorm or no
normalization a config choice that never touches model code.

`BatchNorm` here makes explicit which examples share statistics:

* `examples_per_group`: split the local batch (axis 0) into consecutive groups
  of this many examples, each normalized by its own statistics (0: one group).
* `axis_name` / `devices_per_group`: combine statistics across the devices of a
  named axis (pmap, shard_map, or vmap with `axis_name`): all of them (0), none
  (1), or consecutive groups of k devices.

Statistics are one-pass moments (mean and mean of squares) in float32, so that
combining devices needs a single collective. Running averages are updated from
the mean of every group's statistics over all devices, so every replica holds
identical running averages after every step, whatever the grouping. For the
variance this keeps the average within-group variance (not the variance of the
union of the groups): that is the scale the network was normalized with during
training, so eval reproduces it. With one global group it is the exact batch
variance.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

NORM_KINDS = ("batch", "group", "layer", "none")
# The collection into which BatchNorm sows, in training mode, the statistics it normalized with
# (`mean` and `var`, each (groups, features), after combining devices). Nothing is stored unless a
# caller makes the collection mutable, as the BatchNorm study's probes do.
BATCH_MOMENTS = "batch_moments"

ModuleDef = Callable[..., nn.Module]


class Identity(nn.Module):
  """Returns its input: the normalization of `norm='none'`."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return x


class BatchNorm(nn.Module):
  """BatchNorm over the feature (last) axis with explicit statistic groups.

  Parameters `scale` and `bias` and running statistics `mean` and `var` (in the
  `batch_stats` collection) carry the same names as `flax.linen.BatchNorm`.
  """

  use_running_average: bool | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  axis_name: str | None = None
  devices_per_group: int = 0
  examples_per_group: int = 0
  use_scale: bool = True
  use_bias: bool = True
  scale_init: Callable[..., jax.Array] = nn.initializers.ones
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    features = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
    x32 = x.astype(jnp.float32)

    scale = (self.param("scale", self.scale_init, (features,), self.param_dtype) if self.use_scale
             else jnp.ones((features,), jnp.float32))
    bias = (self.param("bias", self.bias_init, (features,), self.param_dtype) if self.use_bias
            else jnp.zeros((features,), jnp.float32))
    if use_running_average:
      multiplier = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale
      y = x32 * multiplier + (bias - ra_mean.value * multiplier)
    else:
      groups = self._split_groups(x32)  # (num_groups, group_size, ...features)
      reduce_axes = tuple(range(1, groups.ndim - 1))
      moments = jnp.stack([groups.mean(reduce_axes), jnp.square(groups).mean(reduce_axes)])
      moments = self._combine_devices(moments)  # (2, num_groups, features)
      mean, mean_sq = moments[0], moments[1]
      var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
      if not self.is_initializing():
        self._update_running_stats(ra_mean, ra_var, mean, var)
        self.sow(BATCH_MOMENTS, "mean", mean)
        self.sow(BATCH_MOMENTS, "var", var)
      # y = x * a + b with a = scale / sigma and b = bias - mean * a: one multiply-add per element,
      # and a form whose derivative XLA fuses well (measured on the CPU: BatchNorm + ReLU forward
      # and backward on 128x32x32x16 in 1.2 ms, against 11.5 ms for (x - mean) / sigma * scale + bias).
      multiplier = jax.lax.rsqrt(var + self.epsilon) * scale
      offset = bias - mean * multiplier
      expand = (slice(None),) + (None,) * len(reduce_axes)
      y = (groups * multiplier[expand] + offset[expand]).reshape(x.shape)
    return y.astype(self.dtype or x.dtype)

  def _split_groups(self, x: jax.Array) -> jax.Array:
    if not self.examples_per_group:
      return x[None]
    if x.ndim < 2 or x.shape[0] % self.examples_per_group:
      raise ValueError(
          f"BatchNorm group of {self.examples_per_group} examples does not divide the "
          f"batch of {x.shape[0] if x.ndim else 0}; choose a group size that divides it.")
    return x.reshape((x.shape[0] // self.examples_per_group, self.examples_per_group) + x.shape[1:])

  def _combine_devices(self, moments: jax.Array) -> jax.Array:
    """Averages moments over the devices that share statistics with this one."""
    if self.axis_name is None or self.devices_per_group == 1:
      return moments
    if self.devices_per_group == 0:
      return jax.lax.pmean(moments, self.axis_name)
    # Sub-groups of consecutive devices: the moments are a few vectors, so gathering
    # them from every device is cheap and works alike under pmap, shard_map and vmap.
    gathered = jax.lax.all_gather(moments, self.axis_name)
    num_devices = gathered.shape[0]
    if num_devices % self.devices_per_group:
      raise ValueError(
          f"BatchNorm groups of {self.devices_per_group} devices do not divide the "
          f"{num_devices} devices on axis {self.axis_name!r}.")
    per_group = gathered.reshape(
        (num_devices // self.devices_per_group, self.devices_per_group) + moments.shape).mean(1)
    return per_group[jax.lax.axis_index(self.axis_name) // self.devices_per_group]

  def _update_running_stats(self, ra_mean, ra_var, mean: jax.Array, var: jax.Array) -> None:
    batch_mean, batch_var = mean.mean(0), var.mean(0)
    if self.axis_name is not None and self.devices_per_group != 0:
      # Groups differ across devices: average them so every replica holds the same state.
      batch_mean, batch_var = jax.lax.pmean((batch_mean, batch_var), self.axis_name)
    ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * batch_mean
    ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * batch_var


class GroupNorm(nn.Module):
  """GroupNorm (Wu & He 2018) that uses gcd(num_groups, channels) groups.

  Narrow layers (LeNet's 6 channels, ResNet-20's 16) cannot take the paper's 32
  groups; the largest common divisor keeps the layer well defined everywhere.
  """

  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    groups = math.gcd(self.num_groups, x.shape[-1])
    return nn.GroupNorm(num_groups=groups, epsilon=self.epsilon, dtype=self.dtype, name="norm")(x)


@dataclasses.dataclass(frozen=True)
class Norm:
  """The normalization a model is built with; `norm(train)` gives the layer constructor.

  `kind`: 'batch', 'group' (GroupNorm), 'layer' (LayerNorm over every non-batch
  axis, i.e. GroupNorm with one group, as in Wu & He 2018) or 'none'.
  """

  kind: str = "batch"
  momentum: float = 0.9
  epsilon: float = 1e-5
  group_norm_groups: int = 32
  axis_name: str | None = None
  devices_per_group: int = 0
  examples_per_group: int = 0
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.kind not in NORM_KINDS:
      raise ValueError(f"unknown norm {self.kind!r}; choose one of {', '.join(NORM_KINDS)}")

  def __call__(self, train: bool) -> ModuleDef:
    if self.kind == "batch":
      return functools.partial(
          BatchNorm, use_running_average=not train, momentum=self.momentum,
          epsilon=self.epsilon, dtype=self.dtype, axis_name=self.axis_name,
          devices_per_group=self.devices_per_group, examples_per_group=self.examples_per_group)
    if self.kind == "group":
      return functools.partial(GroupNorm, num_groups=self.group_norm_groups,
                               epsilon=self.epsilon, dtype=self.dtype)
    if self.kind == "layer":
      return functools.partial(GroupNorm, num_groups=1, epsilon=self.epsilon, dtype=self.dtype)
    return Identity
