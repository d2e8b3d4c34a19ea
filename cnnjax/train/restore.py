"""Reading a run back: its saved config and data record, one of its checkpoints, and the model with the
experiment for data it fits, or with what new images need (`restore_for_inference`).

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
from flax import linen as nn

from cnnjax import config as config_lib
from cnnjax.checkpoint import Checkpointer, Restored, is_transient
from cnnjax.data import Dataset, Preprocess
from cnnjax.errors import CheckpointError, CnnjaxError, ConfigError, UnreadableCheckpointError
from cnnjax.parallel.host_devices import HostDevices
from cnnjax.train.experiment import Experiment, build, make_model, make_optimizer, make_preprocess, planned_steps
from cnnjax.train.rundir import CONFIG_FILE, DATASET_FILE, RunDir
from cnnjax.train.state import TrainState, create_train_state

# Which checkpoint to read: the newest, or the best-scoring one kept by `keep_best_metric`.
LATEST, BEST = "latest", "best"
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


def read_checkpoint(workdir: str, run_config: ml_collections.ConfigDict, template: TrainState, *,
                    step: int | None, checkpoint: str, misfit: str) -> Restored:
  """The chosen checkpoint (`choose_step`) of the run of `run_config` in `workdir`, into `template`.
  `misfit` says what the template was built for, in the error when the checkpoint does not fit it."""
  checkpointer = RunDir(workdir, is_writer=False).checkpointer(run_config, read_only=True)
  try:
    chosen = choose_step(checkpointer, workdir, step=step, checkpoint=checkpoint)
    try:
      mismatch = checkpointer.mismatch(chosen, template)
      if mismatch:
        raise ConfigError(f"{misfit} does not fit the model of the run in {workdir}: {mismatch}; give data with "
                          "the run's classes and input shape")
      return checkpointer.restore(chosen, template)
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


def restore(workdir: str, config: ml_collections.ConfigDict, *, run_config: ml_collections.ConfigDict,
            step: int | None = None, checkpoint: str = LATEST, host: HostDevices = HostDevices()) -> RestoredRun:
  """Checkpoint `step` (else the newest, or the best with `checkpoint=BEST`) of the run of `run_config` in
  `workdir`, with the experiment of `config` (`run_config` with any overrides), which opens its data.
  Raises a CnnjaxError for every problem: no such checkpoint, a damaged one, data the model does not fit."""
  exp = build(config, host=host)
  restored = read_checkpoint(
      workdir, run_config, jax.device_get(exp.init_state()), step=step, checkpoint=checkpoint,
      misfit=f"data.name={config.data.name} ({exp.dataset.num_classes} classes, inputs {exp.input_shape})")
  return RestoredRun(workdir, exp, restored.state, restored.step)


def recorded_dataset(workdir: str) -> tuple[Dataset, tuple[int, ...], int] | None:
  """(the run's dataset without its splits, the model's input shape, training examples) as the run
  recorded them when it started (`experiment.data_record`), or None for a run that recorded none."""
  record = RunDir(workdir, is_writer=False).read_json(DATASET_FILE)
  if record is None:
    return None
  try:
    dataset = Dataset(record["name"], None, None, record["num_classes"], tuple(record["image_shape"]),
                      tuple(record["mean"]), tuple(record["std"]), task=record["task"],
                      background_class=record["background_class"], vocab_size=record["vocab_size"],
                      class_names=tuple(record["class_names"] or ()))
    return dataset, tuple(record["input_shape"]), int(record["train_examples"])
  except (KeyError, TypeError, ValueError) as e:
    raise ConfigError(f"{os.path.join(workdir, DATASET_FILE)} is not the record a run writes ({type(e).__name__}: "
                      f"{e}); move it aside to read the run with its dataset") from None


@dataclasses.dataclass(frozen=True)
class InferenceRun:
  """What applying a run's model to new inputs needs: the model, its eval preprocessing and the state."""

  workdir: str
  config: ml_collections.ConfigDict
  dataset: Dataset  # splits absent when rebuilt from `dataset.json`
  preprocess: Preprocess
  input_shape: tuple[int, ...]
  model: nn.Module
  state: TrainState  # host arrays
  step: int


def restore_for_inference(workdir: str, *, step: int | None = None, checkpoint: str = LATEST) -> InferenceRun:
  """A checkpoint of the run in `workdir` with its model and eval preprocessing, rebuilt from the run's
  `dataset.json` without opening the dataset (a run that recorded none opens it, as `restore` does)."""
  config = load_config(workdir)
  recorded = recorded_dataset(workdir)
  if recorded is None:
    restored = restore(workdir, config, run_config=config, step=step, checkpoint=checkpoint)
    exp = restored.exp
    return InferenceRun(workdir, config, exp.dataset, exp.preprocess, exp.input_shape, exp.model, restored.state,
                        restored.step)
  config_lib.validate(config)
  dataset, input_shape, train_examples = recorded
  preprocess, _ = make_preprocess(config, dataset)
  model = make_model(config, dataset)
  tx, _ = make_optimizer(config, planned_steps(config, train_examples))
  template = jax.device_get(create_train_state(config.seed, model, tx, input_shape))
  restored = read_checkpoint(workdir, config, template, step=step, checkpoint=checkpoint,
                             misfit=f"the recorded {DATASET_FILE}")
  return InferenceRun(workdir, config, dataset, preprocess, input_shape, model, restored.state, restored.step)
