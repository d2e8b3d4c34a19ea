"""Each measured design choice of cnnjax against its alternative, side by side: `scripts/bench_design_choices.py`.

docs/performance.md justifies a few choices by what they gain; this module
re-measures them so that those numbers come from a results file
(docs/results/design_choices.json) rather than from a one-off measurement:

* `batchnorm_relu`: cnnjax's BatchNorm (`cnnjax.nn.norm`), whose output is
  x * a + b, against the textbook (x - mean) / sigma * scale + bias, each
  followed by a ReLU, forward and backward;
* `init_compile`: compiling ResNet-20's initializer with cnnjax's options
  (`cnnjax.train.state.INIT_COMPILER_OPTIONS`, XLA's optimizations off) against
  XLA's defaults;
* `max_pool_*`: max pooling with cnnjax's own derivative (`cnnjax.nn.pooling`
  in the `cpu_tuned` lowering) against `jax.lax.reduce_window` and its generic
  select-and-scatter gradient, forward and backward;
* `small_conv`: a convolution on maps with fewer pixels than the kernel has
  taps, as `cnnjax.nn.lowering` computes it on CPU (one patch matrix product)
  against `jax.lax.conv_general_dilated`, forward and backward;
* `one_by_one_conv`: an unpadded 1x1 convolution as `cnnjax.nn.lowering`
  computes it on CPU (a matrix product over channels) against
  `jax.lax.conv_general_dilated`, forward and backward.

Before anything is timed, the two sides of each comparison are run once and
their outputs checked equal (`check_same`), so that a ratio never compares
different work. Then the two sides alternate over rounds, the order reversed
every other round, so that a noisy neighbour slows both alike; a round times
each side over several calls (one compilation for `init_compile`) and keeps
their median, and the results are the medians over rounds and the median of
the per-round ratios (alternative over cnnjax).

`markdown_rows` and `quoted_phrases` render what docs/performance.md quotes
from the results file, so that a test can hold the docs to it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cnnjax.models import build_model
from cnnjax.nn import lowering, pooling
from cnnjax.nn.norm import BatchNorm
from cnnjax.train import state as state_lib

CNNJAX, ALTERNATIVE = "cnnjax", "alternative"
# Channels-last images with (spatial..., C_in, C_out) kernels, the layout flax's Conv (and so cnnjax) uses.
CHANNELS_LAST = ("NHWC", "HWIO", "NHWC")
# Calls of a compiled function timed per side and round: enough to fill `seconds_per_round`, within these bounds.
MIN_CALLS, MAX_CALLS = 3, 50


@dataclasses.dataclass(frozen=True)
class Variant:
  """One side of a comparison: `run(prepare())` is what is timed, `values(result)` what it computed.

  `prepare` does the untimed work that each timed call needs afresh (for a
  compilation: tracing and lowering the program).
  """

  description: str
  run: Callable[[Any], Any]
  values: Callable[[Any], Any] = lambda result: result
  prepare: Callable[[], Any] = lambda: None


@dataclasses.dataclass(frozen=True)
class Comparison:
  """A design choice (`cnnjax`) against its alternative (`alternative`) on given shapes.

  `unit` is 'ms' for calls of compiled functions and 's' for compilations, which
  are timed once per round. `rtol` bounds each output's difference between the two
  sides relative to the output's largest magnitude.
  """

  name: str
  where: str
  what: str
  shapes: dict[str, Any]
  unit: str
  rtol: float
  cnnjax: Variant
  alternative: Variant

  @property
  def variants(self) -> dict[str, Variant]:
    return {CNNJAX: self.cnnjax, ALTERNATIVE: self.alternative}


def _normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _forward_backward(description: str, fn: Callable[..., jax.Array], args: tuple[Any, ...], seed: int) -> Variant:
  """`fn(*args)` and its gradient in every argument under a fixed random cotangent, compiled, as one timed call."""
  cotangent = _normal(seed, jax.eval_shape(fn, *args).shape)

  @jax.jit
  def step(cotangent, *inputs):
    outputs, vjp = jax.vjp(fn, *inputs)
    return outputs, vjp(cotangent)

  return Variant(description, run=lambda _: jax.block_until_ready(step(cotangent, *args)))


def batchnorm_relu(shape: tuple[int, ...]) -> Comparison:
  # Means away from 0, as after a convolution, and no value within a third of a standard deviation of its
  # channel's mean, where the ReLU's kink lies (the bias moves it less): at the kink the two forms' roundings
  # can fall on either side of 0 and their gradients then differ by the whole cotangent.
  u = _normal(0, shape)
  x = 1.0 + 2.0 * jnp.sign(u) * (0.5 + jnp.abs(u))
  features = shape[-1]
  module = BatchNorm(use_running_average=False)
  batch_stats = module.init(jax.random.PRNGKey(1), x)["batch_stats"]
  params = {"scale": 1.0 + 0.1 * _normal(2, (features,)), "bias": 0.02 * _normal(3, (features,))}

  def cnnjax_form(x, params):
    y, _ = module.apply({"params": params, "batch_stats": batch_stats}, x, mutable=["batch_stats"])
    return nn.relu(y)

  def textbook_form(x, params):
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    sigma = jnp.sqrt(jnp.square(x - mean).mean(axes) + module.epsilon)
    return nn.relu((x - mean) / sigma * params["scale"] + params["bias"])

  return Comparison("batchnorm_relu", "cnnjax/nn/norm.py", "BatchNorm + ReLU, forward and backward",
                    {"input": list(shape)}, "ms", 1e-4,
                    _forward_backward("cnnjax.nn.norm.BatchNorm (x * a + b), training mode, then ReLU", cnnjax_form,
                                      (x, params), seed=4),
                    _forward_backward("(x - mean) / sigma * scale + bias, then ReLU", textbook_form, (x, params),
                                      seed=4))


def init_compile(model_name: str, input_shape: tuple[int, ...], num_classes: int) -> Comparison:
  model = build_model(model_name, num_classes=num_classes)
  key = jax.random.PRNGKey(0)
  key_shape = jax.ShapeDtypeStruct(key.shape, key.dtype)

  def lowered_init():
    # A new function object each time, so that no trace, lowering or compilation is reused from a cache.
    def init(key):
      return model.init({"params": key}, jnp.zeros((1,) + input_shape, jnp.float32), train=False)
    return jax.jit(init).lower(key_shape)

  def initialized(executable):
    return executable(key)

  return Comparison(
      "init_compile", "cnnjax/train/state.py", "compiling the initializer (tracing and lowering not timed)",
      {"model": model_name, "input": list(input_shape), "num_classes": num_classes}, "s", 1e-6,
      Variant("compiled with cnnjax.train.state.INIT_COMPILER_OPTIONS (XLA's optimizations off)",
              run=lambda lowered: lowered.compile(compiler_options=state_lib.INIT_COMPILER_OPTIONS),
              values=initialized, prepare=lowered_init),
      Variant("compiled with XLA's default options", run=lambda lowered: lowered.compile(), values=initialized,
              prepare=lowered_init))


def max_pool(name: str, shape: tuple[int, ...], window: int, stride: int, padding: int) -> Comparison:
  x = _normal(5, shape)
  ndim = len(shape) - 2

  def cnnjax_pool(x):
    return pooling.pool(x, "max", window, stride, padding=padding, lowering=lowering.CPU_TUNED)

  def reduce_window_pool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1,) + (window,) * ndim + (1,),
                                 (1,) + (stride,) * ndim + (1,), ((0, 0),) + ((padding, padding),) * ndim + ((0, 0),))

  return Comparison(name, "cnnjax/nn/lowering.py", f"{window}x{window}/{stride} max pooling, forward and backward",
                    {"input": list(shape), "window": window, "stride": stride, "padding": padding}, "ms", 1e-6,
                    _forward_backward("cnnjax.nn.pooling.pool in the cpu_tuned lowering (its own derivative)",
                                      cnnjax_pool, (x,), seed=6),
                    _forward_backward("jax.lax.reduce_window max with JAX's gradient (select-and-scatter)",
                                      reduce_window_pool, (x,), seed=6))


def convolution(name: str, what: str, input_shape: tuple[int, ...], kernel_shape: tuple[int, ...],
                padding: int) -> Comparison:
  x = _normal(7, input_shape)
  # He initialization's scale, so that outputs are of the order of the inputs.
  w = _normal(8, kernel_shape) * math.sqrt(2.0 / math.prod(kernel_shape[:-1]))
  pads = ((padding, padding),) * (len(input_shape) - 2)
  strides = (1,) * (len(input_shape) - 2)

  def cnnjax_conv(x, w):
    return lowering.conv_general_dilated(x, w, strides, pads, dimension_numbers=CHANNELS_LAST,
                                         lowering=lowering.CPU_TUNED)

  def xla_conv(x, w):
    return jax.lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=CHANNELS_LAST)

  return Comparison(name, "cnnjax/nn/lowering.py", f"{what}, forward and backward",
                    {"input": list(input_shape), "kernel": list(kernel_shape), "padding": padding}, "ms", 1e-4,
                    _forward_backward("cnnjax.nn.lowering.conv_general_dilated in the cpu_tuned lowering", cnnjax_conv,
                                      (x, w), seed=9),
                    _forward_backward("jax.lax.conv_general_dilated", xla_conv, (x, w), seed=9))


# The comparisons `comparison` builds, in the order they run.
CHOICES = ("batchnorm_relu", "init_compile", "max_pool_32", "max_pool_112", "small_conv", "one_by_one_conv")
SMALL_CONV, ONE_BY_ONE_CONV = "3x3 convolution on 2x2 maps", "unpadded 1x1 convolution"


# Each choice's builder and its arguments: the shapes docs/performance.md quotes, then tiny ones for tests.
# The stem pooling of ResNet-18/50 (3x3, stride 2, padded by 1) at the benchmark's batch of 32, on the stem's
# output at 64x64 inputs (32x32x64) and at 224x224 (112x112x64); the last stage's 3x3, 512-channel convolution
# of ResNet-18/50 at 64x64 inputs (2x2 maps), at the same batch; the first 1x1 convolution of the later blocks
# of ResNet-50's first stage at 224x224 (56x56x256 -> 64), at batch 8 to keep the run short.
_BUILDERS: dict[str, tuple[Callable[..., Comparison], tuple[Any, ...], tuple[Any, ...]]] = {
    "batchnorm_relu": (batchnorm_relu, ((128, 32, 32, 16),), ((4, 8, 8, 4),)),
    "init_compile": (init_compile, ("resnet20", (32, 32, 3), 10), ("mlp", (8, 8, 1), 10)),
    "max_pool_32": (max_pool, ("max_pool_32", (32, 32, 32, 64), 3, 2, 1), ("max_pool_32", (2, 8, 8, 4), 3, 2, 1)),
    "max_pool_112": (max_pool, ("max_pool_112", (32, 112, 112, 64), 3, 2, 1),
                     ("max_pool_112", (2, 12, 12, 4), 3, 2, 1)),
    "small_conv": (convolution, ("small_conv", SMALL_CONV, (32, 2, 2, 512), (3, 3, 512, 512), 1),
                   ("small_conv", SMALL_CONV, (2, 2, 2, 8), (3, 3, 8, 8), 1)),
    "one_by_one_conv": (convolution, ("one_by_one_conv", ONE_BY_ONE_CONV, (8, 56, 56, 256), (1, 1, 256, 64), 0),
                        ("one_by_one_conv", ONE_BY_ONE_CONV, (2, 8, 8, 8), (1, 1, 8, 4), 0)),
}


def comparison(name: str, tiny: bool = False) -> Comparison:
  """One of `CHOICES` in the shapes docs/performance.md quotes; `tiny` shrinks it for tests."""
  if name not in _BUILDERS:
    raise KeyError(f"unknown design choice {name!r}; choose one of {', '.join(CHOICES)}")
  build, full_args, tiny_args = _BUILDERS[name]
  return build(*(tiny_args if tiny else full_args))


def check_same(name: str, cnnjax_values: Any, alternative_values: Any, rtol: float) -> float:
  """Raises unless both sides computed the same outputs within `rtol` of each output's largest magnitude;
  returns the largest such relative difference."""
  ours, theirs = jax.tree.leaves(cnnjax_values), jax.tree.leaves(alternative_values)
  if jax.tree.structure(cnnjax_values) != jax.tree.structure(alternative_values):
    raise AssertionError(f"{name}: the two sides return different structures")
  largest = 0.0
  for index, (a, b) in enumerate(zip(ours, theirs)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * max(scale, np.finfo(np.float32).tiny),
                               err_msg=f"{name}: output {index} differs between cnnjax and the alternative")
    if b.size:
      largest = max(largest, float(np.max(np.abs(a - b))) / max(scale, np.finfo(np.float32).tiny))
  return largest


def _median_seconds(variant: Variant, calls: int) -> float:
  durations = []
  for _ in range(calls):
    prepared = variant.prepare()
    start = time.perf_counter()
    variant.run(prepared)
    durations.append(time.perf_counter() - start)
  return statistics.median(durations)


def measure(comparison: Comparison, *, rounds: int, seconds_per_round: float,
            progress: Callable[[str], None] = print) -> dict[str, Any]:
  """Checks that both sides compute the same, then times them alternately over `rounds`; the JSON record."""
  variants = comparison.variants
  outputs = {}
  for name, variant in variants.items():  # the first call compiles (or warms up the compiler)
    outputs[name] = variant.values(variant.run(variant.prepare()))
  difference = check_same(comparison.name, outputs[CNNJAX], outputs[ALTERNATIVE], comparison.rtol)
  del outputs
  if comparison.unit == "s":
    calls = {name: 1 for name in variants}
  else:
    calls = {name: min(MAX_CALLS, max(MIN_CALLS, round(seconds_per_round / max(_median_seconds(v, 1), 1e-6))))
             for name, v in variants.items()}
  per_round: dict[str, list[float]] = {name: [] for name in variants}
  names = list(variants)
  for index in range(rounds):
    for name in (names if index % 2 == 0 else names[::-1]):
      per_round[name].append(_median_seconds(variants[name], calls[name]))
  scale = 1e3 if comparison.unit == "ms" else 1.0
  ratios = [a / c for a, c in zip(per_round[ALTERNATIVE], per_round[CNNJAX])]
  record = {
      "where": comparison.where, "what": comparison.what, "shapes": comparison.shapes, "unit": comparison.unit,
      "rounds": rounds, "max_relative_difference": difference, "rtol": comparison.rtol,
      "variants": {name: {"description": variant.description, "calls_per_round": calls[name],
                          "median": statistics.median(per_round[name]) * scale,
                          "per_round": [value * scale for value in per_round[name]]}
                   for name, variant in variants.items()},
      "alternative_over_cnnjax": statistics.median(ratios), "alternative_over_cnnjax_per_round": ratios}
  progress(f"{comparison.name}: cnnjax {format_value(record['variants'][CNNJAX]['median'])} {comparison.unit}, "
           f"alternative {format_value(record['variants'][ALTERNATIVE]['median'])} {comparison.unit} "
           f"(x{record['alternative_over_cnnjax']:.1f}); outputs agree within {difference:.1e}")
  return record


def run(names: tuple[str, ...] = CHOICES, *, tiny: bool = False, rounds: int, compile_rounds: int,
        seconds_per_round: float, progress: Callable[[str], None] = print) -> dict[str, Any]:
  """Measures the named comparisons in turn, each built just before (its arrays freed after); the payload's
  measurements, without the provenance."""
  choices = {}
  for name in names:
    built = comparison(name, tiny)
    choices[name] = measure(built, rounds=compile_rounds if built.unit == "s" else rounds,
                            seconds_per_round=seconds_per_round, progress=progress)
    del built
  return {"how": "each side of a choice run once and checked equal, then the two alternated over rounds (the order "
                 "reversed every other round); per round the median of several calls (one compilation for 's'); "
                 "medians over rounds; alternative_over_cnnjax is the median of the per-round ratios",
          "rounds": rounds, "compile_rounds": compile_rounds, "seconds_per_round": seconds_per_round,
          # Set by the tests' conftest: with it, both sides of every choice compile nearly unoptimized.
          "jax_disable_most_optimizations": os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS", ""),
          "load_average_at_end": list(os.getloadavg()), "choices": choices}


def format_value(value: float) -> str:
  """A measured time as the docs print it: no decimals from 100, one from 1, two below."""
  if value >= 100:
    return f"{value:.0f}"
  if value >= 1:
    return f"{value:.1f}"
  return f"{value:.2f}"


def _dims(shape: list[int]) -> str:
  return "x".join(str(d) for d in shape)


def _sides(payload: dict[str, Any], name: str) -> tuple[str, str, str]:
  """(cnnjax, alternative, ratio) of a choice as the docs print them: the medians and the median per-round ratio."""
  record = payload["choices"][name]
  return (format_value(record["variants"][CNNJAX]["median"]), format_value(record["variants"][ALTERNATIVE]["median"]),
          f"x{record['alternative_over_cnnjax']:.1f}")


def _small_conv_layer(payload: dict[str, Any]) -> str:
  shapes = payload["choices"]["small_conv"]["shapes"]
  kernel, batch = shapes["kernel"], shapes["input"][0]
  return f"one {_dims(kernel[:2])}, {kernel[-1]}-channel layer on {batch} maps of {_dims(shapes['input'][1:3])}"


def _one_by_one_layer(payload: dict[str, Any]) -> str:
  shapes = payload["choices"]["one_by_one_conv"]["shapes"]
  return f"batch {shapes['input'][0]}, {_dims(shapes['input'][1:])} -> {shapes['kernel'][-1]}"


def _pool_sizes(payload: dict[str, Any]) -> tuple[str, str, int]:
  """The two pooling inputs without their batch, and the batch."""
  small, large = (payload["choices"][name]["shapes"]["input"] for name in ("max_pool_32", "max_pool_112"))
  return _dims(small[1:]), _dims(large[1:]), small[0]


def markdown_rows(payload: dict[str, Any]) -> list[str]:
  """The rows of docs/performance.md's "Measurements behind design choices" table that quote the results file."""
  bn = _sides(payload, "batchnorm_relu")
  init = _sides(payload, "init_compile")
  pool_small, pool_large = _sides(payload, "max_pool_32"), _sides(payload, "max_pool_112")
  small_size, large_size, pool_batch = _pool_sizes(payload)
  small_conv, one_by_one = _sides(payload, "small_conv"), _sides(payload, "one_by_one_conv")
  bn_input = _dims(payload["choices"]["batchnorm_relu"]["shapes"]["input"])
  model = payload["choices"]["init_compile"]["shapes"]["model"]
  rows = [
      ("BatchNorm as `x * a + b` (`cnnjax/nn/norm.py`)",
       f"BatchNorm + ReLU forward and backward on {bn_input}: {bn[0]} ms, against {bn[1]} ms for "
       f"`(x - mean) / sigma * scale + bias` ({bn[2]})"),
      ("initializers compiled without XLA's optimizations (`cnnjax/train/state.py`)",
       f"`{model}`'s initialization compile time {init[1]} s -> {init[0]} s ({init[2]})"),
      ("max and min pooling's own derivative (`cnnjax/nn/lowering.py`)",
       f"3x3, stride-2 max pooling forward and backward, batch {pool_batch}: {pool_small[0]} ms at {small_size} "
       f"and {pool_large[0]} ms at {large_size}, against {pool_small[1]} and {pool_large[1]} ms with "
       f"select-and-scatter ({pool_small[2]}, {pool_large[2]})"),
      ("convolutions on maps with fewer pixels than the kernel has taps as one patch matrix product "
       "(`cnnjax/nn/lowering.py`)",
       f"{_small_conv_layer(payload)}, forward and backward: {small_conv[0]} ms, against {small_conv[1]} ms "
       f"for XLA's convolution ({small_conv[2]})"),
      ("unpadded 1x1 convolutions as a matrix product over channels (`cnnjax/nn/lowering.py`)",
       f"one of ResNet-50's 1x1 layers at 224x224 ({_one_by_one_layer(payload)}), forward and backward: "
       f"{one_by_one[0]} ms, against {one_by_one[1]} ms for XLA's convolution ({one_by_one[2]})")]
  return [f"| {choice} | {measured} |" for choice, measured in rows]


def quoted_phrases(payload: dict[str, Any]) -> list[str]:
  """What the lowering paragraph of docs/performance.md quotes from the results file, each on one line."""
  small_conv = _sides(payload, "small_conv")
  pool_small, pool_large = _sides(payload, "max_pool_32"), _sides(payload, "max_pool_112")
  small_size, large_size, pool_batch = _pool_sizes(payload)
  one_by_one = _sides(payload, "one_by_one_conv")
  return [f"({small_conv[1]} ms for {_small_conv_layer(payload)}, forward and backward)",
          f"one patch matrix product ({small_conv[0]} ms)",
          f"{pool_small[1]} -> {pool_small[0]} ms at {small_size}, {pool_large[1]} -> {pool_large[0]} ms at "
          f"{large_size}, batch {pool_batch}, forward included",
          f"{_one_by_one_layer(payload)}, forward and backward: {one_by_one[1]} -> {one_by_one[0]} ms, "
          f"{one_by_one[2]}"]
