"""Layers: BatchNorm's explicit statistic groups against a NumPy reference; the norm factory."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.nn import BatchNorm, BatchNormGrouping, Norm, RenormClipping, get_activation

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


def normalized(x, axes, epsilon=1e-5):
  """(x - mean) / sqrt(var + epsilon) over `axes`, in float64: the reference for every norm kind."""
  x = np.asarray(x, np.float64)
  return (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + epsilon)


def renormalized(x, axes, clipping, epsilon=1e-5):
  """Batch Renorm's training output with fresh running statistics (mean 0, variance 1) and the clipping
  limits open (Ioffe 2017, Algorithm 1): normalized * r + d, r = clip(sigma_B / sigma, 1 / rmax, rmax),
  d = clip((mu_B - mu) / sigma, -dmax, dmax)."""
  x = np.asarray(x, np.float64)
  sigma = np.sqrt(1 + epsilon)
  r = np.clip(np.sqrt(x.var(axes, keepdims=True) + epsilon) / sigma, 1 / clipping.rmax, clipping.rmax)
  d = np.clip(x.mean(axes, keepdims=True) / sigma, -clipping.dmax, clipping.dmax)
  return normalized(x, axes, epsilon) * r + d


def test_norm_factory_kinds_compute_their_formulas():
  x = 3.0 * jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 12)) + 1.0
  grouped = np.asarray(x).reshape(2, 4, 4, 4, 3)  # gcd(32, 12) = 4 groups of 3 channels
  expected = {
      ("batch", True): normalized(x, (0, 1, 2)),
      ("batch", False): np.asarray(x) / np.sqrt(1 + 1e-5),  # initial running mean 0, variance 1
      ("renorm", True): renormalized(x, (0, 1, 2), RenormClipping()),
      ("renorm", False): np.asarray(x) / np.sqrt(1 + 1e-5),
      ("group", True): normalized(grouped, (1, 2, 4)).reshape(x.shape),
      ("layer", True): normalized(x, (1, 2, 3)),
      ("none", True): np.asarray(x),
  }
  for (kind, train), want in expected.items():
    layer = Norm(kind=kind)(train=train)()
    variables = layer.init(jax.random.PRNGKey(0), x)
    got, _ = layer.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"{kind} train={train}")
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


# -- Batch Renormalization -----------------------------------------------------------------------

def renorm_variables(features: int, mean: float, var: float, step: int) -> dict:
  """Batch Renorm's variables with given running statistics and step counter."""
  return {"params": {"scale": jnp.full((features,), 1.5), "bias": jnp.full((features,), 0.25)},
          "batch_stats": {"mean": jnp.full((features,), mean), "var": jnp.full((features,), var),
                          "renorm_step": jnp.asarray(step, jnp.int32)}}


def reference_renorm(x: np.ndarray, group: int, running_mean: float, running_var: float, rmax: float,
                     dmax: float, scale: float = 1.5, bias: float = 0.25) -> np.ndarray:
  """Ioffe 2017's training output in float64: each group's x_hat * r + d, then scale and bias."""
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  sigma = np.sqrt(running_var + EPS)
  for start in range(0, len(x), group):
    chunk = x[start:start + group]
    axes = tuple(range(chunk.ndim - 1))
    mean, sigma_batch = chunk.mean(axes), np.sqrt(chunk.var(axes) + EPS)
    r = np.clip(sigma_batch / sigma, 1 / rmax, rmax)
    d = np.clip((mean - running_mean) / sigma, -dmax, dmax)
    out[start:start + group] = ((chunk - mean) / sigma_batch * r + d) * scale + bias
  return out


def test_renorm_limits_open_linearly_after_the_warmup():
  clipping = RenormClipping(rmax=3.0, dmax=5.0, warmup_steps=10, rmax_steps=30, dmax_steps=20)
  steps = jnp.array([0, 10, 15, 20, 25, 30, 100])
  rmax, dmax = clipping.limits(steps)
  np.testing.assert_allclose(rmax, [1, 1, 1.5, 2, 2.5, 3, 3])
  np.testing.assert_allclose(dmax, [0, 0, 2.5, 5, 5, 5, 5])
  at_once = RenormClipping(rmax=2.0, dmax=1.0, warmup_steps=4)
  np.testing.assert_allclose(at_once.limits(jnp.array([3, 4])), [[1, 2], [0, 1]])
  with pytest.raises(ValueError, match="rmax >= 1"):
    RenormClipping(rmax=0.5)


def test_renorm_during_warmup_is_batchnorm_bit_for_bit():
  x = jax.random.normal(jax.random.PRNGKey(6), (8, 3, 3, 5)) * 2 + 1
  variables = renorm_variables(5, mean=0.7, var=3.0, step=0)
  renorm = BatchNorm(use_running_average=False, renorm=RenormClipping(warmup_steps=1),
                     grouping=BatchNormGrouping(examples_per_group=4))
  plain = BatchNorm(use_running_average=False, grouping=BatchNormGrouping(examples_per_group=4))
  y, updates = renorm.apply(variables, x, mutable=["batch_stats"])
  plain_stats = {k: v for k, v in variables["batch_stats"].items() if k != "renorm_step"}
  expected, plain_updates = plain.apply({**variables, "batch_stats": plain_stats}, x, mutable=["batch_stats"])
  np.testing.assert_array_equal(y, expected)
  for key in ("mean", "var"):
    np.testing.assert_array_equal(updates["batch_stats"][key], plain_updates["batch_stats"][key])
  assert int(updates["batch_stats"]["renorm_step"]) == 1


@pytest.mark.parametrize("rmax,dmax", [(1e6, 1e6), (1.5, 0.2)])  # unclipped; clipped
@pytest.mark.parametrize("group", [0, 4])
def test_renorm_corrects_by_the_running_statistics_before_their_update(rmax, dmax, group):
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (8, 3, 3, 5))) * 2 + 1
  module = BatchNorm(use_running_average=False, epsilon=EPS, grouping=BatchNormGrouping(examples_per_group=group),
                     renorm=RenormClipping(rmax=rmax, dmax=dmax))
  y, updates = module.apply(renorm_variables(5, mean=0.5, var=0.8, step=3), x, mutable=["batch_stats"])
  np.testing.assert_allclose(y, reference_renorm(x, group or len(x), 0.5, 0.8, rmax, dmax), atol=5e-5)
  if rmax > 1e3:  # unclipped: the running statistics' normalization
    np.testing.assert_allclose(y, (x - 0.5) / np.sqrt(0.8 + EPS) * 1.5 + 0.25, atol=5e-5)
  # The running statistics update as BatchNorm's do.
  groups = x.reshape((len(x) // (group or len(x)), group or len(x)) + x.shape[1:])
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.9 * 0.5 + 0.1 * groups.mean((1, 2, 3)).mean(0),
                             rtol=1e-5)
  assert int(updates["batch_stats"]["renorm_step"]) == 4


def test_renorm_gradient_flows_through_the_batch_statistics_not_r_and_d():
  x = jax.random.normal(jax.random.PRNGKey(8), (6, 4)) * 2 + 1
  weights = jax.random.normal(jax.random.PRNGKey(9), (6, 4))
  running_mean, running_var, rmax, dmax = 0.5, 0.8, 2.0, 1.0
  module = BatchNorm(use_running_average=False, epsilon=EPS, renorm=RenormClipping(rmax=rmax, dmax=dmax))
  variables = renorm_variables(4, running_mean, running_var, step=0)

  def layer_loss(x):
    return jnp.sum(weights * module.apply(variables, x, mutable=["batch_stats"])[0])

  def reference_loss(x):
    mean, sigma_batch = x.mean(0), jnp.sqrt(x.var(0) + EPS)
    sigma = np.sqrt(running_var + EPS)
    r = jax.lax.stop_gradient(jnp.clip(sigma_batch / sigma, 1 / rmax, rmax))
    d = jax.lax.stop_gradient(jnp.clip((mean - running_mean) / sigma, -dmax, dmax))
    return jnp.sum(weights * (((x - mean) / sigma_batch * r + d) * 1.5 + 0.25))

  gradient = jax.grad(layer_loss)(x)
  np.testing.assert_allclose(gradient, jax.grad(reference_loss)(x), atol=1e-5)
  # r and d carry no gradient: with them differentiated the gradient would be the running statistics' one.
  assert float(jnp.max(jnp.abs(gradient - 1.5 * weights / np.sqrt(running_var + EPS)))) > 1e-2


@pytest.mark.parametrize("devices_per_group", [0, 1, 2])
def test_renorm_across_devices_equals_groups_of_the_full_batch_and_keeps_replicas_identical(devices_per_group):
  devices, per_device = 8, 2
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(10), (devices * per_device, 4, 6))) * 2 - 1
  clipping = RenormClipping(rmax=1.5, dmax=0.3)
  module = BatchNorm(use_running_average=False, epsilon=EPS,
                     grouping=BatchNormGrouping(axis_name="d", devices_per_group=devices_per_group),
                     renorm=clipping)
  variables = renorm_variables(6, mean=-0.4, var=1.7, step=5)
  y, updates = jax.vmap(lambda xs: module.apply(variables, xs, mutable=["batch_stats"]), axis_name="d")(
      x.reshape(devices, per_device, 4, 6))
  group = per_device * (devices_per_group or devices)
  np.testing.assert_allclose(y.reshape(x.shape), reference_renorm(x, group, -0.4, 1.7, 1.5, 0.3), atol=5e-5)
  for leaf in jax.tree.leaves(updates):
    np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))


def test_renorm_kind_builds_batch_renormalization():
  layer = Norm(kind="renorm", renorm=RenormClipping(rmax=2.0))(train=True)
  assert layer.func is BatchNorm and layer.keywords["renorm"] == RenormClipping(rmax=2.0)
  assert Norm(kind="batch")(train=True).keywords["renorm"] is None
