"""BatchNorm synchronization, defined once: which examples share statistics, from `model.bn_sync` to the layer.

The contract (the same numbers on every strategy and device count):

* `global`: statistics over the whole global batch.
* `local`: statistics over each device's own slice of the batch.
* `ghost`: statistics over fixed groups of `model.bn_group_size` consecutive
  examples of the global batch, whatever the number of devices.

`BatchNormGrouping` is the one object that carries a mode from the config to
every `cnnjax.nn.BatchNorm` layer (`cnnjax.train.experiment.build` makes it with
`grouping_for_run`, `cnnjax.nn.Norm` hands it to the layers), and it holds the
arithmetic of the grouping: splitting a batch into groups, and combining
statistics across the devices of a group.

The mechanism differs by strategy, because a step sees either the global batch
(`none`, `jit`) or one device's slice with a named device axis (`pmap`,
`shard_map`); docs/parallel.md tables it, mode by strategy, once.

A group that spans devices (a per-device view with `devices_per_group` != 1)
gathers each device's (shift, mean about it, variance) in one `all_gather` and
combines them exactly (Chan et al.'s pairwise formula: the mean of the
variances plus the variance of the means, the latter taken about the group's
first device's shift). That is the one collective, as the one-pass form
needed; it moves 3 x groups x features numbers per device, a few kilobytes,
and every device of a group computes bit-identical statistics. Under `jit`
with a sharded batch, XLA fetches each group's first example from the device
that holds it, one small extra all-reduce per layer.

Running averages are always updated from the mean over all groups and all
devices (a `pmean` under pmap/shard_map when groups differ), so replicas hold
identical running statistics after every step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

BN_SYNC_MODES = ("global", "local", "ghost")


@dataclasses.dataclass(frozen=True)
class BatchNormGrouping:
  """Which examples one BatchNorm layer normalizes together.

  * `examples_per_group`: split the local batch (axis 0) into consecutive groups
    of this many examples, each normalized by its own statistics (0: one group).
  * `axis_name` / `devices_per_group`: combine statistics across the devices of a
    named axis (pmap, shard_map, or vmap with `axis_name`): all of them (0), none
    (1), or consecutive groups of k devices.
  """

  axis_name: str | None = None
  devices_per_group: int = 0
  examples_per_group: int = 0

  def split(self, x: jax.Array) -> jax.Array:
    """x as (groups, examples per group, ...positions, features)."""
    if not self.examples_per_group:
      return x[None]
    if x.ndim < 2 or x.shape[0] % self.examples_per_group:
      raise ValueError(
          f"BatchNorm group of {self.examples_per_group} examples does not divide the "
          f"batch of {x.shape[0] if x.ndim else 0}; choose a group size that divides it.")
    return x.reshape((x.shape[0] // self.examples_per_group, self.examples_per_group) + x.shape[1:])

  def combine(self, shift: jax.Array, mean: jax.Array, var: jax.Array) -> tuple[jax.Array, jax.Array, int]:
    """Each group's mean and variance over the devices that share it, from this device's `mean` and `var`
    of its values minus `shift` (each (groups, features)).

    Returns (mean, variance) and the number of devices that the statistics span;
    both are bit-identical on every device of a group.
    """
    if self.axis_name is None or self.devices_per_group == 1:
      return shift + mean, jnp.maximum(var, 0.0), 1
    # One collective for every grouping: the per-device statistics are a few vectors, so gathering
    # them from every device is cheap and works alike under pmap, shard_map and vmap.
    gathered = jax.lax.all_gather(jnp.stack([shift, mean, var]), self.axis_name)  # (devices, 3, groups, features)
    num_devices = gathered.shape[0]
    devices = self.devices_per_group or num_devices
    if num_devices % devices:
      raise ValueError(
          f"BatchNorm groups of {devices} devices do not divide the "
          f"{num_devices} devices on axis {self.axis_name!r}.")
    if devices != num_devices:
      per_group = gathered.reshape((num_devices // devices, devices) + gathered.shape[1:])
      gathered = per_group[jax.lax.axis_index(self.axis_name) // devices]
    shifts, means, variances = gathered[:, 0], gathered[:, 1], gathered[:, 2]
    # Every device's mean about the group's first shift: the shifts are close to each other, so their
    # differences lose nothing, and the same numbers on every device keep replicas bit-identical.
    reference = shifts[0]
    device_means = (shifts - reference) + means
    group_mean = device_means.mean(0)
    group_var = (variances + jnp.square(device_means - group_mean)).mean(0)
    return reference + group_mean, jnp.maximum(group_var, 0.0), devices

  def average_over_replicas(self, values: Any) -> Any:
    """`values` averaged over the device axis when groups differ across devices, so that every replica
    holds the same running statistics; unchanged when every device already computed the same."""
    if self.axis_name is not None and self.devices_per_group != 0:
      return jax.lax.pmean(values, self.axis_name)
    return values


def grouping(bn_sync: str, bn_group_size: int, *, per_device_view: bool, axis_name: str | None,
             num_devices: int, global_batch: int) -> BatchNormGrouping:
  """Translates `bn_sync` into the grouping that implements it on a strategy.

  Args:
    bn_sync: 'global', 'local' or 'ghost'.
    bn_group_size: examples per statistics group for 'ghost'.
    per_device_view: True when the step sees one device's slice (pmap, shard_map).
    axis_name: the device axis name under a per-device view.
    num_devices: devices sharing the global batch.
    global_batch: examples per step over all devices.
  """
  if bn_sync not in BN_SYNC_MODES:
    raise ValueError(f"unknown bn_sync {bn_sync!r}; choose one of {', '.join(BN_SYNC_MODES)}")
  per_device = global_batch // num_devices
  if bn_sync == "ghost":
    group = bn_group_size
  elif bn_sync == "local":
    group = per_device
  else:
    group = global_batch
  if group <= 0 or global_batch % group or (group > per_device and group % per_device) or (
      group < per_device and per_device % group):
    raise ValueError(
        f"a BatchNorm group of {group} examples does not fit a global batch of {global_batch} "
        f"on {num_devices} devices ({per_device} per device); choose a group size that divides "
        f"the per-device batch or is a multiple of it that divides the global batch")

  if not per_device_view:
    # The step sees the global batch: groups are consecutive examples of it.
    return BatchNormGrouping(examples_per_group=0 if group == global_batch else group)
  if group >= per_device:
    devices_per_group = group // per_device
    return BatchNormGrouping(axis_name=axis_name,
                             devices_per_group=0 if devices_per_group == num_devices else devices_per_group)
  return BatchNormGrouping(axis_name=axis_name, devices_per_group=1, examples_per_group=group)


def grouping_for_run(bn_sync: str, bn_group_size: int, *, per_device_view: bool, axis_name: str | None,
                     num_devices: int, global_batch: int, process_count: int,
                     automatic_cpu_devices: bool) -> tuple[BatchNormGrouping, str]:
  """The grouping a run's layers apply, and which examples it normalizes over, in words.

  Virtual CPU devices that cnnjax chose by itself (`automatic_cpu_devices`, see
  `cnnjax.parallel.host_devices`) never change what is computed: `local` then
  means each process's own batch, the batch its one CPU device would hold
  without them (ghost groups of batch / processes).
  """
  if bn_sync == "global":
    description = "the whole batch"
  elif bn_sync == "local" and automatic_cpu_devices:
    bn_sync, bn_group_size = "ghost", global_batch // process_count
    description = f"each process's batch of {bn_group_size}, whatever the virtual CPU devices"
  elif bn_sync == "local":
    description = "each device's slice"
  else:
    description = f"groups of {bn_group_size}"
  return grouping(bn_sync, bn_group_size, per_device_view=per_device_view, axis_name=axis_name,
                  num_devices=num_devices, global_batch=global_batch), description
