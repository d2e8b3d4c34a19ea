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
Expected (measured, small scale, 3 seeds, mean ± 95% interval): running means
off the population means by 0.041 (momentum 0.9) and 0.57 (0.99) population stds
on average over training; final eval accuracy 98.70% ± 0.80 with either
statistics at 0.9, and 98.33% ± 1.38 (running) against 98.70% ± 0.80 (precise)
at 0.99, within the seed spread; at step 20 of momentum 0.99, 64.54% ± 12.54
against 96.30% ± 2.22, beyond it.
Cost: 6 runs of 200 steps and 60 reloaded checkpoints, 118 s in the study on 2
CPU cores that other jobs shared.
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
