"""Checkpoints with orbax: the train state, the data iterator's position and the loop's own state.

A checkpoint is one orbax step directory holding three items:

* `state`: the TrainState as host arrays;
* `data`: the grain iterator state as JSON, so a resumed run continues the exact
  data order;
* `meta`: the fingerprint of the config keys that define the run
  (`config.fingerprint`), a sha256 checksum of everything restored, and the
  loop's state (the unfinished logging window, the last logged training window,
  accumulated timings), so a resumed run logs exactly what an uninterrupted one
  would.

Saves are synchronous (the checkpoint is on disk when `save` returns) and
atomic: orbax writes a step into a temporary directory and renames it into place
only when every process has finished writing it, so an interrupted save never
replaces or damages an earlier checkpoint, and only complete checkpoints are
ever listed. `CheckpointManager` keeps the newest `max_to_keep`.

Restoring checks, before reading any array, that the checkpoint belongs to this
run (its fingerprint) and has this run's parameter tree and shapes, and refuses
another run's checkpoint naming the mismatch. After reading, it recomputes the
checksum. A checkpoint that cannot be read or whose bytes changed (a corrupted,
partial or tampered file) is reported, moved aside into
`unreadable_checkpoints/` next to the checkpoint directory (never deleted), and
the next newest is tried.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cnnjax.errors import CheckpointError, DiskFullError, is_disk_full

PyTree = Any
UNREADABLE_DIR = "unreadable_checkpoints"
STATE_ITEM, DATA_ITEM, META_ITEM = "state", "data", "meta"
# Loop-state entries that differ between the processes of one run (wall-clock timings): kept in the
# checkpoint for the summary, outside the checksum, which covers what every process restores alike.
UNCHECKED_LOOP_KEYS = ("timing",)
# Failures to read that say nothing about the checkpoint itself.
TRANSIENT_ERRNOS = (errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.ESTALE, errno.EINTR)
# Room a checkpoint needs beside its arrays: orbax's metadata, the data position and the loop state.
CHECKPOINT_METADATA_BYTES = 2 ** 17
logger = logging.getLogger("cnnjax")


class DamagedCheckpointError(Exception):
  """A checkpoint whose restored bytes do not match the checksum saved with it."""


@dataclasses.dataclass(frozen=True)
class Restored:
  """What a checkpoint gives back: its step, the state, the data position and the loop's state."""

  step: int
  state: PyTree
  data: dict[str, Any]
  loop: dict[str, Any]


def leaf_name(path: tuple[Any, ...]) -> str:
  """A pytree path as orbax names it: keys and attribute names joined by dots."""
  parts = []
  for entry in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(entry, attribute):
        parts.append(str(getattr(entry, attribute)))
        break
  return ".".join(parts)


def tree_signature(tree: PyTree) -> dict[str, tuple[tuple[int, ...], str]]:
  """{leaf name: (shape, dtype)} of a pytree of arrays (or array metadata)."""
  return {leaf_name(path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def checksum(state: PyTree, data_state: dict[str, Any], loop_state: dict[str, Any]) -> str:
  """sha256 over every array of the state (name, dtype, shape and bytes), the data position and the
  loop state's checked entries."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    array = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{leaf_name(path)}:{array.dtype.str}:{array.shape};".encode())
    digest.update(array.tobytes())
  checked = {k: v for k, v in loop_state.items() if k not in UNCHECKED_LOOP_KEYS}
  digest.update(json.dumps([data_state, checked], sort_keys=True).encode())
  return digest.hexdigest()


def is_transient(error: BaseException) -> bool:
  """Whether a failure to read is the machine's (out of memory, out of file handles, I/O trouble) rather
  than a damaged checkpoint's: such a checkpoint must not be set aside."""
  while error is not None:
    if isinstance(error, MemoryError) or (isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS):
      return True
    error = error.__cause__ or error.__context__
  return False


def _report_order(name: str) -> tuple[int, str]:
  """Parameters first, then BatchNorm statistics, then the rest (the optimizer mirrors the parameters)."""
  rank = 0 if name.startswith("params.") else 1 if name.startswith("batch_stats.") else 2
  return rank, name


def describe_mismatch(found: dict[str, Any], expected: dict[str, Any]) -> str | None:
  """The first difference between a checkpoint's signature and this run's, in words, or None."""
  missing = sorted(set(expected) - set(found))
  extra = sorted(set(found) - set(expected))
  if missing or extra:
    parts = []
    if missing:
      parts.append(f"this run has {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                   + " that the checkpoint lacks")
    if extra:
      parts.append(f"the checkpoint has {extra[0]!r}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else "")
                   + " that this run lacks")
    return "parameter tree differs: " + "; ".join(parts)
  for name in sorted(expected, key=_report_order):
    if found[name] != expected[name]:
      return (f"{name} is {found[name][0]} {found[name][1]} in the checkpoint but {expected[name][0]} "
              f"{expected[name][1]} in this run")
  return None


def keep_policy(max_to_keep: int, best_metric: str, best_mode: str) -> dict[str, Any]:
  """orbax CheckpointManagerOptions that keep the newest `max_to_keep` checkpoints and, with `best_metric`,
  the one that scores best on it too: orbax's own best tracking (`best_fn`, `best_mode`, which also
  writes each checkpoint's metrics and answers `best_step`) with a preservation policy that keeps the
  newest beside the best (orbax's `best_fn` alone keeps the best `max_to_keep` and may delete the newest,
  which resume needs). A checkpoint saved without metrics (at a step that did not evaluate) is never the
  best, and goes once it is not among the newest."""
  if not best_metric:
    return {"max_to_keep": max_to_keep}
  policies = ocp.checkpoint_managers
  return {"best_fn": lambda metrics: metrics[best_metric], "best_mode": best_mode,
          "keep_checkpoints_without_metrics": False,
          "preservation_policy": policies.AnyPreservationPolicy([
              policies.LatestN(n=max_to_keep),
              policies.BestN(get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == "min", n=1,
                             keep_checkpoints_without_metrics=False)])}


FRESH_HINT = "use a new --workdir, or pass --fresh to set the old run aside and start over"


class Checkpointer:
  """Saves and restores (state, data position, loop state) under `directory`, for the run whose config
  has `fingerprint` (see `cnnjax.config.fingerprint`)."""

  def __init__(self, directory: str, *, max_to_keep: int, fingerprint: str, read_only: bool = False,
               best_metric: str = "", best_mode: str = "max"):
    """`read_only`: for readers beside a live run (analysis, probes): nothing is created, cleaned up or
    set aside, so that a save in progress is never disturbed. `best_metric` (a key of the metrics that
    `save` is given; '' for none) also keeps the best-scoring checkpoint, the highest with `best_mode`
    'max', the lowest with 'min', beside the newest `max_to_keep` (`keep_policy`)."""
    self.directory = os.path.abspath(directory)
    self.fingerprint = fingerprint
    self.read_only = read_only
    self.best_metric = best_metric
    keeping = keep_policy(max_to_keep, best_metric, best_mode)
    if read_only:  # a reader deletes nothing: what orbax would otherwise reset, with a warning each
      keeping = {key: value for key, value in keeping.items() if key not in ("max_to_keep", "preservation_policy")}
      keeping["save_interval_steps"] = 0
    options = ocp.CheckpointManagerOptions(create=not read_only, read_only=read_only,
                                           enable_async_checkpointing=False,
                                           cleanup_tmp_directories=not read_only, **keeping)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(), DATA_ITEM: ocp.JsonCheckpointHandler(),
                       META_ITEM: ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  @property
  def tracks_best(self) -> bool:
    return bool(self.best_metric)

  def best_step(self) -> int | None:
    """The best-scoring checkpoint's step (None when none was saved with metrics, or none is tracked)."""
    return self._manager.best_step() if self.tracks_best else None

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, host_state: PyTree, data_state: dict[str, Any],
           loop_state: dict[str, Any] | None = None, metrics: dict[str, float] | None = None) -> None:
    """Writes a checkpoint for `step` (every process calls this; orbax coordinates). `metrics` (the eval
    at this step, if any) score it for `best_metric`; orbax keeps them beside the items.

    Raises CheckpointError naming the last good checkpoint when the disk is full.
    """
    loop_state = loop_state or {}
    meta = {"fingerprint": self.fingerprint, "checksum": checksum(host_state, data_state, loop_state),
            "loop": loop_state}
    # Checked before writing: a write that runs out of space half-way leaves orbax's writer threads
    # printing tracebacks. Checkpoints are stored uncompressed, so the arrays' bytes are their size.
    needed = sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(host_state)) + CHECKPOINT_METADATA_BYTES
    if shutil.disk_usage(self.directory).free < needed:
      raise self._disk_full(step)
    try:
      self._manager.save(step, args=ocp.args.Composite(**{
          STATE_ITEM: ocp.args.StandardSave(host_state), DATA_ITEM: ocp.args.JsonSave(data_state),
          META_ITEM: ocp.args.JsonSave(meta)}), metrics=metrics if self.tracks_best else None)
      self._manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except  (orbax wraps the OSError in its own errors)
      if not is_disk_full(error):
        raise
      raise self._disk_full(step) from None

  def _disk_full(self, step: int) -> DiskFullError:
    kept = [s for s in self.all_steps() if s != step]
    return DiskFullError(
        f"the disk is full: checkpoint {step} could not be written to {self.directory}; the last good "
        f"checkpoint ({kept[-1] if kept else 'none'}) is kept; free space and rerun the same command to resume "
        "from it")

  def reached_preemption(self, step: int) -> bool:
    """Whether every process of a multi-process run has reached the step at which JAX's preemption
    service (SIGTERM on any process) asks them all to save; always False in a single process."""
    return self._manager.reached_preemption(step)

  def _has_meta(self, step: int) -> bool:
    return os.path.isdir(os.path.join(self.directory, str(step), META_ITEM))

  def read_meta(self, step: int) -> dict[str, Any]:
    """The checkpoint's `meta` item. Raises CheckpointError when no checkpoint here has one (an older
    format), DamagedCheckpointError when this one lacks it but others have it, and other exceptions when
    it cannot be read."""
    if not self._has_meta(step):
      if not any(self._has_meta(other) for other in self.all_steps()):
        raise CheckpointError(
            f"the checkpoints in {self.directory} carry no config fingerprint or checksum (an older cnnjax "
            f"wrote them) and cannot be checked; {FRESH_HINT}")
      raise DamagedCheckpointError(f"its {META_ITEM} item is missing")
    meta = self._manager.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))[META_ITEM]
    if not isinstance(meta, dict) or not {"fingerprint", "checksum"} <= set(meta):
      raise DamagedCheckpointError(f"its {META_ITEM} item is not a cnnjax record")
    return meta

  def check_compatible(self, step: int, template: PyTree, meta: dict[str, Any]) -> None:
    """Raises CheckpointError if checkpoint `step` belongs to another run or holds another parameter
    tree or shapes. Raises other exceptions if its metadata cannot be read at all."""
    if meta["fingerprint"] != self.fingerprint:
      raise CheckpointError(
          f"checkpoint {step} in {self.directory} belongs to a run of another config (its fingerprint "
          f"{meta['fingerprint'][:12]} is not this config's {self.fingerprint[:12]}); {FRESH_HINT}")
    mismatch = self.mismatch(step, template)
    if mismatch:
      raise CheckpointError(
          f"checkpoint {step} in {self.directory} belongs to a different model, input or optimizer: {mismatch}; "
          f"{FRESH_HINT}")

  def mismatch(self, step: int, template: PyTree) -> str | None:
    """How checkpoint `step`'s parameter tree and shapes differ from `template`'s, in words, or None."""
    return describe_mismatch(tree_signature(self._manager.item_metadata(step)[STATE_ITEM]), tree_signature(template))

  def restore(self, step: int, template: PyTree) -> Restored:
    """Restores step `step` into the structure of `template` (host arrays), after checking that it is
    this run's and that it fits; raises DamagedCheckpointError when the bytes fail the checksum."""
    meta = self.read_meta(step)
    self.check_compatible(step, template, meta)
    abstract = jax.tree.map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), template)
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardRestore(abstract), DATA_ITEM: ocp.args.JsonRestore()}))
    loop_state = meta.get("loop") or {}
    if checksum(restored[STATE_ITEM], restored[DATA_ITEM], loop_state) != meta["checksum"]:
      raise DamagedCheckpointError("its contents do not match the checksum saved with them")
    return Restored(step, restored[STATE_ITEM], restored[DATA_ITEM], loop_state)

  def restore_latest(self, template: PyTree, *, at_most: int | None = None) -> Restored | None:
    """The newest readable checkpoint (at step `at_most` or earlier, if given), or None if there is none.

    Unreadable and damaged checkpoints are reported and moved aside; one of
    another run or shape raises CheckpointError.
    """
    for step in reversed(self.all_steps()):
      if at_most is not None and step > at_most:
        continue
      try:
        return self.restore(step, template)
      except CheckpointError:
        raise
      except Exception as error:  # pylint: disable=broad-except  (any other failure to read means unreadable)
        if is_transient(error):
          raise  # the machine's trouble (memory, file handles, I/O), not the checkpoint's
        self._set_aside(step, error)
    return None

  def delete_after(self, step: int) -> None:
    """Deletes the checkpoints newer than `step`: a resume from `step` writes them again, identically."""
    for newer in self.all_steps():
      if newer > step:
        self._manager.delete(newer)

  def _set_aside(self, step: int, error: Exception) -> None:
    reason = " ".join(str(error).split())[:300] or type(error).__name__
    what = "damaged" if isinstance(error, DamagedCheckpointError) else "unreadable"
    if self.read_only:
      logger.warning("checkpoint %d in %s is %s (%s: %s); reading the next newest (the run that owns it sets it "
                     "aside when it resumes)", step, self.directory, what, type(error).__name__, reason)
      return
    target = os.path.join(os.path.dirname(self.directory), UNREADABLE_DIR, f"{step}-{int(time.time())}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"cnnjax checkpoint {step} set aside")
    logger.warning("checkpoint %d in %s is %s (%s: %s); moved to %s, trying the next newest",
                   step, self.directory, what, type(error).__name__, reason, target)
    self._manager.reload()

  def close(self) -> None:
    self._manager.close()
