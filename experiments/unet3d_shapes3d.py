"""The 3D U-Net (the notes' "3D extension of 2D U-net") on synthetic volumes: per-voxel classes
background / sphere / cube in 16x16x16 one-channel volumes (procedurally generated, offline).

Command:
  python -m cnnjax.main --config=experiments/unet3d_shapes3d.py --workdir=/tmp/cnnjax/unet3d_shapes3d
Per-class IoU afterwards:
  python scripts/segmentation_scores.py --config=experiments/unet3d_shapes3d.py --workdir=/tmp/cnnjax/unet3d_shapes3d
Expected: voxel accuracy of at least 98% on the 64 test volumes; the mean IoU in the summary,
per-class IoU from scripts/segmentation_scores.py.
Result: docs/results/experiments.json, "unet3d_shapes3d" (scripts/run_experiments.py: seed 0, accuracy, mean IoU, steps and time).
"""

from cnnjax.config import base_config


def get_config():
  config = base_config()
  config.model.name = "unet3d"
  config.model.features = (8, 16, 32)  # three levels: 16 -> 8 -> 4 voxels
  config.data.name = "shapes3d"
  config.batch_size = 16
  config.num_epochs = 15
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.weight_decay = 1e-4
  config.optimizer.warmup_steps = 20
  config.log_every_steps = 40
  config.checkpoint_every_steps = 120
  return config
