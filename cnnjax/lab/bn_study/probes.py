"""Measurements of BatchNorm on finished runs: the statistics each device normalized with, cross-example
gradients under batching and vmap, exact population statistics ("precise BN"), and evaluation.

Every measurement reads a run back through its own config (`cnnjax.train.build`)
and steps it with the run's own parallel strategy, so it sees exactly what
training saw: the statistics a BatchNorm layer normalized with come from the
layer itself, which sows them into the `batch_moments` collection when asked
(`cnnjax.nn.norm.BATCH_MOMENTS`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from cnnjax import data as data_lib
from cnnjax import metrics as metrics_lib
from cnnjax import parallel
from cnnjax.nn import BatchNormGrouping
from cnnjax.nn.norm import BATCH_MOMENTS
from cnnjax.parallel.strategies import device_part
from cnnjax.train.experiment import Experiment
from cnnjax.train.rundir import RunDir
from cnnjax.train.state import TrainState
from cnnjax.train.step import cross_entropy, step_key

# The example axis a vmapped computation may name, and BatchNorm then reduce over.
EXAMPLE_AXIS = "examples"
# The computations whose cross-example gradients are measured, in `leakage_modes`' order.
LEAKAGE_MODES = ("batchnorm_train", "batchnorm_eval", "groupnorm", "batchnorm_vmap_no_axis",
                 "batchnorm_vmap_named_axis")
# A fixed dropout key for the gradient measurements: every computation of one model sees the same masks.
LEAKAGE_DROPOUT_SEED = 0
PyTree = Any


# -- reading runs back ---------------------------------------------------------------------------

def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of every checkpoint a run kept, oldest first."""
  return RunDir(workdir).checkpoint_steps()


def load_state(exp: Experiment, workdir: str, step: int | None = None, *,
               config: ml_collections.ConfigDict | None = None) -> TrainState:
  """The state (host arrays) at checkpoint `step`, by default the newest good one, of the run of `config`
  (default: `exp.config`; another run of the same shapes, such as another seed, may pass its own)."""
  config = exp.config if config is None else config
  template = jax.device_get(exp.init_state())
  rundir = RunDir(workdir)
  restored = (rundir.restore_latest(config, template) if step is None else
              rundir.restore_step(config, template, step))
  return restored.state


def train_batches(exp: Experiment, count: int) -> list[dict[str, np.ndarray]]:
  """The first `count` batches of the run's own training stream (its seed, order and augmentation),
  however many steps the run itself took."""
  dataset = data_lib.train_dataset(exp.dataset.train, exp.preprocess, seed=exp.config.seed,
                                   batch=exp.train_slice, num_steps=count)
  return [device_part(dataset[index]) for index in range(count)]


def one_pass(exp: Experiment) -> int:
  """Training batches that cover every training example once."""
  return math.ceil(len(exp.dataset.train) / exp.config.batch_size)


def eval_examples(exp: Experiment, count: int) -> tuple[np.ndarray, np.ndarray]:
  """The first `count` real eval examples: inputs and labels."""
  inputs, labels = [], []
  for batch in exp.eval_batches():
    real = batch["mask"] > 0
    inputs.append(np.asarray(exp.model_inputs(batch))[real])
    labels.append(batch["label"][real])
    if sum(len(x) for x in inputs) >= count:
      break
  return np.concatenate(inputs)[:count], np.concatenate(labels)[:count]


def with_norm(model: Any, **fields: Any) -> Any:
  """The same model with some fields of its normalization (`cnnjax.nn.Norm`) replaced."""
  return model.clone(norm=dataclasses.replace(model.norm, **fields))


# -- statistics each device normalized with ------------------------------------------------------

def _layer_moments(sown: PyTree) -> dict[str, jax.Array]:
  """{layer path: (2, groups, features) = (mean, var)} from the sown `batch_moments` collection."""
  flat = traverse_util.flatten_dict(sown)
  layers = sorted({path[:-1] for path in flat})
  # Each layer sows once per call, so every entry is a one-element tuple.
  return {"/".join(layer): jnp.stack([flat[layer + ("mean",)][0], flat[layer + ("var",)][0]]) for layer in layers}


def normalization_moments(exp: Experiment, state: TrainState,
                          batches: Iterable[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
  """Per batch: {layer: (devices, 2, groups, features)}, the mean and variance every device's BatchNorm
  layers normalized with in a training step, on the run's own strategy and devices."""
  axis_name = exp.strategy.axis_name

  def moments(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    _, updates = exp.model.apply(
        {"params": state.params, "batch_stats": state.batch_stats}, exp.model_batch(batch, None)[0], train=True,
        mutable=["batch_stats", BATCH_MOMENTS], rngs={"dropout": step_key(state.rng, state.step, axis_name)})
    per_layer = _layer_moments(updates[BATCH_MOMENTS])
    if axis_name is None:
      return {layer: value[None] for layer, value in per_layer.items()}
    return {layer: jax.lax.all_gather(value, axis_name) for layer, value in per_layer.items()}

  compiled = exp.strategy.compile_eval(moments)
  device_state = exp.strategy.put_state(state)
  return [exp.strategy.get_outputs(compiled(device_state, exp.strategy.put_batch(batch))) for batch in batches]


def stat_divergence(moments: np.ndarray, epsilon: float) -> tuple[float, float]:
  """How far apart the statistics groups of one layer normalized, in units of the full batch's std.

  `moments`: (devices, 2, groups, features). Every (device, group) is one set of
  statistics over equally many examples, so the full batch's mean is their mean
  and its variance their mean of (var + mean^2) minus the squared mean. Returns
  the mean over sets and features of |group mean - batch mean| / batch std and
  of |group std - batch std| / batch std. Computed in float64, so that
  identical groups (synchronized statistics) give exactly 0.
  """
  values = np.asarray(moments, np.float64)
  means = values[:, 0].reshape(-1, values.shape[-1])
  variances = values[:, 1].reshape(-1, values.shape[-1])
  batch_mean = means.mean(0)
  batch_var = np.maximum((variances + np.square(means)).mean(0) - np.square(batch_mean), 0.0)
  scale = np.sqrt(batch_var + epsilon)
  mean_divergence = float(np.mean(np.abs(means - batch_mean) / scale))
  std_divergence = float(np.mean(np.abs(np.sqrt(variances) - np.sqrt(batch_var)) / scale))
  return mean_divergence, std_divergence


def replica_divergence(exp: Experiment, state: TrainState, num_batches: int) -> dict[str, Any]:
  """The divergence of the devices' (and groups') normalization statistics, averaged over the run's first
  `num_batches` training batches and its BatchNorm layers; also the number of distinct statistics sets."""
  epsilon = exp.config.model.bn_epsilon
  per_batch = normalization_moments(exp, state, train_batches(exp, num_batches))
  mean_divergences, std_divergences = [], []
  for layers in per_batch:
    for moments in layers.values():
      mean_divergence, std_divergence = stat_divergence(moments, epsilon)
      mean_divergences.append(mean_divergence)
      std_divergences.append(std_divergence)
  first = next(iter(per_batch[0].values()))
  return {"replica_stat_divergence": float(np.mean(mean_divergences)),
          "replica_std_divergence": float(np.mean(std_divergences)),
          "statistics_sets": int(first.shape[0] * first.shape[2]), "batches": num_batches,
          "layers": len(per_batch[0])}


# -- cross-example gradients ---------------------------------------------------------------------

def _losses_fn(model: Any, batch_stats: PyTree, train: bool) -> Callable[..., jax.Array]:
  """(params, inputs, labels) -> per-example losses of one batched application."""
  def losses(params, inputs, labels):
    variables = {"params": params, "batch_stats": batch_stats}
    if train:
      logits, _ = model.apply(variables, inputs, train=True, mutable=["batch_stats"],
                              rngs={"dropout": jax.random.PRNGKey(LEAKAGE_DROPOUT_SEED)})
    else:
      logits = model.apply(variables, inputs, train=False)
    return cross_entropy(logits, labels, 0.0)
  return losses


def _one_example(losses: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """The loss of a single example, applied as a batch of one."""
  return lambda params, x, y: losses(params, x[None], y[None])[0]


@dataclasses.dataclass(frozen=True)
class LeakageMode:
  """One way of computing per-example losses, and the batched computation its gradients should match."""

  name: str
  params: PyTree
  losses: Callable[..., jax.Array]  # (params, inputs, labels) -> (n,) losses
  per_example_grads: Callable[..., PyTree] | None  # (params, inputs, labels) -> gradients with a leading n
  reference_losses: Callable[..., jax.Array] | None  # the batched computation it stands for


def leakage_modes(bn_model: Any, bn_state: TrainState, gn_model: Any, gn_state: TrainState) -> list[LeakageMode]:
  """BatchNorm in training and eval mode, GroupNorm, and BatchNorm under vmap without and with a named axis."""
  bn_train = _losses_fn(bn_model, bn_state.batch_stats, train=True)
  bn_eval = _losses_fn(bn_model, bn_state.batch_stats, train=False)
  group = _losses_fn(gn_model, gn_state.batch_stats, train=True)
  named = _losses_fn(with_norm(bn_model, grouping=BatchNormGrouping(axis_name=EXAMPLE_AXIS)),
                     bn_state.batch_stats, train=True)

  def vmapped(losses, axis_name):
    return lambda params, inputs, labels: jax.vmap(_one_example(losses), in_axes=(None, 0, 0),
                                                   axis_name=axis_name)(params, inputs, labels)

  def grads(losses, axis_name):
    return lambda params, inputs, labels: jax.vmap(jax.grad(_one_example(losses)), in_axes=(None, 0, 0),
                                                   axis_name=axis_name)(params, inputs, labels)

  bn_params, gn_params = bn_state.params, gn_state.params
  modes = [
      LeakageMode("batchnorm_train", bn_params, bn_train, None, None),
      LeakageMode("batchnorm_eval", bn_params, bn_eval, grads(bn_eval, None), bn_eval),
      LeakageMode("groupnorm", gn_params, group, grads(group, None), group),
      LeakageMode("batchnorm_vmap_no_axis", bn_params, vmapped(bn_train, None), grads(bn_train, None), bn_train),
      LeakageMode("batchnorm_vmap_named_axis", bn_params, vmapped(named, EXAMPLE_AXIS), grads(named, EXAMPLE_AXIS),
                  bn_train),
  ]
  assert tuple(mode.name for mode in modes) == LEAKAGE_MODES
  return modes


def _max_abs_diff(a: PyTree, b: PyTree) -> float:
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _max_abs(tree: PyTree) -> float:
  return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(tree))


def measure_leakage(mode: LeakageMode, inputs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
  """d loss_i / d x_j for every pair: the mean norm over i != j and over i == j, and, for computations
  standing for a batched one, how far their losses and mean per-example gradient are from it."""

  @jax.jit
  def measure(params, inputs, labels):  # one compiled program per mode
    measured = {"jacobian": jax.jacrev(lambda x: mode.losses(params, x, labels))(inputs)}  # (n, n, *input)
    if mode.reference_losses is not None:
      reference = mode.reference_losses
      measured.update(
          losses=mode.losses(params, inputs, labels), reference_losses=reference(params, inputs, labels),
          batched_grad=jax.grad(lambda p: reference(p, inputs, labels).mean())(params),
          mean_grad=jax.tree.map(lambda g: g.mean(0), mode.per_example_grads(params, inputs, labels)))
    return measured

  measured = measure(mode.params, jnp.asarray(inputs), jnp.asarray(labels))
  count = inputs.shape[0]
  norms = np.sqrt(np.sum(np.square(np.asarray(measured["jacobian"], np.float64).reshape(count, count, -1)), -1))
  off_diagonal = ~np.eye(count, dtype=bool)
  cross, own = float(norms[off_diagonal].mean()), float(np.diag(norms).mean())
  record = {"mode": mode.name, "batch_size": count, "cross_example_grad_norm": cross, "self_grad_norm": own,
            "cross_to_self_ratio": cross / own if own > 0 else None,
            "losses_vs_batched_max_abs_diff": None, "grad_mean_vs_batched_max_abs_diff": None,
            "batched_grad_max_abs": None}
  if mode.reference_losses is not None:
    record.update(
        losses_vs_batched_max_abs_diff=_max_abs_diff(measured["losses"], measured["reference_losses"]),
        grad_mean_vs_batched_max_abs_diff=_max_abs_diff(measured["mean_grad"], measured["batched_grad"]),
        batched_grad_max_abs=_max_abs(measured["batched_grad"]))
  return record


# -- running averages vs population statistics --------------------------------------------------

def precise_batch_stats(exp: Experiment, state: TrainState, batches: Sequence[dict[str, np.ndarray]]) -> PyTree:
  """Population statistics at the state's weights: the equal-weight mean, over `batches`, of the
  statistics every BatchNorm layer normalizes with in training (Wu & Johnson 2021's precise BN).

  The model's own running-average update computes them: with momentum 0 the
  "running average" after one batch is that batch's statistics, combined over
  groups and devices exactly as training combines them.
  """
  model = with_norm(exp.model, momentum=0.0)
  axis_name = exp.strategy.axis_name

  def batch_stats(state: TrainState, batch: dict[str, jax.Array]) -> PyTree:
    _, updates = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                             exp.model_batch(batch, None)[0], train=True, mutable=["batch_stats"],
                             rngs={"dropout": step_key(state.rng, state.step, axis_name)})
    return updates["batch_stats"]

  compiled = exp.strategy.compile_eval(batch_stats)
  device_state = exp.strategy.put_state(state)
  per_batch = [exp.strategy.get_outputs(compiled(device_state, exp.strategy.put_batch(b))) for b in batches]
  return jax.tree.map(lambda *xs: np.mean(np.stack(xs).astype(np.float64), 0).astype(np.float32), *per_batch)


def stat_gap(running: PyTree, precise: PyTree, epsilon: float) -> dict[str, float]:
  """How far running averages are from population statistics, over every layer and feature: the mean
  |running mean - population mean| / population std, and the mean |log(running var / population var)|."""
  flat_running, flat_precise = traverse_util.flatten_dict(running), traverse_util.flatten_dict(precise)
  mean_gaps, var_gaps = [], []
  for path, value in flat_running.items():
    if path[-1] != "mean":
      continue
    var_path = path[:-1] + ("var",)
    population_var = np.asarray(flat_precise[var_path], np.float64) + epsilon
    mean_gaps.append(np.abs(np.asarray(value, np.float64) - flat_precise[path]) / np.sqrt(population_var))
    var_gaps.append(np.abs(np.log((np.asarray(flat_running[var_path], np.float64) + epsilon) / population_var)))
  return {"running_mean_gap": float(np.mean(np.concatenate(mean_gaps))),
          "running_var_log_ratio": float(np.mean(np.concatenate(var_gaps)))}


# -- evaluation ----------------------------------------------------------------------------------

class Evaluator:
  """The training loop's evaluation (every eval example once, padding masked) of any state of a run."""

  def __init__(self, exp: Experiment):
    self.exp = exp
    self.engine = parallel.SingleEngine(exp)
    self.eval_fn = self.engine.eval_step_fn()  # compiled once, reused for every state

  def __call__(self, state: TrainState, batch_stats: PyTree | None = None) -> dict[str, float]:
    """Eval accuracy and loss, with the state's running averages or the given statistics."""
    if batch_stats is not None:
      state = state.replace(batch_stats=batch_stats)
    device_state = self.engine.put_state([state])
    sums = self.engine.eval_sums(device_state, self.eval_fn, self.exp.eval_batches())[0]
    result = metrics_lib.eval_result(sums)
    return {"accuracy": result["accuracy"], "loss": result["loss"], "examples": result["examples"]}


def eval_probabilities(exp: Experiment, state: TrainState) -> tuple[np.ndarray, np.ndarray]:
  """Softmax outputs (eval mode) and labels of every real eval example."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  predict = jax.jit(lambda inputs: jax.nn.softmax(exp.model.apply(variables, inputs, train=False)))
  probabilities, labels = [], []
  for batch in exp.eval_batches():
    real = batch["mask"] > 0
    probabilities.append(np.asarray(predict(exp.model_inputs(batch)))[real])
    labels.append(batch["label"][real])
  return np.concatenate(probabilities), np.concatenate(labels)


def max_abs_state_diff(a: TrainState, b: TrainState) -> float:
  """The largest difference between two states' parameters and running statistics."""
  return _max_abs_diff((a.params, a.batch_stats), (b.params, b.batch_stats))


def max_abs_state_value(state: TrainState) -> float:
  return _max_abs((state.params, state.batch_stats))
