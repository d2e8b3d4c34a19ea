"""BatchNorm study, experiment 2: accuracy against the per-device batch, BatchNorm vs GroupNorm, LayerNorm, none.

Wu & He 2018 (Group Normalization, Figure 1): ResNet-50's ImageNet error with
BatchNorm rose from 23.6% at 32 images per device to 34.7% at 2, while
GroupNorm stayed near 24.1%. Here the global batch stays 128 and BatchNorm's
statistics come from groups of 2 ... 128 examples (`bn_sync=ghost`): on one
device that is the same computation as local BatchNorm with that per-device
batch on 128/b devices (tested in tests/test_parallel.py), so only the
statistics batch changes. GroupNorm, LayerNorm and no normalization treat every
example alone: at a fixed global batch their computation does not depend on
the per-device batch at all, so each is one run.

Command:
  python -m cnnjax.sweep --config=experiments/bn_per_device_batch.py \
    --workdir=/tmp/cnnjax/bn_study/per_device_batch --mode=sequential
  (full scale: --config=experiments/bn_per_device_batch.py:full)
As part of the study: python scripts/bn_study.py --workdir=DIR (section 2 of DIR/report.md).
Expected (measured, small scale, seed 0): BatchNorm 98.06% at a per-device
batch of 2, 98.61% at 4, 98.89% from 8 to 128 (eval loss 0.0666 at 2 against
0.0486 at 128); GroupNorm 97.78%, LayerNorm 98.06%, no normalization 98.33%.
Cost: 10 runs of 200 steps, 22 s in the study on 2 CPU cores.
"""

import os

from cnnjax.sweep import grid, load_experiment_file

BASE_EXPERIMENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bn_base.py")
PER_DEVICE_BATCHES = (2, 4, 8, 16, 32, 64, 128)
PER_EXAMPLE_NORMS = ("group", "layer", "none")


def get_config(scale: str = "small"):
  return load_experiment_file(BASE_EXPERIMENT).get_config(scale)


def sweep():
  return (grid({"model.norm": ("batch",), "model.bn_sync": ("ghost",), "model.bn_group_size": PER_DEVICE_BATCHES})
          + grid({"model.norm": PER_EXAMPLE_NORMS}))
