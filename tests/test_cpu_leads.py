"""The measured CPU leads (cnnjax.lab.bench.cpu_leads): each candidate computes XLA's convolution, its gradient and
its forward-mode derivative; swapping a candidate in is scoped to tracing inside the block; the compiler-option
lead compiles and computes the same step. Their speed is measured by scripts/bench_cpu_leads.py, never here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.lab.bench import cpu_leads
from cnnjax.models import build_model
from cnnjax.nn import lowering
from model_helpers import quick_variables

CONV_LEADS = tuple(cpu_leads.CANDIDATE_CONVS)


def uses_candidate(lead: str, traced) -> bool:
  """Whether a traced function calls the lead's custom-JVP convolution."""
  return f"name={cpu_leads.CANDIDATE_CONVS[lead].__name__}" in str(traced)


def _channels_last(ndim: int) -> jax.lax.ConvDimensionNumbers:
  spatial = tuple(range(1, ndim + 1))
  return jax.lax.ConvDimensionNumbers((0, ndim + 1) + spatial, (ndim + 1, ndim) + tuple(range(ndim)),
                                      (0, ndim + 1) + spatial)


@pytest.mark.parametrize("spatial,kernel,stride,dilation,padding", [
    ((6, 6), 3, 1, 1, ((1, 1), (1, 1))), ((7, 7), 3, 2, 1, "SAME"), ((9,), 3, 1, 2, ((2, 2),)),
    ((4, 4, 4), 3, 1, 1, "VALID"), ((3, 3), 3, 1, 1, ((1, 1), (1, 1))), ((5, 5), 1, 1, 1, "VALID")])
@pytest.mark.parametrize("lead", CONV_LEADS)
def test_candidates_equal_xla_in_value_gradient_and_forward_mode(lead, spatial, kernel, stride, dilation, padding):
  ndim = len(spatial)
  x = jax.random.normal(jax.random.PRNGKey(0), (3,) + spatial + (4,))
  w = jax.random.normal(jax.random.PRNGKey(1), (kernel,) * ndim + (4, 5))
  options = {"rhs_dilation": (dilation,) * ndim, "dimension_numbers": _channels_last(ndim),
             "precision": jax.lax.Precision.HIGHEST}
  candidate = cpu_leads.candidate_conv(lead)

  def ours(x, w):
    return candidate(x, w, (stride,) * ndim, padding, **options)

  def xla(x, w):
    return jax.lax.conv_general_dilated(x, w, (stride,) * ndim, padding, **options)

  def loss(conv_fn):
    return lambda x, w: jnp.sum(jnp.sin(conv_fn(x, w)))

  np.testing.assert_allclose(ours(x, w), xla(x, w), atol=2e-5)
  for ours_grad, xla_grad in zip(jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(xla), (0, 1))(x, w)):
    np.testing.assert_allclose(ours_grad, xla_grad, atol=5e-5)
  tangents = (jax.random.normal(jax.random.PRNGKey(2), x.shape), jax.random.normal(jax.random.PRNGKey(3), w.shape))
  np.testing.assert_allclose(jax.jvp(ours, (x, w), tangents)[1], jax.jvp(xla, (x, w), tangents)[1], atol=5e-5)
  # Multi-tap kernels on maps with at least as many pixels as taps take the candidate; the rest cpu_tuned.
  covered = kernel > 1 and np.prod(spatial) >= kernel ** ndim
  assert uses_candidate(lead, jax.make_jaxpr(ours)(x, w)) == covered


@pytest.mark.parametrize("lead", CONV_LEADS)
@pytest.mark.slow
def test_a_swapped_in_candidate_trains_the_same_resnet_and_is_scoped_to_the_block(lead):
  model = build_model("resnet20", num_classes=5, lowering=lowering.CPU_TUNED)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
  variables = quick_variables(model, x)

  def make_loss():
    # A new function for every trace: JAX caches traces per function, and the swap acts at trace time.
    def loss(params):
      logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
      return jnp.sum(jnp.sin(logits))
    return loss

  baseline = jax.value_and_grad(make_loss())(variables["params"])
  with cpu_leads.convolutions_of(lead):
    traced = jax.make_jaxpr(make_loss())(variables["params"])
    swapped = jax.value_and_grad(make_loss())(variables["params"])
  assert uses_candidate(lead, traced)
  assert not uses_candidate(lead, jax.make_jaxpr(make_loss())(variables["params"]))
  np.testing.assert_allclose(swapped[0], baseline[0], rtol=1e-5)
  for ours, theirs in zip(jax.tree.leaves(swapped[1]), jax.tree.leaves(baseline[1])):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_the_compiler_option_lead_compiles_and_computes_the_same():
  assert cpu_leads.compiler_options(None) is None
  assert cpu_leads.compiler_options(cpu_leads.WEIGHT_GRAD_MATMUL) is None
  options = cpu_leads.compiler_options(cpu_leads.YNN_ELTWISE)
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 16, 16, 8))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 8, 8))

  def loss(x, w):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jax.nn.relu(y * 2.0 + 1.0) ** 2)

  step = jax.jit(jax.value_and_grad(loss, (0, 1)))
  default = step(x, w)
  compiled = step.lower(x, w).compile(compiler_options=options)(x, w)
  for ours, theirs in zip(jax.tree.leaves(compiled), jax.tree.leaves(default)):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-3)
