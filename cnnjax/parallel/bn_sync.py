"""Which examples each BatchNorm layer normalizes over: `model.bn_sync` for every strategy.

The contract (the same numbers on every strategy and device count):

* `global`: statistics over the whole global batch.
* `local`: statistics over each device's own slice of the batch.
* `ghost`: statistics over fixed groups of `model.bn_group_size` consecutive
  examples of the global batch, whatever the number of devices.

The mechanism differs by strategy, because a step sees either the global batch
(`none`, `jit`) or one device's slice with a named device axis (`pmap`,
`shard_map`):

| bn_sync | none / jit (global view)                | pmap / shard_map (per-device view, axis 'batch')                 |
|---------|-----------------------------------------|------------------------------------------------------------------|
| global  | plain batch statistics; under jit XLA   | `all_gather` each device's moments over the device axis and      |
|         | all-reduces them across devices          | combine them exactly                                             |
| local   | reshape to (devices, per-device batch)   | no collective for the statistics                                  |
|         | and reduce within each row               |                                                                  |
| ghost g | reshape to (B / g, g) and reduce each    | g <= per-device batch: reshape the slice into groups of g;        |
|         | group (XLA communicates when a group     | g > per-device batch: `all_gather` the moments and combine them   |
|         | spans devices)                           | over consecutive sub-groups of g / per-device devices             |

Moments are taken about each group's first example and combined exactly
(`cnnjax.nn.norm`), so every mode keeps float32 precision however large a
channel's mean is against its spread.

Running averages are always updated from the mean over all groups and all
devices (a `pmean` under pmap/shard_map when groups differ), so replicas hold
identical running statistics after every step.
"""

from __future__ import annotations

import dataclasses

BN_SYNC_MODES = ("global", "local", "ghost")


@dataclasses.dataclass(frozen=True)
class BatchNormGrouping:
  """The `cnnjax.nn.BatchNorm` fields that implement a bn_sync mode on one strategy."""

  axis_name: str | None = None
  devices_per_group: int = 0
  examples_per_group: int = 0


def batchnorm_grouping(bn_sync: str, bn_group_size: int, *, per_device_view: bool,
                       axis_name: str | None, num_devices: int, global_batch: int) -> BatchNormGrouping:
  """Translates `bn_sync` into BatchNorm fields for a strategy.

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
