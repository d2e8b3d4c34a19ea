"""Receptive fields of every intermediate value of a model, read off its traced program.

The receptive field of a unit is the region of the input that can affect it;
its size r and jump j (the input distance between neighbouring units) follow
the recursion r_out = r_in + (F_eff - 1) j_in, j_out = j_in S for every
convolution or pooling window of extent F_eff = D (F - 1) + 1 and stride S.
Rather than assume a chain of layers, this module walks the jaxpr of the
model's forward pass and applies the recursion to every value: residual
additions and Inception/U-Net concatenations take the larger field of their
inputs, transposed convolutions divide the jump, and a reduction or flatten
over a spatial axis makes the field global (the whole input).

Normalization statistics are treated as constants: a GroupNorm's mean over
the image technically connects every pixel, but the conventional receptive
field (Araujo et al. 2019) follows the feature path only; reductions inside
modules the caller names as normalization layers are therefore not followed.

Sizes are per spatial axis of the model input, in input pixels; the field is
the theoretical one and may exceed the input (ResNet-50's is 427 pixels on a
224 input).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Sequence

from jax.extend import core as jex_core

# Primitives that reduce over `axes`.
REDUCTIONS = ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
              "argmax", "argmin")
WINDOW_REDUCTIONS = ("reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window")


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
  """Size and jump per spatial axis of the input; `is_global` when the unit sees the whole input
  (size and jump are then the input's size)."""

  size: tuple[float, ...]
  jump: tuple[float, ...]
  is_global: bool = False

  def to_dict(self) -> dict[str, Any]:
    def plain(values):
      return [int(v) if float(v).is_integer() else round(float(v), 4) for v in values]
    return {"size": plain(self.size), "jump": plain(self.jump), "global": self.is_global}

  def __str__(self) -> str:
    if self.is_global:
      return "global"
    fmt = lambda values: "x".join(f"{v:g}" for v in values)  # pylint: disable=unnecessary-lambda-assignment
    return f"{fmt(self.size)} (jump {fmt(self.jump)})"


@dataclasses.dataclass(frozen=True)
class _Tracked:
  """What a value's dimensions mean: `axes[d]` is the input spatial axis that dimension d spans, or None."""

  axes: tuple[int | None, ...]
  size: tuple[float, ...]
  jump: tuple[float, ...]
  is_global: bool = False


@dataclasses.dataclass
class _Walk:
  num_spatial: int
  is_statistics_scope: Callable[[str], bool]
  records: list[tuple[str, _Tracked | None]] = dataclasses.field(default_factory=list)


def _global(num_spatial: int) -> _Tracked:
  return _Tracked((), (math.inf,) * num_spatial, (math.inf,) * num_spatial, True)


def _with_axes(info: _Tracked, axes: Sequence[int | None]) -> _Tracked:
  """Keeps `info` on new dimensions; a spatial axis that no dimension carries any more makes it global."""
  if info.is_global:
    return info
  if sorted(a for a in axes if a is not None) != list(range(len(info.size))):
    return _global(len(info.size))
  return dataclasses.replace(info, axes=tuple(axes))


def _merge(infos: Iterable[_Tracked | None], out_rank: int) -> _Tracked | None:
  """Elementwise combination: the larger field per axis (a residual sum, a concatenation)."""
  known = [info for info in infos if info is not None]
  if not known:
    return None
  same_rank = [info for info in known if len(info.axes) == out_rank]
  if not same_rank:
    return _global(len(known[0].size))
  size = tuple(max(values) for values in zip(*(info.size for info in same_rank)))
  jump = tuple(max(values) for values in zip(*(info.jump for info in same_rank)))
  return _Tracked(same_rank[0].axes, size, jump)


def _windowed(info: _Tracked, dims: Sequence[int], extents: Sequence[float], strides: Sequence[float],
              upsampling: Sequence[float]) -> _Tracked:
  """Applies windows of `extents` (input units of the operand) with `strides` along operand `dims`."""
  size, jump = list(info.size), list(info.jump)
  for dim, extent, stride, up in zip(dims, extents, strides, upsampling):
    axis = info.axes[dim]
    if axis is None:
      continue
    # With lhs (base) dilation `up`, a window of extent E touches ceil(E / up) operand units.
    touched = math.ceil(extent / up)
    size[axis] += (touched - 1) * jump[axis]
    jump[axis] = jump[axis] * stride / up
  return dataclasses.replace(info, size=tuple(size), jump=tuple(jump))


def _conv(eqn, lhs: _Tracked | None) -> _Tracked | None:
  if lhs is None:
    return None
  params = eqn.params
  numbers = params["dimension_numbers"]
  kernel_shape = eqn.invars[1].aval.shape
  spatial_lhs = numbers.lhs_spec[2:]
  extents = [d * (kernel_shape[k] - 1) + 1 for d, k in zip(params["rhs_dilation"], numbers.rhs_spec[2:])]
  out = _windowed(lhs, spatial_lhs, extents, params["window_strides"], params["lhs_dilation"])
  axes: list[int | None] = [None] * len(numbers.out_spec)
  for lhs_dim, out_dim in zip(spatial_lhs, numbers.out_spec[2:]):
    axes[out_dim] = lhs.axes[lhs_dim]
  axes[numbers.out_spec[0]] = lhs.axes[numbers.lhs_spec[0]]
  return _with_axes(out, axes)


def _reshape_groups(in_shape: Sequence[int], out_shape: Sequence[int]) -> tuple[dict[int, int], set[int]]:
  """Which input dims survive a reshape as one output dim, and which are merged or split."""
  kept, merged = {}, set()
  i = j = 0
  while i < len(in_shape) and j < len(out_shape):
    if in_shape[i] == out_shape[j]:
      kept[i] = j
      i, j = i + 1, j + 1
      continue
    if in_shape[i] == 1:
      merged.add(i)
      i += 1
      continue
    if out_shape[j] == 1:
      j += 1
      continue
    group, prod_in, prod_out = [i], in_shape[i], out_shape[j]
    i, j = i + 1, j + 1
    while prod_in != prod_out and (i < len(in_shape) or j < len(out_shape)):
      if prod_in < prod_out and i < len(in_shape):
        group.append(i)
        prod_in *= in_shape[i]
        i += 1
      elif j < len(out_shape):
        prod_out *= out_shape[j]
        j += 1
      else:
        break
    merged.update(group)
  merged.update(range(i, len(in_shape)))
  return kept, merged


def _structural(eqn, infos: list[_Tracked | None], walk: _Walk, stack: str) -> list[_Tracked | None] | None:
  """Rules for primitives that move, reduce or window dimensions; None when the primitive is not one."""
  name, params = eqn.primitive.name, eqn.params
  operand = infos[0] if infos else None
  out_rank = len(eqn.outvars[0].aval.shape) if hasattr(eqn.outvars[0].aval, "shape") else 0
  if name == "conv_general_dilated":
    return [_conv(eqn, operand)]
  if name in WINDOW_REDUCTIONS:
    extents = [d * (w - 1) + 1 for d, w in zip(params["window_dilation"], params["window_dimensions"])]
    return [None if operand is None else
            _windowed(operand, range(len(extents)), extents, params["window_strides"], params["base_dilation"])]
  if operand is None and name not in ("dot_general", "gather", "concatenate", "select_n"):
    return [None] * len(eqn.outvars)
  if name in REDUCTIONS:
    reduced = set(params["axes"])
    if any(operand.axes[d] is not None for d in reduced):
      return [None if walk.is_statistics_scope(stack) else _global(walk.num_spatial)] * len(eqn.outvars)
    return [_with_axes(operand, [a for d, a in enumerate(operand.axes) if d not in reduced])] * len(eqn.outvars)
  if name == "reshape":
    kept, merged = _reshape_groups(eqn.invars[0].aval.shape, params["new_sizes"])
    if any(operand.axes[d] is not None and eqn.invars[0].aval.shape[d] > 1 for d in merged):
      return [_global(walk.num_spatial)]
    axes: list[int | None] = [None] * out_rank
    for d_in, d_out in kept.items():
      axes[d_out] = operand.axes[d_in]
    return [_with_axes(operand, axes)]
  if name == "transpose":
    return [_with_axes(operand, [operand.axes[d] for d in params["permutation"]])]
  if name == "squeeze":
    dropped = set(params["dimensions"])
    return [_with_axes(operand, [a for d, a in enumerate(operand.axes) if d not in dropped])]
  if name == "broadcast_in_dim":
    axes = [None] * out_rank
    for d_in, d_out in enumerate(params["broadcast_dimensions"]):
      axes[d_out] = operand.axes[d_in]
    return [_with_axes(operand, axes)]
  if name == "slice" and params.get("strides"):
    ones = [1] * len(operand.axes)
    return [_windowed(operand, range(len(operand.axes)), ones, params["strides"], ones)]
  if name == "dot_general":
    return [_dot_general(eqn, infos, out_rank, walk)]
  if name == "gather":
    return [_gather(eqn, infos, out_rank, walk)]
  return None


def _dot_general(eqn, infos, out_rank: int, walk: _Walk) -> _Tracked | None:
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
  lhs, rhs = infos
  for info, contract in ((lhs, lhs_contract), (rhs, rhs_contract)):
    if info is not None and any(info.axes[d] is not None for d in contract):
      return _global(walk.num_spatial)  # a dense layer over a spatial axis sees all of it
  lhs_rank, rhs_rank = len(eqn.invars[0].aval.shape), len(eqn.invars[1].aval.shape)
  lhs_free = [d for d in range(lhs_rank) if d not in lhs_contract and d not in lhs_batch]
  rhs_free = [d for d in range(rhs_rank) if d not in rhs_contract and d not in rhs_batch]
  source = lhs if lhs is not None else rhs
  batch, free = (lhs_batch, lhs_free) if lhs is not None else (rhs_batch, rhs_free)
  offset = len(lhs_batch) + (0 if lhs is not None else len(lhs_free))
  axes: list[int | None] = [None] * out_rank
  for k, d in enumerate(batch):
    axes[k] = source.axes[d]
  for k, d in enumerate(free):
    axes[offset + k] = source.axes[d]
  return _with_axes(source, axes)


def _gather(eqn, infos, out_rank: int, walk: _Walk) -> _Tracked | None:
  """An embedding lookup: output positions follow the indices' positions."""
  operand, indices = infos[0], infos[1]
  if operand is not None:
    return _global(walk.num_spatial)  # reading a feature map at computed positions: assume anywhere
  offset_dims = set(eqn.params["dimension_numbers"].offset_dims)
  positions = [d for d in range(out_rank) if d not in offset_dims]
  index_dims = list(range(len(indices.axes) - 1))  # the last dimension holds the index vector
  axes: list[int | None] = [None] * out_rank
  for d_out, d_in in zip(positions, index_dims):
    axes[d_out] = indices.axes[d_in]
  return _with_axes(indices, axes)


def _sub_jaxpr(eqn) -> tuple[Any, list[Any]] | None:
  """The (jaxpr, consts) of a call-like primitive (jit, custom_jvp_call, custom_vjp_call, remat)."""
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    value = eqn.params.get(key)
    if isinstance(value, jex_core.ClosedJaxpr):
      return value.jaxpr, value.consts
    if isinstance(value, jex_core.Jaxpr):
      return value, []
  return None


def _walk(jaxpr, infos: list[_Tracked | None], walk: _Walk, prefix: str) -> list[_Tracked | None]:
  env: dict[Any, _Tracked | None] = dict(zip(jaxpr.invars, infos))

  def read(var):
    return None if isinstance(var, jex_core.Literal) else env.get(var)

  for eqn in jaxpr.eqns:
    in_infos = [read(v) for v in eqn.invars]
    inner_stack = str(eqn.source_info.name_stack)
    stack = "/".join(part for part in (prefix, inner_stack) if part)
    sub = _sub_jaxpr(eqn)
    if sub is not None and len(sub[0].invars) == len(eqn.invars):
      out_infos = _walk(sub[0], in_infos, walk, stack)
    elif all(info is None for info in in_infos):
      out_infos = [None] * len(eqn.outvars)
    elif any(info is not None and info.is_global for info in in_infos):
      out_infos = [_global(walk.num_spatial)] * len(eqn.outvars)  # whatever follows sees the whole input
    else:
      out_infos = _structural(eqn, in_infos, walk, stack)
      if out_infos is None:
        # Elementwise, concatenation, padding and the like keep dimensions in place: merge the
        # fields of the inputs of the output's rank; a rank-changing unknown primitive counts as global.
        out_infos = [_merge(in_infos, len(getattr(var.aval, "shape", ()))) for var in eqn.outvars]
    for var, info in zip(eqn.outvars, out_infos):
      env[var] = info
    walk.records.append((stack, out_infos[0] if out_infos else None))
  return [read(v) for v in jaxpr.outvars]


def trace_receptive_fields(closed_jaxpr, input_index: int, spatial_dims: Sequence[int],
                           is_statistics_scope: Callable[[str], bool] = lambda _: False
                           ) -> tuple[list[tuple[str, ReceptiveField | None]], ReceptiveField | None]:
  """Receptive fields of every equation's first output (with its name stack) and of the program's output.

  Args:
    closed_jaxpr: the forward pass, e.g. `jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x)`.
    input_index: position of the model input among the flattened jaxpr inputs.
    spatial_dims: the input's spatial dimensions (1, 2 for NHWC images; 1 for token sequences).
    is_statistics_scope: True for name stacks inside normalization layers, whose reductions are not followed.
  """
  jaxpr = closed_jaxpr.jaxpr
  rank = len(jaxpr.invars[input_index].aval.shape)
  axes = [None] * rank
  for index, dim in enumerate(spatial_dims):
    axes[dim] = index
  start = _Tracked(tuple(axes), (1.0,) * len(spatial_dims), (1.0,) * len(spatial_dims))
  infos: list[_Tracked | None] = [None] * len(jaxpr.invars)
  infos[input_index] = start
  walk = _Walk(len(spatial_dims), is_statistics_scope)
  outputs = _walk(jaxpr, infos, walk, "")
  input_sizes = tuple(float(jaxpr.invars[input_index].aval.shape[d]) for d in spatial_dims)

  def to_field(info: _Tracked | None) -> ReceptiveField | None:
    if info is None:
      return None
    if info.is_global:  # one unit that sees the whole input
      return ReceptiveField(input_sizes, input_sizes, True)
    return ReceptiveField(info.size, info.jump)

  return [(stack, to_field(info)) for stack, info in walk.records], to_field(outputs[0] if outputs else None)
