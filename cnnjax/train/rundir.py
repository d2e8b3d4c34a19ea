"""One run's directory: everything a run keeps on disk, and the rules for reading it back.

A workdir holds

* `config.json`: the config the run was started with;
* `dataset.json`: what the run's data is (class names, shapes, normalization), written when it starts
  (`cnnjax.train.experiment.data_record`), so that `python -m cnnjax.predict` needs no dataset;
* `metrics.jsonl`: one JSON object per logged point (train and eval);
* `events.out.tfevents.*`: the same points for TensorBoard, one file per
  invocation (`cnnjax.metrics.EventLog`), and `curves.png`, drawn from them;
* `plugins/profile/`: a jax.profiler trace, when `profile_steps` asks for one;
* `summary.json`: the final numbers, written once the last step is done;
* `error.json`: written only when training diverged (a non-finite loss or
  gradient), naming the step;
* `failure.json`: written by a sweep when a trial failed for another reason;
* `checkpoints/`: orbax checkpoints (`cnnjax.checkpoint`);
* `eval/`: reports of `python -m cnnjax.evaluate`, which writes nothing else;
* `unreadable_checkpoints/`, `damaged_files/`, `replaced-<time>/`: what was set
  aside, never deleted;
* `.lock`: held (flock) by the process that runs in it.

`RunDir` owns all of them: the lock, the config check and fingerprint, the
metrics log, the summary, the error and failure files, the finished check,
setting damaged files aside, and restoring the newest good checkpoint. Single
runs, sweeps, populations, the BatchNorm study and the analysis tools all read
and write workdirs through it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np

from cnnjax import config as config_lib
from cnnjax import metrics as metrics_lib
from cnnjax.checkpoint import UNREADABLE_DIR, Checkpointer, Restored
from cnnjax.errors import CheckpointError, ConfigError, WorkdirBusyError, printable
from cnnjax.train.profiling import PROFILE_DIR

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
ERROR_FILE = "error.json"
FAILURE_FILE = "failure.json"
CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged_files"
DATASET_FILE = "dataset.json"
EVAL_DIR = "eval"  # python -m cnnjax.evaluate's reports (cnnjax.train.scoring)
LOCK_FILE = ".lock"
# What a run writes into its workdir; `--fresh` moves these aside, checkpoints first, so that an
# interrupted `--fresh` never leaves the old checkpoints beside a missing config.json.
RUN_FILES = (CHECKPOINT_DIR, UNREADABLE_DIR, METRICS_FILE, SUMMARY_FILE, ERROR_FILE, FAILURE_FILE, DAMAGED_DIR,
             metrics_lib.CURVES_FILE, PROFILE_DIR, EVAL_DIR, DATASET_FILE, CONFIG_FILE)
# How a run stands, as its directory shows it.
FINISHED, DIVERGED, FAILED, INCOMPLETE, NOT_STARTED = "finished", "diverged", "failed", "incomplete", "not started"

logger = logging.getLogger("cnnjax")


def check_workdir(workdir: str, flag: str = "--workdir") -> None:
  """Raises ConfigError unless `workdir` is a directory this process can create and write."""
  if not workdir or not workdir.strip():
    raise ConfigError(f"{flag} is empty (an unset shell variable?); give the directory for the run's outputs")
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"{flag}={workdir} is a file, not a directory; give a directory path")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ConfigError(f"{flag}={workdir} lies under {existing}, which is a file; give a directory path")
  # Try for real: permission bits do not tell about read-only mounts, and root ignores them.
  try:
    with tempfile.TemporaryFile(dir=existing, prefix=".cnnjax-write-test-"):
      pass
  except OSError as e:
    raise ConfigError(f"{flag}={workdir} cannot be written ({existing}: {e.strerror}); give a writable "
                      "directory") from None


# What each entry of a workdir must be, when it exists: a file or a directory.
ENTRY_KINDS = {LOCK_FILE: "file", METRICS_FILE: "file", CONFIG_FILE: "file", SUMMARY_FILE: "file",
               ERROR_FILE: "file", FAILURE_FILE: "file", CHECKPOINT_DIR: "directory", UNREADABLE_DIR: "directory",
               DAMAGED_DIR: "directory"}
# flock answers these on file systems that do not support it (some NFS and Lustre mounts).
LOCK_UNSUPPORTED_ERRNOS = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP)


def check_entries(directory: str, kinds: dict[str, str] = ENTRY_KINDS) -> None:
  """Raises ConfigError when an entry cnnjax keeps in `directory` is of the wrong kind (a directory where
  its lock or metrics file goes, a file where its checkpoints go)."""
  for name, kind in kinds.items():
    path = os.path.join(directory, name)
    if os.path.exists(path) and os.path.isdir(path) != (kind == "directory"):
      raise ConfigError(f"{path} should be a {kind}, where cnnjax keeps its {name}; move it out of the way "
                        "(or use another --workdir)")


@contextlib.contextmanager
def exclusive_lock(directory: str, *, what: str, lock_name: str = LOCK_FILE) -> Iterator[None]:
  """Holds an exclusive lock on `directory` while the block runs; the OS drops it if the process dies.

  A second holder is refused at once with ConfigError naming the first (its
  process id, host, start time and command). `what` names the holder's kind in
  the message ('run', 'sweep'). On a file system without flock the block runs
  unguarded, with a warning.
  """
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, lock_name)
  check_entries(directory, {lock_name: "file"})
  try:
    # 'a+' does not truncate: the holder's description stays readable until a new holder replaces it.
    handle = open(path, "a+")  # pylint: disable=consider-using-with  (closed below)
  except OSError as e:
    raise ConfigError(f"cannot open the lock file {path} ({e.strerror}); its owner may be another user: use "
                      "another --workdir") from None
  with handle:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in LOCK_UNSUPPORTED_ERRNOS:
        logger.warning("%s is on a file system without file locks (%s): nothing stops a second %s from using "
                       "it at the same time", directory, e.strerror, what)
        yield
        return
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      handle.seek(0)
      holder = handle.read().strip() or "a process that has not yet said which"
      raise WorkdirBusyError(f"another {what} is using {directory} ({holder}); wait for it to finish or stop "
                             "it, or use another --workdir") from None
    try:
      handle.seek(0)
      handle.truncate()
      handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                   f"{' '.join(sys.argv)[:300]}\n")
      handle.flush()
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


def read_json_object(path: str, damaged_dir: str, *, is_writer: bool = True) -> dict[str, Any] | None:
  """The JSON object in `path`, or None if absent. One that is truncated, empty or not an object is
  reported and moved into `damaged_dir` (by the writer; the others only read), and None returned, so that
  the file is written anew."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      payload = json.load(f)
    if isinstance(payload, dict):
      return payload
    problem = f"it holds a JSON {type(payload).__name__}, not an object"
  except (ValueError, UnicodeDecodeError) as e:
    problem = f"it is not valid JSON ({' '.join(str(e).split())[:120]})"
  except IsADirectoryError:
    problem = "it is a directory"
  target = os.path.join(damaged_dir, f"{os.path.basename(path)}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
  if is_writer:
    os.makedirs(damaged_dir, exist_ok=True)
    shutil.move(path, target)
    logger.warning("%s is damaged (%s); moved to %s", path, problem, target)
  return None


def _all_agree(ok: bool) -> bool:
  """Process 0's `ok`, on every process of a multi-process run."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(ok, np.int32)))


class RunDir:
  """The directory of one run. Only the writer (process 0) writes files; every process reads."""

  def __init__(self, workdir: str, *, is_writer: bool | None = None):
    self.workdir = workdir
    self.is_writer = jax.process_index() == 0 if is_writer is None else is_writer

  def path(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  @property
  def checkpoint_dir(self) -> str:
    return self.path(CHECKPOINT_DIR)

  # -- the lock ----------------------------------------------------------------------------------

  @contextlib.contextmanager
  def lock(self) -> Iterator[None]:
    """Holds the workdir's lock for one run. The processes of a multi-process run share it: process 0
    holds it, and all of them stop with the same error when it is taken."""
    check_workdir(self.workdir)
    check_entries(self.workdir)
    with contextlib.ExitStack() as stack:
      refusal = None
      if jax.process_index() == 0:
        try:
          stack.enter_context(exclusive_lock(self.workdir, what="run"))
        except ConfigError as e:
          refusal = e
      if not _all_agree(refusal is None):
        raise refusal or ConfigError(f"process 0 could not lock {self.workdir}: another run is using it "
                                     "(process 0's error names it); wait for it or use another --workdir")
      yield

  # -- small JSON files --------------------------------------------------------------------------

  def read_json(self, name: str) -> dict[str, Any] | None:
    """A JSON object file of the workdir, or None if absent; a damaged one is set aside (`read_json_object`)."""
    return read_json_object(self.path(name), self.path(DAMAGED_DIR), is_writer=self.is_writer)

  def write_json(self, name: str, payload: dict[str, Any]) -> None:
    """Writes a JSON file atomically (a temporary file renamed into place); writer only."""
    if self.is_writer:
      os.makedirs(self.workdir, exist_ok=True)
      metrics_lib.write_json(self.path(name), payload)

  def metrics_writer(self, start_step: int) -> metrics_lib.MetricsWriter:
    """The metrics log, holding only points up to `start_step` (a resumed run logs the rest again)."""
    writer = metrics_lib.MetricsWriter(self.path(METRICS_FILE), enabled=self.is_writer)
    writer.truncate_after(start_step)
    return writer

  def remove(self, name: str) -> None:
    if self.is_writer and os.path.exists(self.path(name)):
      os.remove(self.path(name))

  # -- config ------------------------------------------------------------------------------------

  def config_differences(self, config: ml_collections.ConfigDict) -> str | None:
    """The keys in which the run held here differs from `config`, in words; None if it does not (or if
    the workdir holds no config.json)."""
    saved = self.read_json(CONFIG_FILE)
    differences = config_lib.resume_differences(saved, config) if saved is not None else []
    if not differences:
      return None
    shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in differences[:3])
    return shown + (f" and {len(differences) - 3} more" if len(differences) > 3 else "")

  def check_writable(self) -> None:
    """Refuses, before a resumed run writes anything, a file of the run held here that this user may not
    write (a read-only `metrics.jsonl` or event file): resuming rewrites them to the restored step."""
    names = [name for name in RUN_FILES if os.path.isfile(self.path(name))]
    names += [os.path.basename(path) for path in metrics_lib.EventLog(self.workdir, enabled=False).event_files()]
    for name in names:
      if not os.access(self.path(name), os.W_OK):
        raise ConfigError(f"{printable(self.path(name))} is read-only for this user, and the run resuming in "
                          f"{printable(self.workdir)} rewrites it; make it writable (chmod u+w) or use another "
                          "--workdir")

  def check_same_run(self, config: ml_collections.ConfigDict) -> None:
    """Refuses a workdir that holds a run of another config (before anything is read or written)."""
    differences = self.config_differences(config)
    if differences:
      raise CheckpointError(
          f"{self.workdir} holds a run with a different config ({differences}); use a new --workdir, "
          "or pass --fresh to set the old run aside and start over")

  def write_config(self, config: ml_collections.ConfigDict) -> None:
    self.write_json(CONFIG_FILE, config_lib.as_json(config))

  def write_dataset(self, record: dict[str, Any]) -> None:
    """Writes `dataset.json` when the run starts; a resumed run keeps the one it started with."""
    if not os.path.exists(self.path(DATASET_FILE)):
      self.write_json(DATASET_FILE, record)

  def set_aside_run(self) -> str | None:
    """Moves an earlier run's files into `replaced-<time>/` inside the workdir (nothing is deleted)."""
    present = [name for name in RUN_FILES if os.path.exists(self.path(name))]
    # The TensorBoard event files, whose names vary; before config.json, which goes last.
    present[-1:-1] = sorted(name for name in os.listdir(self.workdir) if name.startswith(metrics_lib.EVENT_FILE_PREFIX)
                            ) if os.path.isdir(self.workdir) else []
    if not present or not self.is_writer:
      return None
    target = self.path(f"replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(target)
    for name in present:
      shutil.move(self.path(name), os.path.join(target, name))
    return target

  # -- how the run stands ------------------------------------------------------------------------

  def summary(self) -> dict[str, Any] | None:
    return self.read_json(SUMMARY_FILE)

  def finished_summary(self, total_steps: int | None, *, require_config: bool = True) -> dict[str, Any] | None:
    """The summary of a run that reached its last step (`total_steps`; None: any step), else None.

    Before deciding not to train, a summary counts only beside the config.json it
    belongs to (`require_config`): without it, the checkpoints' fingerprints
    decide whose run this is, and the run restores (and summarizes) its last
    checkpoint again. Tables of results read summaries as they are.
    """
    if require_config and not os.path.exists(self.path(CONFIG_FILE)):
      return None
    summary = self.summary()
    if summary is None or (total_steps is not None and summary.get("step") != total_steps):
      return None
    return summary

  def error(self) -> dict[str, Any] | None:
    """What `error.json` says of a divergence, if the run diverged."""
    return self.read_json(ERROR_FILE)

  def failure(self) -> dict[str, Any] | None:
    return self.read_json(FAILURE_FILE)

  def checkpoint_steps(self) -> list[int]:
    """The steps of the complete checkpoints, oldest first (orbax renames a step's temporary directory
    to its bare number only once every process has written it)."""
    directory = self.checkpoint_dir
    if not os.path.isdir(directory):
      return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())

  def has_checkpoints(self) -> bool:
    return bool(self.checkpoint_steps())

  def status(self, total_steps: int | None = None, *, require_config: bool = True) -> str:
    """failed, finished, diverged, incomplete (checkpoints only) or not started (`require_config`: see
    `finished_summary`). A failure counts first: `failure.json` says the latest attempt failed (a run
    that finishes removes it), whatever an earlier attempt's summary says."""
    if self.failure() is not None:
      return FAILED
    if self.finished_summary(total_steps, require_config=require_config) is not None:
      return FINISHED
    if self.error() is not None:
      return DIVERGED
    return INCOMPLETE if self.has_checkpoints() else NOT_STARTED

  def write_summary(self, summary: dict[str, Any]) -> None:
    """The finished run's summary; an earlier attempt's failure no longer stands."""
    self.write_json(SUMMARY_FILE, summary)
    self.remove(FAILURE_FILE)

  def write_error(self, step: int, message: str) -> None:
    self.write_json(ERROR_FILE, {"step": step, "error": message})

  def write_failure(self, reason: str) -> None:
    self.write_json(FAILURE_FILE, {"reason": reason, "time": time.strftime("%Y-%m-%d %H:%M:%S")})

  # -- checkpoints -------------------------------------------------------------------------------

  def checkpointer(self, config: ml_collections.ConfigDict, *, read_only: bool = False) -> Checkpointer:
    """The run's checkpoints, checked against `config`'s fingerprint on every restore (`read_only`: for
    readers beside a possibly live run)."""
    best_metric = config.get("keep_best_metric", "")  # absent from configs saved before the key existed
    return Checkpointer(self.checkpoint_dir, max_to_keep=config.keep_checkpoints,
                        fingerprint=config_lib.fingerprint(config), read_only=read_only, best_metric=best_metric,
                        best_mode=config_lib.BEST_METRICS.get(best_metric, "max"))

  def restore_latest(self, config: ml_collections.ConfigDict, template: Any) -> Restored:
    """The newest good checkpoint of a run of `config` (read-only use: analysis, probes)."""
    if not self.has_checkpoints():
      raise CheckpointError(f"{self.workdir} holds no checkpoint; train it first with python -m cnnjax.main")
    checkpointer = self.checkpointer(config, read_only=True)
    try:
      restored = checkpointer.restore_latest(template)
    finally:
      checkpointer.close()
    if restored is None:
      raise CheckpointError(f"{self.workdir} holds no readable checkpoint; train it again")
    return restored

  def restore_step(self, config: ml_collections.ConfigDict, template: Any, step: int) -> Restored:
    checkpointer = self.checkpointer(config, read_only=True)
    try:
      return checkpointer.restore(step, template)
    finally:
      checkpointer.close()
