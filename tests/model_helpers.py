"""Test helper: model variables without running flax's initializers.

On CPU, compiling a model's `init` costs about half a second per parameter
tensor (each initializer is its own random-bits computation); shape and
forward tests only need values of the right shapes, so they draw them with
NumPy from `jax.eval_shape`'s abstract variables.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

WEIGHT_SCALE = 0.1  # small weights keep deep random nets finite


def quick_variables(model: Any, *example_args: Any, seed: int = 0, **kwargs: Any) -> Any:
  """Variables of `model` for `example_args`: normal(0, 0.1) parameters, unit BatchNorm variances."""
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *example_args, **kwargs))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    names = [getattr(key, "key", "") for key in path]
    if names and names[0] == "batch_stats":
      return np.ones(leaf.shape, leaf.dtype) if names[-1] == "var" else np.zeros(leaf.shape, leaf.dtype)
    return (rng.standard_normal(leaf.shape) * WEIGHT_SCALE).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)
