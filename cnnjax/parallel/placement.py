"""Which devices a run uses: `parallel.strategy=auto` resolved, devices selected, batches checked to divide.

`auto` (the default) stands for `none` on a single device and `jit` over every
device otherwise (across processes too), on as many devices as the batches
divide evenly over (`resolve`). The global batch is split contiguously, device
d of D holding rows [d B/D, (d+1) B/D) of its process's slice (`Layout`).
Across processes (`jax.distributed`), each process feeds only its own slice.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax

AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a global batch is spread: devices, processes and per-device batch."""

  devices: tuple[Any, ...]
  global_batch: int

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def per_device_batch(self) -> int:
    return self.global_batch // self.num_devices

  @property
  def local_devices(self) -> tuple[Any, ...]:
    return tuple(d for d in self.devices if d.process_index == jax.process_index())


@dataclasses.dataclass(frozen=True)
class Resolved:
  """What `auto` (or an explicit choice) comes to: the strategy and the devices it runs on."""

  strategy: str
  devices: tuple[Any, ...]
  available: int  # devices present (over every process)
  automatic: bool  # whether `auto` chose the strategy


def resolve(strategy: str, num_devices: int, batches: Sequence[int],
            devices: Sequence[Any] | None = None) -> Resolved:
  """The strategy and devices of a run. `auto` takes `none` on one device, else `jit` on the most
  devices (the same number from every process) that every batch in `batches` divides evenly over."""
  available = tuple(devices) if devices is not None else tuple(jax.devices())
  if strategy != AUTO:
    return Resolved(strategy, select_devices(strategy, num_devices, available), len(available), False)
  if len(available) == 1:
    return Resolved("none", available, 1, True)
  if num_devices:
    return Resolved("jit", select_devices("jit", num_devices, available), len(available), True)
  processes = len({d.process_index for d in available})
  per_process = min(sum(d.process_index == p for d in available) for p in {d.process_index for d in available})
  count = next(processes * k for k in range(per_process, 0, -1)
               if all(batch % (processes * k) == 0 for batch in batches))
  if count == 1:
    return Resolved("none", select_devices("none", 0, available), len(available), True)
  return Resolved("jit", select_devices("jit", count, available), len(available), True)


def select_devices(strategy: str, num_devices: int, devices: Sequence[Any] | None = None) -> tuple[Any, ...]:
  """The devices a run uses: `num_devices` of `devices` (default: all), one for 'none'.

  With several processes, every process must feed its slice of each batch to
  devices of its own, so the selection takes the same number of devices from
  each process, and 'none' (one device of one process) is refused: each
  process would silently train and evaluate on its own slice only.
  """
  available = tuple(devices) if devices is not None else tuple(jax.devices())
  processes = sorted({d.process_index for d in available})
  if strategy == "none":
    if len(processes) > 1:
      raise ValueError(f"parallel.strategy=none trains on one device of one process, but this run has "
                       f"{len(processes)} processes, which would each train on their own slice of the batch only; "
                       "use parallel.strategy=jit (or pmap, shard_map) to use every process's devices")
    local = [d for d in available if d.process_index == jax.process_index()]
    return (local[0],)
  count = num_devices or len(available)
  if count > len(available):
    raise ValueError(f"parallel.num_devices={count} but only {len(available)} devices are available; "
                     f"set parallel.num_devices to at most {len(available)}")
  if len(processes) == 1:
    return available[:count]
  per_process = {p: [d for d in available if d.process_index == p] for p in processes}
  fewest = min(len(ds) for ds in per_process.values())
  if count % len(processes) or count // len(processes) > fewest:
    raise ValueError(f"parallel.num_devices={count} does not split evenly over the {len(processes)} processes "
                     f"(each must feed its own devices, and the smallest has {fewest}); use a multiple of "
                     f"{len(processes)} up to {fewest * len(processes)}, or 0 for all")
  return tuple(d for p in processes for d in per_process[p][:count // len(processes)])


def check_divisible(global_batch: int, num_devices: int, process_count: int, what: str = "batch_size") -> None:
  """Raises a one-line error when a global batch does not split evenly."""
  if global_batch % process_count:
    raise ValueError(f"{what}={global_batch} does not divide over {process_count} processes; "
                     f"use a multiple of {process_count}")
  if global_batch % num_devices:
    raise ValueError(f"{what}={global_batch} does not divide over {num_devices} devices; use a multiple "
                     f"of {num_devices} (e.g. {(global_batch // num_devices + 1) * num_devices}) "
                     f"or set parallel.num_devices")
