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
import logging
import math
import os
import shutil
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
from cnnjax import checkpoint as checkpoint_lib
from cnnjax.checkpoint import Checkpointer
from cnnjax.errors import CheckpointError, ConfigError, NonFiniteError
from cnnjax.models import build_model
from cnnjax.models.validation import InputTooSmallError, check_input_shape
from cnnjax.train import engines
from cnnjax.train.state import TrainState, count_params, create_train_state
from cnnjax.train.step import eval_step, train_step

SUMMARY_FILE = "summary.json"
ERROR_FILE = "error.json"  # written when a run stops on a non-finite loss
UNREADABLE_DIR = checkpoint_lib.UNREADABLE_DIR
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
# What a run writes into its workdir; `--fresh` moves these aside.
RUN_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, ERROR_FILE, CHECKPOINT_DIR, UNREADABLE_DIR)


@dataclasses.dataclass
class Experiment:
  """Everything a run is made of, built and checked from a config."""

  config: ml_collections.ConfigDict
  dataset: data_lib.Dataset
  preprocess: data_lib.Preprocess
  input_shape: tuple[int, ...]  # one example: (H, W, C), (D, H, W, C) or (L,)
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
      eval_path=config.data.eval_path, num_classes=config.data.num_classes,
      vocab_size=config.data.vocab_size, max_length=config.data.max_length,
      cache_megabytes=config.data.cache_megabytes)
  augment = data_lib.Augment(crop_padding=config.data.crop_padding, flip=config.data.flip,
                             rotation_degrees=config.data.rotation_degrees)
  # (H, W, C) images, (D, H, W, C) volumes or (L,) token ids, after resizing.
  input_shape = dataset.model_input_shape(config.data.image_size, augmented=augment.enabled,
                                          random_resized_crop=config.data.random_resized_crop)
  preprocess = data_lib.Preprocess(
      image_size=config.data.image_size, mean=dataset.mean, std=dataset.std, seed=config.seed,
      random_resized_crop=config.data.random_resized_crop, augment=augment, task=dataset.task,
      mask_fill=dataset.background_class)

  norm_options = dict(momentum=config.model.bn_momentum, epsilon=config.model.bn_epsilon,
                      group_norm_groups=config.model.group_norm_groups,
                      **dataclasses.asdict(grouping))
  try:
    model = build_model(config.model.name, num_classes=dataset.num_classes, norm_kind=config.model.norm,
                        norm_options=norm_options, dtype=_dtype(config.model.dtype),
                        **{**config_lib.model_options(config), **dataset.model_options})
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e).splitlines()[0]) from None
  try:
    check_input_shape(model, input_shape, config.model.name)
  except InputTooSmallError as e:
    raise ConfigError(str(e)) from None

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
      config=config, dataset=dataset, preprocess=preprocess, input_shape=input_shape,
      model=model, tx=tx, schedule_shape=shape, strategy=parallel.Strategy(layout),
      total_steps=total_steps,
      train_slice=data_lib.ProcessSlice(config.batch_size, jax.process_index(), process_count),
      eval_slice=data_lib.ProcessSlice(eval_batch, jax.process_index(), process_count))


class TrainLog:
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


class Throughput:
  """Examples per second of training steps, excluding compilation, evaluation and checkpointing."""

  def __init__(self, examples_per_step: int):
    self.examples_per_step = examples_per_step
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
    return steps * self.examples_per_step / seconds if steps and seconds > 0 else 0.0

  def overall(self) -> float:
    return self.total_steps * self.examples_per_step / self.total_seconds if self.total_steps else 0.0


class Member:
  """One run's workdir (checkpoints, config.json, metrics.jsonl, summary.json) and its data stream."""

  def __init__(self, exp: Experiment, workdir: str):
    self.exp, self.config, self.workdir = exp, exp.config, workdir
    self.is_writer = jax.process_index() == 0
    self.checkpointer: Checkpointer | None = None
    self.log = TrainLog()
    self.error: str | None = None
    self.last_eval: dict[str, float] | None = None
    self.host_state: Any = None
    self.data_state: dict[str, Any] | None = None
    self.resumed = False

  @property
  def summary_path(self) -> str:
    return os.path.join(self.workdir, SUMMARY_FILE)

  def finished_summary(self) -> dict[str, Any] | None:
    """The summary of a run that already reached its last step, if any."""
    summary = metrics_lib.read_json(self.summary_path)
    return summary if summary is not None and summary.get("step") == self.exp.total_steps else None

  def check_same_run(self) -> None:
    """Refuses a workdir that holds a run of another config (before anything is read or written)."""
    saved = metrics_lib.read_json(os.path.join(self.workdir, CONFIG_FILE))
    if saved is None:
      return
    differences = config_lib.resume_differences(saved, self.config)
    if differences:
      shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in differences[:3])
      more = f" and {len(differences) - 3} more" if len(differences) > 3 else ""
      raise CheckpointError(
          f"{self.workdir} holds a run with a different config ({shown}{more}); use a new --workdir, "
          "or pass --fresh to set the old run aside and start over")

  def set_aside(self) -> str | None:
    """Moves an earlier run's files into `replaced-<time>/` inside the workdir (nothing is deleted)."""
    present = [name for name in RUN_FILES if os.path.exists(os.path.join(self.workdir, name))]
    if not present or not self.is_writer:
      return None
    target = os.path.join(self.workdir, f"replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(target)
    for name in present:
      shutil.move(os.path.join(self.workdir, name), os.path.join(target, name))
    return target

  def restore(self) -> int:
    """Opens the checkpoints, restores the newest readable one if any; returns the step to start from."""
    os.makedirs(self.workdir, exist_ok=True)
    self.checkpointer = Checkpointer(os.path.join(self.workdir, CHECKPOINT_DIR),
                                     max_to_keep=self.config.keep_checkpoints)
    self.host_state = jax.device_get(self.exp.init_state())
    restored = self.checkpointer.restore_latest(self.host_state)
    if restored is not None:
      _, self.host_state, self.data_state = restored
      self.resumed = True
    return int(self.host_state.step)

  def open_outputs(self, start_step: int) -> metrics_lib.MetricsWriter:
    if self.is_writer:
      metrics_lib.write_json(os.path.join(self.workdir, CONFIG_FILE), json.loads(self.config.to_json_best_effort()))
    writer = metrics_lib.MetricsWriter(os.path.join(self.workdir, METRICS_FILE), enabled=self.is_writer)
    writer.truncate_after(start_step)
    return writer

  def close(self) -> None:
    if self.checkpointer is not None:
      self.checkpointer.close()


def train_members(members: Sequence[Member], engine: Any, *, start_step: int) -> list[dict[str, Any] | None]:
  """Trains restored members in lockstep from `start_step`; returns each one's summary (None if it failed).

  A member whose loss or gradients stop being finite is marked failed at that
  step (its last good checkpoint stays) and no longer logged or checkpointed;
  when every member has failed, NonFiniteError is raised.
  """
  wall_start = time.time()
  total_steps = members[0].exp.total_steps
  config = members[0].config
  writers = [member.open_outputs(start_step) for member in members]
  progress = metrics_lib.Progress(total=total_steps, initial=start_step, enabled=members[0].is_writer,
                                  allow_bar=config.progress_bar)
  if members[0].resumed:
    progress.message(f"resuming from step {start_step} ({members[0].checkpointer.directory})")

  state = engine.put_state([member.host_state for member in members])
  iterators = []
  for member in members:
    iterator = member.exp.train_batches()
    if member.data_state is not None:
      iterator.set_state(member.data_state)
    iterators.append(iterator)
  eval_fn = engine.eval_step_fn()
  timer = Throughput(engine.global_batch * engine.num_members)
  compile_seconds = 0.0
  pending: tuple[int, Any] | None = None  # (step, device metrics) not yet checked
  last_reported = start_step

  def alive() -> list[tuple[Member, metrics_lib.MetricsWriter]]:
    return [(m, w) for m, w in zip(members, writers) if m.error is None]

  def check(entry: tuple[int, Any] | None) -> None:
    if entry is None:
      return
    step_index, device_metrics = entry
    for member, values in zip(members, engine.outputs(device_metrics)):
      if member.error is not None:
        continue
      if values["finite"] < 1.0:
        member.error = (
            f"loss or gradients became non-finite at step {step_index + 1} (loss={values['loss']}, "
            f"grad_norm={values['grad_norm']}); the last good checkpoint is kept in "
            f"{member.checkpointer.directory}; lower optimizer.learning_rate or add warmup")
        progress.message(f"{member.workdir}: {member.error}")
        if member.is_writer:
          metrics_lib.write_json(os.path.join(member.workdir, ERROR_FILE),
                                 {"step": step_index + 1, "error": member.error})
      else:
        member.log.add(values)
    if all(member.error is not None for member in members):
      raise NonFiniteError(members[0].error)

  def evaluate_alive(step: int) -> None:
    for member, writer, totals in zip(members, writers, engine.eval_sums(state, eval_fn)):
      if member.error is None:
        member.last_eval = engines.eval_result(totals)
        writer.write({"step": step, "split": "eval", **member.last_eval})

  try:
    for step in range(start_step, total_steps):
      device_batch = engine.put_batch([next(iterator) for iterator in iterators])
      if step == start_step:
        compile_start = time.time()
        train_fn = engine.compile_train_step(state, device_batch)
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
      if done % config.log_every_steps == 0 or done == total_steps:
        check(pending)
        pending = None
        throughput = timer.lap() / engine.num_members
        for member, writer in alive():
          window = member.log.flush()
          writer.write({"step": done, "split": "train", "loss": window["loss"], "accuracy": window["accuracy"],
                        "learning_rate": window["learning_rate"], "grad_norm": window["grad_norm"],
                        "examples_per_second": throughput})
        progress.update(done, done - last_reported, alive()[0][0].log.last_window, throughput)
        last_reported = done
      if config.eval_every_steps and done % config.eval_every_steps == 0 and done != total_steps:
        check(pending)
        pending = None
        with timer.paused():
          evaluate_alive(done)
        first = alive()[0][0]
        progress.message(f"step {done}: eval accuracy {first.last_eval['accuracy']:.4f} "
                          f"loss {first.last_eval['loss']:.4f}")
      if done % config.checkpoint_every_steps == 0 or done == total_steps:
        check(pending)
        pending = None
        with timer.paused():
          host_states = engine.get_states(state)
          for (member, iterator), host_state in zip(zip(members, iterators), host_states):
            if member.error is None:
              member.checkpointer.save(done, host_state, iterator.get_state())
  finally:
    progress.close()

  evaluate_alive(total_steps)
  final_states = engine.get_states(state)
  summaries: list[dict[str, Any] | None] = []
  for member, final_state in zip(members, final_states):
    if member.error is not None:
      summaries.append(None)
      continue
    last = member.log.last_window or {}
    result = member.last_eval
    summary = {
        "eval_accuracy": result["accuracy"], "eval_loss": result["loss"], "eval_examples": result["examples"],
        "train_loss": last.get("loss"), "train_accuracy": last.get("accuracy"),
        "step": int(final_state.step), "examples_per_second": timer.overall() / engine.num_members,
        "compile_seconds": compile_seconds, "wall_seconds": time.time() - wall_start,
        "param_checksum": metrics_lib.param_checksum(final_state.params),
        "param_l2": metrics_lib.param_l2(final_state.params), "num_params": count_params(final_state.params),
        "model": member.config.model.name, "data": member.config.data.name,
        "strategy": engine.strategy_name, "bn_sync": member.config.model.bn_sync,
        "num_devices": engine.num_devices, "num_processes": jax.process_count(),
        "global_batch": member.config.batch_size,
    }
    if member.is_writer:
      metrics_lib.write_json(member.summary_path, summary)
    summaries.append(summary)
  return summaries


def run(config: ml_collections.ConfigDict, workdir: str, *, devices: Sequence[Any] | None = None,
        fresh: bool = False) -> dict[str, Any]:
  """Trains and evaluates `config` in `workdir`, resuming if it holds checkpoints. Returns the summary.

  A workdir holding a run of a different config is refused unless `fresh`, which
  first moves the earlier run's files into `workdir/replaced-<time>/`.
  """
  exp = build(config, devices=devices)
  member = Member(exp, workdir)
  if fresh:
    moved = member.set_aside()
    if moved:
      logging.getLogger("cnnjax").info("moved the earlier run in %s to %s", workdir, moved)
  else:
    member.check_same_run()
    finished = member.finished_summary()
    if finished is not None:
      return finished
  try:
    start_step = member.restore()
    return train_members([member], engines.SingleEngine(exp), start_step=start_step)[0]
  finally:
    member.close()
