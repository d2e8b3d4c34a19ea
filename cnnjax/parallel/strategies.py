"""Data-parallel strategies: how a pure step is compiled and fed across devices, one object per strategy.

The step functions in `cnnjax.train.step` are pure functions of (state, batch)
that take the name of the device axis as an argument (None when the step sees
the whole global batch). A strategy compiles such a step for its devices and
moves states and batches in and out. `REGISTRY` maps each name to its class;
what each compiles and what its step sees is tabled once, in docs/parallel.md.

`auto` (`cnnjax.parallel.placement.resolve`) picks `none` or `jit`. States are
replicated on every device; the global batch is split contiguously across
devices. The `vectorized` strategy trains M runs that differ only in values
that need no recompilation, stacked on a leading member axis: one compiled
step, `jax.vmap` over members, with the member axis sharded over devices (each
device steps its own block of members, with no communication). The member axis
is never a BatchNorm axis: the step is vmapped with no axis name, so each
member's BatchNorm normalizes over that member's own batch only.

The training loop drives runs through an `Engine` (`SingleEngine` for one run
on its strategy, `PopulationEngine` for a vectorized population): it hands over
host states and batches as one list per member, and gets per-member host values
back. An engine reads a run only through the `Run` protocol: its config, its
strategy and its pure steps with their hyperparameters bound.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, ClassVar, Iterable, Protocol, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cnnjax import data as data_lib
from cnnjax.parallel.placement import AUTO, Layout

BATCH_AXIS = "batch"
MEMBER_AXIS = "member"
# Eval batches dispatched ahead of the one whose sums the host reads.
EVAL_BATCHES_IN_FLIGHT = 2

PyTree = Any
Batch = dict[str, np.ndarray]
# step(state, batch) -> (state, metrics) and step(state, batch) -> sums, hyperparameters bound.
TrainStep = Callable[..., tuple[PyTree, dict[str, Any]]]
EvalStep = Callable[..., dict[str, Any]]


class Strategy:
  """Compiles pure steps for a layout and moves states and batches to and from devices.

  The defaults here are those of a mesh with replicated states and a sharded
  batch (`jit`, `shard_map`); each strategy overrides what it does differently.
  """

  name: ClassVar[str]
  # Whether the step sees one device's slice, and reduces over `axis_name` with explicit collectives.
  per_device_view: ClassVar[bool] = False
  mesh_axis: ClassVar[str] = BATCH_AXIS

  def __init__(self, layout: Layout):
    self.layout = layout
    self.mesh = Mesh(np.asarray(layout.devices), (self.mesh_axis,), axis_types=(jax.sharding.AxisType.Auto,))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(self.mesh_axis))

  @property
  def axis_name(self) -> str | None:
    """The device axis the step reduces over (bound into it by the caller), or None."""
    return BATCH_AXIS if self.per_device_view else None

  # -- compiling ---------------------------------------------------------------------------

  def compile_train(self, step: TrainStep, *, with_data: bool = False) -> Callable[..., Any]:
    """`step(state, batch) -> (state, metrics)` compiled for the layout, the state donated.

    Its outputs must already be reduced over the device axis (`self.axis_name`,
    which the caller binds into `step`), so they come back replicated. With
    `with_data`, the step takes a third argument: arrays placed on every device
    once (`put_data`, a split resident on the devices), read, never donated.
    """
    return self._compile(step, donate=(0,), returns_state=True, with_data=with_data)

  def compile_eval(self, step: EvalStep, *, with_data: bool = False) -> Callable[..., Any]:
    """`step(state, batch) -> outputs` compiled for the layout, reading the state without donating it
    (and, `with_data`, the resident arrays as a third argument)."""
    return self._compile(step, donate=(), returns_state=False, with_data=with_data)

  def _compile(self, step: Callable[..., Any], donate: tuple[int, ...], returns_state: bool,
               with_data: bool) -> Callable[..., Any]:
    raise NotImplementedError

  # -- moving data -------------------------------------------------------------------------

  def put_state(self, host_state: PyTree) -> PyTree:
    """Replicates a host state (NumPy or single-device arrays) onto the layout's devices."""
    return jax.tree.map(lambda x: _make_replicated(np.asarray(x), self.replicated), host_state)

  def get_state(self, state: PyTree) -> PyTree:
    """The state as host NumPy arrays, read from this process's first replica.

    Every step keeps the replicas identical (gradients and BatchNorm statistics
    are reduced before they are applied), so any replica is the state.
    """
    return jax.tree.map(self._first_replica, state)

  def put_data(self, arrays: PyTree) -> PyTree:
    """Places host arrays on every device of the layout, whole (a split resident on the devices)."""
    return self.put_state(arrays)

  def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Places this process's slice of a global batch on its devices."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()}

  def put_eval_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Places an eval batch: split over the devices like a training batch."""
    return self.put_batch(batch)

  def get_outputs(self, outputs: PyTree) -> PyTree:
    """Step outputs (already reduced across devices) as host NumPy values."""
    return jax.tree.map(self._first_replica, outputs)

  def _first_replica(self, x: Any) -> np.ndarray:
    if not isinstance(x, jax.Array):
      return np.asarray(x)
    return np.asarray(x.addressable_shards[0].data)


class OneDevice(Strategy):
  """`none`: plain jit on one device, which sees the global batch."""

  name = "none"

  def _compile(self, step, donate, returns_state, with_data):
    return jax.jit(step, donate_argnums=donate)

  def put_state(self, host_state):
    return jax.device_put(host_state, self.layout.devices[0])

  def put_batch(self, batch):
    return jax.device_put(batch, self.layout.devices[0])


class Pmap(Strategy):
  """`pmap`: one program per device over axis 'batch', arrays with a leading axis of one row per device."""

  name = "pmap"
  per_device_view = True

  def _compile(self, step, donate, returns_state, with_data):
    # Resident data carries a leading device axis like the state (`put_data` is `put_state`).
    return jax.pmap(step, axis_name=BATCH_AXIS, devices=self.layout.devices, donate_argnums=donate)

  def put_state(self, host_state):
    count = len(self.layout.local_devices)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            self.batch_sharding, np.broadcast_to(np.asarray(x), (count,) + np.shape(x))), host_state)

  def put_batch(self, batch):
    count = len(self.layout.local_devices)
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v.reshape((count, -1) + v.shape[1:]))
            for k, v in batch.items()}

  def _first_replica(self, x):
    # Every array carries a leading device axis; a shard is one device's copy.
    return super()._first_replica(x)[0] if isinstance(x, jax.Array) else np.asarray(x)


class ShardMap(Strategy):
  """`shard_map`: one program over a 1-D mesh, each device seeing its slice as under pmap."""

  name = "shard_map"
  per_device_view = True

  def _compile(self, step, donate, returns_state, with_data):
    out_specs = (P(), P()) if returns_state else P()
    # check_vma=False: gradients of the replicated parameters stay per-device, as under pmap,
    # and the step reduces them with its own explicit pmean (with checking on, JAX would
    # already sum them across devices when differentiating, and the pmean would be wrong).
    in_specs = (P(), P(BATCH_AXIS)) + ((P(),) if with_data else ())
    mapped = jax.shard_map(step, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    return jax.jit(mapped, donate_argnums=donate)


class Jit(Strategy):
  """`jit`: the global-batch step with the batch sharded and the state replicated; XLA inserts the
  collectives."""

  name = "jit"

  def _compile(self, step, donate, returns_state, with_data):
    out_shardings = (self.replicated, self.replicated) if returns_state else self.replicated
    in_shardings = (self.replicated, self.batch_sharding) + ((self.replicated,) if with_data else ())
    return jax.jit(step, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate)


class Vectorized(Strategy):
  """`vectorized`: members stacked on a leading axis, vmapped, the member axis sharded over the devices.

  States and batches hold every member (leading axis M); the train step takes,
  beside them, the values that differ between members (a dict of (M,) arrays,
  passed to the step as keyword arguments). An eval batch is the same for every
  member, so it is replicated.
  """

  name = "vectorized"
  mesh_axis = MEMBER_AXIS

  def compile_train(self, step, *, with_data=False):
    """`step(state, batch, [data,] **member_values)`; the compiled function takes
    (state, batch, member_values[, data]), the member values a dict of (M,) arrays."""
    def member_step(member_state, member_batch, member_values, *data):
      return step(member_state, member_batch, *data, **member_values)

    # shard_map makes each device step only its own block of members. Left to the SPMD partitioner,
    # the vmapped convolutions (grouped over members) were not split by member: every device computed
    # every member, far slower than the same members one after another (docs/performance.md).
    # Resident data is one copy for every member, replicated.
    shared = (None,) if with_data else ()
    return jax.jit(jax.shard_map(jax.vmap(member_step, in_axes=(0, 0, 0) + shared), mesh=self.mesh,
                                 in_specs=(P(MEMBER_AXIS),) * 3 + ((P(),) if with_data else ()),
                                 out_specs=(P(MEMBER_AXIS), P(MEMBER_AXIS))), donate_argnums=(0,))

  def compile_eval(self, step, *, with_data=False):
    # Every member sees the same eval batch; each device evaluates its own members (as in training).
    shared = (None,) if with_data else ()
    return jax.jit(jax.shard_map(jax.vmap(step, in_axes=(0, None) + shared), mesh=self.mesh,
                                 in_specs=(P(MEMBER_AXIS), P()) + ((P(),) if with_data else ()),
                                 out_specs=P(MEMBER_AXIS)))

  def put_data(self, arrays):
    return jax.device_put(arrays, self.replicated)

  def put_state(self, host_state):
    return jax.device_put(host_state, self.batch_sharding)

  def get_state(self, state):
    return jax.device_get(state)

  def put_batch(self, batch):
    return jax.device_put(batch, self.batch_sharding)

  def put_eval_batch(self, batch):
    return jax.device_put(batch, self.replicated)

  def get_outputs(self, outputs):
    return jax.device_get(outputs)


REGISTRY: dict[str, type[Strategy]] = {cls.name: cls for cls in (OneDevice, Pmap, ShardMap, Jit, Vectorized)}
# What `parallel.strategy` may say: a population's strategy is chosen by a sweep, not by a config.
STRATEGIES = (AUTO,) + tuple(name for name in REGISTRY if name != Vectorized.name)


def make(name: str, layout: Layout) -> Strategy:
  """The strategy called `name` on `layout`."""
  if name not in REGISTRY:
    raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
  return REGISTRY[name](layout)


def members_device_count(num_members: int, available: int) -> int:
  """The devices a population spreads over: the largest count that divides the members evenly."""
  return max(d for d in range(1, min(available, num_members) + 1) if num_members % d == 0)


def _make_replicated(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


# -- engines: the training loop's members on a strategy ------------------------------------------

class Run(Protocol):
  """What an engine reads of a run (`cnnjax.train.Experiment` is one): data only, no calls back.

  `train_step` and `eval_step` are the pure steps with the run's model,
  optimizer, loss settings and the strategy's device axis bound.
  """

  config: ml_collections.ConfigDict
  strategy: Strategy
  train_step: TrainStep
  eval_step: EvalStep


class Engine(Protocol):
  """How the training loop (`cnnjax.train.loop.train_members`) places and steps its members.

  Every method takes or returns one entry per member, in the members' order,
  except the resident data, which is one copy for every member.
  """

  strategy_name: str
  num_devices: int
  num_members: int
  global_batch: int  # examples per step of one member

  def put_state(self, host_states: Sequence[PyTree]) -> PyTree: ...

  def get_states(self, state: PyTree) -> list[PyTree]: ...

  def put_batch(self, batches: Sequence[Batch]) -> PyTree: ...

  def put_data(self, arrays: PyTree) -> PyTree:
    """Arrays every member's step reads whole (a split resident on the devices), placed once."""

  def outputs(self, device_outputs: PyTree) -> list[dict[str, Any]]: ...

  def compile_train_step(self, step: TrainStep, state: PyTree, batch: PyTree, data: PyTree
                         ) -> Callable[[PyTree, PyTree], tuple[PyTree, PyTree]]:
    """`step(state, batch, data) -> (state, outputs)` compiled ahead of time for these device arrays,
    `data` bound."""

  def eval_step_fn(self, data: PyTree = None) -> Callable[[PyTree, PyTree], PyTree]:
    """The eval step compiled, reading `data` (a resident eval split; None when batches come from the
    host)."""

  def eval_sums(self, state: PyTree, eval_fn: Callable[[PyTree, PyTree], PyTree],
                batches: Iterable[Batch]) -> list[dict[str, Any]]:
    """Each member's eval outputs summed over `batches` (host batches, the same for every member)."""


def device_part(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The keys of a host batch that go to the devices."""
  return {k: v for k, v in batch.items() if k not in data_lib.HOST_ONLY_KEYS}


class SingleEngine:
  """One run on its own strategy (none, pmap, shard_map, jit)."""

  def __init__(self, exp: Run):
    self.exp = exp
    self.strategy = exp.strategy
    self.strategy_name = exp.strategy.name
    self.num_devices = exp.strategy.layout.num_devices
    self.num_members = 1
    self.global_batch = exp.config.batch_size

  def put_state(self, host_states: Sequence[PyTree]) -> PyTree:
    return self.strategy.put_state(host_states[0])

  def get_states(self, state: PyTree) -> list[PyTree]:
    return [self.strategy.get_state(state)]

  def put_batch(self, batches: Sequence[Batch]) -> PyTree:
    return self.strategy.put_batch(device_part(batches[0]))

  def put_data(self, arrays: PyTree) -> PyTree:
    return self.strategy.put_data(arrays)

  def outputs(self, device_outputs: PyTree) -> list[dict[str, Any]]:
    return [{k: host_value(v) for k, v in self.strategy.get_outputs(device_outputs).items()}]

  def compile_train_step(self, step: TrainStep, state: PyTree, batch: PyTree, data: PyTree) -> Any:
    compiled = self.strategy.compile_train(step, with_data=True).lower(state, batch, data).compile()
    return lambda s, b: compiled(s, b, data)

  def eval_step_fn(self, data: PyTree = None) -> Any:
    compiled = self.strategy.compile_eval(self.exp.eval_step, with_data=True)
    return lambda s, b: compiled(s, b, {} if data is None else data)

  def eval_sums(self, state, eval_fn, batches):
    return _eval_sums(self, state, eval_fn, batches)


class PopulationEngine:
  """M runs as one `vectorized` strategy: the members' states and batches stacked on a leading axis.

  Members may differ only in values that need no recompilation: the label
  smoothing is passed to the step per member; learning rate and weight decay
  live in each member's optimizer state, the seed in its state and data.
  """

  def __init__(self, experiments: Sequence[Run], devices: Sequence[Any] | None = None):
    self.experiments = list(experiments)
    self.exp = self.experiments[0]
    self.num_members = len(self.experiments)
    self.global_batch = self.exp.config.batch_size
    available = list(devices) if devices is not None else jax.local_devices()
    count = members_device_count(self.num_members, len(available))
    self.strategy = make(Vectorized.name, Layout(tuple(available[:count]), self.global_batch))
    self.strategy_name = self.strategy.name
    self.num_devices = count
    self.member_values = self.strategy.put_batch(
        {"label_smoothing": np.asarray([e.config.label_smoothing for e in self.experiments], np.float32)})

  def put_state(self, host_states: Sequence[PyTree]) -> PyTree:
    return self.strategy.put_state(jax.tree.map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]),
                                                *host_states))

  def get_states(self, state: PyTree) -> list[PyTree]:
    host = self.strategy.get_state(state)
    return [jax.tree.map(lambda x, i=i: np.asarray(x[i]), host) for i in range(self.num_members)]

  def put_batch(self, batches: Sequence[Batch]) -> PyTree:
    parts = [device_part(b) for b in batches]
    return self.strategy.put_batch({k: np.stack([p[k] for p in parts]) for k in parts[0]})

  def put_data(self, arrays: PyTree) -> PyTree:
    return self.strategy.put_data(arrays)

  def outputs(self, device_outputs: PyTree) -> list[dict[str, Any]]:
    host = self.strategy.get_outputs(device_outputs)
    return [{k: host_value(v[i]) for k, v in host.items()} for i in range(self.num_members)]

  def compile_train_step(self, step: TrainStep, state: PyTree, batch: PyTree, data: PyTree) -> Any:
    # The base run's step: the members' models, optimizers and schedules are the same.
    compiled = self.strategy.compile_train(step, with_data=True).lower(
        state, batch, self.member_values, data).compile()
    return lambda s, b: compiled(s, b, self.member_values, data)

  def eval_step_fn(self, data: PyTree = None) -> Any:
    compiled = self.strategy.compile_eval(self.exp.eval_step, with_data=True)
    return lambda s, b: compiled(s, b, {} if data is None else data)

  def eval_sums(self, state, eval_fn, batches):
    return _eval_sums(self, state, eval_fn, batches)


def waits_for_each_program(devices: Sequence[jax.Device]) -> bool:
  """Whether the host waits for each program it dispatches to `devices` before dispatching the next.

  True on several CPU devices: XLA's CPU client gives a queued program's launch a thread of its pool,
  which then waits there for the program before it, so with programs queued the threads that the running
  program's collectives need can all be taken, and its rendezvous never completes (XLA aborts the process
  after its timeout). On one device, or on accelerators, programs queue without limit of ours.
  """
  return len(devices) > 1 and devices[0].platform == "cpu"


def _eval_sums(engine: SingleEngine | PopulationEngine, state: PyTree, eval_fn: Callable[[PyTree, PyTree], PyTree],
               batches: Iterable[Batch]) -> list[dict[str, Any]]:
  totals: list[dict[str, Any]] = [{"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "examples": 0.0}
                                  for _ in range(engine.num_members)]

  def add(sums_of_batch: PyTree) -> None:
    for total, sums in zip(totals, engine.outputs(sums_of_batch)):
      # Floats, and per-class arrays for segmentation, summed in float64 on the host.
      for key, value in sums.items():
        total[key] = total.get(key, 0.0) + value

  # A batch's sums are read only once EVAL_BATCHES_IN_FLIGHT later batches are dispatched, so the devices
  # never wait for the host, and no more batches than that wait on the devices; on several CPU devices each
  # batch is waited for on every device (reading its sums waits only for the device they are read from).
  one_at_a_time = waits_for_each_program(engine.strategy.layout.devices)
  ahead = 0 if one_at_a_time else EVAL_BATCHES_IN_FLIGHT
  in_flight: collections.deque = collections.deque()
  for batch in batches:
    in_flight.append(eval_fn(state, engine.strategy.put_eval_batch(device_part(batch))))
    if one_at_a_time:
      jax.block_until_ready(in_flight[-1])
    if len(in_flight) > ahead:
      add(in_flight.popleft())
  while in_flight:
    add(in_flight.popleft())
  return totals


def host_value(value: Any) -> float | np.ndarray:
  """A step output on the host: a float, or a float64 array for per-class sums."""
  array = np.asarray(value)
  return float(array) if array.ndim == 0 else array.astype(np.float64)
