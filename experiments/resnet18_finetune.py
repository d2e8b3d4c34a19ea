"""ResNet-18 fine-tuned on CIFAR-10 from torchvision's ImageNet weights.

Weights: torchvision's ResNet-18 (IMAGENET1K_V1), the file
https://download.pytorch.org/models/resnet18-f37072fd.pth, which torchvision
itself caches in ~/.cache/torch/hub/checkpoints/ (where `init_from` points by
default); any path works, and so does a `.safetensors` file of the same state
dict. It is read without running code from it (`cnnjax.models.torchvision_import`).
The 1000-class classifier is replaced by a fresh 10-class one
(`init_from_replace_classifier`); every other layer starts from the file, and
BatchNorm keeps PyTorch's unbiased running-variance convention, as the weights
were trained with.

Recipe: 224x224 inputs (CIFAR-10 upsampled) with horizontal flips, batch 128,
SGD momentum 0.9, learning rate 0.01 with a cosine decay, weight decay 1e-4,
5 epochs.

Command (CIFAR-10 prepared once with `python -m cnnjax.prepare cifar10`):
  mkdir -p ~/.cache/torch/hub/checkpoints && curl -L -o ~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth \
      https://download.pytorch.org/models/resnet18-f37072fd.pth
  python -m cnnjax.main --config=experiments/resnet18_finetune.py --workdir=/tmp/cnnjax/resnet18_finetune \
      [--config.init_from=PATH] [--config.parallel.strategy=jit]
Expected: a pretrained start beats ResNet-18 trained from scratch for the same steps
(`--config.init_from=` trains from scratch for the comparison).
Size: 1,954 steps at batch 128 of 224x224 images, 1.8 GMACs each forward.
Result: not run here (no network for the weights or the data on this machine).
"""

from cnnjax.config import base_config


def get_config():
  config = base_config()
  config.model.name = "resnet18"
  config.model.bn_running_variance = "unbiased"  # torchvision's convention, which the weights carry
  config.init_from = "~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth"
  config.init_from_replace_classifier = True  # 1000 ImageNet classes -> 10
  config.data.name = "cifar10"
  config.data.image_size = 224
  config.data.flip = True
  config.batch_size = 128
  config.num_epochs = 5
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.01
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = "cosine"
  config.log_every_steps = 50
  config.eval_every_steps = 391
  config.checkpoint_every_steps = 391
  return config
