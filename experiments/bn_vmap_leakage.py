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
Expected (measured, small scale): mean |d loss_i / d x_j| of 0.00912 (4.5% of
|d loss_i / d x_i|) in training mode and under vmap with the axis named;
exactly 0 in eval mode, for GroupNorm and under vmap without an axis name. The
mean of vmapped per-example gradients is the batched gradient to 7.5e-08 with
the axis named, and off by 0.287 (gradient entries up to 0.154) without.
The measurement reads the first seed's models (an invariant needs no seeds); the
other seeds give the models' eval accuracy a spread.
Cost: 6 runs of 200 steps and the measurement, 81 s in the study on 2 CPU cores
that other jobs shared.
"""

import os

from cnnjax.sweep import grid, load_experiment_file, product

BASE_EXPERIMENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bn_base.py")
NORMS = ("batch", "group")


def get_config(scale: str = "small"):
  return load_experiment_file(BASE_EXPERIMENT).get_config(scale)


def sweep():
  return product(grid({"model.norm": NORMS}), grid({"seed": load_experiment_file(BASE_EXPERIMENT).SEEDS}))
