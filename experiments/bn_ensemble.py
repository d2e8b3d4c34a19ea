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
Expected (measured, small scale): the population member seed=1 ends equal to its
solo run (max abs difference 0; entries up to 4.62); with the axes confused it
ends 2.96 away. Member eval accuracies 98.89 / 98.33 / 98.89 / 98.61% (98.61 / 98.33 /
98.33 / 98.33% when confused); the averaged-probability ensemble 99.17% (99.17%).
Cost: the population of 4, the solo run and the confused population, 36 s in the
study on 2 CPU cores that other jobs shared, with 8 simulated devices.
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
