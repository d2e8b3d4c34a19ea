"""The notes' Keras-style CNN (Conv2D, MaxPooling2D, BatchNorm, Flatten, Dense, Dropout) on the digits.

Command:
  python -m cnnjax.main --config=experiments/simple_cnn_digits.py --workdir=/tmp/cnnjax/simple_cnn_digits
Expected: at least 98% on the 360 test digits (16x16 inputs) with every seed.
Result: docs/results/experiments.json, "simple_cnn_digits" (scripts/run_experiments.py: seeds 0, 1 and 2, with steps and time).
"""

from cnnjax.config import base_config


def get_config():
  config = base_config()
  config.model.name = "simple_cnn"
  config.model.features = (32, 64)
  config.model.dense_features = 128
  config.model.dropout_rate = 0.3
  config.data.name = "digits"
  config.data.image_size = 16
  config.data.rotation_degrees = 8.0
  config.batch_size = 64
  config.num_epochs = 20
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 2e-3
  config.optimizer.weight_decay = 1e-4
  config.optimizer.warmup_steps = 50
  config.checkpoint_every_steps = 200
  return config
