"""Timing train steps and the machine: median step time, compile time, FLOPs, the matmul peak.

Timings synchronize with the device (`block_until_ready`) before reading the
clock, exclude compilation, and feed a fixed batch so that only the step is
measured. FLOPs come from XLA's cost analysis of the whole (global) step.
"""

from __future__ import annotations

import dataclasses
import functools
import resource
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.nn import BatchNormGrouping
from cnnjax.train import Experiment
from cnnjax.train.step import train_step

# The matrix product that measures the machine's practical float32 peak.
PEAK_MATMUL_SIZE = 2048
PEAK_MATMUL_REPEATS = 10


def synthetic_batch(exp: Experiment, seed: int = 0) -> dict[str, np.ndarray]:
  """A random host batch of the experiment's input shape (uint8 images, or token ids), for this process's
  slice, as the host path hands it to the step (which normalizes it)."""
  rng = np.random.default_rng(seed)
  batch = exp.train_slice.local_batch
  shape = (batch,) + tuple(exp.input_shape)
  inputs = (rng.integers(0, exp.dataset.vocab_size, shape).astype(np.int32) if exp.dataset.task == "text"
            else rng.integers(0, 256, shape).astype(np.uint8))
  return {"input": inputs,
          "label": rng.integers(0, exp.dataset.num_classes, batch).astype(np.int32),
          "mask": np.ones(batch, np.float32)}


def time_train_step(exp: Experiment, *, warmup_steps: int, timed_steps: int) -> dict[str, Any]:
  """Compiles the experiment's train step, then times `timed_steps` steps after `warmup_steps`."""
  strategy = exp.strategy
  state = strategy.put_state(jax.device_get(exp.init_state()))
  batch = strategy.put_batch(synthetic_batch(exp))
  start = time.perf_counter()
  step = exp.train_step_fn().lower(state, batch).compile()
  compile_seconds = time.perf_counter() - start
  for _ in range(warmup_steps):
    state, metrics = step(state, batch)
    jax.block_until_ready(state)  # untimed: one program at a time (see parallel.waits_for_each_program)
  durations = []
  for _ in range(timed_steps):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    durations.append(time.perf_counter() - start)
  median = statistics.median(durations)
  return {"median_step_seconds": median, "images_per_second": exp.config.batch_size / median,
          "compile_seconds": compile_seconds, "timed_steps": timed_steps,
          "min_step_seconds": min(durations), "max_step_seconds": max(durations)}


def step_flops(exp: Experiment) -> float | None:
  """FLOPs of one global train step, from XLA's cost analysis of the unsharded step (None where the
  backend gives no analysis of a lowered program, as JAX's GPU backend does)."""
  # The same model seeing the whole batch: statistics groups and device axes do not change the count.
  model = exp.model.clone(norm=dataclasses.replace(exp.model.norm, grouping=BatchNormGrouping()))
  step = functools.partial(train_step, model_batch=exp.model_batch, model=model, tx=exp.tx,
                           schedule_shape=exp.schedule_shape, label_smoothing=exp.config.label_smoothing,
                           axis_name=None)
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), exp.init_state())
  batch_size = exp.config.batch_size
  batch = {"input": jax.ShapeDtypeStruct((batch_size,) + tuple(exp.input_shape),
                                          jnp.int32 if exp.dataset.task == "text" else jnp.uint8),
           "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
           "mask": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}
  # The lowered (unoptimized) program's count: no compilation needed, and it counts what the
  # model computes rather than what a particular backend's rewrites leave.
  analysis = jax.jit(step).lower(state, batch).cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


def peak_matmul_flops_per_second() -> float:
  """The machine's practical float32 peak: a large jitted matrix product, median of several."""
  size = PEAK_MATMUL_SIZE
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  durations = []
  for _ in range(PEAK_MATMUL_REPEATS):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    durations.append(time.perf_counter() - start)
  return 2.0 * size ** 3 / statistics.median(durations)


def peak_device_megabytes(devices: Any) -> float | None:
  """The largest peak memory in use on any of `devices` so far; None where the backend keeps no count (CPU)."""
  peaks = [(device.memory_stats() or {}).get("peak_bytes_in_use") for device in devices]
  if any(peak is None for peak in peaks):
    return None
  return max(peaks) / 2 ** 20


def peak_rss_megabytes() -> float:
  """This process's peak resident memory so far."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  # Linux reports kilobytes, macOS bytes.
  return peak / 1024.0 if sys.platform != "darwin" else peak / 2 ** 20
