"""optax optimizers, learning-rate schedules and weight-decay masks.

The optimizer is built with `optax.inject_hyperparams`, so the peak learning
rate and the weight decay live in the optimizer state as arrays rather than as
constants baked into the compiled step: a population of runs that differ only in
those values can share one compiled step (vmap over the state).

The learning rate at step t is `learning_rate * schedule_shape(t)`, where the
shape is a function of the step alone (warmup, then cosine, piecewise or
constant).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import optax

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine", "piecewise")


def schedule_shape(schedule: str, *, total_steps: int, warmup_steps: int = 0,
                   decay_boundaries: Sequence[float] = (0.5, 0.75),
                   decay_factor: float = 0.1) -> Callable[[jax.Array], jax.Array]:
  """A multiplier of the peak learning rate as a function of the step.

  Args:
    schedule: 'constant', 'cosine' (to zero at `total_steps`) or 'piecewise'
      (multiply by `decay_factor` at each boundary).
    total_steps: length of training.
    warmup_steps: linear warmup from 0 to 1 first.
    decay_boundaries: for 'piecewise', fractions of `total_steps`.
    decay_factor: for 'piecewise', the multiplier at each boundary.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
  decay_steps = max(total_steps - warmup_steps, 1)
  if schedule == "cosine":
    main = optax.cosine_decay_schedule(1.0, decay_steps)
  elif schedule == "piecewise":
    boundaries = {int(round(fraction * total_steps)) - warmup_steps: decay_factor
                  for fraction in decay_boundaries}
    main = optax.piecewise_constant_schedule(1.0, boundaries)
  else:
    main = optax.constant_schedule(1.0)
  if warmup_steps <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup_steps), main], [warmup_steps])


def decay_mask(params: Any) -> Any:
  """True for the parameters weight decay applies to: kernels, not norm scales or biases."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(name: str, *, learning_rate: float, weight_decay: float,
                   shape: Callable[[jax.Array], jax.Array], momentum: float = 0.9,
                   nesterov: bool = False, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8) -> optax.GradientTransformation:
  """SGD (momentum / Nesterov, coupled L2 decay as in PyTorch) or AdamW (decoupled decay).

  `learning_rate` and `weight_decay` are injected hyperparameters: they sit in
  `opt_state.hyperparams` and may differ between members of a vmapped population.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")

  def build(learning_rate, weight_decay):
    if name == "sgd":
      body = [optax.add_decayed_weights(weight_decay, mask=decay_mask),
              optax.trace(decay=momentum, nesterov=nesterov)]
    else:
      body = [optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
              optax.add_decayed_weights(weight_decay, mask=decay_mask)]
    return optax.chain(*body, optax.scale_by_schedule(shape), optax.scale(-learning_rate))

  return optax.inject_hyperparams(build)(learning_rate=learning_rate, weight_decay=weight_decay)


def current_learning_rate(opt_state: Any, shape: Callable[[jax.Array], jax.Array], step: Any) -> jax.Array:
  """The learning rate applied at `step`: the injected peak times the schedule shape."""
  return opt_state.hyperparams["learning_rate"] * shape(step)
