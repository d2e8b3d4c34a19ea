"""BatchNorm's train-mode output against float64, when a channel's mean is large against its spread.

The measurement behind the precision table in docs/parallel.md: inputs whose every channel
has mean `ratio` times its standard deviation, normalized in train mode by
`cnnjax.nn.BatchNorm` under each way statistics can be grouped (one group on one
device, ghost groups within a device, a group spanning 8 devices under vmap,
sub-groups of 2 devices), by the plain one-pass form E[x^2] - E[x]^2 in float32
over the whole batch (flax's `nn.BatchNorm` with `use_fast_variance`, its
default), and, where PyTorch is installed, by torch's float32 BatchNorm, each
compared with the same normalization computed in float64 (NumPy). The error is
max |y - y64| / max |y64|.
`scripts/bn_precision.py` writes the records to docs/results/notes/bn_precision.json
and `markdown_table` renders them as docs/parallel.md quotes them.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable

import jax
import numpy as np
from flax import linen as nn

from cnnjax.nn import BatchNorm, BatchNormGrouping

RATIOS = (10, 100, 300, 1000)
# (batch, height, width, channels): 8 devices of 4 examples, or 16 ghost groups of 2.
SHAPE = (32, 8, 8, 16)
DEVICES = 8
GHOST_GROUP = 2
DEVICE_SUB_GROUP = 2
EPSILON = 1e-5
SEED = 0


def large_mean_inputs(ratio: float, shape: tuple[int, ...] = SHAPE, seed: int = SEED) -> np.ndarray:
  """float32 inputs whose channels have standard deviation 1 and mean `ratio`, each channel its own sign."""
  rng = np.random.default_rng(seed)
  signs = rng.choice((-1.0, 1.0), size=shape[-1])
  return (ratio * signs + rng.standard_normal(shape)).astype(np.float32)


def float64_reference(x: np.ndarray, examples_per_group: int, epsilon: float = EPSILON) -> np.ndarray:
  """Two-pass BatchNorm over consecutive groups of examples, in float64."""
  x = np.asarray(x, np.float64)
  groups = x.reshape((-1, examples_per_group) + x.shape[1:])
  axes = tuple(range(1, groups.ndim - 1))
  mean = groups.mean(axes, keepdims=True)
  var = np.square(groups - mean).mean(axes, keepdims=True)
  return ((groups - mean) / np.sqrt(var + epsilon)).reshape(x.shape)


def relative_error(actual: Any, expected: np.ndarray) -> float:
  return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))


def _train_output(layer: Any, x: np.ndarray) -> np.ndarray:
  variables = layer.init(jax.random.PRNGKey(SEED), x)
  y, _ = layer.apply(variables, x, mutable=["batch_stats"])
  return np.asarray(y)


def _across_devices(layer: Any, x: np.ndarray) -> np.ndarray:
  """The layer applied to DEVICES slices of x under vmap with a named axis (as pmap would)."""
  # Initialized in eval mode, which needs no device axis (the variables are the same).
  variables = layer.clone(use_running_average=True).init(jax.random.PRNGKey(SEED), x[:len(x) // DEVICES])
  slices = x.reshape((DEVICES, -1) + x.shape[1:])
  y, _ = jax.vmap(lambda xs: layer.apply(variables, xs, mutable=["batch_stats"]), axis_name="d")(slices)
  return np.asarray(y).reshape(x.shape)


def cnnjax_errors(x: np.ndarray, batch_norm: Callable[..., Any] = BatchNorm) -> dict[str, float]:
  """Relative error of each statistics grouping of `batch_norm` against float64."""
  batch, per_device = len(x), len(x) // DEVICES
  cases = {
      "one_group": (batch_norm(use_running_average=False, epsilon=EPSILON), _train_output, batch),
      "ghost_groups": (batch_norm(use_running_average=False, epsilon=EPSILON,
                                  grouping=BatchNormGrouping(examples_per_group=GHOST_GROUP)),
                       _train_output, GHOST_GROUP),
      "across_devices": (batch_norm(use_running_average=False, epsilon=EPSILON,
                                    grouping=BatchNormGrouping(axis_name="d")),
                         _across_devices, batch),
      "device_sub_groups": (batch_norm(use_running_average=False, epsilon=EPSILON,
                                       grouping=BatchNormGrouping(axis_name="d", devices_per_group=DEVICE_SUB_GROUP)),
                            _across_devices, per_device * DEVICE_SUB_GROUP),
  }
  return {name: relative_error(run(layer, x), float64_reference(x, group))
          for name, (layer, run, group) in cases.items()}


def one_pass_error(x: np.ndarray) -> float:
  """Relative error of the one-pass E[x^2] - E[x]^2 (flax's BatchNorm) over the whole batch, in float32."""
  layer = nn.BatchNorm(use_running_average=False, epsilon=EPSILON, use_fast_variance=True)
  return relative_error(_train_output(layer, x), float64_reference(x, len(x)))


def torch_error(x: np.ndarray) -> float | None:
  """Relative error of torch's float32 train-mode BatchNorm over the whole batch; None without PyTorch."""
  if importlib.util.find_spec("torch") is None:
    return None
  import torch  # pylint: disable=import-outside-toplevel
  nchw = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  y = torch.nn.functional.batch_norm(nchw, None, None, training=True, eps=EPSILON)
  return relative_error(y.numpy().transpose(0, 2, 3, 1), float64_reference(x, len(x)))


def precision_table(ratios: tuple[float, ...] = RATIOS,
                    batch_norm: Callable[..., Any] = BatchNorm) -> list[dict[str, Any]]:
  """One record per ratio: the errors of every cnnjax grouping, their maximum, the one-pass form's and torch's."""
  records = []
  for ratio in ratios:
    x = large_mean_inputs(ratio)
    errors = cnnjax_errors(x, batch_norm)
    records.append({"mean_over_std": ratio, **errors, "cnnjax_max": max(errors.values()),
                    "one_pass_float32": one_pass_error(x), "torch_float32": torch_error(x)})
  return records


def short_exponent(value: float | None) -> str:
  """Two significant digits with the exponent unpadded (1.9e-4, 2.7e+2); None (PyTorch not installed): n/a."""
  if value is None:
    return "n/a"
  mantissa, exponent = f"{value:.1e}".split("e")
  return f"{mantissa}e{int(exponent):+d}"


def markdown_table(records: list[dict[str, Any]]) -> str:
  """The table docs/parallel.md quotes from `precision_table`'s records (cnnjax: the worst grouping)."""
  rows = ["| mean / std | one-pass E[x^2] - E[x]^2 (flax) | cnnjax, worst grouping | torch float32 |",
          "|---|---|---|---|"]
  for record in records:
    rows.append(f"| {record['mean_over_std']:,} | {short_exponent(record['one_pass_float32'])} | "
                f"{short_exponent(record['cnnjax_max'])} | {short_exponent(record['torch_float32'])} |")
  return "\n".join(rows)
