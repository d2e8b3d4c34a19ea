"""A `jax.profiler` trace of chosen train steps, written into the run's directory.

`config.profile_steps = (START, COUNT)` (on the command line
`--config.profile_steps=START,COUNT`) traces the COUNT train steps that follow
the first START, so steps START + 1 .. START + COUNT as `metrics.jsonl` counts
them; compilation happens before the trace starts. COUNT = 0 (the default)
traces nothing. The trace lands in `WORKDIR/plugins/profile/<time>/`, where
TensorBoard's profile plugin looks for it:

* `<host>.xplane.pb`: `pip install tensorboard-plugin-profile` (or xprof), then
  `tensorboard --logdir=WORKDIR` and open the Profile tab (trace viewer, op
  statistics, memory);
* `perfetto_trace.json.gz`: open it at ui.perfetto.dev (Open trace file), no
  install.

Only the writing process (process 0) traces. A run that resumes after START
does not trace again (its earlier invocation did, or was stopped while doing it).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

# Where jax.profiler writes inside its log directory (TensorBoard's plugin layout).
PROFILE_DIR = "plugins"

logger = logging.getLogger("cnnjax")


class StepTrace:
  """Starts the profiler before step index START is dispatched and stops it once step START + COUNT is done."""

  def __init__(self, workdir: str, profile_steps: Any, *, start_step: int, enabled: bool):
    """profile_steps: (START, COUNT) as `cnnjax.config.validate` admits them."""
    self.workdir = workdir
    self.first, count = (int(v) for v in profile_steps)
    self.last = self.first + count
    self.enabled = enabled and count > 0 and start_step <= self.first
    self.active = False

  def before_step(self, step: int) -> None:
    """Called before step index `step` (0-based) is dispatched."""
    if self.enabled and step == self.first:
      jax.profiler.start_trace(self.workdir, create_perfetto_trace=True)
      self.active = True

  def after_step(self, done: int, outputs: Any) -> str | None:
    """Called once `done` steps are dispatched; stops the trace after the last traced one, saying where it is."""
    if not self.active or done != self.last:
      return None
    jax.block_until_ready(outputs)  # the traced steps' device work belongs in the trace
    self.stop()
    return (f"profile of steps {self.first + 1}-{self.last} written to "
            f"{os.path.join(self.workdir, PROFILE_DIR, 'profile')}")

  def stop(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()
