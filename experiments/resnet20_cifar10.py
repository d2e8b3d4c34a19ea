"""ResNet-20 on CIFAR-10 with the recipe of He et al. 2015 (Section 4.2).

Recipe: batch 128, SGD momentum 0.9, weight decay 1e-4, learning rate 0.1
divided by 10 at 32k and 48k iterations, 64k iterations in all; 4-pixel padding
with random 32x32 crops and horizontal flips; option-A shortcuts.

Command (CIFAR-10 prepared once with `python -m cnnjax.prepare cifar10`):
  python -m cnnjax.main --config=experiments/resnet20_cifar10.py --workdir=/tmp/cnnjax/resnet20_cifar10
Data-parallel on all local devices:
  ... --config.parallel.strategy=pmap   (or shard_map, jit)
Offline smoke run on the embedded digits:
  ... --config.data.name=digits --config.num_train_steps=200
Expected: 91.25% test accuracy (He et al. 2015, Table 6).
Size: 64k steps at batch 128.
Result: not run here (no accelerator on this machine to train it to completion).
"""

from cnnjax.config import base_config


def get_config():
  config = base_config()
  config.model.name = "resnet20"
  config.data.name = "cifar10"
  config.data.crop_padding = 4
  config.data.flip = True
  config.batch_size = 128
  config.num_train_steps = 64_000
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = "piecewise"
  config.optimizer.decay_boundaries = (0.5, 0.75)  # 32k and 48k of 64k iterations
  config.optimizer.decay_factor = 0.1
  config.log_every_steps = 100
  config.eval_every_steps = 4_000
  config.checkpoint_every_steps = 2_000
  return config
