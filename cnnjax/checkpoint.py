"""Checkpoints with orbax: the train state and the data iterator's position, saved together.

A checkpoint is one orbax step directory holding two items: `state` (the
TrainState as host arrays) and `data` (the grain iterator state as JSON), so a
resumed run continues the exact data order. orbax writes each step into a
temporary directory and renames it when complete, so an interrupted save never
replaces or damages an earlier checkpoint; `CheckpointManager` keeps the newest
`max_to_keep`. Saves are synchronous: the state is on disk when `save` returns.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cnnjax.errors import CheckpointError

PyTree = Any


class Checkpointer:
  """Saves and restores (state, data position) under `directory`."""

  def __init__(self, directory: str, *, max_to_keep: int):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, host_state: PyTree, data_state: dict[str, Any]) -> None:
    """Writes a checkpoint for `step` (every process calls this; orbax coordinates)."""
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(host_state),
                                                     data=ocp.args.JsonSave(data_state)))
    self._manager.wait_until_finished()

  def restore(self, step: int, template: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Restores step `step` into the structure and shapes of `template` (host arrays)."""
    abstract = jax.tree.map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), template)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(
          f"checkpoint {step} in {self.directory} does not match this run's model or optimizer "
          f"({str(e).splitlines()[0][:200]}); use a new --workdir or delete the checkpoints to start fresh") from None
    return restored["state"], restored["data"]

  def close(self) -> None:
    self._manager.close()
