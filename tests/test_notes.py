"""The studies of the notes' claims, at tiny scale: equivariance of conv stacks, shifted digits, the
filter bank on a real photo, and every script's command line end to end (deep image prior included)."""

import json

import numpy as np
import pytest

from cnnjax import train
from cnnjax.lab.notes import equivariance, filters, shift_study
from cnnjax.lab.notes.trained import restore_run, segmentation_scores
from helpers import experiment_config, run_cli, tiny

def test_convolution_is_equivariant_exactly_where_the_notes_say():
  rows = equivariance.measure(cases=(("circular", 1), ("same", 1), ("circular", 2)), shifts=(1, 2), size=16,
                              depth=2)
  error = {(r.padding, r.stride, r.shift): (r.error, r.interior_error) for r in rows}
  assert error["circular", 1, 1][0] < 1e-6 and error["circular", 1, 2][0] < 1e-6
  assert error["same", 1, 1][0] > 1e-2 and error["same", 1, 1][1] < 1e-6  # zero padding: only the border
  assert error["circular", 2, 2][0] < 1e-6  # stride 2: a 2-pixel shift is a 1-pixel output shift
  assert error["circular", 2, 1][0] > 0.3  # an odd shift has no output shift to match


def test_translate_moves_content_and_fills_with_black():
  images = np.arange(2 * 5 * 5).reshape(2, 5, 5, 1)
  moved = shift_study.translate(images, 1, -2)
  np.testing.assert_array_equal(moved[:, 1:, :3], images[:, :4, 2:])
  assert (moved[:, 0] == 0).all() and (moved[:, :, 3:] == 0).all()
  np.testing.assert_array_equal(shift_study.translate(images, 0, 0), images)


def test_centred_digits_leave_room_to_shift(tfds_data_dir):
  data = shift_study.centred_digits(tfds_data_dir)
  images, labels = data["train"]
  assert images.shape == (1437, 32, 32, 1) and labels.shape == (1437,) and len(data["test"][0]) == 360
  margin = (32 - 16) // 2
  assert images[:, :margin].max() == 0 and images[:, -margin:].max() == 0  # 8 black rows each side


def test_filter_bank_blurs_lower_and_sharpening_raises_sharpness():
  photo = filters.sample_photo()[:96, :128]
  filtered = filters.apply_bank(photo)
  report = filters.filter_report(photo, filtered)
  np.testing.assert_allclose(filtered["identity"], photo, atol=1e-6)
  assert report["identity"] == pytest.approx(1.0)
  assert report["gaussian_blur_5x5"] < report["gaussian_blur_3x3"] < 1 and report["box_blur"] < 1 < report["sharpen"]


@pytest.mark.parametrize("script,args", [
    ("filter_bank", []),
    ("deep_image_prior", ["--size=16", "--steps=20", "--log_every=10", "--features=4,8"]),
    ("mlp_vs_cnn", ["--steps=2", "--variants=MLP (128 hidden)"]),
    ("equivariance", ["--steps=2", "--variants=max pooling + global average"]),
    ("degradation", ["--steps=2", "--models=plain20"]),
])
@pytest.mark.slow
def test_scripts_run_end_to_end_at_tiny_scale(tmp_path, tfds_data_dir, script, args):
  # --json always: the default is the committed results file in docs/results/notes/.
  results = tmp_path / f"{script}.json"
  result = run_cli("", f"--workdir={tmp_path}", f"--json={results}", *args, wrapper=f"scripts/{script}.py",
                   timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / f"{script}.png").stat().st_size > 0
  payload = json.loads(results.read_text())
  assert {"command", "commit", "machine"} <= set(payload) and payload["wall_seconds"] > 0
  CHECK_PAYLOAD[script](payload)


def check_filter_bank(payload):
  sharpness = payload["relative_sharpness"]
  assert sharpness["identity"] == pytest.approx(1.0) and sharpness["box_blur"] < 1 < sharpness["sharpen"]
  assert len(payload["shape"]) == 3


def check_deep_image_prior(payload):
  assert payload["iterations"] == [10, 20] and 19 < payload["noisy_psnr"] < 23  # sigma 25/255, clipped
  assert payload["psnr_noisy"][-1] > payload["psnr_noisy"][0]  # the fit approaches its noisy target


def check_shift_models(results, labels):
  """Each requested model trained and was scored at every shift, with accuracies that are fractions."""
  assert list(results) == labels
  for label, result in results.items():
    assert result["params"] > 0 and 0 <= result["accuracy"] <= 1 and result["reused"] is False, label
    assert len(result["shifted_accuracy"]) == len(result["stability"]) == len(result["shifts"]) > 0, label
    assert all(0 <= value <= 1 for value in result["shifted_accuracy"] + result["stability"]), label


def check_mlp_vs_cnn(payload):
  # The notes' scenario: a 128-unit hidden layer on 32x32x3 against 32 3x3 filters.
  assert payload["scenario"] == {"mlp_hidden_layer": 32 * 32 * 3 * 128 + 128, "conv_layer": 3 * 3 * 3 * 32 + 32}
  check_shift_models(payload["models"], ["MLP (128 hidden)"])


def check_equivariance(payload):
  rows = payload["layers"]
  assert {(row["padding"], row["stride"]) for row in rows} == {("circular", 1), ("same", 1), ("circular", 2),
                                                               ("same", 2)}
  # Circular padding at stride 1 is exactly shift-equivariant; stride 2 breaks it for odd shifts.
  assert all(row["error"] < 1e-5 for row in rows if row["padding"] == "circular" and row["stride"] == 1)
  # Zero padding breaks it only where the padding reaches: the border.
  same = [row for row in rows if row["padding"] == "same" and row["stride"] == 1]
  assert all(row["interior_error"] < 1e-5 < row["error"] for row in same)
  assert any(row["error"] > 1e-2 for row in rows if row["stride"] == 2 and row["shift"] % 2)
  check_shift_models(payload["classifiers"], ["max pooling + global average"])


def check_degradation(payload):
  assert list(payload["models"]) == ["plain20"]
  result = payload["models"]["plain20"]
  assert result["params"] > 0 and len(result["steps"]) == len(result["train_loss"]) > 0
  assert 0 <= result["eval_accuracy"] <= 1 and result["final_train_loss"] > 0


CHECK_PAYLOAD = {"filter_bank": check_filter_bank, "deep_image_prior": check_deep_image_prior,
                 "mlp_vs_cnn": check_mlp_vs_cnn, "equivariance": check_equivariance,
                 "degradation": check_degradation}


@pytest.mark.slow
def test_segmentation_scores_agree_with_the_loop_and_the_script(tmp_path, tfds_data_dir):
  config = tiny(experiment_config("unet_shapes"), num_train_steps=2, **{"model.features": (4, 8),
                                                                       "batch_size": 8, "eval_batch_size": 100})
  summary = train.run(config, str(tmp_path))
  scores = segmentation_scores(*restore_run(config, str(tmp_path)))
  assert scores["pixels"] == 200 * 32 * 32
  assert scores["pixel_accuracy"] == pytest.approx(summary["eval_accuracy"], abs=1e-6)
  assert len(scores["per_class_iou"]) == 4 and scores["mean_iou"] == pytest.approx(summary["eval_mean_iou"], abs=1e-6)
  result = run_cli("", "--config=experiments/unet_shapes.py", f"--workdir={tmp_path}", "--config.model.features=(4, 8)",
                   "--config.num_train_steps=2", "--config.batch_size=8", "--config.eval_batch_size=100",
                   "--config.log_every_steps=2", "--config.checkpoint_every_steps=2", "--config.eval_every_steps=0",
                   "--config.progress_bar=false", "--config.data.num_threads=2",
                   wrapper="scripts/segmentation_scores.py", timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads(result.stdout)["mean_iou"] == pytest.approx(scores["mean_iou"])
