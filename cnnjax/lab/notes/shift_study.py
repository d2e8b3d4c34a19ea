"""Shifted digits: train classifiers on centred digits, then test them on the same digits moved.

The data are scikit-learn's 8x8 digits (the embedded `digits` dataset: 1,437
train, 360 test), upsampled to 16x16 and placed in the middle of a 32x32 black
canvas, so that they can move up to 8 pixels in any direction without leaving
it. Models train on centred digits only, with no augmentation, through
`cnnjax.train.run` (an npz dataset); they are then evaluated on the test digits
shifted by k pixels left, right, up and down. Two numbers per shift:

* accuracy on the shifted test digits;
* stability: the fraction of test digits whose predicted class is the same as
  for the unshifted digit (translation invariance of the whole classifier).

Used by `scripts/equivariance.py` (pooling variants of a CNN) and
`scripts/mlp_vs_cnn.py` (an MLP against CNNs on the same data).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import ml_collections
import numpy as np

from cnnjax import metrics
from cnnjax.config import base_config
from cnnjax.data import open_dataset
from cnnjax.data.sources import read_records
from cnnjax.errors import ConfigError
from cnnjax.lab.notes.trained import predictor, restore_run
from cnnjax.train import count_params
from cnnjax.train import run as train_run
from cnnjax.train.rundir import RunDir

# Plots: one panel (width, height in inches) and the resolution of the PNG.
PANEL_INCHES = (5.5, 4.2)
PLOT_DPI = 120
CANVAS, UPSAMPLE = 32, 2
SHIFTS = (0, 1, 2, 4, 6, 8)
DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0))  # right, left, down, up
DEFAULT_STEPS = 600


@dataclasses.dataclass(frozen=True)
class Variant:
  """A model to train: a registry name and its options (`model.*` config keys)."""

  label: str
  model: str
  options: dict[str, Any] = dataclasses.field(default_factory=dict)


CNN_FEATURES = (32, 64)  # simple_cnn's two conv stages
MLP_HIDDEN = 128  # the notes' scenario: one hidden layer of 128 units
VARIANTS = {variant.label: variant for variant in (
    Variant(f"MLP ({MLP_HIDDEN} hidden)", "mlp", dict(hidden_sizes=(MLP_HIDDEN,))),
    Variant("no pooling + flatten", "simple_cnn", dict(features=CNN_FEATURES, pool="none", head="flatten")),
    Variant("max pooling + flatten", "simple_cnn", dict(features=CNN_FEATURES, pool="max", head="flatten")),
    Variant("max pooling + global average", "simple_cnn", dict(features=CNN_FEATURES, pool="max", head="global")),
    Variant("no pooling + global average", "simple_cnn", dict(features=CNN_FEATURES, pool="none", head="global")),
)}


def choose(labels: Sequence[str], requested: Sequence[str]) -> list[Variant]:
  """The variants of `labels` that `requested` names (all of them when it is empty)."""
  chosen = [VARIANTS[label] for label in labels if not requested or label in requested]
  if not chosen:
    raise ConfigError(f"--variants matched none of: {', '.join(labels)}")
  return chosen


def report(results: dict[str, dict[str, Any]]) -> str:
  """One line per variant: parameters, accuracy, and accuracy at each shift."""
  return "\n".join(f"{label}: {r['params']:,} params, accuracy {r['accuracy']:.4f}, shifted accuracy "
                   f"{[round(a, 3) for a in r['shifted_accuracy']]} at shifts {r['shifts']}"
                   for label, r in results.items())


def centred_digits(tfds_data_dir: str = "") -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The embedded digits, upsampled and centred on the canvas: split -> (images (N, 32, 32, 1) uint8, labels)."""
  dataset = open_dataset("digits", tfds_data_dir=tfds_data_dir)
  out = {}
  for split, source in (("train", dataset.train), ("test", dataset.eval)):
    records = read_records(source, range(len(source)))
    images = np.stack([record["image"] for record in records])
    big = np.repeat(np.repeat(images, UPSAMPLE, axis=1), UPSAMPLE, axis=2)
    margin = (CANVAS - big.shape[1]) // 2
    out[split] = (np.pad(big, ((0, 0), (margin, margin), (margin, margin), (0, 0))),
                  np.asarray([record["label"] for record in records], np.int64))
  return out


def translate(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """Moves images (N, H, W, C) by (dy, dx) pixels, filling with zeros (what enters is black)."""
  out = np.zeros_like(images)
  height, width = images.shape[1:3]
  src_y, dst_y = slice(max(0, -dy), height - max(0, dy)), slice(max(0, dy), height - max(0, -dy))
  src_x, dst_x = slice(max(0, -dx), width - max(0, dx)), slice(max(0, dx), width - max(0, -dx))
  out[:, dst_y, dst_x] = images[:, src_y, src_x]
  return out


def variant_config(variant: Variant, train_path: str, eval_path: str, steps: int, seed: int = 0
                   ) -> ml_collections.ConfigDict:
  """The training config of one variant: centred digits, no augmentation, AdamW."""
  config = base_config()
  config.seed = seed
  config.model.name = variant.model
  for key, value in variant.options.items():
    config.model[key] = value
  config.data.name = "npz"
  config.data.train_path, config.data.eval_path = train_path, eval_path
  config.batch_size = 64
  config.num_train_steps = steps
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 2e-3
  config.optimizer.weight_decay = 1e-4
  config.optimizer.warmup_steps = min(50, steps // 4)
  config.log_every_steps = max(1, min(50, steps))
  config.checkpoint_every_steps = steps
  config.progress_bar = False
  return config


def run_study(variants: Sequence[Variant], workdir: str, *, steps: int = DEFAULT_STEPS,
              shifts: Sequence[int] = SHIFTS, seed: int = 0, tfds_data_dir: str = "") -> dict[str, dict[str, Any]]:
  """Trains every variant (resuming finished ones) and measures it on shifted test digits.

  Returns label -> {params, accuracy, wall_seconds, reused, shifts, shifted_accuracy, stability};
  wall_seconds is the training's own, `reused` whether it finished before this call (another script's, say).
  """
  os.makedirs(workdir, exist_ok=True)
  data = centred_digits(tfds_data_dir)
  paths = {}
  for split, (images, labels) in data.items():
    paths[split] = os.path.join(workdir, f"digits32_{split}.npz")
    np.savez(paths[split], image=images, label=labels)
  test_images, test_labels = data["test"]
  results = {}
  for variant in variants:
    config = variant_config(variant, paths["train"], paths["test"], steps, seed)
    run_dir = os.path.join(workdir, variant.label)
    reused = RunDir(run_dir).finished_summary(steps) is not None  # train_run returns such a run's summary as is
    summary = train_run(config, run_dir)
    exp, state = restore_run(config, run_dir)
    classify = _classifier(exp, state)
    centred = classify(test_images)
    accuracy, stability = [], []
    for shift in shifts:
      moved = [classify(translate(test_images, dy * shift, dx * shift)) for dy, dx in DIRECTIONS]
      accuracy.append(float(np.mean([np.mean(p == test_labels) for p in moved])))
      stability.append(float(np.mean([np.mean(p == centred) for p in moved])))
    results[variant.label] = {"model": variant.model, "options": dict(variant.options),
                              "params": count_params(state.params), "accuracy": summary["eval_accuracy"],
                              "wall_seconds": summary["wall_seconds"], "reused": reused, "shifts": list(shifts),
                              "shifted_accuracy": accuracy, "stability": stability}
  return results


def _classifier(exp: Any, state: Any) -> Any:
  """uint8 images -> predicted classes, with the run's own eval preprocessing."""
  predict = predictor(exp, state)
  return lambda images: np.asarray(predict(exp.preprocess.eval(list(images)))).argmax(-1)


def plot_shift_curves(results: dict[str, dict[str, Any]], accuracy_axis: Any, stability_axis: Any) -> None:
  """Accuracy and stability against shift, one line per variant (legend on the stability axis)."""
  for label, result in results.items():
    name = f"{label} ({result['params']:,} params)"
    accuracy_axis.plot(result["shifts"], result["shifted_accuracy"], marker="o", label=name)
    stability_axis.plot(result["shifts"], result["stability"], marker="o", label=name)
  for axis, ylabel in ((accuracy_axis, "test accuracy"), (stability_axis, "same prediction as unshifted")):
    axis.set_xlabel("shift (pixels, 4 directions averaged)")
    axis.set_ylabel(ylabel)
    axis.set_ylim(0, 1.02)
    axis.grid(alpha=0.3)
  stability_axis.legend(fontsize=8)


def figure(columns: int, title: str) -> tuple[Any, list[Any]]:
  """A row of `columns` panels; the axes as a list."""
  return metrics.figure_row(columns, PANEL_INCHES, title)


def save(fig: Any, path: str) -> None:
  metrics.save_figure(fig, path, PLOT_DPI)
