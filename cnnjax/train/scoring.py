"""Scoring one checkpoint, as `python -m cnnjax.evaluate` does: the run's own eval, with more reported.

`score` runs the computation of the loop's eval (`parallel.Engine.eval_sums` over
`Experiment.eval_feed` with the run's strategy, summed as `metrics.eval_result`
reads them), its eval step asked for `step.detail_sums` as well: the confusion
matrix and the top-5 hits. Loss and accuracy are therefore the numbers the run
itself reports for the same checkpoint and data. From the sums it reports
top-1 and top-5 accuracy, each class's accuracy (its recall) and the confusion
matrix; segmentation adds each class's IoU and their mean. With 5 classes or
fewer every class is among the top 5, so top-5 accuracy is reported as null.

`write_report` writes `eval/<dataset>-<split>-<step>.json`, the confusion matrix
as `.csv` and `.png`, into the run's directory, each atomically; nothing else
there is touched.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
import re
from typing import Any

import jax
import numpy as np

from cnnjax import metrics as metrics_lib
from cnnjax import parallel
from cnnjax.train.restore import RestoredRun
from cnnjax.errors import ConfigError
from cnnjax.train.rundir import EVAL_DIR, check_workdir
from cnnjax.train.step import TOP_K

# The confusion matrix's picture: inches per class, within bounds, and its resolution.
CONFUSION_INCHES_PER_CLASS, CONFUSION_MIN_INCHES, CONFUSION_MAX_INCHES, CONFUSION_DPI = 0.45, 4.0, 16.0, 100
# Classes above which the picture leaves out the class names and the counts (they would not be legible).
CONFUSION_MAX_LABELLED = 30


def eval_sums(restored: RestoredRun) -> dict[str, Any]:
  """The eval sums of the restored state over its experiment's eval split, with `detail_sums`."""
  exp = restored.exp
  detailed = dataclasses.replace(exp, eval_step=functools.partial(exp.eval_step, detail=True))
  engine = parallel.SingleEngine(detailed)
  eval_fn = engine.eval_step_fn(engine.put_data(exp.resident_data()[1]))
  return engine.eval_sums(engine.put_state([restored.state]), eval_fn, exp.eval_feed())[0]


def _ratios(numerators: np.ndarray, denominators: np.ndarray) -> list[float | None]:
  """Elementwise ratios, None where the denominator is 0 (undefined: a class never seen)."""
  return [float(n / d) if d > 0 else None for n, d in zip(numerators, denominators)]


def report(totals: dict[str, Any], restored: RestoredRun) -> dict[str, Any]:
  """The JSON report of summed eval outputs (`eval_sums`)."""
  exp, config = restored.exp, restored.exp.config
  result = metrics_lib.eval_result(totals)
  confusion = np.rint(np.asarray(totals["confusion"])).astype(np.int64)
  classes = confusion.shape[0]
  hits = np.diag(confusion)
  out = {
      "workdir": os.path.abspath(restored.workdir), "step": restored.step, "dataset": config.data.name,
      "split": split_name(config), "task": exp.dataset.task, "strategy": exp.strategy.name,
      "num_devices": exp.strategy.layout.num_devices, "examples": result["examples"],
      "positions": int(totals["count"]), "loss": result["loss"], "accuracy": result["accuracy"],
      f"top{TOP_K}_accuracy": float(totals["top_k_correct"] / max(totals["count"], 1.0)) if classes > TOP_K else None,
      "class_names": list(exp.dataset.class_names) or [str(index) for index in range(classes)],
      "per_class_accuracy": _ratios(hits, confusion.sum(1)),
      "confusion_matrix": confusion.tolist(),
  }
  if "class_union" in totals:
    out["mean_iou"] = result["mean_iou"]
    out["per_class_iou"] = _ratios(np.asarray(totals["class_intersection"]), np.asarray(totals["class_union"]))
  return out


def split_name(config: Any) -> str:
  """The eval split as the report names it: `data.eval_split`, or 'eval' for the dataset's own eval split."""
  return config.data.eval_split or "eval"


def report_stem(result: dict[str, Any]) -> str:
  """`<dataset>-<split>-<step>`, with characters other than letters, digits, '.', '_' and '-' as '_'
  (a split such as 'train[:10%]')."""
  return re.sub(r"[^A-Za-z0-9._-]", "_", f"{result['dataset']}-{result['split']}-{result['step']}")


def check_report_directory(workdir: str) -> None:
  """ConfigError unless the reports can be written into `workdir/eval/` (checked before anything is
  computed: a run on a read-only mount, or a file where the directory goes)."""
  directory = os.path.join(workdir, EVAL_DIR)
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise ConfigError(f"{directory} is a file, where python -m cnnjax.evaluate writes its reports; move it out of "
                      "the way")
  try:
    check_workdir(directory, flag="the report directory")
  except ConfigError as e:
    raise ConfigError(f"python -m cnnjax.evaluate writes its report into {directory}: {e}") from None


def write_report(result: dict[str, Any], workdir: str) -> str:
  """Writes the report's JSON, CSV and PNG into `workdir/eval/`; returns the JSON's path."""
  directory = os.path.join(workdir, EVAL_DIR)
  os.makedirs(directory, exist_ok=True)
  stem = os.path.join(directory, report_stem(result))
  metrics_lib.write_json(f"{stem}.json", result)
  tmp = f"{stem}.csv.tmp"
  with open(tmp, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["true \\ predicted"] + result["class_names"])
    for name, row in zip(result["class_names"], result["confusion_matrix"]):
      writer.writerow([name] + row)
  os.replace(tmp, f"{stem}.csv")
  draw_confusion(result, f"{stem}.png")
  return f"{stem}.json"


def draw_confusion(result: dict[str, Any], path: str) -> None:
  """The confusion matrix as a PNG: rows the true class, columns the predicted one, each row's share."""
  confusion = np.asarray(result["confusion_matrix"], np.float64)
  classes = len(confusion)
  inches = min(max(CONFUSION_INCHES_PER_CLASS * classes, CONFUSION_MIN_INCHES), CONFUSION_MAX_INCHES)
  figure, (axes,) = metrics_lib.figure_row(1, (inches, inches),
                                           f"{result['dataset']} {result['split']}, step {result['step']}: "
                                           f"accuracy {result['accuracy']:.4f}")
  shares = confusion / np.maximum(confusion.sum(1, keepdims=True), 1.0)
  axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
  axes.set_xlabel("predicted")
  axes.set_ylabel("true")
  if classes <= CONFUSION_MAX_LABELLED:
    axes.set_xticks(range(classes), result["class_names"], rotation=90)
    axes.set_yticks(range(classes), result["class_names"])
    for row in range(classes):
      for column in range(classes):
        if confusion[row, column]:
          axes.text(column, row, f"{int(confusion[row, column])}", ha="center", va="center", fontsize=7,
                    color="white" if shares[row, column] > 0.5 else "black")
  metrics_lib.save_figure(figure, path, CONFUSION_DPI)


def evaluate(restored: RestoredRun) -> tuple[dict[str, Any], str]:
  """Scores the restored checkpoint and writes its report (process 0); (report, JSON path)."""
  result = report(eval_sums(restored), restored)
  if jax.process_index() != 0:
    return result, ""
  return result, write_report(result, restored.workdir)
