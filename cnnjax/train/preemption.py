"""Preemption: SIGTERM and SIGINT make a run save the step it is on and stop.

Cluster schedulers (SLURM, Kubernetes, cloud and TPU preemption) send SIGTERM
before they kill a job; a user sends SIGINT with Ctrl-C. Either one asks the
training loop to finish the current step, save a checkpoint of it, print one
line naming the step, and exit with status 128 + the signal number. A rerun of
the same command resumes there and ends bit-identical to an uninterrupted run.

* One process: Python handlers set a flag that the loop reads after every step.
* Several processes (`jax.distributed`): JAX's preemption service catches
  SIGTERM on any process, and `CheckpointManager.reached_preemption(step)`
  (JAX's `reached_preemption_sync_point`) turns true on every process at the
  same step, so all of them save that step. SIGINT is handed to that service as
  a SIGTERM to the process itself. A Python SIGTERM handler would replace JAX's,
  so none is installed there.

A second signal while the first is being handled stops the process at once
(checkpoints are atomic: the last complete one stays).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Iterator

import jax

from cnnjax.errors import EXIT_STATUS_BASE, Preempted

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
  """Whether a stop was requested, and by which signal; `handling()` installs the handlers."""

  def __init__(self):
    self.signum: int | None = None
    self._last_step: int | None = None  # the step of the last `reached`

  @contextlib.contextmanager
  def handling(self) -> Iterator["Preemption"]:
    """Installs the handlers while the block runs (from the main thread; elsewhere it does nothing)."""
    if threading.current_thread() is not threading.main_thread():
      yield self
      return
    multi_process = jax.process_count() > 1
    signals = (signal.SIGINT,) if multi_process else HANDLED_SIGNALS
    # A signal ignored at start (SIGINT in a shell's background job) stays ignored: it is not aimed at us.
    signals = [signum for signum in signals if signal.getsignal(signum) is not signal.SIG_IGN]
    previous = {signum: signal.signal(signum, self._handle) for signum in signals}
    try:
      yield self
    finally:
      for signum, handler in previous.items():
        signal.signal(signum, handler)

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.signum is not None:
      os._exit(EXIT_STATUS_BASE + signum)  # pylint: disable=protected-access  (a second signal: stop now)
    self.signum = signum
    if jax.process_count() > 1:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption service tells every process

  def reached(self, step: int, checkpointer: Any) -> bool:
    """Whether the loop must save `step` and stop. Every process of a multi-process run calls this
    after every dispatch, with the step it reached, and gets the same answer.

    JAX's preemption service agrees on a sync point one past the largest step
    any process has reported, and answers yes only at that exact step; orbax
    reports the steps it saves to the same service. So it is told every step
    since the last call, one by one: a dispatch of several steps would skip
    the point.
    """
    if jax.process_count() == 1:
      return self.signum is not None
    first = step if self._last_step is None else self._last_step + 1
    self._last_step = step
    # Every step is reported, even past one that answered yes: the processes make the same calls.
    return any([checkpointer.reached_preemption(passed) for passed in range(first, step + 1)])

  def stopped(self, step: int) -> Preempted:
    return Preempted(self.signum or signal.SIGTERM, step)
