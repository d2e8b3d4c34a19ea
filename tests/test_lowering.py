"""Per-backend lowerings (cnnjax.nn.lowering): the choice per backend, and both lowerings computing the same
function with the same derivatives (reverse and forward mode) as XLA's own operations, layer by layer and
through a whole model built from a config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import config as config_lib
from cnnjax import train
from cnnjax.errors import ConfigError
from cnnjax.models import build_model
from cnnjax.nn import Conv, lowering, pool
from cnnjax.nn.pooling import pool_pads
from helpers import experiment_config, tiny
from model_helpers import quick_variables

FORCED = (lowering.PLAIN, lowering.CPU_TUNED)


def primitive_list(jaxpr) -> list[str]:
  """Every primitive in a jaxpr, in order, nested ones (custom_jvp_call, pjit) included."""
  names = []
  for eqn in jaxpr.eqns:
    names.append(eqn.primitive.name)
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        names += primitive_list(inner)
  return names


def primitive_names(jaxpr) -> set[str]:
  return set(primitive_list(jaxpr))


@pytest.mark.parametrize("backend,expected", [("cpu", "cpu_tuned"), ("gpu", "plain"), ("tpu", "plain"),
                                              ("cuda", "plain"), ("rocm", "plain")])
def test_auto_takes_the_cpu_rewrites_on_cpu_only(backend, expected):
  assert lowering.choose("auto", backend) == expected
  for forced in FORCED:  # a forced choice holds on every backend
    assert lowering.choose(forced, backend) == forced


def test_unknown_lowering_is_refused_in_layers_models_and_configs():
  with pytest.raises(ValueError, match="unknown lowering 'fast'"):
    Conv(4, (3, 3), lowering="fast")
  with pytest.raises(ValueError, match="unknown lowering 'fast'"):
    pool(jnp.ones((1, 4, 4, 1)), "avg", 2, lowering="fast")
  with pytest.raises(ValueError, match="unknown lowering 'fast'"):
    build_model("resnet20", num_classes=10, lowering="fast")
  config = experiment_config("lenet5_digits", **{"model.lowering": "fast"})
  with pytest.raises(ConfigError, match="model.lowering='fast' is unknown"):
    config_lib.validate(config)


def test_auto_is_resolved_at_trace_time_from_where_the_computation_is_placed(monkeypatch):
  x, w = jnp.ones((2, 4, 4, 3)), jnp.ones((1, 1, 3, 5))
  layer = Conv(5, (1, 1), use_bias=False)

  def traced():
    return primitive_names(jax.make_jaxpr(lambda x: layer.apply({"params": {"kernel": w}}, x))(x).jaxpr)

  assert lowering.placement_backend() == jax.default_backend()
  # A process whose default backend is the CPU traces the 1x1 convolution as a matrix product...
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert lowering.resolve("auto") == "cpu_tuned" and "conv_general_dilated" not in traced()
  # ...one whose default backend is an accelerator, the plain convolution...
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert lowering.resolve("auto") == "plain" and "conv_general_dilated" in traced()
  # ...unless the computation is placed on CPU devices explicitly (by device or platform name).
  for device in (jax.devices("cpu")[0], "cpu"):
    with jax.default_device(device):
      assert lowering.resolve("auto") == "cpu_tuned" and "conv_general_dilated" not in traced()


def _channels_last(ndim: int) -> jax.lax.ConvDimensionNumbers:
  spatial = tuple(range(1, ndim + 1))
  return jax.lax.ConvDimensionNumbers((0, ndim + 1) + spatial, (ndim + 1, ndim) + tuple(range(ndim)),
                                      (0, ndim + 1) + spatial)


@pytest.mark.parametrize("spatial,kernel,stride,dilation,padding", [
    ((2, 2), 3, 1, 1, ((1, 1), (1, 1))), ((2, 2), 3, 1, 1, "SAME"), ((3, 3), 5, 2, 1, "SAME"),
    ((2, 3), 3, 1, 2, ((2, 2), (1, 3))), ((1, 1), 3, 1, 1, ((1, 1), (1, 1))), ((4,), 7, 2, 1, ((3, 3),)),
    ((2, 2, 2), 3, 1, 1, ((1, 1),) * 3), ((2, 2), 3, 2, 1, "VALID"), ((5, 5), 3, 1, 1, "SAME"),
    ((5, 5), 1, 2, 1, "SAME"), ((4, 4), 1, 1, 1, "VALID"), ((6, 6, 6), 1, 2, 1, "VALID"), ((3,), 1, 1, 1, ((1, 1),))])
@pytest.mark.parametrize("choice", FORCED)
@pytest.mark.slow
def test_both_convolution_lowerings_equal_xla_in_value_gradient_and_forward_mode(choice, spatial, kernel, stride,
                                                                                dilation, padding):
  ndim = len(spatial)
  x = jax.random.normal(jax.random.PRNGKey(0), (3,) + spatial + (4,))
  w = jax.random.normal(jax.random.PRNGKey(1), (kernel,) * ndim + (4, 5))
  options = dict(rhs_dilation=(dilation,) * ndim, dimension_numbers=_channels_last(ndim),
                 precision=jax.lax.Precision.HIGHEST)

  def ours(x, w):
    return lowering.conv_general_dilated(x, w, (stride,) * ndim, padding, lowering=choice, **options)

  def xla(x, w):
    return jax.lax.conv_general_dilated(x, w, (stride,) * ndim, padding, **options)

  def loss(conv_fn):
    return lambda x, w: jnp.sum(jnp.sin(conv_fn(x, w)))

  assert ours(x, w).shape == xla(x, w).shape
  np.testing.assert_allclose(ours(x, w), xla(x, w), atol=2e-5)
  for ours_grad, xla_grad in zip(jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(xla), (0, 1))(x, w)):
    np.testing.assert_allclose(ours_grad, xla_grad, atol=5e-5)
  tangents = (jax.random.normal(jax.random.PRNGKey(2), x.shape), jax.random.normal(jax.random.PRNGKey(3), w.shape))
  np.testing.assert_allclose(jax.jvp(ours, (x, w), tangents)[1], jax.jvp(xla, (x, w), tangents)[1], atol=5e-5)
  # cpu_tuned: unpadded 1x1 kernels and fewer input pixels than kernel taps (where XLA would swap the
  # operands) are matrix products, anything else XLA's own convolution; plain: always XLA's.
  primitives = primitive_names(jax.make_jaxpr(ours)(x, w).jaxpr)
  unpadded_1x1 = kernel == 1 and (padding in ("SAME", "VALID") or all(p == (0, 0) for p in padding))
  small = np.prod(spatial) < kernel ** ndim
  rewritten = choice == lowering.CPU_TUNED and (small or unpadded_1x1)
  assert ("conv_general_dilated" in primitives) == (not rewritten), primitives


@pytest.mark.parametrize("kind,shape,window,stride,padding,ceil_mode", [
    ("max", (2, 9, 9, 3), 3, 2, 1, False), ("max", (2, 8, 8, 3), 2, 2, "valid", False),
    ("min", (2, 7, 7, 3), 3, 2, "valid", True), ("max", (2, 10, 5), 3, 1, "same", False),
    ("max", (2, 5, 5, 5, 2), 2, 2, "valid", True)])
@pytest.mark.parametrize("choice", FORCED)
@pytest.mark.slow
def test_both_pooling_lowerings_equal_xla_with_ties(choice, kind, shape, window, stride, padding, ceil_mode):
  # Rounded ReLU outputs: many equal values per window, so which element receives the gradient matters.
  x = jnp.round(jax.nn.relu(jax.random.normal(jax.random.PRNGKey(0), shape)) * 2) / 2
  ndim = len(shape) - 2
  pads = ((0, 0),) + pool_pads(shape[1:-1], (window,) * ndim, (stride,) * ndim, padding, ceil_mode) + ((0, 0),)
  init, reduce = (-jnp.inf, jax.lax.max) if kind == "max" else (jnp.inf, jax.lax.min)

  def xla(x):
    return jax.lax.reduce_window(x, init, reduce, (1,) + (window,) * ndim + (1,), (1,) + (stride,) * ndim + (1,),
                                 pads)

  def ours(x):
    return pool(x, kind, window, stride, padding=padding, ceil_mode=ceil_mode, lowering=choice)

  ours_y, ours_vjp = jax.vjp(ours, x)
  xla_y, xla_vjp = jax.vjp(xla, x)
  np.testing.assert_array_equal(ours_y, xla_y)
  grad_y = jax.random.normal(jax.random.PRNGKey(1), ours_y.shape)
  np.testing.assert_allclose(ours_vjp(grad_y)[0], xla_vjp(grad_y)[0], atol=1e-6)
  x_dot = jax.random.normal(jax.random.PRNGKey(2), shape)
  if choice == lowering.CPU_TUNED:
    # Its forward mode is the transpose of its gradient, ties included (a custom JVP, so that
    # Hessian-vector products and jacfwd work); XLA's own forward mode breaks ties by the tangent's
    # value, so the two are compared on untied inputs below.
    np.testing.assert_allclose(jnp.vdot(jax.jvp(ours, (x,), (x_dot,))[1], grad_y),
                               jnp.vdot(x_dot, ours_vjp(grad_y)[0]), rtol=1e-5)
  untied = jax.random.normal(jax.random.PRNGKey(3), shape)
  np.testing.assert_allclose(jax.jvp(ours, (untied,), (x_dot,))[1], jax.jvp(xla, (untied,), (x_dot,))[1], atol=1e-6)
  assert ("custom_jvp_call" in primitive_names(jax.make_jaxpr(ours)(x).jaxpr)) == (choice == lowering.CPU_TUNED)


@pytest.mark.slow
def test_a_model_computes_the_same_in_both_lowerings():
  # A bottleneck ResNet on 32x32 inputs has every rewrite: unpadded 1x1 convolutions, 3x3
  # convolutions on 2x2 and 1x1 maps (fewer pixels than taps) and the max-pooled stem.
  models = {choice: build_model("resnet50", num_classes=5, stage_sizes=(1, 1, 1, 1), stage_features=(4, 4, 8, 8),
                                lowering=choice) for choice in FORCED}
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  variables = quick_variables(models[lowering.PLAIN], x)
  conv_layers = sum(leaf.ndim == 4 for leaf in jax.tree.leaves(variables["params"]))
  outputs, gradients, forward = {}, {}, {}
  for choice, model in models.items():
    assert model.lowering == choice

    def loss(params, x, model=model):
      logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
      return jnp.sum(jnp.sin(logits))

    outputs[choice] = jax.jit(loss)(variables["params"], x)
    gradients[choice] = jax.jit(jax.grad(loss, (0, 1)))(variables["params"], x)
    forward[choice] = jax.jit(lambda x, loss=loss: jax.jvp(lambda x: loss(variables["params"], x), (x,),
                                                           (jnp.cos(x),))[1])(x)
    # plain: every convolution is XLA's; cpu_tuned: the 1x1 and small-map ones are matrix products.
    convolutions = primitive_list(jax.make_jaxpr(model.apply)(variables, x).jaxpr).count("conv_general_dilated")
    assert (convolutions == conv_layers) == (choice == lowering.PLAIN), (choice, convolutions, conv_layers)
  np.testing.assert_allclose(outputs["plain"], outputs["cpu_tuned"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(forward["plain"], forward["cpu_tuned"], rtol=1e-4, atol=1e-5)
  for plain, tuned in zip(jax.tree.leaves(gradients["plain"]), jax.tree.leaves(gradients["cpu_tuned"])):
    np.testing.assert_allclose(plain, tuned, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("choice", lowering.LOWERINGS)
def test_the_config_key_reaches_the_model(choice, tfds_data_dir):
  config = tiny(experiment_config("resnet20_cifar10", **{
      "data.name": "digits", "data.image_size": 8, "batch_size": 8, "model.lowering": choice}))
  assert train.build(config).model.lowering == choice
  assert "model.lowering" in config_lib.RESUME_SAFE_KEYS  # the same function: a run may resume in another
