"""BatchNorm study, experiment 6: ghost batch size at a fixed large global batch.

Hoffer et al. 2017 (Train longer, generalize better) normalize a large batch in
small "ghost" batches. Here the global batch is 512 (four times the study's
128, learning rate scaled linearly to 0.4, the same number of epochs) and
BatchNorm's statistics come from groups of 8 ... 512 consecutive examples
(`model.bn_sync=ghost`, `model.bn_group_size`), the batch sharded over all
devices (`jit`): groups smaller than a device's slice stay on it, larger ones
are reduced across devices.

Command:
  python -m cnnjax.sweep --config=experiments/bn_ghost_batch.py --workdir=/tmp/cnnjax/bn_study/ghost_batch \
    --mode=sequential
  (full scale: --config=experiments/bn_ghost_batch.py:full)
As part of the study: python scripts/bn_study.py --workdir=DIR (section 6 of DIR/report.md).
Expected: eval accuracy against the ghost batch size (8 to 512), with the seed spread that
decides whether any size stands apart.
Result: docs/results/bn_study/summary.md, "Ghost batch" (scripts/bn_study.py; the report and plots beside it).
"""

import os

from cnnjax.sweep import grid, load_experiment_file, product

BASE_EXPERIMENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bn_base.py")
GLOBAL_BATCH = 512
GROUP_SIZES = (8, 16, 32, 64, 128, 256, 512)
DEFAULT_GROUP_SIZE = 32


def get_config(scale: str = "small"):
  base = load_experiment_file(BASE_EXPERIMENT)
  config = base.get_config(scale)
  scale_up = GLOBAL_BATCH // base.GLOBAL_BATCH
  config.batch_size = GLOBAL_BATCH
  config.num_train_steps = base.TRAIN_STEPS[scale] // scale_up  # the same epochs
  config.checkpoint_every_steps = min(config.checkpoint_every_steps, config.num_train_steps)
  config.optimizer.learning_rate = base.LEARNING_RATE * scale_up
  config.model.bn_sync = "ghost"
  config.model.bn_group_size = DEFAULT_GROUP_SIZE  # run alone; the sweep sets every size
  config.parallel.strategy = "jit"
  return config


def sweep():
  return product(grid({"model.bn_group_size": GROUP_SIZES}), grid({"seed": load_experiment_file(BASE_EXPERIMENT).SEEDS}))
