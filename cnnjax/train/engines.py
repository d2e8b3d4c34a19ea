"""Engines: how the training loop places and steps one run, or a vectorized population of runs.

The loop (`cnnjax.train.loop`) drives a list of members, each with its own
workdir, data stream, checkpoints and metrics. An engine turns the members'
host states and batches into device arrays, steps them, and hands back
per-member host values:

* `SingleEngine`: one member, stepped by its parallel strategy (none, pmap,
  shard_map, jit).
* `PopulationEngine`: M members that differ only in values that need no
  recompilation (learning rate, weight decay, label smoothing, seed), stacked on a
  leading member axis and trained by one compiled step, `jax.vmap` over members,
  with the member axis sharded over devices (`jax.shard_map`: each device steps
  its own block of members, with no communication). The member axis is never a
  BatchNorm axis: the step is vmapped with no axis name, so each member's
  BatchNorm normalizes over that member's own batch only.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cnnjax import data as data_lib
from cnnjax.train.step import eval_step, train_step

MEMBER_AXIS = "member"
PyTree = Any


def device_part(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The keys of a host batch that go to the devices."""
  return {k: v for k, v in batch.items() if k not in data_lib.HOST_ONLY_KEYS}


class SingleEngine:
  """One run on its parallel strategy."""

  def __init__(self, exp: Any):
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

  def put_batch(self, batches: Sequence[dict[str, np.ndarray]]) -> PyTree:
    return self.strategy.put_batch(device_part(batches[0]))

  def outputs(self, device_outputs: PyTree) -> list[dict[str, float]]:
    return [{k: host_value(v) for k, v in self.strategy.get_outputs(device_outputs).items()}]

  def compile_train_step(self, state: PyTree, batch: PyTree) -> Any:
    return self.exp.train_step_fn().lower(state, batch).compile()

  def eval_sums(self, state: PyTree, eval_fn: Any) -> list[dict[str, float]]:
    totals = _zero_sums()
    for batch in self.exp.eval_batches():
      sums = self.outputs(eval_fn(state, self.strategy.put_batch(device_part(batch))))[0]
      _accumulate(totals, sums)
    return [totals]

  def eval_step_fn(self) -> Any:
    return self.exp.eval_step_fn()


class PopulationEngine:
  """M runs vmapped over a leading member axis, sharded over devices."""

  def __init__(self, experiments: Sequence[Any], devices: Sequence[Any] | None = None):
    self.experiments = list(experiments)
    base = self.experiments[0]
    self.exp = base
    self.num_members = len(self.experiments)
    self.global_batch = base.config.batch_size
    available = list(devices) if devices is not None else jax.local_devices()
    count = members_device_count(self.num_members, len(available))
    self.devices = tuple(available[:count])
    self.num_devices = count
    self.strategy_name = "vectorized"
    mesh = Mesh(np.asarray(self.devices), (MEMBER_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
    self.member_sharding = NamedSharding(mesh, P(MEMBER_AXIS))
    self.replicated = NamedSharding(mesh, P())
    self.label_smoothing = jax.device_put(
        np.asarray([e.config.label_smoothing for e in self.experiments], np.float32), self.member_sharding)

  def put_state(self, host_states: Sequence[PyTree]) -> PyTree:
    stacked = jax.tree.map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *host_states)
    return jax.device_put(stacked, self.member_sharding)

  def get_states(self, state: PyTree) -> list[PyTree]:
    host = jax.device_get(state)
    return [jax.tree.map(lambda x, i=i: np.asarray(x[i]), host) for i in range(self.num_members)]

  def put_batch(self, batches: Sequence[dict[str, np.ndarray]]) -> PyTree:
    parts = [device_part(b) for b in batches]
    return jax.device_put({k: np.stack([p[k] for p in parts]) for k in parts[0]}, self.member_sharding)

  def outputs(self, device_outputs: PyTree) -> list[dict[str, float]]:
    host = jax.device_get(device_outputs)
    return [{k: host_value(v[i]) for k, v in host.items()} for i in range(self.num_members)]

  def compile_train_step(self, state: PyTree, batch: PyTree) -> Any:
    base = self.exp

    def member_step(member_state, member_batch, label_smoothing):
      return train_step(member_state, member_batch, model=base.model, tx=base.tx,
                        schedule_shape=base.schedule_shape, label_smoothing=label_smoothing, axis_name=None)

    # shard_map makes each device step only its own block of members. Left to the SPMD partitioner,
    # the vmapped convolutions (grouped over members) were not split by member: every device computed
    # every member, measured 14x slower than the same members one after another on 8 CPU devices.
    mesh = self.member_sharding.mesh
    stepped = jax.jit(jax.shard_map(jax.vmap(member_step), mesh=mesh, in_specs=(P(MEMBER_AXIS),) * 3,
                                    out_specs=(P(MEMBER_AXIS), P(MEMBER_AXIS))), donate_argnums=(0,))
    compiled = stepped.lower(state, batch, self.label_smoothing).compile()
    return lambda s, b: compiled(s, b, self.label_smoothing)

  def eval_step_fn(self) -> Any:
    base = self.exp
    member_eval = functools.partial(eval_step, model=base.model, axis_name=None)
    # Every member sees the same eval batch; each device evaluates its own members (as in training).
    return jax.jit(jax.shard_map(jax.vmap(member_eval, in_axes=(0, None)), mesh=self.member_sharding.mesh,
                                 in_specs=(P(MEMBER_AXIS), P()), out_specs=P(MEMBER_AXIS)))

  def eval_sums(self, state: PyTree, eval_fn: Any) -> list[dict[str, float]]:
    totals = [_zero_sums() for _ in range(self.num_members)]
    for batch in self.exp.eval_batches():
      per_member = self.outputs(eval_fn(state, jax.device_put(device_part(batch), self.replicated)))
      for total, sums in zip(totals, per_member):
        _accumulate(total, sums)
    return totals


def members_device_count(num_members: int, available: int) -> int:
  """The devices a population spreads over: the largest count that divides the members evenly."""
  return max(d for d in range(1, min(available, num_members) + 1) if num_members % d == 0)


def _zero_sums() -> dict[str, float]:
  return {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "examples": 0.0}


def _accumulate(totals: dict[str, Any], sums: dict[str, Any]) -> None:
  """Adds one batch's sums (floats, and per-class arrays for segmentation) into `totals`."""
  for key, value in sums.items():
    totals[key] = totals.get(key, 0.0) + value


def eval_result(totals: dict[str, Any]) -> dict[str, float]:
  """Loss and accuracy from summed eval outputs; for segmentation also the mean IoU."""
  count = max(totals["count"], 1.0)
  result = {"loss": totals["loss_sum"] / count, "accuracy": totals["correct"] / count,
            "examples": int(totals["examples"])}
  if "class_union" in totals:
    result["mean_iou"] = mean_iou(totals["class_intersection"], totals["class_union"])
  return result


def mean_iou(intersection: np.ndarray, union: np.ndarray) -> float:
  """The mean over classes of intersection / union, leaving out classes absent from both the truth and the
  predictions (union 0), whose IoU is undefined."""
  present = np.asarray(union) > 0
  return float(np.mean(np.asarray(intersection)[present] / np.asarray(union)[present])) if present.any() else 0.0


def host_value(value: Any) -> float | np.ndarray:
  """A step output on the host: a float, or a float64 array for per-class sums."""
  array = np.asarray(value)
  return float(array) if array.ndim == 0 else array.astype(np.float64)
