"""Reading back finished runs: the final train state of a workdir, predictions, and segmentation scores.

`python -m cnnjax.main` writes checkpoints; the studies here reload the last
one with the run's own config to evaluate what the loop does not: accuracy on
shifted test images, or per-class intersection over union for segmentation
(the loop reports pixel accuracy, which the background class dominates).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnnjax import parallel
from cnnjax.train import Experiment, RunDir, TrainState, build


def restore_run(config: ml_collections.ConfigDict, workdir: str) -> tuple[Experiment, TrainState]:
  """The experiment of `config` and the newest good state saved in `workdir` (host arrays)."""
  exp = build(config)
  return exp, RunDir(workdir).restore_latest(config, jax.device_get(exp.init_state())).state


def predictor(exp: Experiment, state: TrainState) -> Any:
  """A jitted function from a batch of model inputs to logits, in eval mode."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  predict = jax.jit(lambda variables, inputs: exp.model.apply(variables, inputs, train=False))
  return lambda inputs: predict(variables, inputs)


def batch_predictor(exp: Experiment, state: TrainState) -> Any:
  """A jitted function from a host batch (`Experiment.eval_batches`) to logits, in eval mode: the device
  stage of preprocessing and the model in one program, as the eval step computes them."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  predict = jax.jit(lambda variables, batch: exp.model.apply(variables, exp.model_batch(batch, None)[0],
                                                             train=False))
  return lambda batch: predict(variables, parallel.device_part(batch))


def segmentation_scores(exp: Experiment, state: TrainState) -> dict[str, Any]:
  """Pixel accuracy, per-class IoU and their mean over the eval split (padded examples excluded)."""
  predict = batch_predictor(exp, state)
  classes = exp.dataset.num_classes
  confusion = np.zeros((classes, classes), np.int64)  # rows: truth, columns: prediction
  for batch in exp.eval_batches():
    predicted = np.asarray(jnp.argmax(predict(batch), -1))
    real = batch["mask"] > 0
    truth, guess = batch["label"][real].ravel(), predicted[real].ravel()
    confusion += np.bincount(truth * classes + guess, minlength=classes * classes).reshape(classes, classes)
  hits = np.diag(confusion).astype(np.float64)
  union = confusion.sum(0) + confusion.sum(1) - hits
  iou = np.where(union > 0, hits / np.maximum(union, 1), np.nan)
  return {"pixel_accuracy": float(hits.sum() / confusion.sum()), "per_class_iou": iou.tolist(),
          "mean_iou": float(np.nanmean(iou)), "pixels": int(confusion.sum())}
