"""BatchNorm study, experiment 5: batch statistics vs running averages over training, and precise BatchNorm.

Trains the study's model with running-average momentum 0.9 and 0.99 and keeps a
checkpoint every tenth of training. `scripts/bn_study.py` reloads each one and
measures how far the running averages are from the statistics of the current
network (recomputed over one pass of the training data at those weights:
"precise BatchNorm", Wu & Johnson 2021), and the eval accuracy with either.

Command:
  python -m cnnjax.sweep --config=experiments/bn_train_vs_eval.py --workdir=/tmp/cnnjax/bn_study/train_vs_eval \
    --mode=sequential
  (full scale: --config=experiments/bn_train_vs_eval.py:full)
As part of the study: python scripts/bn_study.py --workdir=DIR (section 5 of DIR/report.md).
Expected: running means that lag the population means more at momentum 0.99 than at 0.9,
and eval accuracy with running statistics below that with precise ones early in training at 0.99.
Result: docs/results/bn_study/summary.md, "Train vs eval" (scripts/bn_study.py; the report and plots beside it).
"""

import os

from cnnjax.sweep import grid, load_experiment_file, product

BASE_EXPERIMENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bn_base.py")
MOMENTA = (0.9, 0.99)
CHECKPOINTS_PER_RUN = 10  # evenly spaced over training; all kept


def get_config(scale: str = "small"):
  config = load_experiment_file(BASE_EXPERIMENT).get_config(scale)
  config.checkpoint_every_steps = config.num_train_steps // CHECKPOINTS_PER_RUN
  config.keep_checkpoints = CHECKPOINTS_PER_RUN
  return config


def sweep():
  return product(grid({"model.bn_momentum": MOMENTA}), grid({"seed": load_experiment_file(BASE_EXPERIMENT).SEEDS}))
