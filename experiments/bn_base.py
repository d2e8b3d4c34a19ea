"""The BatchNorm study's reference run: the model and recipe every bn_* experiment starts from.

Two scales, chosen by the config argument (`--config=experiments/bn_base.py:full`):

* `small` (the default): the notes' CNN (conv -> relu -> max pool -> BatchNorm, two
  stages of 16 and 32 channels, dense 64, no dropout) on the embedded 8x8 digits,
  batch 128, 200 SGD steps (about 18 epochs). Dropout is off so that BatchNorm is
  the only layer whose output depends on the rest of the batch.
* `full`: ResNet-20 on CIFAR-10 with He et al. 2015's recipe (SGD 0.1, momentum
  0.9, weight decay 1e-4, crops and flips), batch 128, 30 epochs (11,700 steps)
  with a cosine schedule.

Command:
  python -m cnnjax.main --config=experiments/bn_base.py --workdir=/tmp/cnnjax/bn_base
Expected: at least 97% eval accuracy on the 360 test digits with every seed.
Result: docs/results/experiments.json, "bn_base" (scripts/run_experiments.py: seeds 0, 1 and 2). The full scale (30 CIFAR-10
epochs per run) is not run here.
"""

from cnnjax.config import base_config

SCALES = ("small", "full")
GLOBAL_BATCH = 128
# Training steps at GLOBAL_BATCH; experiments with another global batch keep the epochs fixed.
TRAIN_STEPS = {"small": 200, "full": 11_700}
LEARNING_RATE = 0.1  # at GLOBAL_BATCH; scaled linearly with the global batch (Goyal et al. 2017)
# The seeds each configuration of the study's experiments runs with (their mean and spread are reported).
SEEDS = (0, 1, 2)


def get_config(scale: str = "small"):
  if scale not in SCALES:
    raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)} "
                     "(e.g. --config=experiments/bn_base.py:full)")
  config = base_config()
  if scale == "small":
    config.model.name = "simple_cnn"
    config.model.features = (16, 32)
    config.model.dense_features = 64
    config.model.dropout_rate = 0.0
    config.data.name = "digits"
    config.log_every_steps = 20
  else:
    config.model.name = "resnet20"
    config.data.name = "cifar10"
    config.data.crop_padding = 4
    config.data.flip = True
    config.optimizer.weight_decay = 1e-4
    config.log_every_steps = 100
  config.model.norm = "batch"
  config.model.group_norm_groups = 8  # for GroupNorm runs: 16 channels in groups of 2, 32 in groups of 4
  config.batch_size = GLOBAL_BATCH
  config.num_train_steps = TRAIN_STEPS[scale]
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = LEARNING_RATE
  config.optimizer.momentum = 0.9
  config.optimizer.schedule = "cosine"
  # One checkpoint at the end: a small run is cheaper to redo than to checkpoint often.
  config.checkpoint_every_steps = config.num_train_steps if scale == "small" else 2_000
  return config
