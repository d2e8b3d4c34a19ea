"""What a run leaves to look at: TensorBoard event files, curves.png and a jax.profiler trace.

Event files are read back with TensorBoard's own EventAccumulator (and its
multiplexer for a sweep), as `tensorboard --logdir` reads them.
"""

import glob
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

from cnnjax import metrics, train
from cnnjax.lab.notes import trained
from cnnjax.errors import ConfigError
from cnnjax.sweep import load_trials, run_sweep
from helpers import EXPERIMENTS, experiment_config, read_jsonl, tiny

TRAIN_TAGS = {"train/loss", "train/accuracy", "train/learning_rate", "train/grad_norm", "train/examples_per_second"}
EVAL_TAGS = {"eval/loss", "eval/accuracy"}
# matplotlib's first two line colours (train and eval), as RGB.
TRAIN_COLOUR, EVAL_COLOUR = (31, 119, 180), (255, 127, 14)


def lenet_config(**overrides):
  return tiny(experiment_config("lenet5_digits"), **{"batch_size": 32, "num_train_steps": 6, **overrides})


def event_points(directory) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} as TensorBoard reads the directory; every event kept, repeats included."""
  accumulator = EventAccumulator(str(directory), purge_orphaned_data=False)
  accumulator.Reload()
  return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def jsonl_points(directory) -> dict[str, list[tuple[int, float]]]:
  """The same {tag: [(step, value)]} from metrics.jsonl, in float32 as event files store values."""
  points: dict[str, list[tuple[int, float]]] = {}
  for record in read_jsonl(os.path.join(directory, "metrics.jsonl")):
    for tag, value in metrics.scalars(record).items():
      points.setdefault(tag, []).append((record["step"], float(np.float32(value))))
  return points


def test_a_run_writes_every_curve_to_tensorboard_once(tmp_path, tfds_data_dir):
  workdir = tmp_path / "run"
  train.run(lenet_config(eval_every_steps=2), str(workdir))
  points = event_points(workdir)
  assert set(points) == TRAIN_TAGS | EVAL_TAGS
  assert [step for step, _ in points["train/loss"]] == [2, 4, 6]
  assert [step for step, _ in points["eval/accuracy"]] == [2, 4, 6]
  assert points == jsonl_points(workdir)
  assert len(glob.glob(str(workdir / "events.out.tfevents.*"))) == 1


@pytest.mark.parametrize("damage", ["killed_before_checkpoint", "torn_event", "events_lost"])
@pytest.mark.slow
def test_a_resumed_run_holds_each_tensorboard_point_once(tmp_path, tfds_data_dir, damage):
  reference = tmp_path / "reference"
  train.run(lenet_config(eval_every_steps=2), str(reference))
  workdir = tmp_path / "run"
  train.run(lenet_config(eval_every_steps=2), str(workdir))
  # Killed after step 6's points were logged, before its checkpoint and summary: the rerun restores step 4
  # and logs steps 5-6 again.
  os.remove(workdir / "summary.json")
  shutil.rmtree(workdir / "checkpoints" / "6")
  (event_file,) = glob.glob(str(workdir / "events.out.tfevents.*"))
  if damage == "torn_event":
    with open(event_file, "ab") as f:
      f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00\x01\x02")  # a record cut short by the kill
  if damage == "events_lost":  # killed after writing metrics.jsonl, before the event file
    os.remove(event_file)
  train.run(lenet_config(eval_every_steps=2), str(workdir))
  points = event_points(workdir)
  for tag, series in points.items():
    steps = [step for step, _ in series]
    assert len(steps) == len(set(steps)), (tag, steps)
  assert {tag: sorted(s for s, _ in series) for tag, series in points.items()} == {
      tag: sorted(s for s, _ in series) for tag, series in event_points(reference).items()}
  # Exactly the points metrics.jsonl holds (the resumed run's values for the steps it redid).
  assert {tag: sorted(series) for tag, series in points.items()} == {
      tag: sorted(series) for tag, series in jsonl_points(workdir).items()}


def test_each_sweep_trial_is_one_tensorboard_run(tmp_path, tfds_data_dir):
  base = tiny(experiment_config("lr_sweep_digits"), num_train_steps=2, log_every_steps=1)
  base.lock()
  trials = [t for t in load_trials(os.path.join(EXPERIMENTS, "lr_sweep_digits.py")) if t.name.endswith("seed=0")][:2]
  sweep_dir = tmp_path / "sweep"
  run_sweep(base, trials, str(sweep_dir), mode="vectorized")
  multiplexer = EventMultiplexer()
  multiplexer.AddRunsFromDirectory(str(sweep_dir))
  multiplexer.Reload()
  assert sorted(multiplexer.Runs()) == sorted(t.name for t in trials)
  for trial in trials:
    assert [e.step for e in multiplexer.Scalars(trial.name, "train/loss")] == [1, 2]


@pytest.mark.slow
def test_a_segmentation_run_logs_the_mean_iou_of_its_eval(tmp_path):
  config = tiny(experiment_config("unet_shapes"), num_train_steps=2, batch_size=16)
  workdir = tmp_path / "run"
  train.run(config, str(workdir))
  (final,) = [r for r in read_jsonl(workdir / "metrics.jsonl") if r["split"] == "eval"]
  exp, state = trained.restore_run(config, str(workdir))
  assert final["mean_iou"] == pytest.approx(trained.segmentation_scores(exp, state)["mean_iou"], rel=1e-5)
  assert event_points(workdir)["eval/mean_iou"] == [(2, pytest.approx(final["mean_iou"], rel=1e-6))]


def test_mean_iou_leaves_out_classes_never_seen_nor_predicted():
  assert metrics.mean_iou(np.array([2.0, 0.0, 1.0]), np.array([4.0, 0.0, 3.0])) == pytest.approx(
      (0.5 + 1 / 3) / 2)


def colour_share(image: np.ndarray, colour: tuple[int, int, int]) -> float:
  return float(np.mean(np.all(np.abs(image[..., :3].astype(int) - colour) < 8, axis=-1)))


def test_curves_are_drawn_at_each_eval_and_at_the_end(tmp_path, tfds_data_dir, monkeypatch):
  drawn = []
  original = metrics.MetricsWriter.write_curves

  def recording(self):
    original(self)
    drawn.append(max(r["step"] for r in self.records()))
  monkeypatch.setattr(metrics.MetricsWriter, "write_curves", recording)
  workdir = tmp_path / "run"
  train.run(lenet_config(eval_every_steps=2), str(workdir))
  assert drawn == [2, 4, 6]
  image = np.asarray(Image.open(workdir / "curves.png"))
  assert image.shape[:2] == (int(metrics.CURVES_PANEL_INCHES[1] * metrics.CURVES_DPI), int(3 * metrics.CURVES_PANEL_INCHES[0] * metrics.CURVES_DPI))
  # Lines of both splits are there (train in the first colour, eval in the second).
  assert colour_share(image, TRAIN_COLOUR) > 1e-3 and colour_share(image, EVAL_COLOUR) > 1e-3


def test_fresh_sets_the_earlier_runs_event_files_and_curves_aside(tmp_path, tfds_data_dir):
  workdir = tmp_path / "run"
  train.run(lenet_config(), str(workdir))
  train.run(lenet_config(seed=1), str(workdir), fresh=True)
  (moved,) = glob.glob(str(workdir / "replaced-*"))
  assert len(glob.glob(os.path.join(moved, "events.out.tfevents.*"))) == 1
  assert os.path.exists(os.path.join(moved, "curves.png"))
  assert len(glob.glob(str(workdir / "events.out.tfevents.*"))) == 1


def test_profile_steps_write_a_trace_into_the_workdir(tmp_path, tfds_data_dir, caplog):
  workdir = tmp_path / "run"
  with caplog.at_level("INFO", logger="cnnjax"):
    train.run(lenet_config(profile_steps=(2, 2)), str(workdir))
  (trace_dir,) = glob.glob(str(workdir / "plugins" / "profile" / "*"))
  names = os.listdir(trace_dir)
  assert any(name.endswith(".xplane.pb") for name in names), names
  assert "perfetto_trace.json.gz" in names
  assert "profile of steps 3-4 written to" in caplog.text


@pytest.mark.parametrize("value", [(1,), (1, -2), (1.5, 2)])
def test_bad_profile_steps_are_refused(tmp_path, value):
  with pytest.raises(ConfigError, match="profile_steps="):
    train.run(lenet_config(profile_steps=value), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
