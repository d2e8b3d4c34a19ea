"""U-Net on the synthetic shapes segmentation set (procedurally generated, offline): per-pixel classes
background / circle / square / triangle on 32x32 RGB images of random colours.

Command:
  python -m cnnjax.main --config=experiments/unet_shapes.py --workdir=/tmp/cnnjax/unet_shapes
Expected: pixel accuracy of at least 98% on the 200 test images; the mean IoU in the summary,
per-class IoU from scripts/segmentation_scores.py.
Result: docs/results/experiments.json, "unet_shapes" (scripts/run_experiments.py: seed 0, accuracy, mean IoU, steps and time).
"""

from cnnjax.config import base_config


def get_config():
  config = base_config()
  config.model.name = "unet"
  config.model.features = (16, 32, 64)  # three levels: 32 -> 16 -> 8 pixels
  config.model.norm = "batch"
  config.data.name = "shapes"
  config.data.flip = True
  config.data.crop_padding = 2  # masks move with their images
  config.batch_size = 32
  config.num_epochs = 10
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.weight_decay = 1e-4
  config.optimizer.warmup_steps = 30
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200
  return config
