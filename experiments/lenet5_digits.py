"""LeNet-5 on the embedded 8x8 digits, upsampled to 32x32: the default experiment.

Command:
  python -m cnnjax.main --config=experiments/lenet5_digits.py --workdir=/tmp/cnnjax/lenet5_digits
Expected: eval accuracy of at least 97% on the 360 test digits with every seed.
Result: docs/results/experiments.json, "lenet5_digits" (scripts/run_experiments.py: seeds 0, 1 and 2, with steps and time).
"""

from cnnjax.config import base_config


def get_config():
  config = base_config()
  config.model.name = "lenet5"
  config.data.name = "digits"
  config.data.image_size = 32  # LeNet-5 expects 32x32 inputs
  config.data.rotation_degrees = 8.0
  config.batch_size = 64
  config.num_epochs = 40
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 2e-3
  config.optimizer.weight_decay = 1e-4
  config.optimizer.warmup_steps = 50
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200
  return config
