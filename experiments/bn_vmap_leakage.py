"""BatchNorm study, experiment 3: in training mode the loss of example i depends on example j; vmap and the batch.

Trains the study's model with BatchNorm and with GroupNorm; `scripts/bn_study.py`
then measures, on 16 test digits, the mean norm of d loss_i / d x_j over pairs
i != j (relative to d loss_i / d x_i) for BatchNorm in training mode, in eval
mode, GroupNorm, and BatchNorm under `jax.vmap` over the examples without and
with an axis name that BatchNorm reduces over; and whether the mean of
per-example gradients computed with `vmap` equals the gradient of the batch's
mean loss.

Command:
  python -m cnnjax.sweep --config=experiments/bn_vmap_leakage.py --workdir=/tmp/cnnjax/bn_study/vmap_leakage \
    --mode=sequential
  (full scale: --config=experiments/bn_vmap_leakage.py:full)
The measurement itself runs in the study: python scripts/bn_study.py --workdir=DIR (section 3 of DIR/report.md).
Expected: in training mode, and under vmap with the axis named, each example's loss depends
on the other examples' inputs; exactly 0 in eval mode, for GroupNorm and under vmap without an axis
name. The mean of vmapped per-example gradients is the batched gradient only with the axis named.
The measurement reads the first seed's models (an invariant needs no seeds); the other seeds give
the models' eval accuracy a spread.
Result: docs/results/bn_study/summary.md, "vmap leakage" (scripts/bn_study.py; the report and plots beside it).
"""

import os

from cnnjax.sweep import grid, load_experiment_file, product

BASE_EXPERIMENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bn_base.py")
NORMS = ("batch", "group")


def get_config(scale: str = "small"):
  return load_experiment_file(BASE_EXPERIMENT).get_config(scale)


def sweep():
  return product(grid({"model.norm": NORMS}), grid({"seed": load_experiment_file(BASE_EXPERIMENT).SEEDS}))
