"""Plain against residual networks at increasing depth: the degradation problem of the ResNet notes.

He et al. (2015, Figure 1 and 6) found that a deeper plain network (56 layers)
has a higher training error than a shallower one (20 layers), which
overfitting cannot explain, and that the same networks with identity
shortcuts do not degrade. This study trains plain-20, plain-56, ResNet-20 and
ResNet-56 (the registry's `plain20`, `plain56`, `resnet20`, `resnet56`: the same
layers, with or without the shortcuts) with one recipe through
`cnnjax.train.run` and compares their training-loss curves.

Small scale, so that it runs on two CPU cores: the embedded 8x8 digits at their
own size (the three stages work at 8x8, 4x4 and 2x2) with small random
rotations, SGD with momentum 0.9, learning rate 0.1 (cosine) and weight decay
1e-4 as in the paper, batch 64.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import ml_collections
import numpy as np

from cnnjax.config import base_config
from cnnjax.train import run as train_run
from cnnjax.train.rundir import METRICS_FILE

MODELS = ("plain20", "plain56", "resnet20", "resnet56")
DEFAULT_STEPS = 500
LOG_EVERY = 10
ROTATION_DEGREES = 10.0


def depth_config(model: str, steps: int, seed: int = 0) -> ml_collections.ConfigDict:
  """One recipe for every depth, plain or residual."""
  config = base_config()
  config.seed = seed
  config.model.name = model
  config.data.name = "digits"
  config.data.rotation_degrees = ROTATION_DEGREES
  config.batch_size = 64
  config.num_train_steps = steps
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = min(20, steps // 4)
  config.log_every_steps = min(LOG_EVERY, steps)
  config.checkpoint_every_steps = steps
  config.progress_bar = False
  return config


def train_curve(workdir: str) -> tuple[list[int], list[float]]:
  """Steps and mean training loss of each logging window of a run (from its metrics.jsonl)."""
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    records = [r for r in (json.loads(line) for line in f if line.strip()) if r["split"] == "train"]
  return [r["step"] for r in records], [r["loss"] for r in records]


def run_study(workdir: str, *, models: Sequence[str] = MODELS, steps: int = DEFAULT_STEPS, seed: int = 0
              ) -> dict[str, dict[str, Any]]:
  """Trains each model (finished runs are reused) and returns its curve and final numbers."""
  results = {}
  for model in models:
    run_dir = os.path.join(workdir, model)
    summary = train_run(depth_config(model, steps, seed), run_dir)
    steps_logged, losses = train_curve(run_dir)
    tail = max(1, len(losses) // 10)  # the last tenth of training, to average out batch noise
    results[model] = {"params": summary["num_params"], "steps": steps_logged, "train_loss": losses,
                      "final_train_loss": float(np.mean(losses[-tail:])), "eval_accuracy": summary["eval_accuracy"],
                      "wall_seconds": summary["wall_seconds"]}
  return results


def plot_curves(results: dict[str, dict[str, Any]], axis: Any) -> None:
  """Training loss against step: plain dashed, residual solid, one colour per depth."""
  colours = {"20": "tab:blue", "56": "tab:red"}
  for model, result in results.items():
    depth = model[-2:]
    style = "--" if model.startswith("plain") else "-"
    axis.plot(result["steps"], result["train_loss"], style, color=colours.get(depth, "black"),
              label=f"{model} (final {result['final_train_loss']:.3f})")
  axis.set_yscale("log")
  axis.set_xlabel("step")
  axis.set_ylabel("training loss (log scale)")
  axis.grid(alpha=0.3)
  axis.legend()
