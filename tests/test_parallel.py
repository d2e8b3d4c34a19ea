"""Data parallelism on 8 simulated CPU devices: strategies, BatchNorm statistic semantics, replicas.

The equivalence matrix: k steps of every strategy with bn_sync=global equal k
steps on one device over the full batch; local and ghost equal a reference
written by hand (plain BatchNorm applied to each slice or group separately,
gradients averaged); replicas stay identical. Batch Renormalization
(norm=renorm) passes the same matrix, with its clipping limits opening during
the k steps so that its corrections act.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax import train
from cnnjax.errors import ConfigError
from cnnjax.train.step import cross_entropy, step_key
from helpers import experiment_config, set_values, tiny

STRATEGIES = ("none", "pmap", "shard_map", "jit")
DEVICES = 8
GLOBAL_BATCH = 32
STEPS = 3
# Relative tolerance per parameter leaf: max |a - b| <= RTOL * max |b|.
RTOL = 1e-5


NORMS = ("batch", "renorm")
# Batch Renorm: plain BatchNorm at step 0, then limits that open over the next steps (r and d act from step 1,
# where the running statistics have moved), tight enough that the clipping binds.
RENORM_SCHEDULE = {"model.renorm_rmax": 1.5, "model.renorm_dmax": 0.5, "model.renorm_warmup_steps": 1,
                   "model.renorm_rmax_steps": 2, "model.renorm_dmax_steps": 3}


def small_resnet_config(strategy: str, bn_sync: str, group: int = 0, norm: str = "batch"):
  """A ResNet-8 (one block per stage, BatchNorm or Batch Renorm everywhere) on 8x8 digits."""
  config = tiny(experiment_config("resnet20_cifar10"), **{
      "data.name": "digits", "data.image_size": 8, "data.crop_padding": 0, "data.flip": False,
      "batch_size": GLOBAL_BATCH, "num_train_steps": STEPS, "parallel.strategy": strategy,
      "model.bn_sync": bn_sync, "model.bn_group_size": group, "optimizer.schedule": "constant",
      "model.norm": norm, **(RENORM_SCHEDULE if norm == "renorm" else {})})
  config.model.blocks_per_stage = 1
  return config


_RUNS: dict = {}


def cached_train_steps(strategy: str, bn_sync: str, group: int = 0, norm: str = "batch"):
  """train_steps of small_resnet_config, computed once per module (several tests read the same run)."""
  key = (strategy, bn_sync, group, norm)
  if key not in _RUNS:
    _RUNS[key] = train_steps(small_resnet_config(strategy, bn_sync, group, norm))
  return _RUNS[key]


def train_steps(config):
  """Runs the configured strategy for the config's steps; returns (host state, losses, device state, exp)."""
  exp = train.build(config)
  strategy = exp.strategy
  state = strategy.put_state(jax.device_get(exp.init_state()))
  step_fn = exp.train_step_fn()
  batches = exp.train_batches()
  losses = []
  for _ in range(exp.total_steps):
    batch = next(batches)
    batch.pop("index")
    state, metrics = step_fn(state, strategy.put_batch(batch))
    losses.append(float(strategy.get_outputs(metrics)["loss"]))
  return strategy.get_state(state), losses, state, exp


def mean_over_groups(stats):
  """The groups' updated running statistics averaged; Batch Renorm's step counters agree, so any one."""
  return jax.tree.map(lambda s: s.mean(0) if jnp.issubdtype(s.dtype, jnp.floating) else s[0], stats)


@functools.lru_cache(maxsize=None)
def hand_reference(group: int, norm: str = "batch"):
  """k steps where each group of `group` consecutive examples is normalized on its own.

  Written without any grouping machinery: the one-device model with plain
  BatchNorm (or Batch Renorm) is applied to every group separately (vmap with no
  axis name), the loss is the mean of the group losses, and the running
  statistics are the mean of the groups' updated statistics.
  """
  exp = train.build(small_resnet_config("none", "global", norm=norm))
  model, tx = exp.model, exp.tx
  state = exp.init_state()
  batches = exp.train_batches()

  @jax.jit
  def step(state, inputs, labels):
    def loss_fn(params):
      def group_loss(x, y):
        logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
        return cross_entropy(logits, y, 0.0).mean(), updates["batch_stats"]
      shape = (GLOBAL_BATCH // group, group)
      losses, stats = jax.vmap(group_loss)(inputs.reshape(shape + inputs.shape[1:]), labels.reshape(shape))
      return losses.mean(), mean_over_groups(stats)
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=batch_stats, opt_state=opt_state), loss

  losses = []
  for _ in range(exp.total_steps):
    batch = next(batches)
    state, loss = step(state, exp.model_inputs(batch), batch["label"])
    losses.append(float(loss))
  return jax.device_get(state), losses


def assert_states_close(actual, expected, rtol=RTOL):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path((actual.params, actual.batch_stats)),
                          jax.tree.leaves((expected.params, expected.batch_stats))):
    scale = float(np.max(np.abs(b))) or 1.0
    error = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    assert error <= rtol * scale, f"{jax.tree_util.keystr(path)}: max error {error:.3g} vs scale {scale:.3g}"


@pytest.fixture(scope="module")
def full_batch_reference(tfds_data_dir):
  host, losses, _, _ = cached_train_steps("none", "global")
  return host, losses


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("strategy", STRATEGIES[1:])
@pytest.mark.slow
def test_global_sync_equals_one_device_on_the_full_batch(strategy, norm, tfds_data_dir):
  host, losses, _, exp = cached_train_steps(strategy, "global", norm=norm)
  assert exp.strategy.layout.num_devices == DEVICES
  reference, reference_losses, _, _ = cached_train_steps("none", "global", norm=norm)
  assert_states_close(host, reference)
  np.testing.assert_allclose(losses, reference_losses, rtol=RTOL)


def test_renorm_corrections_change_training(tfds_data_dir):
  """The renorm runs above are not BatchNorm's: from step 1 r and d move the losses and statistics."""
  host, losses, _, _ = cached_train_steps("none", "global", norm="renorm")
  batch_host, batch_losses, _, _ = cached_train_steps("none", "global")
  assert losses[0] == batch_losses[0]  # step 0 is plain BatchNorm
  assert abs(losses[-1] - batch_losses[-1]) > 1e-4
  assert max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(host.params),
                                                          jax.tree.leaves(batch_host.params))) > 1e-4
  assert all(int(step) == STEPS for step in jax.tree.leaves(
      {k: v for k, v in flat_stats(host.batch_stats).items() if k.endswith("renorm_step")}))


def flat_stats(stats) -> dict:
  return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(stats)}


# Ghost groups smaller than a device's slice (2), equal to it (4 = local), spanning 2 and 4 devices.
GROUPED_CASES = [(strategy, bn_sync, group) for strategy in STRATEGIES
                 for bn_sync, group in (("local", GLOBAL_BATCH // DEVICES), ("ghost", 2), ("ghost", 8), ("ghost", 16))
                 if not (strategy == "none" and bn_sync == "local")]  # one device: local is global


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("strategy,bn_sync,group", GROUPED_CASES)
@pytest.mark.slow
def test_local_and_ghost_equal_the_hand_reference(strategy, bn_sync, group, norm, tfds_data_dir):
  reference, reference_losses = hand_reference(group, norm)
  host, losses, _, _ = cached_train_steps(strategy, bn_sync, group if bn_sync == "ghost" else 0, norm)
  assert_states_close(host, reference)
  np.testing.assert_allclose(losses, reference_losses, rtol=RTOL)


def test_local_measurably_differs_from_global(full_batch_reference):
  host, losses, _, _ = cached_train_steps("pmap", "local")
  reference, reference_losses = full_batch_reference
  stats = jax.tree.leaves(host.batch_stats)
  reference_stats = jax.tree.leaves(reference.batch_stats)
  assert max(float(np.max(np.abs(a - b))) for a, b in zip(stats, reference_stats)) > 1e-3
  assert abs(losses[-1] - reference_losses[-1]) > 1e-4


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("strategy", STRATEGIES[1:])
@pytest.mark.slow
def test_replicas_hold_identical_parameters_and_running_statistics(strategy, norm, tfds_data_dir):
  _, _, state, _ = cached_train_steps(strategy, "local", norm=norm)
  for leaf in jax.tree.leaves((state.params, state.batch_stats, state.opt_state)):
    copies = [np.asarray(shard.data) for shard in leaf.addressable_shards]
    if strategy == "pmap":  # one row per device
      copies = [row for copy in copies for row in copy]
    assert len(copies) == DEVICES
    for copy in copies[1:]:
      np.testing.assert_array_equal(copy, copies[0])


def test_each_device_and_step_draws_its_own_reproducible_key():
  base = jax.random.PRNGKey(7)

  def keys_at(step):
    return jax.pmap(lambda _: step_key(base, jnp.int32(step), "batch"), axis_name="batch")(jnp.arange(DEVICES))

  keys, again, next_step = keys_at(3), keys_at(3), keys_at(4)
  assert len({tuple(np.asarray(k)) for k in keys}) == DEVICES
  np.testing.assert_array_equal(keys, again)
  assert not np.array_equal(keys, next_step)


@pytest.mark.parametrize("overrides,message", [
    ({"batch_size": 30}, "batch_size=30 does not divide over 8 devices"),
    ({"eval_batch_size": 12}, "eval_batch_size=12 does not divide over 8 devices"),
    ({"model.bn_sync": "ghost", "model.bn_group_size": 3}, "group of 3 examples does not fit"),
    ({"model.bn_sync": "ghost", "model.bn_group_size": 12}, "group of 12 examples does not fit"),
    ({"parallel.num_devices": 9}, "only 8 devices are available"),
])
def test_impossible_layouts_are_one_line_errors_before_compiling(overrides, message, tfds_data_dir):
  config = set_values(small_resnet_config("pmap", "global"), overrides)
  with pytest.raises(ConfigError, match=message):
    train.build(config)


def test_num_devices_selects_a_subset(tfds_data_dir):
  config = small_resnet_config("shard_map", "global")
  config.parallel.num_devices = 4
  exp = train.build(config)
  assert exp.strategy.layout.num_devices == 4 and exp.strategy.layout.per_device_batch == 8
