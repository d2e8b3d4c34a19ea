"""Checkpoints with orbax: the train state and the data iterator's position, saved together.

A checkpoint is one orbax step directory holding two items: `state` (the
TrainState as host arrays) and `data` (the grain iterator state as JSON), so a
resumed run continues the exact data order. Saves are synchronous (the state is
on disk when `save` returns) and atomic: orbax writes a step into a temporary
directory and renames it into place only when every process has finished
writing it, so an interrupted save never replaces or damages an earlier
checkpoint, and only complete checkpoints are ever listed. `CheckpointManager`
keeps the newest `max_to_keep`.

Restoring (`restore_latest`) checks before reading anything that the newest
checkpoint has this run's parameter tree and shapes, and refuses a checkpoint of
another model or optimizer, naming the mismatch. A checkpoint that cannot be read
(a corrupted or partial file) is reported, moved aside into
`unreadable_checkpoints/` next to the checkpoint directory (never deleted), and
the next newest is tried.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cnnjax.errors import CheckpointError

PyTree = Any
UNREADABLE_DIR = "unreadable_checkpoints"
logger = logging.getLogger("cnnjax")


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


class Checkpointer:
  """Saves and restores (state, data position) under `directory`."""

  def __init__(self, directory: str, *, max_to_keep: int):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, host_state: PyTree, data_state: dict[str, Any]) -> None:
    """Writes a checkpoint for `step` (every process calls this; orbax coordinates)."""
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(host_state),
                                                     data=ocp.args.JsonSave(data_state)))
    self._manager.wait_until_finished()

  def check_compatible(self, step: int, template: PyTree) -> None:
    """Raises CheckpointError if checkpoint `step` holds another parameter tree or shapes.

    Raises other exceptions if the checkpoint's metadata cannot be read at all.
    """
    found = tree_signature(self._manager.item_metadata(step)["state"])
    mismatch = describe_mismatch(found, tree_signature(template))
    if mismatch:
      raise CheckpointError(
          f"checkpoint {step} in {self.directory} belongs to a different model, input or optimizer: {mismatch}; "
          "use a new --workdir, or pass --fresh to set the old run aside and start over")

  def restore(self, step: int, template: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Restores step `step` into the structure of `template` (host arrays), after checking it fits."""
    self.check_compatible(step, template)
    abstract = jax.tree.map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), template)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def restore_latest(self, template: PyTree) -> tuple[int, PyTree, dict[str, Any]] | None:
    """The newest readable checkpoint as (step, state, data position), or None if there is none.

    Unreadable checkpoints are reported and moved aside; an incompatible one
    raises CheckpointError.
    """
    for step in reversed(self.all_steps()):
      try:
        state, data_state = self.restore(step, template)
      except CheckpointError:
        raise
      except Exception as error:  # pylint: disable=broad-except  (any failure to read means unreadable)
        self._set_aside(step, error)
        continue
      return step, state, data_state
    return None

  def _set_aside(self, step: int, error: Exception) -> None:
    reason = " ".join(str(error).split())[:300] or type(error).__name__
    target = os.path.join(os.path.dirname(self.directory), UNREADABLE_DIR, f"{step}-{int(time.time())}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"cnnjax checkpoint {step} set aside")
    logger.warning("checkpoint %d in %s is unreadable (%s: %s); moved to %s, trying the next newest",
                   step, self.directory, type(error).__name__, reason, target)
    self._manager.reload()

  def close(self) -> None:
    self._manager.close()
