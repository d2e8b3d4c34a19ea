"""The training loop: build everything from a config, train with resume, evaluate, summarize.

`build(config)` turns a config into an `Experiment` (dataset, model, optimizer,
parallel strategy) and validates everything it can before any file is written.
`run(config, workdir)` trains it:

* resumes from the newest checkpoint in `workdir/checkpoints` (state and data
  position), and returns the existing summary of a run that already finished;
* checks every step that the loss and gradients are finite (one step behind, so
  the device is never idle), and stops naming the step if not, before any
  checkpoint of the bad state is written;
* logs train and eval points to `metrics.jsonl`, checkpoints every
  `checkpoint_every_steps` steps and at the end, and writes `summary.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnnjax import config as config_lib
from cnnjax import data as data_lib
from cnnjax import metrics as metrics_lib
from cnnjax import optim, parallel
from cnnjax.checkpoint import Checkpointer
from cnnjax.errors import ConfigError, NonFiniteError
from cnnjax.models import build_model
from cnnjax.train.state import TrainState, count_params, create_train_state
from cnnjax.train.step import eval_step, train_step

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass
class Experiment:
  """Everything a run is made of, built and checked from a config."""

  config: ml_collections.ConfigDict
  dataset: data_lib.Dataset
  preprocess: data_lib.Preprocess
  input_shape: tuple[int, int, int]
  model: Any
  tx: Any
  schedule_shape: Any
  strategy: parallel.Strategy
  total_steps: int
  train_slice: data_lib.ProcessSlice
  eval_slice: data_lib.ProcessSlice

  def init_state(self) -> TrainState:
    return create_train_state(self.config.seed, self.model, self.tx, self.input_shape)

  def train_step_fn(self):
    return self.strategy.compile(
        functools.partial(train_step, model=self.model, tx=self.tx, schedule_shape=self.schedule_shape,
                          label_smoothing=self.config.label_smoothing, axis_name=self.strategy.axis_name),
        donate_state=True, returns_state=True)

  def eval_step_fn(self):
    return self.strategy.compile(
        functools.partial(eval_step, model=self.model, axis_name=self.strategy.axis_name),
        donate_state=False, returns_state=False)

  def train_batches(self) -> Any:
    dataset = data_lib.train_dataset(self.dataset.train, self.preprocess, seed=self.config.seed,
                                     batch=self.train_slice, num_steps=self.total_steps)
    return data_lib.iterate(dataset, num_threads=self.config.data.num_threads,
                            prefetch=self.config.data.prefetch_batches)

  def eval_batches(self) -> Any:
    dataset = data_lib.eval_dataset(self.dataset.eval, self.preprocess, batch=self.eval_slice)
    return data_lib.iterate(dataset, num_threads=self.config.data.num_threads,
                            prefetch=self.config.data.prefetch_batches)


def _dtype(name: str) -> Any:
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def build(config: ml_collections.ConfigDict, *, devices: Sequence[Any] | None = None) -> Experiment:
  """Validates `config` and builds the run; raises a CnnjaxError on any bad input. Writes nothing."""
  config_lib.validate(config)
  process_count = jax.process_count()
  try:
    selected = parallel.select_devices(config.parallel.strategy, config.parallel.num_devices, devices)
    eval_batch = config.eval_batch_size or config.batch_size
    parallel.check_divisible(config.batch_size, len(selected), process_count, "batch_size")
    parallel.check_divisible(eval_batch, len(selected), process_count,
                             "eval_batch_size" if config.eval_batch_size else "batch_size (used for eval)")
    layout = parallel.Layout(config.parallel.strategy, selected, config.batch_size)
    grouping = parallel.batchnorm_grouping(
        config.model.bn_sync, config.model.bn_group_size, per_device_view=layout.per_device_view,
        axis_name=layout.axis_name, num_devices=layout.num_devices, global_batch=config.batch_size)
  except ValueError as e:
    raise ConfigError(str(e)) from None

  dataset = data_lib.open_dataset(
      config.data.name, tfds_data_dir=config.data.tfds_data_dir, train_split=config.data.train_split,
      eval_split=config.data.eval_split, train_path=config.data.train_path,
      eval_path=config.data.eval_path, num_classes=config.data.num_classes)
  height, width, channels = dataset.image_shape
  if config.data.image_size:
    height = width = config.data.image_size
  if height is None or width is None:
    raise ConfigError(f"dataset {dataset.name!r} has images of varying size; set data.image_size")
  preprocess = data_lib.Preprocess(
      image_size=config.data.image_size, mean=dataset.mean, std=dataset.std, seed=config.seed,
      random_resized_crop=config.data.random_resized_crop,
      augment=data_lib.Augment(crop_padding=config.data.crop_padding, flip=config.data.flip,
                               rotation_degrees=config.data.rotation_degrees))

  norm_options = dict(momentum=config.model.bn_momentum, epsilon=config.model.bn_epsilon,
                      group_norm_groups=config.model.group_norm_groups,
                      **dataclasses.asdict(grouping))
  try:
    model = build_model(config.model.name, num_classes=dataset.num_classes, norm_kind=config.model.norm,
                        norm_options=norm_options, dtype=_dtype(config.model.dtype),
                        **config_lib.model_options(config))
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e).splitlines()[0]) from None

  if config.num_train_steps > 0:
    total_steps = config.num_train_steps
  else:
    total_steps = max(1, math.ceil(config.num_epochs * len(dataset.train) / config.batch_size))
  shape = optim.schedule_shape(config.optimizer.schedule, total_steps=total_steps,
                               warmup_steps=config.optimizer.warmup_steps,
                               decay_boundaries=tuple(config.optimizer.decay_boundaries),
                               decay_factor=config.optimizer.decay_factor)
  tx = optim.make_optimizer(config.optimizer.name, learning_rate=config.optimizer.learning_rate,
                            weight_decay=config.optimizer.weight_decay, shape=shape,
                            momentum=config.optimizer.momentum, nesterov=config.optimizer.nesterov,
                            b1=config.optimizer.b1, b2=config.optimizer.b2, eps=config.optimizer.eps)
  return Experiment(
      config=config, dataset=dataset, preprocess=preprocess, input_shape=(height, width, channels),
      model=model, tx=tx, schedule_shape=shape, strategy=parallel.Strategy(layout),
      total_steps=total_steps,
      train_slice=data_lib.ProcessSlice(config.batch_size, jax.process_index(), process_count),
      eval_slice=data_lib.ProcessSlice(eval_batch, jax.process_index(), process_count))


def evaluate(exp: Experiment, state: Any, eval_fn: Any) -> dict[str, float]:
  """Loss and accuracy over every eval example exactly once (the padded last batch is masked)."""
  totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "examples": 0.0}
  for batch in exp.eval_batches():
    device_batch = exp.strategy.put_batch(_device_part(batch))
    sums = exp.strategy.get_outputs(eval_fn(state, device_batch))
    for key in totals:
      totals[key] += float(sums[key])
  count = max(totals["count"], 1.0)
  return {"loss": totals["loss_sum"] / count, "accuracy": totals["correct"] / count,
          "examples": int(totals["examples"])}


def _device_part(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: v for k, v in batch.items() if k not in data_lib.HOST_ONLY_KEYS}


class _TrainLog:
  """Per-step metrics fetched one step behind, averaged over each logging window."""

  def __init__(self):
    self.window: list[dict[str, float]] = []
    self.last_window: dict[str, float] | None = None

  def add(self, metrics: dict[str, float]) -> None:
    self.window.append(metrics)

  def flush(self) -> dict[str, float]:
    keys = self.window[0].keys()
    mean = {k: float(np.mean([m[k] for m in self.window])) for k in keys}
    self.window, self.last_window = [], mean
    return mean


class _Throughput:
  """Examples per second of training steps, excluding compilation, evaluation and checkpointing."""

  def __init__(self, global_batch: int):
    self.global_batch = global_batch
    self._start: float | None = None
    self._paused = 0.0
    self._steps = 0
    self.total_seconds, self.total_steps = 0.0, 0

  def start(self) -> None:
    self._start, self._paused, self._steps = time.time(), 0.0, 0

  def count_step(self) -> None:
    self._steps += 1

  @contextlib.contextmanager
  def paused(self):
    began = time.time()
    try:
      yield
    finally:
      self._paused += time.time() - began

  def lap(self) -> float:
    """Throughput since the last lap; starts the next one."""
    if self._start is None:
      return 0.0
    seconds = time.time() - self._start - self._paused
    steps = self._steps
    self.total_seconds += seconds
    self.total_steps += steps
    self.start()
    return steps * self.global_batch / seconds if steps and seconds > 0 else 0.0

  def overall(self) -> float:
    return self.total_steps * self.global_batch / self.total_seconds if self.total_steps else 0.0


def run(config: ml_collections.ConfigDict, workdir: str, *,
        devices: Sequence[Any] | None = None) -> dict[str, Any]:
  """Trains and evaluates `config` in `workdir`, resuming if it holds checkpoints. Returns the summary."""
  wall_start = time.time()
  exp = build(config, devices=devices)
  is_writer = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  summary_path = os.path.join(workdir, SUMMARY_FILE)
  checkpointer = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), max_to_keep=config.keep_checkpoints)
  host_state = jax.device_get(exp.init_state())
  data_state = None
  latest = checkpointer.latest_step()
  if latest is not None:
    host_state, data_state = checkpointer.restore(latest, host_state)
  start_step = int(host_state.step)
  finished = metrics_lib.read_json(summary_path)
  if start_step >= exp.total_steps and finished is not None and finished.get("step") == exp.total_steps:
    checkpointer.close()
    return finished

  if is_writer:
    metrics_lib.write_json(os.path.join(workdir, CONFIG_FILE), json.loads(config.to_json_best_effort()))
  writer = metrics_lib.MetricsWriter(os.path.join(workdir, METRICS_FILE), enabled=is_writer)
  writer.truncate_after(start_step)
  progress = metrics_lib.Progress(total=exp.total_steps, initial=start_step, enabled=is_writer,
                                  allow_bar=config.progress_bar)
  if latest is not None:
    progress.message(f"resuming from step {start_step} ({checkpointer.directory})")

  strategy = exp.strategy
  state = strategy.put_state(host_state)
  train_fn, eval_fn = exp.train_step_fn(), exp.eval_step_fn()
  batches = exp.train_batches()
  if data_state is not None:
    batches.set_state(data_state)

  log = _TrainLog()
  timer = _Throughput(config.batch_size)
  compile_seconds = 0.0
  pending: tuple[int, Any] | None = None  # (step, device metrics) not yet checked
  last_reported = start_step

  def check(entry: tuple[int, Any] | None) -> None:
    if entry is None:
      return
    step_index, device_metrics = entry
    values = {k: float(v) for k, v in strategy.get_outputs(device_metrics).items()}
    if values["finite"] < 1.0:
      raise NonFiniteError(
          f"loss or gradients became non-finite at step {step_index + 1} (loss={values['loss']}, "
          f"grad_norm={values['grad_norm']}); the last good checkpoint is kept in {checkpointer.directory}; "
          "lower optimizer.learning_rate or add warmup")
    log.add(values)

  try:
    for step in range(start_step, exp.total_steps):
      device_batch = strategy.put_batch(_device_part(next(batches)))
      if step == start_step:
        compile_start = time.time()
        train_fn = train_fn.lower(state, device_batch).compile()
        compile_seconds = time.time() - compile_start
      state, device_metrics = train_fn(state, device_batch)
      check(pending)
      pending = (step, device_metrics)
      done = step + 1
      if step == start_step:
        jax.block_until_ready(device_metrics)
        timer.start()  # the first step is not timed: it includes one-off transfers
      else:
        timer.count_step()
      if done % config.log_every_steps == 0 or done == exp.total_steps:
        check(pending)
        pending = None
        throughput = timer.lap()
        window = log.flush()
        writer.write({"step": done, "split": "train", "loss": window["loss"], "accuracy": window["accuracy"],
                      "learning_rate": window["learning_rate"], "grad_norm": window["grad_norm"],
                      "examples_per_second": throughput})
        progress.update(done, done - last_reported, window, throughput)
        last_reported = done
      if config.eval_every_steps and done % config.eval_every_steps == 0 and done != exp.total_steps:
        check(pending)
        pending = None
        with timer.paused():
          result = evaluate(exp, state, eval_fn)
        writer.write({"step": done, "split": "eval", **result})
        progress.message(f"step {done}: eval accuracy {result['accuracy']:.4f} loss {result['loss']:.4f}")
      if done % config.checkpoint_every_steps == 0 or done == exp.total_steps:
        check(pending)
        pending = None
        with timer.paused():
          checkpointer.save(done, strategy.get_state(state), batches.get_state())
  finally:
    progress.close()

  result = evaluate(exp, state, eval_fn)
  final_state = strategy.get_state(state)
  writer.write({"step": exp.total_steps, "split": "eval", **result})
  last = log.last_window or {}
  summary = {
      "eval_accuracy": result["accuracy"], "eval_loss": result["loss"], "eval_examples": result["examples"],
      "train_loss": last.get("loss"), "train_accuracy": last.get("accuracy"),
      "step": int(final_state.step), "examples_per_second": timer.overall(),
      "compile_seconds": compile_seconds, "wall_seconds": time.time() - wall_start,
      "param_checksum": metrics_lib.param_checksum(final_state.params),
      "param_l2": metrics_lib.param_l2(final_state.params), "num_params": count_params(final_state.params),
      "model": config.model.name, "data": config.data.name, "strategy": strategy.name,
      "bn_sync": config.model.bn_sync, "num_devices": strategy.layout.num_devices,
      "num_processes": jax.process_count(), "global_batch": config.batch_size,
  }
  if is_writer:
    metrics_lib.write_json(summary_path, summary)
  checkpointer.close()
  return summary
