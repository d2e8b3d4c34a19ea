"""Data-parallel strategies: how a pure step function is compiled and fed across devices.

The step functions in `cnnjax.train.step` are pure functions of (state, batch)
that take the name of the device axis as an argument (None when the step sees
the whole global batch). A strategy compiles such a step for a set of devices
and moves states and batches in and out:

| strategy  | compiled as                                   | the step sees          | gradient / metric reduction |
|-----------|-----------------------------------------------|------------------------|-----------------------------|
| none      | `jax.jit` on one device                        | the global batch       | none needed                 |
| pmap      | `jax.pmap(axis_name='batch')`                  | one device's slice     | `lax.pmean` over 'batch'    |
| shard_map | `jax.jit(jax.shard_map(...))` on a 1-D mesh    | one device's slice     | `lax.pmean` over 'batch'    |
| jit       | `jax.jit` with NamedSharding, batch sharded    | the global batch       | inserted by XLA             |

`auto` (the default) stands for `none` on a single device and `jit` over every
device otherwise (across processes too), on as many devices as the batches
divide evenly over (`resolve`).

States are replicated on every device; the global batch is split contiguously,
device d of D holding rows [d B/D, (d+1) B/D) of its process's slice. Across
processes (`jax.distributed`), each process feeds only its own slice.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AUTO = "auto"
STRATEGIES = (AUTO, "none", "pmap", "shard_map", "jit")
BATCH_AXIS = "batch"

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a global batch is spread: devices, processes and per-device batch."""

  strategy: str
  devices: tuple[Any, ...]
  global_batch: int

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def per_device_batch(self) -> int:
    return self.global_batch // self.num_devices

  @property
  def per_device_view(self) -> bool:
    """Whether the step sees one device's slice (and collectives on `axis_name`)."""
    return self.strategy in ("pmap", "shard_map")

  @property
  def axis_name(self) -> str | None:
    return BATCH_AXIS if self.per_device_view else None

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


class Strategy:
  """Compiles pure steps for a layout and moves states and batches to and from devices."""

  def __init__(self, layout: Layout):
    self.layout = layout
    if layout.strategy not in STRATEGIES:
      raise ValueError(f"unknown strategy {layout.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    self.mesh = Mesh(np.asarray(layout.devices), (BATCH_AXIS,),
                     axis_types=(jax.sharding.AxisType.Auto,))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(BATCH_AXIS))
    # pmap takes arrays with a leading axis over the devices, one row per device.
    self._stacked = self.batch_sharding

  @property
  def name(self) -> str:
    return self.layout.strategy

  @property
  def axis_name(self) -> str | None:
    return self.layout.axis_name

  # -- compiling ---------------------------------------------------------------------------

  def compile(self, step: Callable[..., Any], *, donate_state: bool, returns_state: bool) -> Callable[..., Any]:
    """Compiles `step(state, batch)` for the layout.

    `step` returns `(state, outputs)` when `returns_state`, else `outputs`; its
    outputs must already be reduced over the device axis (`self.axis_name`, which
    the caller binds into `step`), so they come back replicated.
    """
    donate = (0,) if donate_state else ()
    name = self.layout.strategy
    if name == "pmap":
      return jax.pmap(step, axis_name=BATCH_AXIS, devices=self.layout.devices, donate_argnums=donate)
    out_specs = (P(), P()) if returns_state else P()
    if name == "shard_map":
      # check_vma=False: gradients of the replicated parameters stay per-device, as under pmap,
      # and the step reduces them with its own explicit pmean (with checking on, JAX would
      # already sum them across devices when differentiating, and the pmean would be wrong).
      mapped = jax.shard_map(step, mesh=self.mesh, in_specs=(P(), P(BATCH_AXIS)), out_specs=out_specs,
                             check_vma=False)
      return jax.jit(mapped, donate_argnums=donate)
    if name == "jit":
      out_shardings = (self.replicated, self.replicated) if returns_state else self.replicated
      return jax.jit(step, in_shardings=(self.replicated, self.batch_sharding),
                     out_shardings=out_shardings, donate_argnums=donate)
    return jax.jit(step, donate_argnums=donate)

  # -- moving data -------------------------------------------------------------------------

  def put_state(self, host_state: PyTree) -> PyTree:
    """Replicates a host state (NumPy or single-device arrays) onto the layout's devices."""
    if self.layout.strategy == "pmap":
      count = len(self.layout.local_devices)
      return jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(
              self._stacked, np.broadcast_to(np.asarray(x), (count,) + np.shape(x))), host_state)
    if self.layout.strategy == "none":
      return jax.device_put(host_state, self.layout.devices[0])
    return jax.tree.map(lambda x: _make_replicated(np.asarray(x), self.replicated), host_state)

  def get_state(self, state: PyTree) -> PyTree:
    """The state as host NumPy arrays, read from this process's first replica.

    Every step keeps the replicas identical (gradients and BatchNorm statistics
    are reduced before they are applied), so any replica is the state.
    """
    return jax.tree.map(self._first_replica, state)

  def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Places this process's slice of a global batch on its devices."""
    if self.layout.strategy == "pmap":
      count = len(self.layout.local_devices)
      return {k: jax.make_array_from_process_local_data(self._stacked, v.reshape((count, -1) + v.shape[1:]))
              for k, v in batch.items()}
    if self.layout.strategy == "none":
      return jax.device_put(batch, self.layout.devices[0])
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()}

  def get_outputs(self, outputs: PyTree) -> PyTree:
    """Step outputs (already reduced across devices) as host NumPy values."""
    return jax.tree.map(self._first_replica, outputs)

  def _first_replica(self, x: Any) -> np.ndarray:
    if not isinstance(x, jax.Array):
      return np.asarray(x)
    data = np.asarray(x.addressable_shards[0].data)
    # Under pmap every array carries a leading device axis; a shard is one device's copy.
    return data[0] if self.layout.strategy == "pmap" else data


def _make_replicated(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
