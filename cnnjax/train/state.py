"""TrainState: everything a training run carries from step to step, as one pytree.

The state holds data only (no functions), so that it can be donated, replicated,
vmapped over a population and checkpointed as is; the model and the optimizer
are bound to the step functions with `functools.partial`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn


@flax.struct.dataclass
class TrainState:
  """step: optimizer steps taken; rng: the run's base key (raw uint32[2]); the rest as named.

  The per-step randomness is derived from `rng` by folding in the step (and the
  device index), so `rng` itself never changes and a resumed run draws exactly
  what the uninterrupted one would have.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  rng: jax.Array


# Initialization runs once, so its speed does not matter but its compile time does: XLA's
# optimizations multiply the compile time of the many random initializers (docs/performance.md,
# "Measurements behind design choices").
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.lru_cache(maxsize=None)
def _compiled_init(model: nn.Module, input_shape: tuple[int, ...]):
  """model.init as a compiled function of the key, one compile per (model, input shape).

  Flax modules compare by value, so the equal models of a population's members
  or of repeated builds share one compiled initializer.
  """
  def init(key):
    return model.init({"params": key}, jnp.zeros((1,) + input_shape, jnp.float32), train=False)

  key_shape = jax.ShapeDtypeStruct(jax.random.PRNGKey(0).shape, jax.random.PRNGKey(0).dtype)
  return jax.jit(init).lower(key_shape).compile(compiler_options=INIT_COMPILER_OPTIONS)


def create_train_state(seed: int, model: nn.Module, tx: optax.GradientTransformation,
                       input_shape: tuple[int, ...]) -> TrainState:
  """Initializes parameters, BatchNorm statistics and the optimizer state from `seed`."""
  init_key, run_key = jax.random.split(jax.random.PRNGKey(seed))
  variables = _compiled_init(model, tuple(input_shape))(init_key)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                    opt_state=tx.init(params), rng=run_key)


def count_params(params: Any) -> int:
  """Number of trainable parameters."""
  return sum(int(x.size) for x in jax.tree.leaves(params))
