"""`python -m cnnjax.main` (or `cnnjax.sweep`), with a fault injected at a chosen point.

CNNJAX_FAULT=<point>:<arguments>, where <point> is one of:
  between_steps:S   SIGKILL after S steps are done, before the next one is dispatched
  during_step:S     SIGKILL right after step S is dispatched, while the device computes it
  save_begin:S      SIGKILL once orbax has created the temporary directory of checkpoint S
  save_commit:S[:K] SIGKILL just before orbax renames checkpoint S into place, the K-th time it does
                    (default 1; a vectorized population saves checkpoint S once per member)
  trial_fails:NAME  the run in a directory named NAME raises RuntimeError (a sweep trial failing for a
                    reason other than divergence, such as running out of memory)

CNNJAX_FAULT_ENTRY=sweep runs `python -m cnnjax.sweep` instead of `cnnjax.main`.

Used by tests/test_reliability.py and tests/test_fault_matrix.py. The hooks patch
the engine, orbax's atomic temporary path or the training entry in this process
only; the code under test is unchanged.
"""

import importlib
import os
import signal

import numpy as np

from absl import app
from orbax.checkpoint._src.path import atomicity

from cnnjax import cli
from cnnjax import train
from cnnjax.parallel import strategies as engines

INJECTED_FAILURE = "injected failure: out of memory allocating 1234 bytes"


def die() -> None:
  os.kill(os.getpid(), signal.SIGKILL)


def steps_done(state) -> int:
  """The state's step counter (replicated or stacked over devices or members: all copies agree)."""
  return int(np.asarray(state.step.addressable_shards[0].data).reshape(-1)[0])


def install_step_fault(point: str, step: int) -> None:
  for engine in (engines.SingleEngine, engines.PopulationEngine):
    original_compile = engine.compile_train_step

    def compile_train_step(self, step_fn, state, batch, data, original_compile=original_compile):
      compiled = original_compile(self, step_fn, state, batch, data)

      def step_fn(s, b):
        done = steps_done(s["state"])
        if point == "between_steps" and done == step:
          die()
        outputs = compiled(s, b)
        if point == "during_step" and done + 1 == step:
          die()
        return outputs
      return step_fn
    engine.compile_train_step = compile_train_step


def install_save_fault(point: str, step: int, occurrence: int) -> None:
  cls = atomicity.AtomicRenameTemporaryPath
  original_create, original_finalize = cls.create, cls.finalize
  commits = [0]

  async def create(self):
    result = await original_create(self)
    if point == "save_begin" and self.get_final().name == str(step):
      die()
    return result

  async def finalize(self):
    if point == "save_commit" and self.get_final().name == str(step):
      commits[0] += 1
      if commits[0] == occurrence:
        die()
    return await original_finalize(self)
  cls.create, cls.finalize = create, finalize


def install_trial_failure(name: str) -> None:
  original_run = train.run

  def run(config, workdir, **kwargs):
    if os.path.basename(os.path.normpath(workdir)) == name:
      raise RuntimeError(INJECTED_FAILURE)
    return original_run(config, workdir, **kwargs)
  train.run = run


def install(fault: str) -> None:
  point, _, arguments = fault.partition(":")
  if point in ("between_steps", "during_step"):
    install_step_fault(point, int(arguments))
  elif point in ("save_begin", "save_commit"):
    step, _, occurrence = arguments.partition(":")
    install_save_fault(point, int(step), int(occurrence or 1))
  elif point == "trial_fails":
    install_trial_failure(arguments)
  else:
    raise ValueError(f"unknown fault point {point!r}")


if __name__ == "__main__":
  install(os.environ["CNNJAX_FAULT"])
  entry = importlib.import_module("cnnjax.sweep.__main__" if os.environ.get("CNNJAX_FAULT_ENTRY") == "sweep"
                                  else "cnnjax.main")
  app.run(entry.main, flags_parser=cli.one_line_flags_parser)
