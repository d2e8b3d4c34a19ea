"""Timing train steps: median step time, throughput and compile time of a built experiment.

Used by the benchmark scripts in `scripts/`. Timings synchronize with the device
(`block_until_ready`) before reading the clock, exclude compilation, and feed a
fixed batch so that only the step is measured.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import numpy as np

from cnnjax.train import Experiment


def synthetic_batch(exp: Experiment, seed: int = 0) -> dict[str, np.ndarray]:
  """A random batch of the experiment's input shape, for this process's slice."""
  rng = np.random.default_rng(seed)
  batch = exp.train_slice.local_batch
  return {"input": rng.standard_normal((batch,) + tuple(exp.input_shape)).astype(np.float32),
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
  jax.block_until_ready(state)
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
