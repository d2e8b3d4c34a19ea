"""The training loop: train with resume, evaluate, summarize.

`run(config, workdir)` builds the run (`cnnjax.train.experiment.build`, which
validates everything it can before any file is written) and trains it in its
run directory (`cnnjax.train.rundir`) through an engine of its parallel strategy
(`cnnjax.parallel`), which compiles the step:

* locks the workdir, so that a second run on it is refused;
* resumes from the newest good checkpoint of this config (state, data position
  and logging window), and returns the existing summary of a run that already
  finished;
* checks every step that the loss and gradients are finite (one step behind, so
  the device is never idle), and stops naming the step if not, before any
  checkpoint of the bad state is written;
* logs train and eval points to `metrics.jsonl` and TensorBoard event files,
  draws `curves.png` at each eval, traces `profile_steps` with jax.profiler,
  checkpoints every `checkpoint_every_steps` steps and at the end, and writes
  `summary.json`;
* on SIGTERM or SIGINT (`cnnjax.train.preemption`), saves the step it is on and
  stops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from cnnjax import metrics as metrics_lib
from cnnjax import parallel
from cnnjax.checkpoint import Checkpointer
from cnnjax.errors import NonFiniteError
from cnnjax.models import torchvision_import
from cnnjax.parallel.host_devices import HostDevices
from cnnjax.train.experiment import Experiment, build
from cnnjax.train.preemption import Preemption
from cnnjax.train.profiling import StepTrace
from cnnjax.train.rundir import METRICS_FILE, RunDir, check_workdir
from cnnjax.train.state import TrainState, count_params

class TrainLog:
  """Per-step metrics fetched one step behind, averaged over each logging window.

  The unfinished window and the last finished one travel in every checkpoint,
  so a resumed run logs the same averages as an uninterrupted one whatever the
  logging and checkpoint intervals are.
  """

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

  def state(self) -> dict[str, Any]:
    return {"log_window": list(self.window), "last_train": self.last_window}

  def load(self, state: dict[str, Any]) -> None:
    self.window = list(state.get("log_window") or [])
    self.last_window = state.get("last_train")


class Throughput:
  """Seconds and steps of timed training, excluding compilation, evaluation and checkpointing."""

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

  def _running(self) -> float:
    return time.time() - self._start - self._paused if self._start is not None else 0.0

  def lap(self) -> float:
    """Examples per second since the last lap; starts the next one."""
    if self._start is None:
      return 0.0
    seconds, steps = self._running(), self._steps
    self.total_seconds += seconds
    self.total_steps += steps
    self.start()
    return steps * self.examples_per_step / seconds if steps and seconds > 0 else 0.0

  def totals(self) -> tuple[float, int]:
    """(seconds, steps) timed so far: the finished laps, and the current one up to now if it counted a step
    (time after the last step, such as the final evaluation, is not training)."""
    if not self._steps:
      return self.total_seconds, self.total_steps
    return self.total_seconds + self._running(), self.total_steps + self._steps


@dataclasses.dataclass
class Timing:
  """Where a run's time went, summed over every invocation that trained it (saved in checkpoints)."""

  train_seconds: float = 0.0
  timed_steps: int = 0
  compile_seconds: float = 0.0
  wall_seconds: float = 0.0

  def plus(self, timer: Throughput, compile_seconds: float, wall_seconds: float) -> "Timing":
    seconds, steps = timer.totals()
    return Timing(self.train_seconds + seconds, self.timed_steps + steps,
                  self.compile_seconds + compile_seconds, self.wall_seconds + wall_seconds)

  def examples_per_second(self, examples_per_step: int) -> float:
    return self.timed_steps * examples_per_step / self.train_seconds if self.train_seconds > 0 else 0.0


def start_from_weights(exp: Experiment, host_state: TrainState) -> TrainState:
  """`host_state` with the parameters and BatchNorm statistics of `config.init_from` (torchvision weights);
  the optimizer state stays as initialized, since it holds no values of the weights."""
  variables = torchvision_import.init_from(
      exp.config, exp.model, {"params": host_state.params, "batch_stats": host_state.batch_stats})
  logging.getLogger("cnnjax").info("starting from the weights in %s", exp.config.init_from)
  return host_state.replace(params=variables["params"], batch_stats=variables.get("batch_stats", {}))


class Member:
  """One run in the loop: its experiment, run directory, checkpoints, logs and restored position."""

  def __init__(self, exp: Experiment, workdir: str):
    self.exp, self.config, self.workdir = exp, exp.config, workdir
    self.rundir = RunDir(workdir)
    self.is_writer = self.rundir.is_writer
    self.checkpointer: Checkpointer | None = None
    self.log = TrainLog()
    self.error: str | None = None
    self.last_eval: dict[str, float] | None = None
    self.host_state: Any = None
    self.data_state: dict[str, Any] | None = None
    self.timing = Timing()  # of the invocations before this one
    self.resumed = False
    # The workdir names (basenames) of the vectorized population this member trains in, in order (saved
    # with its checkpoints, so that an interrupted population resumes as the same population), or None.
    self.population: list[str] | None = None

  def finished_summary(self) -> dict[str, Any] | None:
    """The summary of a run that already reached its last step, if any."""
    return self.rundir.finished_summary(self.exp.total_steps)

  def open_checkpoints(self) -> None:
    if self.checkpointer is None:
      self.checkpointer = self.rundir.checkpointer(self.config)

  def restore(self, *, at_most: int | None = None) -> int:
    """Restores the newest good checkpoint (at step `at_most` or earlier, if given); returns the step
    to start from (0 when there is none)."""
    self.open_checkpoints()
    self.host_state = jax.device_get(self.exp.init_state())
    self.data_state, self.log, self.timing, self.resumed = None, TrainLog(), Timing(), False
    self.population = None
    restored = self.checkpointer.restore_latest(self.host_state, at_most=at_most)
    if restored is None and self.config.init_from:
      self.host_state = start_from_weights(self.exp, self.host_state)
    if restored is not None:
      self.host_state, self.data_state = restored.state, restored.data
      self.log.load(restored.loop)
      self.timing = Timing(**restored.loop.get("timing", {}))
      self.population = restored.loop.get("population")
      self.resumed = True
    return int(self.host_state.step)

  def save(self, step: int, host_state: Any, data_state: dict[str, Any], timing: Timing) -> None:
    self.checkpointer.save(step, host_state, data_state, {**self.log.state(), "population": self.population,
                                                          "timing": dataclasses.asdict(timing)})

  def stand_in(self, workdir: str) -> "Member":
    """An inert member in the place of a population member that is not here (it diverged, or was left
    out): it computes beside the others, starting from this member's state, and is never logged, saved or
    summarized, nor is its `workdir` written."""
    member = Member(self.exp, workdir)
    member.host_state, member.data_state, member.population = self.host_state, self.data_state, self.population
    member.error = f"a stand-in for {workdir}, which is not part of this run"
    return member

  def open_outputs(self, start_step: int) -> metrics_lib.MetricsWriter:
    if self.error is not None:  # a stand-in writes nothing
      return metrics_lib.MetricsWriter(self.rundir.path(METRICS_FILE), enabled=False)
    self.rundir.write_config(self.config)
    return self.rundir.metrics_writer(start_step)

  def summary(self, final_state: Any, timing: Timing, engine: parallel.Engine) -> dict[str, Any]:
    last = self.log.last_window or {}
    result = self.last_eval
    return {
        "eval_accuracy": result["accuracy"], "eval_loss": result["loss"], "eval_examples": result["examples"],
        "train_loss": last.get("loss"), "train_accuracy": last.get("accuracy"),
        "step": int(final_state.step), "examples_per_second": timing.examples_per_second(self.config.batch_size),
        "compile_seconds": timing.compile_seconds, "wall_seconds": timing.wall_seconds,
        "param_checksum": metrics_lib.param_checksum(final_state.params),
        "param_l2": metrics_lib.param_l2(final_state.params), "num_params": count_params(final_state.params),
        "model": self.config.model.name, "data": self.config.data.name,
        "strategy": engine.strategy_name, "bn_sync": self.config.model.bn_sync,
        "num_devices": engine.num_devices, "num_processes": jax.process_count(),
        "global_batch": self.config.batch_size,
        **({"eval_mean_iou": result["mean_iou"]} if "mean_iou" in result else {}),  # segmentation
    }

  def close(self) -> None:
    if self.checkpointer is not None:
      self.checkpointer.close()


def train_members(members: Sequence[Member], engine: parallel.Engine, *, start_step: int,
                  preemption: Preemption | None = None) -> list[dict[str, Any] | None]:
  """Trains restored members in lockstep from `start_step`; returns each one's summary (None if it failed).

  A member whose loss or gradients stop being finite is marked failed at that
  step (its last good checkpoint stays) and no longer logged or checkpointed;
  when every member has failed, NonFiniteError is raised. When `preemption`
  says so (SIGTERM or SIGINT), every member saves the step just done and
  `Preempted` is raised.
  """
  wall_start = time.time()
  preemption = preemption or Preemption()
  total_steps = members[0].exp.total_steps
  config = members[0].config
  writers = [member.open_outputs(start_step) for member in members]
  lead = next(member for member in members if member.error is None)  # stand-ins aside
  progress = metrics_lib.Progress(total=total_steps, initial=start_step, enabled=lead.is_writer,
                                  allow_bar=config.progress_bar)
  if lead.resumed:
    progress.message(f"resuming from step {start_step} ({lead.checkpointer.directory})")

  state = engine.put_state([member.host_state for member in members])
  for member in members:
    member.host_state = None  # the devices hold the state now (on a CPU host a second copy would share RAM)
  iterators = []
  for member in members:
    iterator = member.exp.train_batches()
    if member.data_state is not None:
      iterator.set_state(member.data_state)
    iterators.append(iterator)
  eval_fn = engine.eval_step_fn()
  trace = StepTrace(lead.workdir, config.profile_steps, start_step=start_step, enabled=lead.is_writer)
  timer = Throughput(engine.global_batch * engine.num_members)
  compile_seconds = 0.0
  pending: tuple[int, Any] | None = None  # (step, device metrics) not yet checked

  def timing(member: Member) -> Timing:
    return member.timing.plus(timer, compile_seconds, time.time() - wall_start)

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
        member.rundir.write_error(step_index + 1, member.error)
      else:
        member.log.add(values)
    if all(member.error is not None for member in members):
      raise NonFiniteError(lead.error)

  def evaluate_alive(step: int) -> None:
    # Every member evaluates on the same examples, which the first member's run reads.
    sums = engine.eval_sums(state, eval_fn, members[0].exp.eval_batches())
    for member, writer, totals in zip(members, writers, sums):
      if member.error is None:
        member.last_eval = metrics_lib.eval_result(totals)
        writer.write({"step": step, "split": "eval", **member.last_eval})
        writer.write_curves()

  def save_alive(step: int) -> None:
    host_states = engine.get_states(state)
    for member, iterator, host_state in zip(members, iterators, host_states):
      if member.error is None:
        member.save(step, host_state, iterator.get_state(), timing(member))

  if start_step < total_steps and preemption.reached(start_step, lead.checkpointer):
    raise preemption.stopped(start_step)  # asked to stop before any step: the newest checkpoint stands
  last_reported = start_step
  try:
    for step in range(start_step, total_steps):
      device_batch = engine.put_batch([next(iterator) for iterator in iterators])
      if step == start_step:
        compile_start = time.time()
        train_fn = engine.compile_train_step(state, device_batch)
        compile_seconds = time.time() - compile_start
      trace.before_step(step)
      state, device_metrics = train_fn(state, device_batch)
      check(pending)
      pending = (step, device_metrics)
      done = step + 1
      traced = trace.after_step(done, device_metrics)
      if traced:
        progress.message(traced)
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
      stop = done < total_steps and preemption.reached(done, lead.checkpointer)
      if done % config.checkpoint_every_steps == 0 or done == total_steps or stop:
        check(pending)
        pending = None
        with timer.paused():
          save_alive(done)
      if stop:
        progress.message(f"{signal_name(preemption)}: saved a checkpoint at step {done} of {total_steps} in "
                         f"{lead.checkpointer.directory}; rerun the same command to resume from it")
        raise preemption.stopped(done)
  finally:
    trace.stop()
    progress.close()
    for iterator in iterators:
      iterator.close()  # stops data worker processes now, whether training ended, stopped or failed

  evaluate_alive(total_steps)
  final_states = engine.get_states(state)
  summaries: list[dict[str, Any] | None] = []
  for member, final_state in zip(members, final_states):
    if member.error is not None:
      summaries.append(None)
      continue
    summary = member.summary(final_state, timing(member), engine)
    member.rundir.write_summary(summary)
    summaries.append(summary)
  for writer in writers:
    writer.close()
  return summaries


def signal_name(preemption: Preemption) -> str:
  """The signal that stopped the run, by name (JAX's service reports SIGTERM from a peer process)."""
  return signal.Signals(preemption.signum or signal.SIGTERM).name


def run(config: ml_collections.ConfigDict, workdir: str, *, devices: Sequence[Any] | None = None,
        fresh: bool = False, preemption: Preemption | None = None, host: HostDevices = HostDevices()
        ) -> dict[str, Any]:
  """Trains and evaluates `config` in `workdir`, resuming if it holds checkpoints. Returns the summary.

  The workdir is locked while the run trains: a second run on it is refused. A
  workdir holding a run of a different config is refused unless `fresh`, which
  first moves the earlier run's files into `workdir/replaced-<time>/`. SIGTERM
  or SIGINT (through `preemption`) save the current step and raise `Preempted`.
  `host` describes the process's CPU devices (see `build`).
  """
  check_workdir(workdir)
  exp = build(config, devices=devices, host=host)
  member = Member(exp, workdir)
  with member.rundir.lock():
    if fresh:
      moved = member.rundir.set_aside_run()
      if moved:
        logging.getLogger("cnnjax").info("moved the earlier run in %s to %s", workdir, moved)
      if jax.process_count() > 1:  # the other processes must not read what process 0 is moving
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        multihost_utils.sync_global_devices("cnnjax fresh start")
    else:
      member.rundir.check_same_run(config)
      finished = member.finished_summary()
      if finished is not None:
        logging.getLogger("cnnjax").info("%s already finished at step %d; its summary stands (pass --fresh to "
                                         "train it again)", workdir, finished["step"])
        return finished
    if member.is_writer:
      logging.getLogger("cnnjax").info("run: %s", exp.describe())
    try:
      start_step = member.restore()
      return train_members([member], parallel.SingleEngine(exp), start_step=start_step,
                           preemption=preemption)[0]
    finally:
      member.close()
