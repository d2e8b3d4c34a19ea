"""Normalization layers and the factory that injects them into models.

Models never construct a normalization layer directly: they receive a `Norm`
(a small frozen dataclass) and call `norm(train)` to get the layer constructor.
That keeps BatchNorm's device synchronization, GroupNorm, LayerNorm or no
normalization a config choice that never touches model code.

`BatchNorm` here makes explicit which examples share statistics: its
`grouping` (`cnnjax.nn.bn_sync.BatchNormGrouping`, the one definition of
`model.bn_sync` from the config to the layer) splits the batch into groups and
combines their statistics across devices.

Statistics are float32 moments of x - c, one pass over the data, with c per
group and channel the mean of the group's first example over its positions:
close to the group's mean (within the spread of the examples' means), outside
the gradient (the statistics do not depend on it mathematically, only their
rounding does), and read from data that the group's step already holds. The
plain one-pass form E[x^2] - E[x]^2 cancels catastrophically when a channel's
mean is large against its standard deviation; about c the variance stays
within a few float32 roundings of a two-pass computation (the errors of both
against float64, by mean/std: docs/parallel.md, from scripts/bn_precision.py). The output keeps the
form x * a + b, whose rounding error is eps x |x| / sigma, of the order of
PyTorch float32's: computing it from x - c would be exact too, but measurably
slows the step (docs/performance.md, "Measurements behind design choices").

Why not the running mean as c, which every replica holds without
communication? A fresh layer's is 0, and a channel whose mean moves by more
than a few dozen of its standard deviations between steps leaves it behind:
both cancel as before. The first example's mean lies within the range of the
examples' means, whatever the step.

A group that spans devices combines every device's (shift, mean about it,
variance) exactly (`BatchNormGrouping.combine`); what that costs against the
one-pass form is measured in docs/performance.md ("Measurements behind design
choices").

Running averages are updated from the mean of every group's statistics over
all devices, so every replica holds identical running averages after every
step, whatever the grouping. For the variance this keeps the average
within-group variance (not the variance of the union of the groups): that is
the scale the network was normalized with during training, so eval reproduces
it. With one global group it is the exact batch variance.

The running-variance convention (`running_variance`, config key
`model.bn_running_variance`): 'biased' (the default, as in flax) stores the
variance the batch was normalized with, the mean of squared deviations over
the m values per channel of a statistics group (examples x positions, over all
devices of the group); 'unbiased' (PyTorch's) multiplies it by m / (m - 1)
before it enters the running average. The stored variances of the two differ
by exactly (m - 1) / m: 0.998 for a global batch of 512 at 1x1, 0.9375 for 4
examples at 2x2. Normalization during training is the same in both (PyTorch
too normalizes with the biased variance); only eval-mode outputs differ.

Batch Renormalization (Ioffe 2017; `Norm(kind='renorm')`, `BatchNorm(renorm=...)`)
is BatchNorm whose training output is corrected towards the running statistics:
x_hat = (x - mu_B) / sigma_B * r + d with r = clip(sigma_B / sigma, 1 / rmax,
rmax) and d = clip((mu_B - mu) / sigma, -dmax, dmax), both outside the gradient,
sigma_B = sqrt(var_B + eps) per statistics group and mu, sigma = sqrt(var + eps)
the running statistics before this step's update. Unclipped, that is the
running statistics' normalization with the batch's gradient; the clipping
limits start at rmax = 1, dmax = 0 (plain BatchNorm) and open up over steps
(`RenormClipping`), because fresh running statistics are meaningless. Every
statistics group, device and strategy computes the same r and d: they read the
group's statistics (identical on its devices) and the running statistics and
a step counter (`renorm_step` in `batch_stats`), which every replica holds
identically; so Batch Renorm keeps every bn_sync mode's equivalences.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from cnnjax.nn.bn_sync import BatchNormGrouping

NORM_KINDS = ("batch", "renorm", "group", "layer", "none")
# The kinds that are BatchNorm layers (running statistics, statistics groups, bn_sync).
BATCH_NORM_KINDS = ("batch", "renorm")
# How the batch variance enters BatchNorm's running average: as normalized with (flax), or times
# m / (m - 1) for m values per channel and statistics group (PyTorch).
RUNNING_VARIANCE_CONVENTIONS = ("biased", "unbiased")
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


@dataclasses.dataclass(frozen=True)
class RenormClipping:
  """Batch Renormalization's clipping limits and how they open up over training steps (Ioffe 2017, sec. 4).

  Up to `warmup_steps` the limits are rmax = 1 and dmax = 0, plain BatchNorm.
  From there they grow linearly to `rmax` at step `rmax_steps` and to `dmax` at
  step `dmax_steps` (a ramp that ends at or before `warmup_steps` opens at once).
  The paper's Inception run: 5,000 warmup steps, rmax = 3 at 40,000 and dmax = 5
  at 25,000 steps.
  """

  rmax: float = 3.0
  dmax: float = 5.0
  warmup_steps: int = 0
  rmax_steps: int = 0
  dmax_steps: int = 0

  def __post_init__(self):
    if self.rmax < 1 or self.dmax < 0 or min(self.warmup_steps, self.rmax_steps, self.dmax_steps) < 0:
      raise ValueError(f"Batch Renorm needs rmax >= 1, dmax >= 0 and steps >= 0; got {self}")

  def _opened(self, step: jax.Array, end: int) -> jax.Array:
    """How far a limit has opened at `step`: 0 until warmup_steps, then linearly to 1 at `end`."""
    step = step.astype(jnp.float32)
    if end <= self.warmup_steps:
      return (step >= self.warmup_steps).astype(jnp.float32)
    return jnp.clip((step - self.warmup_steps) / (end - self.warmup_steps), 0.0, 1.0)

  def limits(self, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(rmax, dmax) in force at training step `step` (counted from 0)."""
    return (1.0 + (self.rmax - 1.0) * self._opened(step, self.rmax_steps),
            self.dmax * self._opened(step, self.dmax_steps))


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
  grouping: BatchNormGrouping = BatchNormGrouping()
  running_variance: str = "biased"  # one of RUNNING_VARIANCE_CONVENTIONS
  renorm: RenormClipping | None = None  # Batch Renormalization with these limits; None: BatchNorm
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
    # Batch Renorm's training steps so far, for its clipping schedule (declared in eval mode too, so that
    # the state has one structure).
    renorm_step = (self.variable("batch_stats", "renorm_step", lambda: jnp.zeros((), jnp.int32))
                   if self.renorm is not None else None)
    x32 = x.astype(jnp.float32)

    scale = (self.param("scale", self.scale_init, (features,), self.param_dtype) if self.use_scale
             else jnp.ones((features,), jnp.float32))
    bias = (self.param("bias", self.bias_init, (features,), self.param_dtype) if self.use_bias
            else jnp.zeros((features,), jnp.float32))
    if use_running_average:
      multiplier = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale
      y = x32 * multiplier + (bias - ra_mean.value * multiplier)
    else:
      groups = self.grouping.split(x32)  # (num_groups, group_size, ...positions, features)
      reduce_axes = tuple(range(1, groups.ndim - 1))
      expand = (slice(None),) + (None,) * len(reduce_axes)  # (groups, features) -> broadcast over groups
      # The shift: each group's first example averaged over its positions (see the module docstring).
      shift = jax.lax.stop_gradient(groups[:, 0].mean(tuple(range(1, groups.ndim - 2))))
      mean, var, devices = self._moments(groups - shift[expand], shift, reduce_axes)
      inv_sigma = jax.lax.rsqrt(var + self.epsilon)
      # Batch Renorm's output is BatchNorm's with scale * r and bias + scale * d, since
      # ((x - mu_B) / sigma_B * r + d) * scale + bias; r and d read the running statistics before the update.
      scale, bias = self._renormalized(renorm_step, scale, bias, mean, var, ra_mean.value, ra_var.value)
      if not self.is_initializing():
        values_per_group = math.prod(groups.shape[1:-1]) * devices
        self._update_running_stats(ra_mean, ra_var, mean, var, values_per_group)
        self.sow(BATCH_MOMENTS, "mean", mean)
        self.sow(BATCH_MOMENTS, "var", var)
      # y = x * a + b with a = scale / sigma and b = bias - mean * a: one multiply-add per element, and
      # a form whose derivative XLA fuses better than (x - mean) / sigma * scale + bias or
      # (x - c) * a + b (docs/results/design_choices.json, quoted in docs/performance.md). Its rounding error, eps x |x| / sigma, is of the order of
      # PyTorch float32's (docs/parallel.md, the precision table).
      multiplier = inv_sigma * scale
      offset = bias - mean * multiplier
      y = (groups * multiplier[expand] + offset[expand]).reshape(x.shape)
    return y.astype(self.dtype or x.dtype)

  def _renormalized(self, step, scale: jax.Array, bias: jax.Array, mean: jax.Array, var: jax.Array,
                    running_mean: jax.Array, running_var: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(scale, bias) as they act on the batch-normalized values: scale * r and bias + scale * d for Batch
    Renorm, each (groups, features); unchanged for BatchNorm. Counts the step (`step`) that uses them."""
    if self.renorm is None:
      return scale, bias
    rmax, dmax = self.renorm.limits(step.value)
    running_sigma = jnp.sqrt(running_var + self.epsilon)
    r = jax.lax.stop_gradient(jnp.clip(jnp.sqrt(var + self.epsilon) / running_sigma, 1.0 / rmax, rmax))
    d = jax.lax.stop_gradient(jnp.clip((mean - running_mean) / running_sigma, -dmax, dmax))
    if not self.is_initializing():
      step.value = step.value + 1
    return scale * r, bias + scale * d

  def _moments(self, centered: jax.Array, shift: jax.Array,
               reduce_axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array, int]:
    """Each group's mean and variance from its values minus `shift`, over the devices that share it.

    Returns (mean, variance), each (groups, features), and the number of devices
    that the statistics span; both are bit-identical on every device of a group.
    """
    mean = centered.mean(reduce_axes)
    var = jnp.square(centered).mean(reduce_axes) - jnp.square(mean)
    return self.grouping.combine(shift, mean, var)

  def _update_running_stats(self, ra_mean, ra_var, mean: jax.Array, var: jax.Array, values_per_group: int) -> None:
    if self.running_variance not in RUNNING_VARIANCE_CONVENTIONS:
      raise ValueError(f"unknown BatchNorm running variance {self.running_variance!r}; "
                       f"choose one of {', '.join(RUNNING_VARIANCE_CONVENTIONS)}")
    batch_mean, batch_var = mean.mean(0), var.mean(0)
    if self.running_variance == "unbiased":
      if values_per_group < 2:
        raise ValueError("an unbiased running variance needs at least 2 values per channel in each BatchNorm "
                         "group; use larger groups or model.bn_running_variance=biased")
      batch_var = batch_var * (values_per_group / (values_per_group - 1))
    batch_mean, batch_var = self.grouping.average_over_replicas((batch_mean, batch_var))
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

  `kind`: 'batch', 'renorm' (Batch Renormalization with the `renorm` limits),
  'group' (GroupNorm), 'layer' (LayerNorm over every non-batch axis, i.e.
  GroupNorm with one group, as in Wu & He 2018) or 'none'.
  """

  kind: str = "batch"
  momentum: float = 0.9
  epsilon: float = 1e-5
  group_norm_groups: int = 32
  grouping: BatchNormGrouping = BatchNormGrouping()
  running_variance: str = "biased"
  renorm: RenormClipping = RenormClipping()
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.kind not in NORM_KINDS:
      raise ValueError(f"unknown norm {self.kind!r}; choose one of {', '.join(NORM_KINDS)}")
    if self.running_variance not in RUNNING_VARIANCE_CONVENTIONS:
      raise ValueError(f"unknown BatchNorm running variance {self.running_variance!r}; "
                       f"choose one of {', '.join(RUNNING_VARIANCE_CONVENTIONS)}")

  def __call__(self, train: bool) -> ModuleDef:
    if self.kind in BATCH_NORM_KINDS:
      return functools.partial(
          BatchNorm, use_running_average=not train, momentum=self.momentum,
          epsilon=self.epsilon, dtype=self.dtype, grouping=self.grouping,
          running_variance=self.running_variance, renorm=self.renorm if self.kind == "renorm" else None)
    if self.kind == "group":
      return functools.partial(GroupNorm, num_groups=self.group_norm_groups,
                               epsilon=self.epsilon, dtype=self.dtype)
    if self.kind == "layer":
      return functools.partial(GroupNorm, num_groups=1, epsilon=self.epsilon, dtype=self.dtype)
    return Identity
