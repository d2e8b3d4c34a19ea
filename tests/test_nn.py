"""Layers: BatchNorm's explicit statistic groups against a NumPy reference; the norm factory."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.nn import BatchNorm, BatchNormGrouping, Norm, get_activation

EPS = 1e-5


def reference_batchnorm(x: np.ndarray, group: int) -> np.ndarray:
  """Normalizes consecutive groups of `group` examples of x (N, ..., C) by their own statistics."""
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  for start in range(0, len(x), group):
    chunk = x[start:start + group]
    axes = tuple(range(chunk.ndim - 1))
    out[start:start + group] = (chunk - chunk.mean(axes)) / np.sqrt(chunk.var(axes) + EPS)
  return out


def apply_train(module, x):
  variables = module.init(jax.random.PRNGKey(0), x)
  y, updates = module.apply(variables, x, mutable=["batch_stats"])
  return y, updates["batch_stats"]


@pytest.mark.parametrize("group", [0, 2, 4, 8])
def test_examples_per_group_normalizes_each_group(group):
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 3, 3, 5)) * 3 + 1
  y, _ = apply_train(BatchNorm(use_running_average=False, epsilon=EPS,
                               grouping=BatchNormGrouping(examples_per_group=group)), x)
  np.testing.assert_allclose(y, reference_batchnorm(x, group or 8), atol=2e-5)


@pytest.mark.parametrize("devices_per_group", [0, 1, 2, 4])
def test_devices_per_group_under_vmap_equals_groups_of_the_full_batch(devices_per_group):
  devices, per_device = 8, 2
  x = jax.random.normal(jax.random.PRNGKey(1), (devices * per_device, 4, 6)) * 2 - 1
  module = BatchNorm(use_running_average=False, epsilon=EPS,
                     grouping=BatchNormGrouping(axis_name="d", devices_per_group=devices_per_group))
  variables = BatchNorm(use_running_average=False).init(jax.random.PRNGKey(0), x)
  y, updates = jax.vmap(lambda xs: module.apply(variables, xs, mutable=["batch_stats"]), axis_name="d")(
      x.reshape(devices, per_device, 4, 6))
  group = per_device * (devices_per_group or devices)
  np.testing.assert_allclose(y.reshape(x.shape), reference_batchnorm(x, group), atol=2e-5)
  # Running statistics are identical on every device, whatever the grouping.
  for leaf in jax.tree.leaves(updates):
    np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))


def test_running_average_keeps_the_mean_of_group_statistics():
  x = jax.random.normal(jax.random.PRNGKey(2), (8, 6)) * 2 + 3
  _, stats = apply_train(BatchNorm(use_running_average=False, momentum=0.9,
                                   grouping=BatchNormGrouping(examples_per_group=4)), x)
  groups = np.asarray(x).reshape(2, 4, 6)
  np.testing.assert_allclose(stats["mean"], 0.1 * groups.mean(1).mean(0), rtol=1e-5)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * groups.var(1).mean(0), rtol=1e-5)


def test_eval_mode_uses_running_statistics_and_no_batch_mixing():
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 5))
  module = BatchNorm(use_running_average=True)
  variables = module.init(jax.random.PRNGKey(0), x)
  np.testing.assert_allclose(module.apply(variables, x), x / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_group_size_that_does_not_divide_the_batch_is_an_error():
  with pytest.raises(ValueError, match="does not divide"):
    apply_train(BatchNorm(use_running_average=False,
                          grouping=BatchNormGrouping(examples_per_group=3)), jnp.ones((8, 2)))


def test_norm_factory_kinds():
  x = jnp.ones((2, 4, 4, 12))
  for kind in ("batch", "group", "layer", "none"):
    layer = Norm(kind=kind)(train=False)()
    variables = layer.init(jax.random.PRNGKey(0), x)
    assert layer.apply(variables, x).shape == x.shape
  with pytest.raises(ValueError, match="unknown norm"):
    Norm(kind="instance")


def test_leaky_relu_uses_the_notes_slope():
  np.testing.assert_allclose(get_activation("leaky_relu")(jnp.array([-1.0, 2.0])), [-0.1, 2.0])
  with pytest.raises(ValueError, match="unknown activation"):
    get_activation("swish")


# Channel means this many standard deviations from zero: the one-pass E[x^2] - E[x]^2 in float32
# lost the variance entirely here (an output 0.28 from float64 in issue 15's measurement).
LARGE_MEAN_OVER_STD = 1000.0
PRECISION_RTOL = 1e-4


def large_mean_inputs(shape, seed=0):
  rng = np.random.default_rng(seed)
  signs = rng.choice((-1.0, 1.0), size=shape[-1])
  return (LARGE_MEAN_OVER_STD * signs + rng.standard_normal(shape)).astype(np.float32)


def relative_error(actual, expected):
  return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("group", [0, 2])
def test_large_channel_means_stay_within_1e4_of_float64_on_a_fresh_layer(group):
  x = large_mean_inputs((16, 4, 4, 8))
  y, _ = apply_train(BatchNorm(use_running_average=False, epsilon=EPS,
                               grouping=BatchNormGrouping(examples_per_group=group)), x)
  assert relative_error(y, reference_batchnorm(x, group or len(x))) < PRECISION_RTOL


@pytest.mark.parametrize("devices_per_group", [0, 2])
def test_large_channel_means_across_devices_stay_within_1e4_of_float64(devices_per_group):
  devices, per_device = 8, 2
  x = large_mean_inputs((devices * per_device, 4, 6), seed=1)
  module = BatchNorm(use_running_average=False, epsilon=EPS,
                     grouping=BatchNormGrouping(axis_name="d", devices_per_group=devices_per_group))
  variables = BatchNorm(use_running_average=True).init(jax.random.PRNGKey(0), x)
  y, updates = jax.vmap(lambda xs: module.apply(variables, xs, mutable=["batch_stats"]), axis_name="d")(
      x.reshape(devices, per_device, 4, 6))
  group = per_device * (devices_per_group or devices)
  assert relative_error(y.reshape(x.shape), reference_batchnorm(x, group)) < PRECISION_RTOL
  for leaf in jax.tree.leaves(updates):
    np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))


def expected_running_var(groups: np.ndarray, convention: str, momentum: float = 0.9) -> np.ndarray:
  """The running variance after one step from 1: the mean over groups of each group's variance,
  times m / (m - 1) for the unbiased convention (m values per channel in a group)."""
  groups = np.asarray(groups, np.float64)
  axes = tuple(range(1, groups.ndim - 1))
  values_per_group = int(np.prod(groups.shape[1:-1]))
  var = groups.var(axes).mean(0)
  if convention == "unbiased":
    var = var * values_per_group / (values_per_group - 1)
  return momentum + (1 - momentum) * var


@pytest.mark.parametrize("convention", ["biased", "unbiased"])
@pytest.mark.parametrize("group", [0, 4])
def test_running_variance_conventions_follow_their_formulas(convention, group):
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (8, 3, 3, 5))) * 2 + 1
  _, stats = apply_train(BatchNorm(use_running_average=False,
                                   grouping=BatchNormGrouping(examples_per_group=group), running_variance=convention),
                         x)
  groups = x.reshape((len(x) // (group or len(x)), group or len(x)) + x.shape[1:])
  np.testing.assert_allclose(stats["var"], expected_running_var(groups, convention), rtol=1e-5)


@pytest.mark.parametrize("convention", ["biased", "unbiased"])
@pytest.mark.parametrize("devices_per_group", [0, 2])
def test_running_variance_conventions_count_the_values_of_every_device_in_the_group(convention, devices_per_group):
  devices, per_device = 8, 2
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (devices * per_device, 4, 6))) * 2 - 1
  module = BatchNorm(use_running_average=False,
                     grouping=BatchNormGrouping(axis_name="d", devices_per_group=devices_per_group),
                     running_variance=convention)
  variables = BatchNorm(use_running_average=True).init(jax.random.PRNGKey(0), x)
  _, updates = jax.vmap(lambda xs: module.apply(variables, xs, mutable=["batch_stats"]), axis_name="d")(
      x.reshape(devices, per_device, 4, 6))
  group = per_device * (devices_per_group or devices)
  groups = x.reshape((len(x) // group, group) + x.shape[1:])
  np.testing.assert_allclose(updates["batch_stats"]["var"][0], expected_running_var(groups, convention), rtol=1e-5)


def test_unbiased_running_variance_of_a_single_value_is_an_error():
  with pytest.raises(ValueError, match="at least 2 values per channel"):
    apply_train(BatchNorm(use_running_average=False,
                          grouping=BatchNormGrouping(examples_per_group=1), running_variance="unbiased"),
                jnp.ones((4, 3)))
  with pytest.raises(ValueError, match="unknown BatchNorm running variance"):
    Norm(kind="batch", running_variance="sample")
