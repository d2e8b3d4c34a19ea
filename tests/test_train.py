"""Training: the loop's outputs, resume from checkpoints, finished runs, non-finite stops, checkpoints."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from cnnjax import train
from cnnjax.checkpoint import Checkpointer
from cnnjax.config import fingerprint as config_fingerprint
from cnnjax.errors import NonFiniteError
from helpers import checkpoint_steps, experiment_config, final_state, read_jsonl, tiny

SUMMARY_KEYS = {"eval_accuracy", "eval_loss", "train_loss", "step", "examples_per_second", "compile_seconds",
                "wall_seconds", "param_checksum", "param_l2"}


def lenet_config(**overrides):
  return tiny(experiment_config("lenet5_digits"), **{"batch_size": 32, **overrides})


def test_run_writes_every_output(tmp_path, tfds_data_dir):
  summary = train.run(lenet_config(num_train_steps=6, eval_every_steps=3), str(tmp_path))
  assert SUMMARY_KEYS <= set(summary) and summary["step"] == 6 and summary["eval_examples"] == 360
  assert json.load(open(tmp_path / "summary.json")) == json.loads(json.dumps(summary))
  assert json.load(open(tmp_path / "config.json"))["model"]["name"] == "lenet5"
  records = read_jsonl(tmp_path / "metrics.jsonl")
  train_records = [r for r in records if r["split"] == "train"]
  eval_records = [r for r in records if r["split"] == "eval"]
  assert [r["step"] for r in train_records] == [2, 4, 6] and [r["step"] for r in eval_records] == [3, 6]
  assert {"loss", "accuracy", "learning_rate", "examples_per_second"} <= set(train_records[0])
  assert checkpoint_steps(tmp_path) == [2, 4, 6]


def test_resume_continues_exactly_and_finished_runs_are_not_retrained(tmp_path, tfds_data_dir):
  uninterrupted = train.run(lenet_config(num_train_steps=6), str(tmp_path / "a"))
  # A run that died after its step-4 checkpoint: its final checkpoint and summary never written.
  partial = str(tmp_path / "b")
  train.run(lenet_config(num_train_steps=6, checkpoint_every_steps=4), partial)
  assert checkpoint_steps(partial) == [4, 6]
  shutil.rmtree(os.path.join(partial, "checkpoints", "6"))
  os.remove(os.path.join(partial, "summary.json"))
  resumed = train.run(lenet_config(num_train_steps=6, checkpoint_every_steps=4), partial)
  assert resumed["param_checksum"] == uninterrupted["param_checksum"]
  steps = [r["step"] for r in read_jsonl(os.path.join(partial, "metrics.jsonl")) if r["split"] == "train"]
  assert steps == [2, 4, 6]  # records past the checkpoint were replaced, not duplicated
  # A finished run returns its summary without training again.
  before = open(os.path.join(partial, "metrics.jsonl")).read()
  again = train.run(lenet_config(num_train_steps=6, checkpoint_every_steps=4), partial)
  assert again == resumed and open(os.path.join(partial, "metrics.jsonl")).read() == before


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tfds_data_dir):
  config = lenet_config(num_train_steps=40, checkpoint_every_steps=2, log_every_steps=2)
  config.optimizer.name = "sgd"
  config.optimizer.momentum = 0.0
  config.optimizer.warmup_steps = 0
  config.optimizer.schedule = "constant"
  config.optimizer.learning_rate = 1e30
  with pytest.raises(NonFiniteError, match=r"non-finite at step \d+") as info:
    train.run(config, str(tmp_path))
  bad_step = int(str(info.value).split("at step ")[1].split()[0])
  steps = checkpoint_steps(tmp_path)
  assert all(step < bad_step for step in steps)
  if steps:
    host_state = final_state(tmp_path, config, steps[-1])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(host_state.params))


def test_checkpoint_round_trip(tmp_path, tfds_data_dir):
  exp = train.build(lenet_config())
  state = jax.device_get(exp.init_state())
  ckpt = Checkpointer(str(tmp_path), max_to_keep=2, fingerprint=config_fingerprint(exp.config))
  ckpt.save(3, state, {"next_index": 3}, {"log_window": [{"loss": 0.5}]})
  restored = ckpt.restore(3, state)
  assert restored.data == {"next_index": 3} and restored.loop == {"log_window": [{"loss": 0.5}]}
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored.state)):
    np.testing.assert_array_equal(a, b)
