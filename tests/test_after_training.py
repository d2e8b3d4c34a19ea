"""After training: `python -m cnnjax.evaluate`, keeping the best checkpoint, `python -m cnnjax.predict`.

One tiny LeNet-5 run on the digits, trained once for the module, is scored,
read back and predicted on; the commands run as users run them (subprocesses)
and must leave the run's own files as they were.
"""

import hashlib
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from cnnjax import config as config_lib
from cnnjax import train
from cnnjax.checkpoint import Checkpointer
from helpers import experiment_config, read_jsonl, run_cli, tiny

STEPS = 6


def best_run_config(**overrides):
  """LeNet-5 on the digits for 6 steps at a learning rate so high that the eval at step 2 is the best (by
  about 9 points of accuracy, and by half the loss)."""
  return tiny(experiment_config("lenet5_digits"), **{
      "batch_size": 32, "num_train_steps": STEPS, "eval_every_steps": 2, "checkpoint_every_steps": 2,
      "keep_checkpoints": 1, "keep_best_metric": "eval_accuracy", "optimizer.learning_rate": 0.15,
      "optimizer.schedule": "constant", "optimizer.warmup_steps": 0, **overrides})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tfds_data_dir):
  """A finished 6-step run that evaluates and checkpoints every 2 steps, keeping the newest checkpoint and
  the one of best eval accuracy (step 2)."""
  workdir = str(tmp_path_factory.mktemp("after_training") / "run")
  train.run(best_run_config(), workdir)
  return workdir


def run_files(workdir) -> dict[str, str]:
  """{path: sha256} of every file of a run outside `eval/`."""
  digests = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      if os.path.relpath(path, workdir).split(os.sep)[0] != "eval":
        digests[os.path.relpath(path, workdir)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return digests


def eval_records(workdir) -> dict[int, dict]:
  return {r["step"]: r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "eval"}


# -- evaluate ------------------------------------------------------------------------------------------

def test_evaluate_gives_the_runs_own_final_eval_and_touches_nothing_else(run_dir):
  before = run_files(run_dir)
  result = run_cli("cnnjax.evaluate", f"--workdir={run_dir}")
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.load(open(os.path.join(run_dir, "eval", f"digits-eval-{STEPS}.json")))
  summary = json.load(open(os.path.join(run_dir, "summary.json")))
  # The same computation as the run's final eval: equal numbers, not merely close ones.
  assert report["loss"] == summary["eval_loss"] and report["accuracy"] == summary["eval_accuracy"]
  assert report["step"] == STEPS and report["examples"] == summary["eval_examples"] == 360
  assert report["strategy"] == summary["strategy"] and report["num_devices"] == summary["num_devices"]
  confusion = np.asarray(report["confusion_matrix"])
  assert confusion.shape == (10, 10) and confusion.sum() == 360
  assert np.trace(confusion) / 360 == pytest.approx(report["accuracy"], abs=1e-12)
  per_class = np.asarray(report["per_class_accuracy"], np.float64)
  np.testing.assert_allclose(per_class, np.diag(confusion) / confusion.sum(1))
  assert report["accuracy"] <= report["top5_accuracy"] <= 1.0
  assert report["class_names"] == [str(digit) for digit in range(10)]
  rows = open(os.path.join(run_dir, "eval", f"digits-eval-{STEPS}.csv")).read().splitlines()
  assert rows[0].split(",")[1:] == report["class_names"] and len(rows) == 11
  assert [int(x) for x in rows[1].split(",")[1:]] == confusion[0].tolist()
  assert open(os.path.join(run_dir, "eval", f"digits-eval-{STEPS}.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  assert f"accuracy={report['accuracy']:.4f}" in result.stdout
  assert run_files(run_dir) == before


def test_evaluate_scores_an_earlier_checkpoint_on_the_train_split(run_dir):
  best = min(step for step in train.RunDir(run_dir).checkpoint_steps())
  result = run_cli("cnnjax.evaluate", f"--workdir={run_dir}", f"--step={best}", "--config.data.eval_split=train",
                   "--json")
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(result.stdout)
  assert report["split"] == "train" and report["step"] == best and report["examples"] == 1437
  assert os.path.exists(os.path.join(run_dir, "eval", f"digits-train-{best}.json"))


def test_segmentation_reports_per_class_iou(tmp_path):
  """The detailed sums of a segmentation eval step: the confusion matrix over pixels gives the per-class
  IoU that the step's own intersections and unions give."""
  from cnnjax.train import scoring  # pylint: disable=import-outside-toplevel
  from cnnjax.train.restore import RestoredRun  # pylint: disable=import-outside-toplevel
  config = tiny(experiment_config("unet_shapes"), batch_size=8, eval_batch_size=8, **{"parallel.strategy": "none"})
  exp = train.build(config)
  restored = RestoredRun(str(tmp_path), exp, jax.device_get(exp.init_state()), 0)
  report = scoring.report(scoring.eval_sums(restored), restored)
  confusion = np.asarray(report["confusion_matrix"], np.float64)
  hits = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) - hits
  iou = [h / u if u else None for h, u in zip(hits, union)]
  assert report["task"] == "segmentation" and report["class_names"][0] == "background"
  assert report["top5_accuracy"] is None  # 4 classes: every class is among the top 5
  assert report["per_class_iou"] == pytest.approx(iou)
  assert report["mean_iou"] == pytest.approx(np.mean([x for x in iou if x is not None]))
  assert report["accuracy"] == pytest.approx(hits.sum() / confusion.sum())


def test_evaluate_refuses_bad_input_in_one_line_and_changes_nothing(run_dir, tmp_path):
  before = run_files(run_dir)
  damaged = str(tmp_path / "damaged")
  shutil.copytree(run_dir, damaged, ignore=shutil.ignore_patterns("eval"))
  newest = max(train.RunDir(damaged).checkpoint_steps())
  state_dir = os.path.join(damaged, "checkpoints", str(newest), "state")
  data_files = sorted(os.path.join(root, name) for root, _, names in os.walk(state_dir) for name in names
                      if os.sep + "d" + os.sep in os.path.join(root, name))
  with open(data_files[0], "r+b") as f:
    f.seek(8)
    f.write(b"garbage!")
  damaged_before = run_files(damaged)
  no_best = str(tmp_path / "no_best")
  shutil.copytree(run_dir, no_best)
  saved = json.load(open(os.path.join(no_best, "config.json")))
  saved["keep_best_metric"] = ""  # resume-safe: the checkpoints are still this run's
  json.dump(saved, open(os.path.join(no_best, "config.json"), "w"))
  blocked = str(tmp_path / "blocked")
  shutil.copytree(run_dir, blocked, ignore=shutil.ignore_patterns("eval"))
  open(os.path.join(blocked, "eval"), "w").close()
  from cnnjax.errors import CnnjaxError  # pylint: disable=import-outside-toplevel
  from cnnjax.train import restore, scoring  # pylint: disable=import-outside-toplevel
  run_config = restore.load_config(run_dir)
  shapes = restore.load_config(run_dir)
  shapes.data.name = "shapes"
  library_cases = [
      (lambda: restore.load_config(str(tmp_path / "absent")), "is not a directory"),
      (lambda: restore.load_config(str(tmp_path)), "holds no run: its config.json is missing"),
      (lambda: scoring.check_report_directory(blocked), "eval is a file, where python -m cnnjax.evaluate writes"),
      (lambda: restore.restore(no_best, run_config, run_config=restore.load_config(no_best), checkpoint=restore.BEST),
       "keeps no best checkpoint"),
      (lambda: restore.restore(run_dir, shapes, run_config=run_config),
       r"data.name=shapes \(4 classes, inputs \(32, 32, 3\)\) does not fit the model of the run .*params.c1.kernel"),
  ]
  for call, message in library_cases:
    with pytest.raises(CnnjaxError, match=message):
      call()
  # As users meet them: one line, exit status 2 (a damaged checkpoint ends the process at once).
  cli_cases = [
      ([f"--workdir={run_dir}", "--step=5"], "has no checkpoint at step 5; it keeps steps 2, 6"),
      ([f"--workdir={damaged}"], f"checkpoint {newest} in .* is damaged or unreadable"),
      ([f"--workdir={run_dir}", "--config.data.nokey=1"], "unknown config key 'data.nokey'"),
  ]
  for args, message in cli_cases:
    result = run_cli("cnnjax.evaluate", *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
    assert re.search(message, lines[0]), (args, lines[0])
  assert run_files(run_dir) == before and run_files(damaged) == damaged_before
  assert not os.path.exists(os.path.join(damaged, "eval"))


@pytest.mark.parametrize("module", ["cnnjax.evaluate", "cnnjax.predict"])
def test_help_is_no_error(module):
  result = run_cli(module, "--help")
  assert result.returncode == 0 and "--workdir" in result.stdout + result.stderr, result.stderr[-2000:]


# -- keeping the best checkpoint -----------------------------------------------------------------------

def test_the_best_checkpoint_is_kept_beside_the_newest_and_evaluate_finds_it(run_dir):
  records = eval_records(run_dir)
  steps = train.RunDir(run_dir).checkpoint_steps()
  best = max(sorted(records), key=lambda step: records[step]["accuracy"])  # the first of equals
  assert best < STEPS and steps == [best, STEPS]
  result = run_cli("cnnjax.evaluate", f"--workdir={run_dir}", "--checkpoint=best", "--json")
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(result.stdout)
  assert report["step"] == best and report["accuracy"] == records[best]["accuracy"]
  assert report["loss"] == records[report["step"]]["loss"]


@pytest.mark.parametrize("mode,scores,kept", [("max", [0.5, 0.9, 0.3, 0.4, 0.2], [2, 4, 5]),
                                              ("min", [0.5, 0.9, 0.3, 0.4, 0.6], [3, 4, 5])])
def test_keep_policy_keeps_the_newest_and_the_best(tmp_path, mode, scores, kept):
  """Checkpoints 1..5 scored `scores`, and step 6 saved without an eval: the 2 newest and the best stay,
  the newest restores first, and the best reads back."""
  state = {"w": np.arange(3, dtype=np.float32)}
  checkpointer = Checkpointer(str(tmp_path), max_to_keep=2, fingerprint="f", best_metric="eval_loss", best_mode=mode)
  for step, score in enumerate(scores, start=1):
    checkpointer.save(step, {"w": state["w"] + step}, {"next_index": step}, metrics={"eval_loss": score})
  assert checkpointer.all_steps() == kept
  checkpointer.save(6, {"w": state["w"] + 6}, {"next_index": 6})
  best = kept[0]
  assert checkpointer.all_steps() == [best, 5, 6] and checkpointer.best_step() == best
  assert checkpointer.restore_latest(state).step == 6
  np.testing.assert_array_equal(checkpointer.restore(best, state).state["w"], state["w"] + best)
  checkpointer.close()
  reader = Checkpointer(str(tmp_path), max_to_keep=2, fingerprint="f", best_metric="eval_loss", best_mode=mode,
                        read_only=True)
  assert reader.best_step() == best and reader.all_steps() == [best, 5, 6]
  reader.close()


def test_keep_best_metric_is_validated_and_may_change_on_resume():
  config = best_run_config()
  saved = config_lib.as_json(config)
  changed = best_run_config(keep_best_metric="eval_loss")
  assert config_lib.resume_differences(saved, changed) == []
  assert config_lib.fingerprint(changed) == config_lib.fingerprint(best_run_config(keep_best_metric=""))
  with pytest.raises(config_lib.ConfigError, match="keep_best_metric='accuracy' is unknown"):
    config_lib.validate(best_run_config(keep_best_metric="accuracy"))
  with pytest.raises(config_lib.ConfigError, match="multiple of it"):
    config_lib.validate(best_run_config(eval_every_steps=3))


def test_resume_starts_from_the_newest_and_may_change_keep_best_metric(tmp_path, run_dir):
  """Resume restores the newest checkpoint, not the best. The run killed after its step-2 checkpoint (the
  best) and resumed with keep_best_metric=eval_loss ends bit-identical to the uninterrupted run, keeping
  the best by its loss beside the newest."""
  assert train.RunDir(run_dir).checkpoint_steps() == [2, STEPS]
  member = train.Member(train.build(best_run_config()), run_dir)
  assert member.restore() == STEPS
  member.close()
  partial = str(tmp_path / "partial")
  shutil.copytree(run_dir, partial)
  shutil.rmtree(os.path.join(partial, "checkpoints", str(STEPS)))
  os.remove(os.path.join(partial, "summary.json"))
  resumed = train.run(best_run_config(keep_best_metric="eval_loss"), partial)
  assert resumed["param_checksum"] == json.load(open(os.path.join(run_dir, "summary.json")))["param_checksum"]
  records = eval_records(partial)
  assert train.RunDir(partial).checkpoint_steps() == sorted({min(records, key=lambda s: records[s]["loss"]), STEPS})


# -- predict -------------------------------------------------------------------------------------------

PREDICTED = 24  # eval digits written as image files


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, tfds_data_dir):
  """The first eval digits as 8-bit grayscale PNGs, the first also as 16-bit and as RGBA (converted as the
  training images were, they are the same image), and a file that is not an image."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from cnnjax.data import open_dataset  # pylint: disable=import-outside-toplevel
  directory = tmp_path_factory.mktemp("images")
  evaluation = open_dataset("digits").eval
  for index in range(PREDICTED):
    Image.fromarray(np.asarray(evaluation[index]["image"])[..., 0]).save(directory / f"digit{index:02d}.png")
  first = np.asarray(evaluation[0]["image"])[..., 0]
  Image.fromarray(first.astype(np.uint16) * 257).save(directory / "other_16bit.png")
  Image.fromarray(np.stack([first] * 3 + [np.full_like(first, 255)], -1), "RGBA").save(directory / "other_rgba.png")
  (directory / "other_text.png").write_text("not an image")
  return directory


@pytest.fixture(scope="module")
def eval_probabilities(run_dir):
  """The model's class probabilities for the first eval examples (those written as images), from logits
  computed as the eval step computes them."""
  from cnnjax.lab.notes.trained import batch_predictor  # pylint: disable=import-outside-toplevel
  from helpers import final_state  # pylint: disable=import-outside-toplevel
  config = best_run_config()
  exp = train.build(config)
  batch = next(iter(exp.eval_batches()))
  logits = np.asarray(batch_predictor(exp, final_state(run_dir, config))(batch), np.float64)[:PREDICTED]
  probabilities = np.exp(logits - logits.max(-1, keepdims=True))
  return probabilities / probabilities.sum(-1, keepdims=True)


def test_predict_gives_the_models_eval_predictions_and_names_what_it_cannot_read(run_dir, image_dir,
                                                                                 eval_probabilities):
  before = run_files(run_dir)
  result = run_cli("cnnjax.predict", f"--workdir={run_dir}", str(image_dir), "--json", "--top_k=3")
  assert result.returncode == 2  # one file was not an image
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: {image_dir / 'other_text.png'}: it is not an image"), lines
  output = json.loads(result.stdout)
  assert output["step"] == STEPS and output["failed"][0]["path"] == str(image_dir / "other_text.png")
  by_file = {os.path.basename(p["path"]): p["top"] for p in output["predictions"]}
  assert len(by_file) == PREDICTED + 2
  probabilities = eval_probabilities
  for index in range(PREDICTED):
    top = by_file[f"digit{index:02d}.png"]
    assert [t["class"] for t in top] == list(np.argsort(-probabilities[index], kind="stable")[:3])
    assert top[0]["name"] == str(top[0]["class"])
    np.testing.assert_allclose([t["probability"] for t in top], np.sort(probabilities[index])[::-1][:3], atol=1e-5)
  for converted in ("other_16bit.png", "other_rgba.png"):
    assert [t["class"] for t in by_file[converted]] == [t["class"] for t in by_file["digit00.png"]]
    assert [t["probability"] for t in by_file[converted]] == pytest.approx([t["probability"] for t in
                                                                            by_file["digit00.png"]], abs=1e-6)
  assert run_files(run_dir) == before


def test_predict_without_recorded_names_prints_indices_and_says_so_once(run_dir, image_dir, tmp_path):
  unnamed = str(tmp_path / "unnamed")
  shutil.copytree(run_dir, unnamed, ignore=shutil.ignore_patterns("eval"))
  record = json.load(open(os.path.join(unnamed, "dataset.json")))
  record["class_names"] = None
  json.dump(record, open(os.path.join(unnamed, "dataset.json"), "w"))
  result = run_cli("cnnjax.predict", f"--workdir={unnamed}", str(image_dir / "digit00.png"),
                   str(image_dir / "digit01.png"), "--top_k=2")
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stderr.count("recorded no class names") == 1
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 2 and lines[0].startswith(f"{image_dir / 'digit00.png'}: ")
  assert all(part.split()[0].isdigit() for part in lines[0].split(": ", 1)[1].split(", "))


def test_predict_reads_a_run_without_dataset_json_from_its_dataset(run_dir, image_dir, tmp_path,
                                                                    eval_probabilities):
  older = str(tmp_path / "older")
  shutil.copytree(run_dir, older, ignore=shutil.ignore_patterns("eval"))
  os.remove(os.path.join(older, "dataset.json"))
  result = run_cli("cnnjax.predict", f"--workdir={older}", str(image_dir / "digit01.png"), "--json", "--top_k=2")
  assert result.returncode == 0, result.stderr[-2000:]
  top = json.loads(result.stdout)["predictions"][0]["top"]
  assert [t["class"] for t in top] == list(np.argsort(-eval_probabilities[1], kind="stable")[:2])
  assert [t["name"] for t in top] == [str(t["class"]) for t in top]  # the names the dataset gives
  np.testing.assert_allclose([t["probability"] for t in top], np.sort(eval_probabilities[1])[::-1][:2], atol=1e-5)


def test_predict_refuses_runs_that_do_not_classify_images():
  from cnnjax.data import Dataset  # pylint: disable=import-outside-toplevel
  from cnnjax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from cnnjax.train import prediction, restore  # pylint: disable=import-outside-toplevel
  for task, shape in (("segmentation", (32, 32, 3)), ("text", (256,))):
    run = restore.InferenceRun("DIR", None, Dataset("x", None, None, 2, shape, (), (), task=task), None, shape, None,
                               None, 0)
    with pytest.raises(ConfigError, match=f"is a {task} model; python -m cnnjax.predict classifies images"):
      prediction.check_classifier(run)


def test_predict_refuses_bad_input_in_one_line(run_dir, image_dir, tmp_path):
  cases = [([f"--workdir={run_dir}"], "give the image files or folders"),
           ([f"--workdir={run_dir}", str(image_dir), "--top_k=0"], "--top_k=0 must be at least 1"),
           ([f"--workdir={run_dir}", str(tmp_path / "absent.png")], "is neither a file nor a folder"),
           ([f"--workdir={run_dir}", str(tmp_path)], "no image files"),
           ([f"--workdir={tmp_path}", str(image_dir)], "holds no run")]
  for args, message in cases:
    result = run_cli("cnnjax.predict", *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], (args, result.stderr)
