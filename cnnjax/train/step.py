"""The pure train and eval steps, and `advance`: steps and their metrics as the training loop dispatches them.

Both steps are functions of (state, batch[, data]) only; the model, optimizer,
loss settings, the device stage of preprocessing and the device axis name are
bound with `functools.partial` by the caller. With `axis_name=None` the step
sees the whole global batch (plain jit, sharded jit); with an axis name it sees
one device's slice and reduces gradients, metrics and BatchNorm statistics with
explicit collectives on that axis (pmap, shard_map, vmap). The same function
therefore drops into every parallel strategy.

A batch reaches the step as the host left it (uint8 images and each example's
augmentation draws) or as a plan into a split resident on the devices (`data`);
`model_batch` turns either into model inputs and labels on the devices.

`advance` runs one step, or several in a loop on the devices over a block of
plans, and adds each step's metrics into a log that stays on the devices (`empty_log`):
the loop reads it only where it logs, evaluates or checkpoints, so no step
waits for a value to come back to the host. The log also keeps the first step
whose loss, gradients or parameters were not finite, with its loss and
gradient norm.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from cnnjax.optim import current_learning_rate
from cnnjax.train.state import TrainState

Batch = dict[str, jax.Array]
# (batch, resident data or None) -> (model inputs, labels), on the devices.
ModelBatch = Callable[[Batch, Any], tuple[jax.Array, jax.Array]]
# The training metrics the log sums over its window (their means are what the loop logs).
LOGGED_METRICS = ("loss", "accuracy", "grad_norm", "learning_rate")
# The k of the top-k accuracy that a detailed evaluation reports (`detail_sums`).
TOP_K = 5


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
  """Per-example softmax cross-entropy against (optionally smoothed) one-hot labels."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def _device_index(axis_name: str | None) -> jax.Array:
  return jax.lax.axis_index(axis_name) if axis_name is not None else jnp.zeros((), jnp.int32)


def step_key(base_key: jax.Array, step: jax.Array, axis_name: str | None) -> jax.Array:
  """The key for one step on one device: the run's key with the step, then the device index, folded in.

  Reproducible (a pure function of the run's key, the step and the device) and
  different on every device and at every step.
  """
  return jax.random.fold_in(jax.random.fold_in(base_key, step), _device_index(axis_name))


def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def _pmean(tree: Any, axis_name: str | None) -> Any:
  return jax.lax.pmean(tree, axis_name) if axis_name is not None else tree


def train_step(state: TrainState, batch: Batch, data: Any = None, *, model_batch: ModelBatch, model: nn.Module,
               tx: optax.GradientTransformation, schedule_shape: Callable[[jax.Array], jax.Array],
               label_smoothing: float, axis_name: str | None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on `batch`; returns the new state and metrics averaged over devices.

  Metrics: loss, accuracy, grad_norm, learning_rate, and `finite` (1.0 when the
  loss, the gradient norm and the updated parameters are all finite), which the
  loop checks every step.
  """
  dropout_key = step_key(state.rng, state.step, axis_name)
  inputs, labels = model_batch(batch, data)

  def loss_fn(params):
    logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, inputs,
                                  train=True, mutable=["batch_stats"], rngs={"dropout": dropout_key})
    loss = cross_entropy(logits, labels, label_smoothing).mean()
    return loss, (logits, updates.get("batch_stats", {}))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  # Equal slices per device, so the mean of the per-device means is the global mean.
  grads = _pmean(grads, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  grad_norm = optax.tree.norm(grads)
  metrics = _pmean({"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)},
                   axis_name)
  metrics["grad_norm"] = grad_norm
  metrics["learning_rate"] = current_learning_rate(state.opt_state, schedule_shape, state.step)
  # The new parameters too: finite gradients can still overflow them with a huge learning rate.
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & _all_finite(params)
  metrics["finite"] = finite.astype(jnp.float32)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  return new_state, metrics


def eval_step(state: TrainState, batch: Batch, data: Any = None, *, model_batch: ModelBatch, model: nn.Module,
              axis_name: str | None, detail: bool = False) -> dict[str, jax.Array]:
  """Sums over the batch and devices: loss and correct predictions over `count` labelled
  positions (one per example, or one per pixel for segmentation) of the `examples` real
  examples (mask); for segmentation also each class's intersection and union of predicted and
  true pixels (`class_intersection`, `class_union`), from which the loop reports the mean IoU.
  `detail` adds `detail_sums` (the confusion matrix and top-k hits) to the same computation."""
  inputs, labels = model_batch(batch, data)
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, inputs, train=False)
  # Labels may carry positions (segmentation): every position of a real example counts.
  weights = jnp.broadcast_to(batch["mask"].reshape(batch["mask"].shape + (1,) * (labels.ndim - 1)), labels.shape)
  sums = {"loss_sum": jnp.sum(cross_entropy(logits, labels, 0.0) * weights),
          "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * weights),
          "count": jnp.sum(weights), "examples": jnp.sum(batch["mask"])}
  if labels.ndim > 1:  # positions: segmentation
    classes = logits.shape[-1]
    position_axes = tuple(range(labels.ndim))
    predicted = jax.nn.one_hot(jnp.argmax(logits, -1), classes) * weights[..., None]
    truth = jax.nn.one_hot(labels, classes) * weights[..., None]
    intersection = jnp.sum(predicted * truth, position_axes)
    sums["class_intersection"] = intersection
    sums["class_union"] = jnp.sum(predicted, position_axes) + jnp.sum(truth, position_axes) - intersection
  if detail:
    sums.update(detail_sums(logits, labels, weights))
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return sums


def detail_sums(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
  """Over the weighted positions: `confusion` (true class x predicted class counts) and `top_k_correct`,
  the positions whose label is among the `TOP_K` highest logits (all of them when there are fewer
  classes: `cnnjax.train.scoring` then reports no top-k accuracy)."""
  classes = logits.shape[-1]
  flat_logits, flat_labels, flat_weights = logits.reshape(-1, classes), labels.reshape(-1), weights.reshape(-1)
  truth = jax.nn.one_hot(flat_labels, classes) * flat_weights[:, None]
  confusion = truth.T @ jax.nn.one_hot(jnp.argmax(flat_logits, -1), classes)
  top = jax.lax.top_k(flat_logits, min(TOP_K, classes))[1]
  return {"confusion": confusion, "top_k_correct": jnp.sum(jnp.any(top == flat_labels[:, None], -1) * flat_weights)}


def empty_log() -> dict[str, np.ndarray]:
  """A log with no steps in it: the sums of `LOGGED_METRICS`, the step count, and `bad_step` (the first
  non-finite step, counted from 1; 0 while there is none) with that step's loss and gradient norm."""
  return {**{key: np.float32(0.0) for key in LOGGED_METRICS}, "count": np.int32(0), "bad_step": np.int32(0),
          "bad_loss": np.float32(0.0), "bad_grad_norm": np.float32(0.0)}


def log_step(log: dict[str, jax.Array], metrics: dict[str, jax.Array], step: jax.Array) -> dict[str, jax.Array]:
  """`log` with the metrics of step index `step` (0-based) added."""
  first_bad = (log["bad_step"] == 0) & (metrics["finite"] < 1.0)
  return {**{key: log[key] + metrics[key] for key in LOGGED_METRICS}, "count": log["count"] + 1,
          "bad_step": jnp.where(first_bad, step + 1, log["bad_step"]).astype(jnp.int32),
          "bad_loss": jnp.where(first_bad, metrics["loss"], log["bad_loss"]),
          "bad_grad_norm": jnp.where(first_bad, metrics["grad_norm"], log["bad_grad_norm"])}


@dataclasses.dataclass(frozen=True)
class Dispatches:
  """Where the dispatches of a run with a resident split end: at most `per_dispatch` steps each, ending at
  multiples of it and of each interval (where the loop logs, evaluates or checkpoints), at each mark (a
  profile window's ends) and at the last step. A function of the step alone, so the host and the devices
  compute it alike (`end`), and a resumed run dispatches as the uninterrupted one did."""

  per_dispatch: int
  total_steps: int
  intervals: tuple[int, ...]
  marks: tuple[int, ...] = ()

  def end(self, first: Any, xp: Any = np) -> Any:
    """The step index where the dispatch that starts at step index `first` ends."""
    ends = [xp.asarray(self.total_steps), (first // self.per_dispatch + 1) * self.per_dispatch]
    ends += [(first // interval + 1) * interval for interval in self.intervals if interval]
    ends += [xp.where(first < mark, mark, self.total_steps) for mark in self.marks]
    return functools.reduce(xp.minimum, ends)


def advance(carry: dict[str, Any], batches: Batch, data: Any = None, *, step: Callable[..., Any],
            dispatches: Dispatches | None, **step_options: Any) -> tuple[dict[str, Any], dict[str, Any]]:
  """Steps `carry` = {'state', 'log'} and adds each step's metrics to the log. `step_options` go to every
  step (a population's per-member values). Returns the new carry and no outputs: the log is read from the
  carry.

  With `dispatches` None, `batches` is one host batch: one step. Otherwise it is a block of plans into
  the resident split, stacked on axis 1 from step `first_step`, and the dispatch runs from the state's
  step to `dispatches.end` of it, one step or several in a device loop. The loop's trip count is a value,
  not a shape: every dispatch runs the same program, so results do not depend on where dispatches end (a
  loop of known length 1 would be inlined and compiled differently).
  """

  def one_step(carry, batch):
    state, metrics = step(carry["state"], batch, data, **step_options)
    return {"state": state, "log": log_step(carry["log"], metrics, carry["state"].step)}

  if dispatches is None:
    return one_step(carry, batches), {}
  plans = {key: value for key, value in batches.items() if key != "first_step"}
  first = carry["state"].step
  offset = first - jnp.max(batches["first_step"])

  def plan(index):
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, offset + index, 1, keepdims=False), plans)

  if dispatches.per_dispatch == 1:
    return one_step(carry, plan(0)), {}
  count = dispatches.end(first, jnp) - first
  return jax.lax.fori_loop(0, count, lambda index, carry: one_step(carry, plan(index)), carry), {}
