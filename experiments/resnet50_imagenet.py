"""ResNet-50 on ImageNet (ILSVRC 2012) with the standard 90-epoch step recipe (config only).

Recipe: global batch 256 (scale the learning rate linearly, 0.1 per 256), SGD
momentum 0.9, weight decay 1e-4, learning rate divided by 10 after epochs 30, 60
and 80, 224x224 inputs, random resized crops and horizontal flips, label
smoothing 0.

Data: TFDS `imagenet2012` needs a manual download of the ILSVRC 2012 tar files
into a manual directory; then, once:
  pip install 'cnnjax[prepare]' && python -m cnnjax.prepare imagenet2012 --manual_dir=DIR
Command:
  python -m cnnjax.main --config=experiments/resnet50_imagenet.py --workdir=/tmp/cnnjax/resnet50_imagenet \
      --config.parallel.strategy=jit
Expected: about 76% top-1 (torchvision's ResNet-50 reference: 76.13% with this recipe).
Size: 450k steps at batch 256.
Result: not run here (no ImageNet and no accelerator on this machine).
"""

from cnnjax.config import imagenet_config


def get_config():
  return imagenet_config("resnet50", learning_rate=0.1, decay_epochs=(30, 60, 80))
