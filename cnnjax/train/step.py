"""The pure train and eval steps.

Both are functions of (state, batch) only; the model, optimizer, loss settings
and the device axis name are bound with `functools.partial` by the caller. With
`axis_name=None` the step sees the whole global batch (plain jit, sharded jit);
with an axis name it sees one device's slice and reduces gradients, metrics and
BatchNorm statistics with explicit collectives on that axis (pmap, shard_map,
vmap). The same function therefore drops into every parallel strategy.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from cnnjax.optim import current_learning_rate
from cnnjax.train.state import TrainState

Batch = dict[str, jax.Array]


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


def train_step(state: TrainState, batch: Batch, *, model: nn.Module, tx: optax.GradientTransformation,
               schedule_shape: Callable[[jax.Array], jax.Array], label_smoothing: float,
               axis_name: str | None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on `batch`; returns the new state and metrics averaged over devices.

  Metrics: loss, accuracy, grad_norm, learning_rate, and `finite` (1.0 when the
  loss, the gradient norm and the updated parameters are all finite), which the
  loop checks every step.
  """
  dropout_key = step_key(state.rng, state.step, axis_name)

  def loss_fn(params):
    logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, batch["input"],
                                  train=True, mutable=["batch_stats"], rngs={"dropout": dropout_key})
    loss = cross_entropy(logits, batch["label"], label_smoothing).mean()
    return loss, (logits, updates.get("batch_stats", {}))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  # Equal slices per device, so the mean of the per-device means is the global mean.
  grads = _pmean(grads, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  grad_norm = optax.tree.norm(grads)
  metrics = _pmean({"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])},
                   axis_name)
  metrics["grad_norm"] = grad_norm
  metrics["learning_rate"] = current_learning_rate(state.opt_state, schedule_shape, state.step)
  # The new parameters too: finite gradients can still overflow them with a huge learning rate.
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & _all_finite(params)
  metrics["finite"] = finite.astype(jnp.float32)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  return new_state, metrics


def eval_step(state: TrainState, batch: Batch, *, model: nn.Module,
              axis_name: str | None) -> dict[str, jax.Array]:
  """Sums over the batch and devices: loss and correct predictions over `count` labelled
  positions (one per example, or one per pixel for segmentation) of the `examples` real
  examples (mask); for segmentation also each class's intersection and union of predicted and
  true pixels (`class_intersection`, `class_union`), from which the loop reports the mean IoU."""
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["input"],
                       train=False)
  labels = batch["label"]
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
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return sums
