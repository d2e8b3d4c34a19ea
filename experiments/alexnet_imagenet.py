"""AlexNet on ImageNet (ILSVRC 2012), torchvision's layout and recipe (config only).

Recipe (torchvision's reference scripts for AlexNet and VGG): global batch 256,
SGD momentum 0.9, learning rate 0.01 divided by 10 every 30 epochs, 90 epochs,
weight decay 1e-4, 224x224 random resized crops and horizontal flips, dropout 0.5.

Data: TFDS `imagenet2012` needs a manual download of the ILSVRC 2012 tar files; then, once:
  pip install 'cnnjax[prepare]' && python -m cnnjax.prepare imagenet2012 --manual_dir=DIR
Command:
  python -m cnnjax.main --config=experiments/alexnet_imagenet.py --workdir=/tmp/cnnjax/alexnet_imagenet \
      --config.parallel.strategy=jit
Expected: about 56.5% top-1 (torchvision's AlexNet reference: 56.52%).
Size: 450k steps at batch 256; 61,100,840 parameters and 0.71 GMACs per 224x224 image
(python -m cnnjax.summary alexnet --input_shape=224,224,3 --num_classes=1000).
Result: not run here (no ImageNet on this machine).
"""

from cnnjax.config import imagenet_config


def get_config():
  config = imagenet_config("alexnet", learning_rate=0.01, decay_epochs=(30, 60))
  config.model.classifier_features = 4096
  config.model.dropout_rate = 0.5
  return config
