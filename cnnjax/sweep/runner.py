"""Running a sweep: sequential, partitioned over device groups, or vectorized as one population.

`run_sweep(base_config, trials, workdir, mode=...)` trains every trial into
`workdir/<trial name>/`, with exactly the outputs of a single run there
(config.json, metrics.jsonl, summary.json, checkpoints/):

* `sequential`: one trial after another, each through `cnnjax.train.run` on all
  the devices (as its `parallel.strategy` and `parallel.num_devices` say).
* `partitioned`: the devices are split into equal groups and one Python thread
  per group takes trials from a shared queue, calling `cnnjax.train.run` with
  that group's devices. Threads rather than processes: the devices belong to
  one JAX runtime (a second process could not address them), JAX dispatch and
  compilation are thread-safe and release the GIL while the device works, and
  each run owns its workdir, data iterator and orbax manager, so the threads
  share nothing but the device list (measured: the same parameters, bit for
  bit, as the same trials run one after another).
* `vectorized`: trials that differ only in values needing no recompilation
  train as one `cnnjax.train.population` (vmapped over a member axis, sharded
  over the devices); any other difference is refused with a one-line error.
* `auto`: vectorized when the trials allow it, else partitioned (sequential on
  one device).

Every trial config is built and checked before anything is written, so a bad
override in the last trial fails before the first one trains. A trial that
fails while training for any reason other than divergence (out of memory, a
bad file) is recorded as `failed` with its one-line reason (its
`failure.json`, `results.csv`, `results.md`, `sweep_log.jsonl`) and the other
trials go on; the sweep then reports the failed trials. Re-running skips
finished trials (and diverged ones, whose `error.json` says why), retries
failed ones (failures can be transient), resumes interrupted ones from their
checkpoints, and never trains a step twice into the results. A lock stops two
sweeps from writing one workdir at once (each trial's run directory has its
own); the operating system releases it when a sweep dies. SIGTERM or SIGINT
stop the sweep the way they stop a run: the trials in training save their
step, no new trial starts, and `Preempted` is raised.
`workdir/sweep_log.jsonl` records when each trial started and ended, where,
and how.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import ml_collections
import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from cnnjax import config as config_lib
from cnnjax import metrics as metrics_lib
from cnnjax import parallel, train
from cnnjax.errors import CheckpointError, ConfigError, DiskFullError, NonFiniteError, WorkdirBusyError
from cnnjax.sweep.declare import Trial, apply_overrides
from cnnjax.parallel.host_devices import HostDevices
from cnnjax.train import population
from cnnjax.train.preemption import Preempted, Preemption
from cnnjax.train.rundir import DIVERGED, FAILED, FINISHED, NOT_STARTED, RunDir, exclusive_lock

MODES = ("auto", "sequential", "partitioned", "vectorized")
LOCK_FILE = ".sweep.lock"
LOG_FILE = "sweep_log.jsonl"
SWEEP_FILE = "sweep.json"
# How often the main thread wakes while workers train, so that Ctrl-C reaches it promptly.
JOIN_POLL_SECONDS = 1.0
LOG_TIME_DECIMALS = 3  # sweep_log.jsonl timestamps, in seconds

logger = logging.getLogger("cnnjax")
_context = threading.local()  # the trial a thread is training, for its log lines


@dataclasses.dataclass
class TrialRun:
  """One trial of a sweep: its config, directory, and what happened to it."""

  trial: Trial
  config: ml_collections.ConfigDict
  workdir: str
  status: str = NOT_STARTED
  summary: dict[str, Any] | None = None
  trained: bool = False  # whether this invocation trained it
  reason: str = ""  # failed: why, in one line
  device_ids: tuple[int, ...] = ()  # the devices this invocation trained it on
  start_time: float | None = None
  end_time: float | None = None


@dataclasses.dataclass
class SweepReport:
  mode: str
  runs: list[TrialRun]
  wall_seconds: float

  @property
  def trained(self) -> list[TrialRun]:
    return [r for r in self.runs if r.trained]

  @property
  def failed(self) -> list[TrialRun]:
    return [r for r in self.runs if r.status == FAILED]


def trial_runs(base_config: ml_collections.ConfigDict, trials: Sequence[Trial], workdir: str) -> list[TrialRun]:
  """Each trial's config (the base with its overrides) and directory; the trial bar replaces per-run bars."""
  runs = []
  for trial in trials:
    config = apply_overrides(base_config, trial)
    with config.unlocked():
      config.progress_bar = False
    runs.append(TrialRun(trial, config, os.path.join(workdir, trial.name)))
  return runs


def resolve_mode(mode: str, configs: Sequence[ml_collections.ConfigDict], num_devices: int) -> str:
  """The mode `auto` stands for, or `mode` itself once checked."""
  if mode not in MODES:
    raise ConfigError(f"--mode={mode} is unknown; choose one of {', '.join(MODES)}")
  if mode != "auto":
    return mode
  if (len(configs) > 1 and not population.non_vectorizable_differences(configs)
      and min(c.keep_checkpoints for c in configs) >= population.MIN_KEPT_CHECKPOINTS):
    return "vectorized"
  return "partitioned" if num_devices > 1 else "sequential"


def device_groups(configs: Sequence[ml_collections.ConfigDict], devices: Sequence[Any],
                  devices_per_trial: int, num_trials: int) -> list[tuple[Any, ...]]:
  """Equal, disjoint groups of `devices`: `devices_per_trial` each, or by default as many groups as trials."""
  if devices_per_trial < 0 or devices_per_trial > len(devices):
    raise ConfigError(f"--devices_per_trial={devices_per_trial} but {len(devices)} devices are available; "
                      f"give a value from 1 to {len(devices)} (0: split the devices evenly over the trials)")
  if not devices_per_trial:
    requested = max(c.parallel.num_devices for c in configs)
    if all(c.parallel.strategy == "none" for c in configs):
      devices_per_trial = 1  # a single-device strategy would leave the rest of a larger group idle
    elif requested:
      devices_per_trial = min(requested, len(devices))
    else:
      devices_per_trial = max(1, len(devices) // max(1, min(num_trials, len(devices))))
  count = len(devices) // devices_per_trial
  return [tuple(devices[i * devices_per_trial:(i + 1) * devices_per_trial]) for i in range(count)]


def _structure(config: ml_collections.ConfigDict) -> str:
  """What decides whether a config builds: everything but the values a population may vary."""
  flat = config_lib.flatten(config)
  return json.dumps({k: v for k, v in flat.items() if k not in config_lib.VECTORIZABLE_KEYS}, sort_keys=True,
                    default=str)


def _prepare(runs: Sequence[TrialRun], mode: str, groups: Sequence[Sequence[Any]],
             host: HostDevices) -> dict[str, int]:
  """Checks every trial before anything is written (its config, and that its directory holds no run of
  another config); returns each trial's number of steps, by name.

  Trials that differ only in learning rate, weight decay, label smoothing or
  seed share one build (building opens the dataset, which costs more than the check);
  their own values are checked by `config.validate`.
  """
  if mode == "vectorized":
    population.check_vectorizable([r.config for r in runs])
  total_steps: dict[str, int] = {}
  steps: dict[str, int] = {}
  for run in runs:
    try:
      config_lib.validate(run.config)
      key = _structure(run.config)
      if key not in total_steps:
        if mode == "vectorized":
          exp = train.build(population.member_config(run.config))
        else:
          exp = train.build(run.config, devices=groups[0], host=host)  # every group has the same size
        total_steps[key] = exp.total_steps
      if not RunDir(run.workdir, is_writer=False).has_checkpoints():
        train.check_init_from(run.config)
    except ConfigError as e:
      raise ConfigError(f"trial {run.trial.name!r}: {e}") from None
    steps[run.trial.name] = total_steps[key]
    # Read only: a damaged file is set aside later, under the sweep's lock.
    differences = RunDir(run.workdir, is_writer=False).config_differences(run.config)
    if differences:
      raise CheckpointError(
          f"trial {run.trial.name!r}: {run.workdir} holds a run with a different config ({differences}); the "
          "sweep's config changed since that run: use a new --workdir, or delete that trial's directory to "
          "retrain it")
  return steps


def _mark_status(runs: Sequence[TrialRun], steps: dict[str, int]) -> None:
  """Marks finished, diverged and failed trials, under the sweep's lock (damaged files are set aside)."""
  for run in runs:
    rundir = RunDir(run.workdir)
    # A summary of a different length (the step count was changed) does not count as finished.
    run.status = rundir.status(steps[run.trial.name])
    run.summary = rundir.summary() if run.status == FINISHED else None
    if run.status == FAILED:
      run.reason = (rundir.failure() or {}).get("reason", "")


def one_line(error: BaseException) -> str:
  """An exception as one line: its type and the first 300 characters of its message."""
  text = " ".join(str(error).split())[:300]
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _record_failure(run: TrialRun, error: BaseException) -> None:
  run.status, run.reason = FAILED, one_line(error)
  if not isinstance(error, WorkdirBusyError):  # another process owns that directory: write nothing there
    RunDir(run.workdir).write_failure(run.reason)
  logger.warning("trial %s failed (%s); the other trials go on, and a rerun retries it", run.trial.name,
                 run.reason)


class _TrialPrefix(logging.Filter):
  """Prefixes cnnjax log lines with the trial that the logging thread is training."""

  def filter(self, record: logging.LogRecord) -> bool:
    name = getattr(_context, "trial", None)
    if name is not None and not getattr(record, "sweep_trial", None):
      record.msg = f"[{name}] {record.msg}"
      record.sweep_trial = name
    return True


class _TrialProgress:
  """A bar over trials on a terminal (run logs print above it); one log line per finished trial always."""

  def __init__(self, runs: Sequence[TrialRun]):
    self.total = len(runs)
    self.done = sum(r.status in (FINISHED, DIVERGED) for r in runs)
    self._lock = threading.Lock()
    self._bar = (tqdm.tqdm(total=self.total, initial=self.done, unit="trial", dynamic_ncols=True)
                 if sys.stderr.isatty() else None)

  def trial_done(self, run: TrialRun) -> None:
    with self._lock:
      self.done += 1
      if self._bar is not None:
        self._bar.update(1)
    if run.summary:
      result = f"eval_accuracy {run.summary['eval_accuracy']:.4f} eval_loss {run.summary['eval_loss']:.4f}"
    else:
      result = f"failed ({run.reason})" if run.status == FAILED else "diverged (see its error.json)"
    logger.info("trial %d/%d %s: %s", self.done, self.total, run.trial.name, result)

  @contextlib.contextmanager
  def showing(self) -> Iterator[None]:
    prefix = _TrialPrefix()
    logger.addFilter(prefix)
    try:
      with logging_redirect_tqdm([logger]) if self._bar is not None else contextlib.nullcontext():
        yield
    finally:
      logger.removeFilter(prefix)
      if self._bar is not None:
        self._bar.close()


def _log_event(workdir: str, lock: threading.Lock, event: dict[str, Any]) -> None:
  """Appends one line to the sweep's log (threads share it, hence the lock)."""
  with lock, open(os.path.join(workdir, LOG_FILE), "a") as f:
    f.write(json.dumps({"time": round(time.time(), LOG_TIME_DECIMALS), **event}, sort_keys=True) + "\n")


def _train_alone(run: TrialRun, devices: Sequence[Any], mode: str, log: Callable[[dict], None],
                 preemption: Preemption, host: HostDevices) -> None:
  """Trains one trial through `cnnjax.train.run` on `devices`; records the outcome.

  Divergence and any other error are recorded on the trial; `Preempted` is
  logged and raised.
  """
  _context.trial = run.trial.name
  # The devices the run's strategy takes from the group (one of them for strategy 'none').
  config = run.config
  used = parallel.resolve(config.parallel.strategy, config.parallel.num_devices,
                          (config.batch_size, config.eval_batch_size or config.batch_size), devices).devices
  run.device_ids = tuple(d.id for d in used)
  run.start_time = time.time()
  log({"event": "start", "trial": run.trial.name, "mode": mode, "devices": list(run.device_ids)})
  try:
    run.summary = train.run(run.config, run.workdir, devices=devices, preemption=preemption, host=host)
    run.status, run.reason = FINISHED, ""
  except NonFiniteError:
    run.status = DIVERGED  # train.run wrote error.json; the other trials go on
  except Preempted as stop:
    log({"event": "stopped", "trial": run.trial.name, "step": stop.step, "signal": stop.signum})
    raise
  except DiskFullError:
    raise  # every later trial would fail the same way: stop the sweep
  except Exception as error:  # pylint: disable=broad-except  (one trial's failure must not sink the sweep)
    _record_failure(run, error)
  finally:
    run.end_time = time.time()
    _context.trial = None
  run.trained = True
  log({"event": "end", "trial": run.trial.name, "status": run.status, "step": (run.summary or {}).get("step", 0),
       **({"reason": run.reason} if run.reason else {})})


def _run_groups(pending: Sequence[TrialRun], groups: Sequence[tuple[Any, ...]], mode: str,
                progress: _TrialProgress, log: Callable[[dict], None], preemption: Preemption,
                host: HostDevices) -> None:
  """One worker per device group takes trials from a shared queue until none are left.

  A preemption (or an error of the sweep itself) stops every worker from
  taking a new trial; trials already running save their step and stop, and
  the first such exception is raised.
  """
  queue = list(pending)
  queue_lock = threading.Lock()
  errors: list[BaseException] = []

  def worker(group: tuple[Any, ...]) -> None:
    while True:
      with queue_lock:
        if errors or not queue or preemption.signum is not None:
          return
        run = queue.pop(0)
      try:
        _train_alone(run, group, mode, log, preemption, host)
      except BaseException as e:  # pylint: disable=broad-except  (handed to the main thread below)
        with queue_lock:
          errors.append(e)
        return
      progress.trial_done(run)

  if len(groups) == 1:
    worker(groups[0])  # in this thread: behaves as a single run
  else:
    threads = [threading.Thread(target=worker, args=(group,), name=f"sweep-group-{i}", daemon=True)
               for i, group in enumerate(groups)]
    for thread in threads:
      thread.start()
    for thread in threads:
      while thread.is_alive():
        thread.join(timeout=JOIN_POLL_SECONDS)
  if errors:
    raise errors[0]
  if preemption.signum is not None and queue:
    raise preemption.stopped(0)  # stopped between trials: every trial so far is saved


def _run_vectorized(pending: Sequence[TrialRun], devices: Sequence[Any], population_size: int,
                    progress: _TrialProgress, log: Callable[[dict], None], preemption: Preemption) -> None:
  """Pending trials as populations of at most `population_size` members (0: all together).

  A member that cannot be built is recorded as failed and left out of its
  population; an error while a population trains fails its members only.
  """
  size = population_size or len(pending)
  for first in range(0, len(pending), size):
    if preemption.signum is not None:
      raise preemption.stopped(0)
    chunk = list(pending[first:first + size])
    _context.trial = f"population of {len(chunk)}"
    start = time.time()
    for run in chunk:
      run.start_time = start
      log({"event": "start", "trial": run.trial.name, "mode": "vectorized",
           "population": [r.trial.name for r in chunk]})
    try:
      outcomes = population.run_population([r.config for r in chunk], [r.workdir for r in chunk],
                                           devices=devices, preemption=preemption)
    except Preempted as stop:
      for run in chunk:
        log({"event": "stopped", "trial": run.trial.name, "step": stop.step, "signal": stop.signum})
      raise
    except DiskFullError:
      raise
    except Exception as error:  # pylint: disable=broad-except  (fails this population, not the sweep)
      outcomes = [error] * len(chunk)
    finally:
      _context.trial = None
    end = time.time()
    for run, outcome in zip(chunk, outcomes):
      run.trained, run.end_time = True, end
      if isinstance(outcome, BaseException):
        _record_failure(run, outcome)
        summary = None
      else:
        summary = run.summary = outcome
        run.status = FINISHED if summary is not None else DIVERGED
      # The population spreads its members over the first devices (as many as divide the members evenly).
      run.device_ids = tuple(d.id for d in devices[:summary["num_devices"]]) if summary else ()
      log({"event": "end", "trial": run.trial.name, "status": run.status,
           "step": (summary or {}).get("step", 0), "devices": list(run.device_ids),
           **({"reason": run.reason} if run.reason else {})})
      progress.trial_done(run)


def run_sweep(base_config: ml_collections.ConfigDict, trials: Sequence[Trial], workdir: str, *,
              mode: str = "auto", devices: Sequence[Any] | None = None, devices_per_trial: int = 0,
              population_size: int = 0, record: dict[str, Any] | None = None,
              preemption: Preemption | None = None, host: HostDevices = HostDevices()) -> SweepReport:
  """Trains every unfinished trial of the sweep into `workdir/<trial>/`; returns what happened to each.

  `devices` defaults to this process's local devices. `devices_per_trial`
  (partitioned) and `population_size` (vectorized) default to 0: split the
  devices evenly over the trials, and one population of all pending trials.
  `record` is stored in `workdir/sweep.json` with the trials (e.g. the command).
  Raises ConfigError before writing anything if any trial cannot run, and
  `Preempted` once `preemption` saw SIGTERM or SIGINT and the trials saved.
  `host` describes the process's CPU devices (see `cnnjax.train.build`).
  """
  started = time.time()
  preemption = preemption or Preemption()
  devices = tuple(devices) if devices is not None else tuple(jax.local_devices())
  if population_size < 0:
    raise ConfigError(f"--population_size={population_size} must be >= 0 (0: all pending trials at once)")
  runs = trial_runs(base_config, trials, workdir)
  configs = [r.config for r in runs]
  mode = resolve_mode(mode, configs, len(devices))
  groups = [devices]  # sequential: one group of every device
  if mode == "partitioned":
    groups = device_groups(configs, devices, devices_per_trial, len(runs))
  steps = _prepare(runs, mode, groups, host)

  with exclusive_lock(workdir, what="sweep", lock_name=LOCK_FILE):
    _mark_status(runs, steps)
    pending = [r for r in runs if r.status not in (FINISHED, DIVERGED)]
    metrics_lib.write_json(os.path.join(workdir, SWEEP_FILE), {
        **(record or {}), "mode": mode,
        "trials": [{"name": r.trial.name, "overrides": r.trial.overrides} for r in runs]})
    log = functools.partial(_log_event, workdir, threading.Lock())
    where = (f"{len(groups)} groups of {len(groups[0])} device(s)" if mode == "partitioned" else
             f"{len(devices)} devices")
    retried = sum(r.status == FAILED for r in pending)
    logger.info("sweep of %d trials in %s mode on %s: %d finished or diverged, %d to train%s", len(runs), mode,
                where, len(runs) - len(pending), len(pending),
                f" ({retried} of them failed before and are retried)" if retried else "")
    progress = _TrialProgress(runs)  # after the line above: a bar must not share its line
    with progress.showing():
      if pending and mode == "vectorized":
        _run_vectorized(pending, devices, population_size, progress, log, preemption)
      elif pending:
        _run_groups(pending, groups, mode, progress, log, preemption, host)
  return SweepReport(mode=mode, runs=runs, wall_seconds=time.time() - started)
