"""The training loop: train with resume, evaluate, summarize.

`run(config, workdir)` builds the run (`cnnjax.train.experiment.build`, which
validates everything it can before any file is written) and trains it in its
run directory (`cnnjax.train.rundir`) through an engine of its parallel strategy
(`cnnjax.parallel`), which compiles the step:

* locks the workdir, so that a second run on it is refused;
* resumes from the newest good checkpoint of this config (state, data position
  and logging window), and returns the existing summary of a run that already
  finished;
* never reads the devices between steps: each step's metrics, and the
  first step whose loss, gradients or parameters are not finite, are kept on
  the devices (`cnnjax.train.step.advance`) and read only where the loop logs,
  evaluates or checkpoints; a non-finite step stops the run at the next such
  point, naming the step where it happened, before any checkpoint of the bad
  state is written; only on several CPU devices does it wait for each
  dispatch to finish before the next (`parallel.waits_for_each_program`);
* feeds the devices ahead: host batches are placed `DEVICE_PREFETCH`
  dispatches before the step that reads them; a split resident on the devices
  (`cnnjax.data.resident`) needs only each step's plan, and runs
  `parallel.steps_per_dispatch` steps per dispatch (one loop on the devices);
* logs train and eval points to `metrics.jsonl` and TensorBoard event files,
  draws `curves.png` at each eval, traces `profile_steps` with jax.profiler,
  checkpoints every `checkpoint_every_steps` steps and at the end, and writes
  `summary.json`;
* on SIGTERM or SIGINT (`cnnjax.train.preemption`), saves the step it is on and
  stops.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import logging
import math
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
from cnnjax.train.experiment import Experiment, build, check_init_from, data_record, warn_past_the_run
from cnnjax.train.preemption import Preemption
from cnnjax.train.profiling import StepTrace
from cnnjax.train.rundir import METRICS_FILE, RunDir, check_workdir
from cnnjax.train import step as step_lib
from cnnjax.train.state import TrainState, count_params

# Dispatches whose host batches are placed on the devices before the step that reads them: the transfer of
# the next batches overlaps the steps before.
DEVICE_PREFETCH = 2
# The most train steps one dispatch runs when `parallel.steps_per_dispatch` is 0 (chosen): past it, the
# host's per-dispatch cost is already a small share of the steps, and a stop request waits longer.
MAX_AUTO_STEPS_PER_DISPATCH = 16
# Steps whose plans go to the devices at once, in one transfer (rounded up to a multiple of the steps per
# dispatch): between blocks, a dispatch moves nothing.
PLAN_BLOCK_STEPS = 64


class TrainLog:
  """The training metrics of the current logging window, summed on the devices, and the last finished window.

  The devices add every step's metrics into the window (`step.log_step`); the
  loop reads it where it logs, evaluates or checkpoints. The unfinished
  window's sums and the last finished window travel in every checkpoint, so a
  resumed run logs the same averages as an uninterrupted one whatever the
  logging and checkpoint intervals are.
  """

  def __init__(self):
    self.window: dict[str, np.ndarray] = step_lib.empty_log()
    self.last_window: dict[str, float] | None = None

  def read(self, values: dict[str, Any]) -> None:
    """Takes the window as read from the devices."""
    self.window = {key: np.asarray(values[key], empty.dtype) for key, empty in step_lib.empty_log().items()}

  def flush(self) -> dict[str, float]:
    """The window's means; the next window starts empty."""
    count = int(self.window["count"])
    mean = {key: float(self.window[key]) / count for key in step_lib.LOGGED_METRICS}
    self.window, self.last_window = step_lib.empty_log(), mean
    return mean

  def state(self) -> dict[str, Any]:
    return {"log_sums": {key: value.item() for key, value in self.window.items()}, "last_train": self.last_window}

  def load(self, state: dict[str, Any]) -> None:
    self.window = step_lib.empty_log()
    if state.get("log_sums"):
      self.read(state["log_sums"])
    for metrics in state.get("log_window") or []:  # checkpoints written before the window was summed
      self.window = {**{key: self.window[key] + np.float32(metrics[key]) for key in step_lib.LOGGED_METRICS},
                     **{key: self.window[key] for key in ("bad_step", "bad_loss", "bad_grad_norm")},
                     "count": self.window["count"] + np.int32(1)}
    self.last_window = state.get("last_train")


def steps_per_dispatch(config: ml_collections.ConfigDict, on_device: bool, platform: str) -> int:
  """The most train steps one dispatch runs: 1 for host batches; else `parallel.steps_per_dispatch`, or
  when 0: 1 on CPUs, where XLA runs a step inside a device loop several times slower than on its own
  (docs/results/run_vs_step.json), and MAX_AUTO_STEPS_PER_DISPATCH elsewhere. It depends on no interval
  (dispatches end where the loop reads, `step.Dispatches`), so a run resumed with other intervals
  dispatches alike."""
  if not on_device:
    return 1
  if config.parallel.steps_per_dispatch:
    return config.parallel.steps_per_dispatch
  return 1 if platform == "cpu" else MAX_AUTO_STEPS_PER_DISPATCH


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

  def count_steps(self, steps: int) -> None:
    self._steps += steps

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
    self.last_eval_step: int | None = None
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
    # The eval at this step, if there was one, scores the checkpoint for `keep_best_metric`.
    scored = self.last_eval_step == step and self.last_eval is not None
    metrics = {f"eval_{key}": value for key, value in self.last_eval.items()} if scored else None
    self.checkpointer.save(step, host_state, data_state, {**self.log.state(), "population": self.population,
                                                          "timing": dataclasses.asdict(timing)}, metrics=metrics)

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
    self.rundir.write_dataset(data_record(self.exp))
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
  exp = members[0].exp
  total_steps = exp.total_steps
  config = members[0].config
  writers = [member.open_outputs(start_step) for member in members]
  lead = next(member for member in members if member.error is None)  # stand-ins aside
  progress = metrics_lib.Progress(total=total_steps, initial=start_step, enabled=lead.is_writer,
                                  allow_bar=config.progress_bar)
  if lead.resumed:
    progress.message(f"resuming from step {start_step} ({lead.checkpointer.directory})")
  elif lead.is_writer:
    warn_past_the_run(config, total_steps)

  # Every member trains on the same dataset (a population differs in seeds and scalars only): one copy.
  train_arrays, eval_arrays = exp.resident_data()
  train_data, eval_data = engine.put_data(train_arrays), engine.put_data(eval_arrays)
  carry = engine.put_state([{"state": member.host_state, "log": member.log.window} for member in members])
  for member in members:
    member.host_state = None  # the devices hold the state now (on a CPU host a second copy would share RAM)
  on_device = exp.data_placement.train_on_device
  # A batch is a pure function of its step, so the data position to resume from is the step itself.
  feeds = [member.exp.train_feed() for member in members]
  if not on_device:
    for feed in feeds:
      feed.set_state({"next_index": start_step})
  per_dispatch = steps_per_dispatch(config, on_device, exp.strategy.layout.devices[0].platform)
  one_at_a_time = parallel.waits_for_each_program(engine.strategy.layout.devices)
  eval_fn = engine.eval_step_fn(eval_data)
  trace = StepTrace(lead.workdir, config.profile_steps, start_step=start_step, enabled=lead.is_writer)
  timer = Throughput(engine.global_batch * engine.num_members)
  compile_seconds = 0.0
  train_fn = None
  # Dispatches end where the loop reads the log, and where a profile traces, in every invocation: the
  # dispatches of a resumed run are those of the uninterrupted one.
  dispatch_ends = step_lib.Dispatches(
      per_dispatch, total_steps, (config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps),
      (trace.first, trace.last) if trace.last > trace.first else ())
  block_steps = math.ceil(PLAN_BLOCK_STEPS / per_dispatch) * per_dispatch

  def dispatches():
    """(first step, steps, device batch) of every dispatch: a host batch each, or a block of plans shared by
    the dispatches it covers (blocks start at multiples of `block_steps`, so no dispatch crosses one)."""
    first, block_end, block = start_step, start_step, None
    while first < total_steps:
      end = int(dispatch_ends.end(first)) if on_device else first + 1
      if not on_device:
        yield first, 1, engine.put_batch([next(feed) for feed in feeds])
      else:
        if first >= block_end:
          block_end = min((first // block_steps + 1) * block_steps, total_steps)
          block = engine.put_batch([feed.block(first, block_end - first, block_steps) for feed in feeds])
        yield first, end - first, block
      first = end

  def timing(member: Member) -> Timing:
    return member.timing.plus(timer, compile_seconds, time.time() - wall_start)

  def alive() -> list[tuple[Member, metrics_lib.MetricsWriter]]:
    return [(m, w) for m, w in zip(members, writers) if m.error is None]

  def read_logs() -> None:
    """Reads every member's log from the devices; marks a member failed at its first non-finite step."""
    for member, values in zip(members, engine.outputs(carry["log"])):
      if member.error is not None:
        continue
      member.log.read(values)
      bad_step = int(values["bad_step"])
      if bad_step:
        kept = (f"the last good checkpoint is kept in {member.checkpointer.directory}"
                if member.checkpointer.latest_step() is not None else "no checkpoint was written before it")
        member.error = (f"loss or gradients became non-finite at step {bad_step} (loss={values['bad_loss']}, "
                        f"grad_norm={values['bad_grad_norm']}); {kept}; lower optimizer.learning_rate or add warmup")
        progress.message(f"{member.workdir}: {member.error}")
        member.rundir.write_error(bad_step, member.error)
    if all(member.error is not None for member in members):
      raise NonFiniteError(lead.error)

  def evaluate_alive(step: int) -> None:
    # Every member evaluates on the same examples, which the first member's run reads.
    sums = engine.eval_sums(carry["state"], eval_fn, members[0].exp.eval_feed())
    for member, writer, totals in zip(members, writers, sums):
      if member.error is None:
        member.last_eval, member.last_eval_step = metrics_lib.eval_result(totals), step
        writer.write({"step": step, "split": "eval", **member.last_eval})
        writer.write_curves()

  def save_alive(step: int) -> None:
    host_states = engine.get_states(carry["state"])
    for member, host_state in zip(members, host_states):
      if member.error is None:
        member.save(step, host_state, {"next_index": step}, timing(member))

  if start_step < total_steps and preemption.reached(start_step, lead.checkpointer):
    raise preemption.stopped(start_step)  # asked to stop before any step: the newest checkpoint stands
  last_reported = start_step
  placed = dispatches()
  ahead = collections.deque(itertools.islice(placed, DEVICE_PREFETCH))
  try:
    while ahead:
      first, count, device_batch = ahead.popleft()
      if train_fn is None:
        compile_start = time.time()
        train_fn = engine.compile_train_step(
            functools.partial(step_lib.advance, step=exp.train_step, dispatches=dispatch_ends if on_device else None),
            carry, device_batch, train_data)
        compile_seconds = time.time() - compile_start
      trace.before_step(first)
      carry, _ = train_fn(carry, device_batch)
      ahead.extend(itertools.islice(placed, DEVICE_PREFETCH - len(ahead)))  # while the devices step
      if one_at_a_time:
        jax.block_until_ready(carry["log"])
      done = first + count
      traced = trace.after_step(done, carry["log"])
      if traced:
        progress.message(traced)
      if first == start_step:
        jax.block_until_ready(carry["log"])
        timer.start()  # the first dispatch is not timed: it includes one-off transfers
      else:
        timer.count_steps(count)
      log_now = done % config.log_every_steps == 0 or done == total_steps
      # The final eval comes before the final checkpoint, which it scores (`keep_best_metric`).
      eval_now = (bool(config.eval_every_steps) and done % config.eval_every_steps == 0) or done == total_steps
      stop = done < total_steps and preemption.reached(done, lead.checkpointer)
      save_now = done % config.checkpoint_every_steps == 0 or done == total_steps or stop
      if log_now or eval_now or save_now:
        read_logs()
      if log_now:
        throughput = timer.lap() / engine.num_members
        for member, writer in alive():
          window = member.log.flush()
          writer.write({"step": done, "split": "train", "loss": window["loss"], "accuracy": window["accuracy"],
                        "learning_rate": window["learning_rate"], "grad_norm": window["grad_norm"],
                        "examples_per_second": throughput})
        carry = {"state": carry["state"], "log": engine.put_state([member.log.window for member in members])}
        progress.update(done, done - last_reported, alive()[0][0].log.last_window, throughput)
        last_reported = done
      if eval_now:
        with timer.paused():
          evaluate_alive(done)
      if eval_now and done != total_steps:  # the final numbers are the summary's
        first_alive = alive()[0][0]
        progress.message(f"step {done}: eval accuracy {first_alive.last_eval['accuracy']:.4f} "
                         f"loss {first_alive.last_eval['loss']:.4f}")
      if save_now:
        with timer.paused():
          save_alive(done)
      if stop:
        progress.message(f"{signal_name(preemption)}: saved a checkpoint at step {done} of {total_steps} in "
                         f"{lead.checkpointer.directory}; rerun the same command to resume from it")
        raise preemption.stopped(done)
  finally:
    trace.stop()
    progress.close()
    for feed in feeds:
      feed.close()  # stops data worker processes now, whether training ended, stopped or failed

  if not any(member.last_eval_step == total_steps for member in members):  # resumed at its last checkpoint
    evaluate_alive(total_steps)
  final_states = engine.get_states(carry["state"])
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
  if fresh or not member.rundir.has_checkpoints():
    check_init_from(config)
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
      member.rundir.check_writable()
    if member.is_writer:
      logging.getLogger("cnnjax").info("run: %s", exp.describe())
    try:
      start_step = member.restore()
      return train_members([member], parallel.SingleEngine(exp), start_step=start_step,
                           preemption=preemption)[0]
    finally:
      member.close()
