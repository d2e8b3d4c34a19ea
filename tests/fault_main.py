"""`python -m cnnjax.main`, with the process killing itself (SIGKILL) at a chosen point.

CNNJAX_FAULT=<point>:<step>, where <point> is one of:
  between_steps  after <step> steps are done, before the next one is dispatched
  during_step    right after step <step> is dispatched, while the device computes it
  save_begin     once orbax has created the temporary directory of checkpoint <step>
  save_commit    just before orbax renames checkpoint <step> into place

Used by tests/test_reliability.py. The hooks patch the engine and orbax's atomic
temporary path in this process only; the code under test is unchanged.
"""

import os
import signal

import numpy as np

from absl import app
from orbax.checkpoint._src.path import atomicity

from cnnjax import cli
from cnnjax import main as cnnjax_main
from cnnjax.train import engines


def die() -> None:
  os.kill(os.getpid(), signal.SIGKILL)


def steps_done(state) -> int:
  """The state's step counter (replicated or stacked over devices or members: all copies agree)."""
  return int(np.asarray(state.step.addressable_shards[0].data).reshape(-1)[0])


def install(point: str, step: int) -> None:
  if point in ("between_steps", "during_step"):
    for engine in (engines.SingleEngine, engines.PopulationEngine):
      original_compile = engine.compile_train_step

      def compile_train_step(self, state, batch, original_compile=original_compile):
        compiled = original_compile(self, state, batch)

        def step_fn(s, b):
          done = steps_done(s)
          if point == "between_steps" and done == step:
            die()
          outputs = compiled(s, b)
          if point == "during_step" and done + 1 == step:
            die()
          return outputs
        return step_fn
      engine.compile_train_step = compile_train_step
  elif point in ("save_begin", "save_commit"):
    cls = atomicity.AtomicRenameTemporaryPath
    original_create, original_finalize = cls.create, cls.finalize

    async def create(self):
      result = await original_create(self)
      if point == "save_begin" and self.get_final().name == str(step):
        die()
      return result

    async def finalize(self):
      if point == "save_commit" and self.get_final().name == str(step):
        die()
      return await original_finalize(self)
    cls.create, cls.finalize = create, finalize
  else:
    raise ValueError(f"unknown fault point {point!r}")


if __name__ == "__main__":
  fault_point, fault_step = os.environ["CNNJAX_FAULT"].split(":")
  install(fault_point, int(fault_step))
  app.run(cnnjax_main.main, flags_parser=cli.one_line_flags_parser)
