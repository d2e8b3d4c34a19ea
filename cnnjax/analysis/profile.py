"""Per-layer profile of a model: output shape, trainable parameters, multiply-accumulates, receptive field.

`profile_model(model, input_shape)` traces one forward pass abstractly (no
parameter is ever materialized, so VGG-16's 138M parameters cost nothing) and
records every leaf layer in execution order: convolutions, dense layers,
normalization, pooling, embeddings. Layers that do nothing at eval time
(dropout, a normalization of kind 'none', an adaptive pool already at its
size) are left out of the table.

Multiply-accumulates count the products of convolutions and dense layers,
bias additions excluded, as the notes count them ((2x2) x (3x3) = 36 for a 3x3
filter over a 4x4 input): a convolution costs (output positions x K) x
(prod(F) C / groups), a transposed convolution (input positions x C) x
(prod(F) K), a dense layer inputs x outputs per position. Normalization,
activations and pooling are not counted.

Receptive fields come from `cnnjax.analysis.receptive_field`, which follows
every value through the traced program, so branches and skips are exact.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cnnjax.analysis.receptive_field import ReceptiveField, trace_receptive_fields
from cnnjax.nn import BatchNorm, FilterBank, GroupNorm, Pool
from cnnjax.nn.kernels import stacked_kernels

NORM_TYPES = (nn.BatchNorm, nn.GroupNorm, nn.LayerNorm, BatchNorm, GroupNorm)
BATCH = 1  # profiles are per example


@dataclasses.dataclass(frozen=True)
class Layer:
  """One leaf layer: `name` is its module path, `kind` its class, `spec` its kernel / stride / padding / ..."""

  name: str
  kind: str
  spec: dict[str, Any]
  input_shape: tuple[int, ...]
  output_shape: tuple[int, ...]
  params: int
  macs: int
  receptive_field: ReceptiveField | None

  @property
  def details(self) -> str:
    return _details(self.spec)

  def to_dict(self) -> dict[str, Any]:
    return {"name": self.name, "kind": self.kind, "spec": self.spec, "input_shape": list(self.input_shape),
            "output_shape": list(self.output_shape), "params": self.params, "macs": self.macs,
            "receptive_field": None if self.receptive_field is None else self.receptive_field.to_dict()}


@dataclasses.dataclass(frozen=True)
class Profile:
  """A model's layers and totals; shapes exclude the batch axis."""

  model: str
  input_shape: tuple[int, ...]
  output_shape: tuple[int, ...]
  params: int
  macs: int
  receptive_field: ReceptiveField | None
  layers: tuple[Layer, ...]

  def to_dict(self) -> dict[str, Any]:
    return {"model": self.model, "input_shape": list(self.input_shape), "output_shape": list(self.output_shape),
            "params": self.params, "macs": self.macs,
            "receptive_field": None if self.receptive_field is None else self.receptive_field.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers]}

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)

  def table(self) -> str:
    """The profile as an aligned text table with a total row."""
    header = ("layer", "kind", "details", "output shape", "params", "MACs", "receptive field")
    rows = [(layer.name, layer.kind, layer.details, _shape(layer.output_shape), f"{layer.params:,}",
             f"{layer.macs:,}", str(layer.receptive_field or "-")) for layer in self.layers]
    rows.append((f"total ({self.model})", "", f"input {_shape(self.input_shape)}", _shape(self.output_shape),
                 f"{self.params:,}", f"{self.macs:,}", str(self.receptive_field or "-")))
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    numeric = {4, 5}
    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    lines = []
    for index, row in enumerate([header] + rows):
      cells = [cell.rjust(w) if i in numeric else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
      lines.append("  ".join(cells).rstrip())
      if index in (0, len(rows) - 1):  # under the header, above the total
        lines.append(rule)
    return "\n".join(lines)


def _shape(shape: Sequence[int]) -> str:
  return "x".join(str(s) for s in shape)


def _count(tree: Any) -> int:
  return sum(int(math.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _subtree(params: Any, path: Sequence[str]) -> Any:
  node = params
  for part in path:
    if not isinstance(node, dict) or part not in node:
      return {}
    node = node[part]
  return node


def _spatial(shape: Sequence[int]) -> int:
  return int(math.prod(shape[1:-1]))


def _per_axis(value: Any, ndim: int) -> list[int]:
  return [value] * ndim if isinstance(value, int) else list(value)


def _padding_spec(padding: Any, ndim: int) -> str | list[list[int]]:
  if isinstance(padding, str):
    return padding.lower()
  if isinstance(padding, int):
    return [[padding, padding]] * ndim
  return [[p, p] if isinstance(p, int) else list(p) for p in padding]


def _describe(module: nn.Module, in_shape: Sequence[int], out_shape: Sequence[int]) -> tuple[dict[str, Any], int]:
  """The layer's hyperparameters (kernel, stride, padding, ...) and its multiply-accumulates."""
  if isinstance(module, (nn.Conv, nn.ConvTranspose)):
    ndim = len(module.kernel_size)
    spec = {"kernel": list(module.kernel_size), "strides": _per_axis(module.strides or 1, ndim),
            "padding": _padding_spec(module.padding, ndim),
            "dilation": _per_axis(module.kernel_dilation or 1, ndim),
            "groups": getattr(module, "feature_group_count", 1), "bias": module.use_bias,
            "transposed": isinstance(module, nn.ConvTranspose)}
    taps = int(math.prod(module.kernel_size))
    if spec["transposed"]:  # every input position scatters a kernel into the output
      return spec, _spatial(in_shape) * in_shape[-1] * taps * out_shape[-1]
    return spec, _spatial(out_shape) * out_shape[-1] * taps * in_shape[-1] // spec["groups"]
  if isinstance(module, nn.Dense):
    positions = int(math.prod(out_shape[1:-1])) if len(out_shape) > 2 else 1
    return {"inputs": in_shape[-1], "features": module.features}, positions * in_shape[-1] * module.features
  if isinstance(module, nn.Embed):
    return {"vocabulary": module.num_embeddings, "features": module.features}, 0
  if isinstance(module, Pool):
    ndim = len(in_shape) - 2
    strides = module.strides if module.strides is not None else module.window
    return {"pool": module.kind, "window": _per_axis(module.window, ndim), "strides": _per_axis(strides, ndim),
            "padding": _padding_spec(module.padding, ndim), "ceil_mode": module.ceil_mode}, 0
  if isinstance(module, FilterBank):
    size = stacked_kernels(tuple(module.names)).shape[0]
    return {"kernels": list(module.names)}, _spatial(out_shape) * out_shape[-1] * size * size
  kind = getattr(module, "kind", None)
  return ({"kind": kind} if isinstance(kind, str) else {}), 0


def _details(spec: dict[str, Any]) -> str:
  """One line of text for the table: '3x3 stride 2x2, pad 1', 'max 3x3 stride 2x2, ceil', '512 -> 10'."""
  axes = lambda values: "x".join(str(v) for v in values)  # pylint: disable=unnecessary-lambda-assignment

  def padding(value):
    if isinstance(value, str):
      return value
    if all(low == high == value[0][0] for low, high in value):
      return str(value[0][0])
    return " ".join(f"{low}/{high}" for low, high in value)

  if "kernel" in spec:
    parts = [f"{axes(spec['kernel'])} stride {axes(spec['strides'])}", f"pad {padding(spec['padding'])}"]
    if any(d != 1 for d in spec["dilation"]):
      parts.append(f"dilation {axes(spec['dilation'])}")
    if spec["groups"] != 1:
      parts.append(f"groups {spec['groups']}")
    return ", ".join(parts) + (" (transposed)" if spec["transposed"] else "")
  if "pool" in spec:
    text = f"{spec['pool']} {axes(spec['window'])} stride {axes(spec['strides'])}"
    if spec["padding"] != "valid":
      text += f", pad {padding(spec['padding'])}"
    return text + (", ceil" if spec["ceil_mode"] else "")
  if "vocabulary" in spec:
    return f"{spec['vocabulary']} x {spec['features']}"
  if "inputs" in spec:
    return f"{spec['inputs']} -> {spec['features']}"
  if "kernels" in spec:
    return f"{len(spec['kernels'])} fixed kernels"
  return spec.get("kind", "")


def profile_model(model: nn.Module, input_shape: Sequence[int], *, name: str = "",
                  input_dtype: Any = jnp.float32) -> Profile:
  """Profiles `model` on one input of `input_shape` (no batch axis) without materializing parameters."""
  x = jax.ShapeDtypeStruct((BATCH,) + tuple(input_shape), input_dtype)
  variables = jax.eval_shape(lambda inputs: model.init(jax.random.PRNGKey(0), inputs, train=False), x)
  calls: list[tuple[tuple[str, ...], nn.Module, tuple[int, ...], tuple[int, ...]]] = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and args and hasattr(args[0], "shape"):
      first = out[0] if isinstance(out, (tuple, list)) else out
      calls.append((tuple(context.module.path), context.module, tuple(args[0].shape),
                    tuple(getattr(first, "shape", ()))))
    return out

  def forward(variables, inputs):
    with nn.intercept_methods(record):
      return model.apply(variables, inputs, train=False)

  closed = jax.make_jaxpr(forward)(variables, x)
  out_shape = tuple(closed.out_avals[0].shape)
  root = type(model).__name__
  stack_of = lambda path: "/".join((root,) + path)  # pylint: disable=unnecessary-lambda-assignment
  norm_stacks = [stack_of(path) for path, module, _, _ in calls if isinstance(module, NORM_TYPES)]

  def is_statistics_scope(stack: str) -> bool:
    return any(stack == s or stack.startswith(s + "/") for s in norm_stacks)

  spatial_dims = tuple(range(1, len(x.shape) - 1)) if len(x.shape) > 2 else (1,)
  records, total_field = trace_receptive_fields(closed, len(jax.tree.leaves(variables)), spatial_dims,
                                                is_statistics_scope)
  params = variables.get("params", {})
  paths = [path for path, _, _, _ in calls]
  layers = []
  for path, module, in_shape, layer_out in calls:
    if any(other[:len(path)] == path and len(other) > len(path) for other in paths):
      continue  # not a leaf: its sublayers are listed
    stack = stack_of(path)
    matches = [field for s, field in records if s == stack or s.startswith(stack + "/")]
    layer_params = _count(_subtree(params, path))
    if not matches and not layer_params:
      continue  # computes nothing at eval time (dropout, identity norm, an adaptive pool at its size)
    spec, macs = _describe(module, in_shape, layer_out)
    layers.append(Layer("/".join(path), type(module).__name__, spec, in_shape[1:], layer_out[1:], layer_params,
                        macs, matches[-1] if matches else None))
  return Profile(name or root, tuple(input_shape), out_shape[1:], _count(params),
                 sum(layer.macs for layer in layers), total_field, tuple(layers))


def profile_registered(name: str, input_shape: Sequence[int], num_classes: int, **options: Any) -> Profile:
  """Profiles a registry model by name (options as for `cnnjax.models.build_model`)."""
  from cnnjax.models import build_model  # pylint: disable=import-outside-toplevel  (analysis sits beside models)
  return profile_model(build_model(name, num_classes=num_classes, **options), input_shape, name=name)
