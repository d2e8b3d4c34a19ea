"""Splits placed on the devices: the host keeps the data plan, the devices do the data work.

When a split's decoded arrays fit `data.device_megabytes` on every device, they
are placed once on every device as they are stored (uint8 images, integer
labels or masks). Each step the host sends only the data plan of
`cnnjax.data.pipeline.TrainPlan`: this process's examples' indices in the split
and their augmentation draws (`Preprocess.draws`), a few bytes per example and
exactly what the host path computes for the same step. The compiled step
gathers the examples and finishes them with the device stage every batch goes
through (`Preprocess.finish`), so a batch is the same whatever the placement,
and the data state of a run is still its step: a run resumes with either.

The split is replicated, not sharded: each device gathers its rows of a batch
from its own copy, where a sharded split would exchange every batch's examples
between devices. Plans go to the devices a block of steps at a time, stacked
on axis 1 (axis 0 holds the rows, which the strategies split over devices): the
step reads its own plan from the block by its step counter, so that between
blocks a dispatch moves nothing, and one dispatch may run several steps in a
loop on the devices (`cnnjax.train.step.advance`).

`data.placement` chooses: `device`, `host`, or `auto` (the default), which
places a split on the devices when the preprocessing can run there (fixed-size
arrays held in memory, no host-only crop) and it fits the budget.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.data.pipeline import ProcessSlice, TrainPlan, eval_examples, num_eval_batches
from cnnjax.data.preprocess import Preprocess
from cnnjax.data.sources import Dataset, RandomAccessSource
from cnnjax.errors import ConfigError

PLACEMENTS = ("auto", "host", "device")
# The plan's key for the examples' indices in the resident split (a host batch's `index` stays on the host).
SOURCE_INDEX = "source_index"
MEGABYTE = 2 ** 20


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where the train and eval splits live, and why."""

  train_on_device: bool
  eval_on_device: bool
  reason: str

  def describe(self) -> str:
    where = {(True, True): "device (train and eval)", (True, False): "device (train; eval on the host)",
             (False, False): "host"}[(self.train_on_device, self.eval_on_device)]
    return f"{where}: {self.reason}"


def split_arrays(source: RandomAccessSource) -> dict[str, np.ndarray] | None:
  """A split as the arrays that go to the devices, {'input', 'label'}: None unless it is held in memory as
  fixed-size arrays (the digits, MNIST, CIFAR, the shapes sets, npz files)."""
  columns = getattr(source, "columns", None)
  if columns is None or not isinstance(columns.get("image"), np.ndarray):
    return None
  labels = columns["mask"] if "mask" in columns else columns.get("label")
  if not isinstance(labels, np.ndarray):
    return None
  # Labels as the host path hands them to the step (int32); masks keep their uint8 (the step casts them).
  return {"input": columns["image"], "label": labels if labels.dtype == np.uint8 else labels.astype(np.int32)}


def nbytes(arrays: dict[str, np.ndarray]) -> int:
  return sum(array.nbytes for array in arrays.values())


def host_only_reason(dataset: Dataset, preprocess: Preprocess) -> str | None:
  """Why this run's preprocessing must run on the host, or None when the devices can run all of it."""
  if preprocess.random_resized_crop:
    return "data.random_resized_crop crops each decoded image on the host"
  if preprocess.task == "segmentation" and preprocess.image_size and tuple(dataset.image_shape[:2]) != (
      preprocess.image_size,) * 2:
    return "segmentation masks are resized on the host"
  if split_arrays(dataset.train) is None:
    return f"{dataset.name}'s training split is not held in memory as fixed-size arrays"
  return None


def choose(placement: str, budget_megabytes: int, dataset: Dataset, preprocess: Preprocess, *,
           copies_per_memory: int = 1) -> Placement:
  """Where this run's splits live; ConfigError when `placement=device` cannot be honoured.

  The budget is per device memory: `copies_per_memory` devices sharing one memory (the CPU devices of a
  process, which all live in its RAM) hold that many copies against it.
  """
  if placement == "host":
    return Placement(False, False, "data.placement=host")
  why_not = host_only_reason(dataset, preprocess)
  if why_not is not None:
    if placement == "device":
      raise ConfigError(f"data.placement=device, but {why_not}; use data.placement=auto or host")
    return Placement(False, False, why_not)
  budget = budget_megabytes * MEGABYTE
  train_bytes = nbytes(split_arrays(dataset.train)) * copies_per_memory
  copies = f" ({copies_per_memory} devices sharing one memory)" if copies_per_memory > 1 else ""
  if train_bytes > budget:
    if placement == "device":
      raise ConfigError(f"data.placement=device, but {dataset.name}'s training split takes "
                        f"{train_bytes / MEGABYTE:.1f} MB on every device memory{copies}, over "
                        f"data.device_megabytes={budget_megabytes}; raise data.device_megabytes, or use "
                        "data.placement=auto or host")
    return Placement(False, False, f"the training split, {train_bytes / MEGABYTE:.1f} MB{copies}, exceeds "
                                   f"data.device_megabytes={budget_megabytes}")
  eval_arrays = split_arrays(dataset.eval)
  eval_bytes = nbytes(eval_arrays) * copies_per_memory if eval_arrays is not None else 0
  eval_fits = eval_arrays is not None and train_bytes + eval_bytes <= budget
  total = train_bytes + (eval_bytes if eval_fits else 0)
  return Placement(True, eval_fits, f"{total / MEGABYTE:.1f} MB on every device memory{copies}, within "
                                    f"data.device_megabytes={budget_megabytes}")


class TrainPlans:
  """The plans of training steps for a resident split, computed a block of steps at a time."""

  def __init__(self, num_examples: int, preprocess: Preprocess, *, seed: int, batch: ProcessSlice):
    self._plan = TrainPlan(num_examples, seed, batch)
    self._preprocess = preprocess

  def block(self, first: int, count: int, pad_to: int) -> dict[str, np.ndarray]:
    """The plans of steps [first, first + count), stacked on axis 1 and padded to `pad_to` steps with
    copies of the last, and `first_step` (rows,): `first` (`cnnjax.train.step.advance` reads the plan of
    step s at s - first)."""
    steps = np.arange(first, first + count)
    positions, indices = zip(*(self._plan.examples(int(step)) for step in steps))
    positions, indices = np.stack(positions, axis=1), np.stack(indices, axis=1)  # (rows, count)
    plans = {SOURCE_INDEX: indices.astype(np.int32)}
    if self._preprocess.augment.enabled:
      draws = self._preprocess.draws(positions.reshape(-1))
      plans["draws"] = draws.reshape(positions.shape + draws.shape[1:])
    padding = pad_to - count
    plans = {key: np.concatenate([value, np.repeat(value[:, -1:], padding, axis=1)], axis=1) if padding else value
             for key, value in plans.items()}
    return {**plans, "first_step": np.full(len(indices), first, np.int32)}

  def close(self) -> None:
    """Nothing runs in the background: plans are computed when asked for."""


def eval_plans(num_examples: int, batch: ProcessSlice) -> list[dict[str, np.ndarray]]:
  """This process's plan of every eval batch of a resident split: indices, and the mask of the padding."""
  plans = []
  for batch_index in range(num_eval_batches(num_examples, batch.global_batch)):
    indices, valid = eval_examples(batch_index, num_examples, batch)
    plans.append({SOURCE_INDEX: indices.astype(np.int32), "mask": valid.astype(np.float32)})
  return plans


def per_example(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn` of batches, mapped over the examples with jax.vmap: each gather then indexes within one
  example, so a batch sharded over devices is augmented where it lies."""
  return jax.vmap(lambda *arrays: fn(*(array[None] for array in arrays))[0])


def model_batch(preprocess: Preprocess, batch: dict[str, Any], data: dict[str, Any] | None
                ) -> tuple[jax.Array, jax.Array]:
  """Model inputs and labels on the devices, from a host-stage batch or from a plan and the resident split."""
  if SOURCE_INDEX in batch:
    index = batch[SOURCE_INDEX]
    batch = {**batch, "input": data["input"][index], "label": data["label"][index]}
  return preprocess.finish(batch, xp=jnp, per_example=per_example)
