"""Optimizers: weight-decay masks, schedules, injected hyperparameters, SGD's update rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import optim
from cnnjax.models import build_model


def test_decay_mask_skips_norm_scales_and_biases():
  model = build_model("resnet20", num_classes=10)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
  mask = optim.decay_mask(params)
  flat = {"/".join(k.key for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat["stem_conv/kernel"] and flat["classifier/kernel"]
  assert not flat["stem_norm/scale"] and not flat["stem_norm/bias"] and not flat["classifier/bias"]


def test_piecewise_schedule_follows_he_et_al():
  shape = optim.schedule_shape("piecewise", total_steps=64_000, decay_boundaries=(0.5, 0.75))
  assert [float(shape(s)) for s in (0, 31_999, 32_000, 47_999, 48_000, 63_999)] == pytest.approx(
      [1, 1, 0.1, 0.1, 0.01, 0.01])


def test_warmup_then_cosine():
  shape = optim.schedule_shape("cosine", total_steps=110, warmup_steps=10)
  assert float(shape(0)) == 0.0 and float(shape(5)) == pytest.approx(0.5)
  assert float(shape(10)) == pytest.approx(1.0) and float(shape(110)) == pytest.approx(0.0, abs=1e-6)
  with pytest.raises(ValueError, match="unknown schedule"):
    optim.schedule_shape("linear", total_steps=10)


def test_sgd_momentum_with_coupled_weight_decay_matches_the_update_rule():
  params = {"w": jnp.array([[1.0, -2.0]]), "b": jnp.array([0.5])}
  grads = {"w": jnp.array([[0.1, 0.2]]), "b": jnp.array([0.3])}
  tx = optim.make_optimizer("sgd", learning_rate=0.1, weight_decay=0.01, momentum=0.9,
                            shape=optim.schedule_shape("constant", total_steps=10))
  state = tx.init(params)
  buffer = {k: np.zeros_like(v) for k, v in params.items()}
  current = {k: np.asarray(v) for k, v in params.items()}
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    for k in current:
      g = np.asarray(grads[k]) + (0.01 * current[k] if k == "w" else 0.0)
      buffer[k] = 0.9 * buffer[k] + g
      current[k] = current[k] - 0.1 * buffer[k]
  for k in current:
    np.testing.assert_allclose(params[k], current[k], rtol=1e-6)


def test_learning_rate_and_weight_decay_are_state_not_constants():
  tx = optim.make_optimizer("adamw", learning_rate=0.3, weight_decay=0.1,
                            shape=optim.schedule_shape("constant", total_steps=10))
  state = tx.init({"w": jnp.ones((2, 2))})
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.3)
  assert float(optim.current_learning_rate(state, optim.schedule_shape("constant", total_steps=10), 3)) == \
      pytest.approx(0.3)
  # A population: vmap over states that differ only in their learning rate.
  states = jax.vmap(lambda lr: tx.init({"w": jnp.ones((2, 2))})._replace(
      hyperparams={**state.hyperparams, "learning_rate": lr}))(jnp.array([0.1, 0.2]))
  updates, _ = jax.vmap(lambda s: tx.update({"w": jnp.ones((2, 2))}, s, {"w": jnp.ones((2, 2))}))(states)
  ratio = np.asarray(updates["w"][1] / updates["w"][0])
  np.testing.assert_allclose(ratio, 2.0, rtol=1e-5)
