"""Vectorized populations: a member equals the same run trained alone, BatchNorm included."""

import os

import jax
import numpy as np
import pytest

from cnnjax import train
from cnnjax.errors import ConfigError
from cnnjax.train.population import check_vectorizable, run_population
from helpers import experiment_config, final_state, read_jsonl, tiny

# (learning rate, seed, label smoothing) per member.
MEMBERS = [(0.05, 0, 0.0), (0.1, 0, 0.1), (0.05, 1, 0.0), (0.1, 1, 0.0)]


def member_config(learning_rate, seed, label_smoothing):
  """The notes' CNN (BatchNorm after pooling, dropout) on the digits."""
  config = tiny(experiment_config("simple_cnn_digits"), **{
      "batch_size": 16, "num_train_steps": 4, "optimizer.learning_rate": learning_rate, "seed": seed,
      "label_smoothing": label_smoothing, "checkpoint_every_steps": 4})
  return config




@pytest.mark.slow
def test_each_member_equals_its_solo_run(tmp_path, tfds_data_dir):
  configs = [member_config(*m) for m in MEMBERS]
  workdirs = [str(tmp_path / f"member{i}") for i in range(len(MEMBERS))]
  summaries = run_population(configs, workdirs)
  assert all(s is not None and s["strategy"] == "vectorized" for s in summaries)
  # Solo runs of two members that differ from the first in every vectorizable value.
  for i in (1, 2):
    config = configs[i]
    solo_dir = str(tmp_path / f"solo{i}")
    solo = train.run(member_config(*MEMBERS[i]), solo_dir)
    member_state, solo_state = final_state(workdirs[i], config), final_state(solo_dir, config)
    for a, b in zip(jax.tree.leaves((member_state.params, member_state.batch_stats)),
                    jax.tree.leaves((solo_state.params, solo_state.batch_stats))):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(summaries[i]["eval_loss"], solo["eval_loss"], rtol=1e-4)
    member_losses = [r["loss"] for r in read_jsonl(os.path.join(workdirs[i], "metrics.jsonl")) if r["split"] == "train"]
    solo_losses = [r["loss"] for r in read_jsonl(os.path.join(solo_dir, "metrics.jsonl")) if r["split"] == "train"]
    np.testing.assert_allclose(member_losses, solo_losses, rtol=1e-4)
  # Members really differ from one another.
  assert len({s["param_checksum"] for s in summaries}) == len(MEMBERS)
  # A second call finds every member finished and trains nothing.
  assert run_population(configs, workdirs) == summaries


def test_structural_differences_are_refused():
  configs = [member_config(0.1, 0, 0.0), member_config(0.1, 0, 0.0)]
  configs[1].model.features = (16, 32)
  with pytest.raises(ConfigError, match=r"differ in model.features"):
    check_vectorizable(configs)
  configs = [member_config(0.1, 0, 0.0), member_config(0.1, 0, 0.0)]
  configs[1].batch_size = 32
  with pytest.raises(ConfigError, match=r"differ in batch_size"):
    check_vectorizable(configs)


def test_diverging_members_are_recorded_and_the_others_finish(tmp_path, tfds_data_dir):
  configs = [member_config(0.05, 0, 0.0), member_config(1e30, 0, 0.0)]
  for config in configs:
    config.optimizer.name = "sgd"
    config.optimizer.momentum = 0.0
  workdirs = [str(tmp_path / "ok"), str(tmp_path / "diverged")]
  summaries = run_population(configs, workdirs)
  assert summaries[0] is not None and summaries[1] is None
  assert os.path.exists(os.path.join(workdirs[1], "error.json"))
  assert not os.path.exists(os.path.join(workdirs[1], "summary.json"))
