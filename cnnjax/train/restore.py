"""Reading a run back: its saved config, one of its checkpoints, and the experiment for data the model fits.

What `python -m cnnjax.evaluate` and `python -m cnnjax.predict` share. Nothing
here writes into the run's directory: its files are read through a `RunDir`
that is not the writer (a damaged `config.json` is reported, never moved) and
its checkpoints through a read-only `Checkpointer`. A run still training may be
read beside it.

The run's config comes from its `config.json`; overrides (another dataset or
split, another strategy) build the experiment that reads the data, while the
checkpoint is checked against the run's own config (its fingerprint). A
checkpoint that does not fit the experiment (other classes, another input
shape) is refused in one line naming the difference, before any array is read.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections

from cnnjax import config as config_lib
from cnnjax.checkpoint import Checkpointer, is_transient
from cnnjax.errors import CheckpointError, CnnjaxError, ConfigError, UnreadableCheckpointError
from cnnjax.parallel.host_devices import HostDevices
from cnnjax.train.experiment import Experiment, build
from cnnjax.train.rundir import CONFIG_FILE, RunDir
from cnnjax.train.state import TrainState

# Which checkpoint to read: the newest, or the best-scoring one kept by `keep_best_metric`.
LATEST, BEST = "latest", "best"
CHECKPOINT_CHOICES = (LATEST, BEST)
TRAIN_HINT = "give the --workdir of a run trained with python -m cnnjax.main"


@dataclasses.dataclass(frozen=True)
class RestoredRun:
  """One checkpoint of a run, with the experiment built for the data it is to be applied to."""

  workdir: str
  exp: Experiment
  state: TrainState  # host arrays
  step: int


def _as_config(saved: Any, defaults: dict[str, Any]) -> Any:
  """`config.json`'s values over the schema's `defaults` (keys added to cnnjax after the run started
  hold their defaults, as a resumed run's would), with JSON's lists back to the tuples config files
  write."""
  if isinstance(saved, dict):
    merged = dict(defaults) if isinstance(defaults, dict) else {}
    merged.update({key: _as_config(value, merged.get(key)) for key, value in saved.items()})
    return merged
  if isinstance(saved, list):
    return tuple(_as_config(item, None) for item in saved)
  return saved


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config the run in `workdir` saved; ConfigError when `workdir` holds no run."""
  if not workdir or not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir!r} is not a directory; {TRAIN_HINT}")
  saved = RunDir(workdir, is_writer=False).read_json(CONFIG_FILE)
  if saved is None:
    problem = "is damaged" if os.path.exists(os.path.join(workdir, CONFIG_FILE)) else "is missing"
    raise ConfigError(f"{workdir} holds no run: its {CONFIG_FILE} {problem}; {TRAIN_HINT}")
  return ml_collections.ConfigDict(_as_config(saved, config_lib.base_config().to_dict()))


def _kept(steps: list[int]) -> str:
  return ", ".join(str(step) for step in steps) or "none"


def choose_step(checkpointer: Checkpointer, workdir: str, *, step: int | None, checkpoint: str) -> int:
  """The checkpoint step to read: `step` if given, else the newest (`LATEST`) or the best kept (`BEST`)."""
  steps = checkpointer.all_steps()
  if not steps:
    raise CheckpointError(f"{workdir} holds no checkpoint; train it first with python -m cnnjax.main")
  if step is not None:
    if step not in steps:
      raise CheckpointError(f"{workdir} has no checkpoint at step {step}; it keeps steps {_kept(steps)}")
    return step
  if checkpoint == BEST:
    if not checkpointer.tracks_best:
      raise CheckpointError(f"the run in {workdir} keeps no best checkpoint (its keep_best_metric is off); "
                            f"give --step=N (kept: {_kept(steps)}) or --checkpoint=latest")
    best = checkpointer.best_step()
    if best is None:
      raise CheckpointError(f"the run in {workdir} has no scored checkpoint yet (a checkpoint is scored when it "
                            f"is saved at a step that evaluates); give --step=N (kept: {_kept(steps)})")
    return best
  return steps[-1]


def restore(workdir: str, config: ml_collections.ConfigDict, *, run_config: ml_collections.ConfigDict,
            step: int | None = None, checkpoint: str = LATEST, host: HostDevices = HostDevices()) -> RestoredRun:
  """Checkpoint `step` (else the newest, or the best with `checkpoint=BEST`) of the run of `run_config` in
  `workdir`, with the experiment of `config` (`run_config` with any overrides). Raises a CnnjaxError for
  every problem: no such checkpoint, a damaged one, data the model does not fit."""
  exp = build(config, host=host)
  checkpointer = RunDir(workdir, is_writer=False).checkpointer(run_config, read_only=True)
  try:
    chosen = choose_step(checkpointer, workdir, step=step, checkpoint=checkpoint)
    template = jax.device_get(exp.init_state())
    try:
      mismatch = checkpointer.mismatch(chosen, template)
      if mismatch:
        raise ConfigError(
            f"data.name={config.data.name} ({exp.dataset.num_classes} classes, inputs {exp.input_shape}) does not "
            f"fit the model of the run in {workdir}: {mismatch}; give data with the run's classes and input shape")
      restored = checkpointer.restore(chosen, template)
    except CnnjaxError:
      raise
    except Exception as error:  # pylint: disable=broad-except  (any other failure to read: damaged or unreadable)
      if is_transient(error):
        raise
      others, directory = [s for s in checkpointer.all_steps() if s != chosen], checkpointer.directory
      # Left open: closing orbax's manager after a failed read has its reader threads print tracebacks;
      # the entry point exits at once (`cli.stop_at_once`).
      checkpointer = None
      raise UnreadableCheckpointError(
          f"checkpoint {chosen} in {directory} is damaged or unreadable ({type(error).__name__}: "
          f"{' '.join(str(error).split())[:200]}); read another with --step=N (kept: {_kept(others)})") from None
  finally:
    if checkpointer is not None:
      checkpointer.close()
  return RestoredRun(workdir, exp, restored.state, restored.step)
