"""BatchNorm study, experiment 4: an ensemble trained at once by vmapping over its members' parameters.

Four members (seeds 0-3) train as one vectorized population
(`cnnjax.train.population`: `jax.vmap` over a member axis with no axis name, so
each member's BatchNorm normalizes over its own batch only). `scripts/bn_study.py`
also trains member seed=1 alone, and the same population with the axes
confused (BatchNorm reducing over the member axis too, so each member
normalizes with statistics pooled over every member's batch), and compares
each with the solo run.

Command (the population alone; `--mode=vectorized` trains the 4 seeds as one vmapped step):
  python -m cnnjax.sweep --config=experiments/bn_ensemble.py --workdir=/tmp/cnnjax/bn_study/ensemble --mode=vectorized
  and a member alone: python -m cnnjax.main --config=experiments/bn_ensemble.py --config.seed=1 --workdir=SOLO
  (full scale: --config=experiments/bn_ensemble.py:full)
As part of the study: python scripts/bn_study.py --workdir=DIR (section 4 of DIR/report.md).
Expected: the population member seed=1 ends bit-equal to its solo run, and away from it
when the population's and the devices' axes are confused; the averaged-probability ensemble at least
as accurate as its members.
Result: docs/results/bn_study/summary.md, "Ensembles" (scripts/bn_study.py; the report and plots beside it).
"""

import os

from cnnjax.sweep import grid, load_experiment_file

BASE_EXPERIMENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bn_base.py")
SEEDS = (0, 1, 2, 3)
SOLO_SEED = 1  # the member also trained alone and compared with its population twin


def get_config(scale: str = "small"):
  config = load_experiment_file(BASE_EXPERIMENT).get_config(scale)
  # A population member trains its whole batch on one device; its solo twin must too, or the batch's
  # sums are split over devices and rounded in another order (the population itself ignores this key).
  config.parallel.strategy = "none"
  return config


def sweep():
  return grid({"seed": SEEDS})
