"""Sweep declarations, trial names, printed commands and results tables: everything that needs no training."""

import csv
import json
import os

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from cnnjax.errors import CheckpointError, ConfigError
from cnnjax.sweep import (apply_overrides, choice, grid, load_trials, log_uniform, make_trials, product,
                          random_search, run_sweep, trial_name, uniform, write_results, zipped)
from cnnjax.sweep import declare, results, runner
from cnnjax.train.population import check_vectorizable
from helpers import EXPERIMENTS, experiment_config, load_experiment


def test_grid_zipped_and_product_compose():
  assert grid({"a": (1, 2), "b": ("x", "y")}) == [
      {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
  assert zipped({"a": (1, 2), "b": (3, 4)}) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
  schedules = zipped({"optimizer.learning_rate": (0.1, 0.01), "optimizer.warmup_steps": (0, 50)})
  combined = product(schedules, grid({"seed": (0, 1, 2)}))
  assert len(combined) == 6 and combined[1] == {"optimizer.learning_rate": 0.1, "optimizer.warmup_steps": 0,
                                                "seed": 1}
  with pytest.raises(ConfigError, match="equal length"):
    zipped({"a": (1, 2), "b": (3,)})
  with pytest.raises(ConfigError, match=r"both set \['seed'\]"):
    product(grid({"seed": (0,)}), grid({"seed": (1,)}))
  with pytest.raises(ConfigError, match="non-empty list"):
    grid({"a": 0.1})


def test_numpy_values_become_plain_config_values():
  trials = make_trials(grid({"optimizer.learning_rate": np.logspace(-3, -1, 3), "seed": np.arange(2)}))
  assert [t.name for t in trials[:2]] == ["learning_rate=0.001,seed=0", "learning_rate=0.001,seed=1"]
  assert all(type(t.overrides["seed"]) is int and type(t.overrides["optimizer.learning_rate"]) is float
             for t in trials)


def test_random_search_is_seeded_and_stays_in_range():
  space = {"optimizer.learning_rate": log_uniform(1e-4, 1e-1), "optimizer.weight_decay": uniform(0.0, 0.01),
           "model.norm": choice(("batch", "group")), "seed": (0, 1, 2)}
  first = random_search(space, num_trials=20, seed=7)
  assert first == random_search(space, num_trials=20, seed=7)
  assert first != random_search(space, num_trials=20, seed=8)
  assert all(1e-4 <= t["optimizer.learning_rate"] <= 1e-1 for t in first)
  assert all(0.0 <= t["optimizer.weight_decay"] <= 0.01 for t in first)
  assert {t["model.norm"] for t in first} == {"batch", "group"} and {t["seed"] for t in first} == {0, 1, 2}
  # Rounded to 3 significant digits, so names and tables show the exact value.
  assert all(float(f"{t['optimizer.learning_rate']:.3g}") == t["optimizer.learning_rate"] for t in first)


def test_trial_names_are_stable_safe_and_unambiguous():
  assert trial_name({"optimizer.learning_rate": 0.003, "seed": 1}) == "learning_rate=0.003,seed=1"
  assert trial_name({"seed": 1, "optimizer.learning_rate": 0.003}) == "learning_rate=0.003,seed=1"
  assert trial_name({"model.features": (16, 32), "data.flip": True}) == "flip=true,features=16x32"
  # Keys sharing a last component keep enough of their path to tell them apart.
  assert trial_name({"optimizer.b1": 0.9, "model.b1": 0.5}) == "model.b1=0.5,optimizer.b1=0.9"
  assert trial_name({"data.train_path": "/data/a b.npz"}) == "train_path=_data_a_b.npz"
  assert trial_name({}) == "default"
  long_a = trial_name({"data.train_path": "x" * 200 + "a"})
  long_b = trial_name({"data.train_path": "x" * 200 + "b"})
  assert len(long_a) == declare.MAX_NAME_CHARS and long_a != long_b


def test_make_trials_refuses_repeats_and_malformed_declarations():
  with pytest.raises(ConfigError, match="declares trial 'seed=0' twice"):
    make_trials([{"seed": 0}, {"seed": 0}])
  with pytest.raises(ConfigError, match="with different overrides"):
    make_trials([{"data.train_path": "a/b"}, {"data.train_path": "a_b"}])
  with pytest.raises(ConfigError, match="non-empty list"):
    make_trials({"seed": 0})
  with pytest.raises(ConfigError, match="every trial must be a dict"):
    make_trials([("seed", 0)])


def test_apply_overrides_copies_checks_keys_and_types():
  base = experiment_config("lr_sweep_digits")
  base.lock()
  trial = make_trials([{"optimizer.learning_rate": 0.01, "model.features": [8, 16]}])[0]
  config = apply_overrides(base, trial)
  assert config.optimizer.learning_rate == 0.01 and config.model.features == (8, 16) and config.is_locked
  assert base.optimizer.learning_rate == 2e-3  # the base is untouched
  with pytest.raises(ConfigError, match=r"trial 'lr=0.1' sets unknown config key 'optimizer.lr'; optimizer has"):
    apply_overrides(base, make_trials([{"optimizer.lr": 0.1}])[0])
  with pytest.raises(ConfigError, match=r"sets seed=1.5, which does not fit"):
    apply_overrides(base, make_trials([{"seed": 1.5}])[0])


def test_printed_overrides_parse_back_to_the_same_values(monkeypatch):
  overrides = {"optimizer.learning_rate": 0.0003, "seed": 2, "model.features": (8, 16), "data.flip": True,
               "model.norm": "group", "model.dropout_rate": 0.25}
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True)
  argv = ["prog", f"--config={os.path.join(EXPERIMENTS, 'lr_sweep_digits.py')}",
          *declare.command_line_overrides(overrides)]
  monkeypatch.setattr("sys.argv", argv)  # config_flags reads the overrides from sys.argv
  values(argv)
  for key, value in overrides.items():
    node = values.config
    for part in key.split("."):
      node = node[part]
    assert node == value and type(node) is type(value), key


SWEEP_EXPERIMENTS = sorted(name[:-3] for name in os.listdir(EXPERIMENTS)
                           if name.endswith(".py") and hasattr(load_experiment(name[:-3]), "sweep"))


@pytest.mark.parametrize("name", SWEEP_EXPERIMENTS)
def test_sweep_experiments_declare_valid_trials(name):
  trials = load_trials(os.path.join(EXPERIMENTS, f"{name}.py"))
  base = experiment_config(name)
  base.lock()
  configs = [apply_overrides(base, t) for t in trials]
  assert len({t.name for t in trials}) == len(trials) >= 2
  doc = load_experiment(name).__doc__
  assert f"python -m cnnjax.sweep --config=experiments/{name}.py" in doc and "Expected" in doc and "Result:" in doc
  if name == "lr_sweep_digits":
    check_vectorizable(configs)  # learning rate x seed: one population
  if name == "norm_sweep_digits":
    with pytest.raises(ConfigError, match="differ in model.norm"):
      check_vectorizable(configs)


def test_a_config_without_sweep_is_refused():
  with pytest.raises(ConfigError, match=r"defines no sweep\(\)"):
    load_trials(os.path.join(EXPERIMENTS, "lenet5_digits.py"))


def test_vectorizing_different_structures_is_refused_before_anything_is_written(tmp_path):
  base = experiment_config("norm_sweep_digits")
  base.lock()
  trials = load_trials(os.path.join(EXPERIMENTS, "norm_sweep_digits.py"))
  with pytest.raises(ConfigError, match="differ in model.norm"):
    run_sweep(base, trials, str(tmp_path / "sweep"), mode="vectorized")
  assert not (tmp_path / "sweep").exists()


def test_a_trial_directory_of_another_config_is_refused_before_anything_trains(tmp_path, tfds_data_dir):
  base = experiment_config("lr_sweep_digits")
  base.lock()
  trials = load_trials(os.path.join(EXPERIMENTS, "lr_sweep_digits.py"))[:2]
  earlier = apply_overrides(base, trials[1])
  with earlier.unlocked():
    earlier.num_epochs = 3.0  # the sweep was run before with another length
  (tmp_path / trials[1].name).mkdir()
  (tmp_path / trials[1].name / "config.json").write_text(earlier.to_json_best_effort())
  with pytest.raises(CheckpointError, match=rf"trial '{trials[1].name}': .* different config \(num_epochs: 3.0 -> 10.0\)"):
    run_sweep(base, trials, str(tmp_path), mode="sequential")
  assert sorted(os.listdir(tmp_path)) == [trials[1].name]  # nothing trained or written


class FakeDevice:
  def __init__(self, index):
    self.id = index


def test_device_groups_split_evenly_and_disjointly():
  devices = [FakeDevice(i) for i in range(8)]
  configs = [experiment_config("lr_sweep_digits") for _ in range(4)]  # parallel.strategy=jit
  groups = runner.device_groups(configs, devices, 0, num_trials=4)
  assert [[d.id for d in g] for g in groups] == [[0, 1], [2, 3], [4, 5], [6, 7]]
  assert len(runner.device_groups(configs, devices, 0, num_trials=20)) == 8
  assert [len(g) for g in runner.device_groups(configs, devices, 3, num_trials=4)] == [3, 3]
  single = [experiment_config("lenet5_digits", **{"parallel.strategy": "none"}) for _ in range(2)]
  assert len(runner.device_groups(single, devices, 0, num_trials=2)) == 8
  # auto: the devices split evenly over the trials, each trial's jit over its own group
  assert len(runner.device_groups([experiment_config("lenet5_digits")] * 2, devices, 0, num_trials=2)) == 2
  with pytest.raises(ConfigError, match="--devices_per_trial=9 but 8 devices"):
    runner.device_groups(configs, devices, 9, num_trials=4)
  assert runner.resolve_mode("auto", configs, 8) == "vectorized"
  assert runner.resolve_mode("auto", [experiment_config("norm_sweep_digits"),
                                      experiment_config("norm_sweep_digits", **{"model.norm": "group"})],
                             8) == "partitioned"


def write_trial(workdir, trial, summary=None, error=None, checkpoint_step=None):
  path = workdir / trial.name
  path.mkdir(parents=True)
  if summary is not None:
    (path / "summary.json").write_text(json.dumps(summary))
  if error is not None:
    (path / "error.json").write_text(json.dumps({"error": error}))
  if checkpoint_step is not None:
    (path / "checkpoints" / str(checkpoint_step)).mkdir(parents=True)


def test_results_tables_mark_the_best_and_summarize_seeds(tmp_path):
  trials = make_trials(grid({"optimizer.learning_rate": (0.001, 0.01, 0.1), "seed": (0, 1)}))
  accuracies = {0: 0.90, 1: 0.92, 2: 0.95, 3: 0.97}  # trial index -> eval accuracy; 4 diverged, 5 unfinished
  for index, trial in enumerate(trials):
    if index in accuracies:
      write_trial(tmp_path, trial, summary={"eval_accuracy": accuracies[index], "eval_loss": 1 - accuracies[index],
                                            "train_loss": 0.5, "step": 100, "wall_seconds": 3.0})
  write_trial(tmp_path, trials[4], error="loss became non-finite")
  write_trial(tmp_path, trials[5], checkpoint_step=50)
  written = write_results(str(tmp_path), trials)
  assert written["best"] == trials[3].name
  rows = list(csv.DictReader(open(tmp_path / "results.csv")))
  assert [r["trial"] for r in rows] == [t.name for t in trials]
  assert [r["status"] for r in rows] == ["finished"] * 4 + ["diverged", "incomplete"]
  assert [r["best"] for r in rows] == ["False", "False", "False", "True", "False", "False"]
  assert rows[2]["optimizer.learning_rate"] == "0.01" and rows[2]["eval_accuracy"] == "0.95"
  markdown = (tmp_path / "results.md").read_text()
  assert f"| **best** | {trials[3].name} |" in markdown
  assert "| 0.01 | 2 | 0.9600 | 0.0141 | 0.9500 | 0.9700 |" in markdown  # mean and spread over seeds
  assert "| 0.1 | 0 |" in markdown
  assert written["plots"] == ["plot_eval_accuracy_vs_optimizer.learning_rate.png"]
  assert (tmp_path / written["plots"][0]).stat().st_size > 0
  # Losses rank lowest first.
  assert write_results(str(tmp_path), trials, "eval_loss")["best"] == trials[3].name
  # Equal accuracies go to the lower eval loss, whatever the declaration order.
  tied = [results.Row(t, "finished", {"eval_accuracy": 0.9, "eval_loss": loss})
          for t, loss in zip(trials, (0.3, 0.1, 0.2))]
  assert results.best_row(tied, "eval_accuracy") is tied[1]
  with pytest.raises(ConfigError, match="--metric=accuracy is unknown"):
    results.check_metric("accuracy")


def test_plots_draw_one_series_per_value_of_the_other_keys_with_the_spread_over_seeds(tmp_path):
  trials = make_trials(grid({"model.bn_sync": ("global", "local"), "parallel.num_devices": (1, 8),
                             "seed": (0, 1, 2)}))
  # global is flat at 0.9 (+ seed noise); local falls to 0.5 on 8 devices. An average over bn_sync would hide it.
  for trial in trials:
    drop = 0.4 if trial.overrides["model.bn_sync"] == "local" and trial.overrides["parallel.num_devices"] == 8 else 0
    write_trial(tmp_path, trial, summary={"eval_accuracy": 0.9 - drop + 0.01 * trial.overrides["seed"],
                                          "eval_loss": 0.1, "train_loss": 0.1, "step": 10, "wall_seconds": 1.0})
  rows = results.read_rows(trials, str(tmp_path))
  keys = results.swept_keys(rows)
  by_devices = results.plot_series(rows, "parallel.num_devices", keys, "eval_accuracy")
  assert list(by_devices) == ["bn_sync=global", "bn_sync=local"]
  local = {p.x: p for p in by_devices["bn_sync=local"]}
  assert local[8].mean == pytest.approx(0.51) and local[1].mean == pytest.approx(0.91)
  assert local[8].values == pytest.approx((0.5, 0.51, 0.52))
  assert local[8].half_width == pytest.approx(4.3027 * 0.01 / np.sqrt(3), rel=1e-4)  # t interval over 3 seeds
  by_sync = results.plot_series(rows, "model.bn_sync", keys, "eval_accuracy")
  assert list(by_sync) == ["num_devices=1", "num_devices=8"]
  assert [p.x for p in by_sync["num_devices=8"]] == ["global", "local"]
  written = results.write_plots(str(tmp_path), rows, keys, "eval_accuracy")
  assert written == ["plot_eval_accuracy_vs_model.bn_sync.png", "plot_eval_accuracy_vs_parallel.num_devices.png"]
  single = results.plot_series(rows[:1], "model.bn_sync", ["model.bn_sync"], "eval_accuracy")
  assert list(single) == ["all trials"] and single["all trials"][0].half_width == 0.0
