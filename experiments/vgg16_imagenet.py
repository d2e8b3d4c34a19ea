"""VGG-16 on ImageNet (ILSVRC 2012), torchvision's layout and recipe (config only); any VGG by name.

Recipe (torchvision's reference scripts for AlexNet and VGG): global batch 256,
SGD momentum 0.9, learning rate 0.01 divided by 10 every 30 epochs, 90 epochs,
weight decay 1e-4, 224x224 random resized crops and horizontal flips.
The other depths and the BatchNorm variants use the same recipe:
  --config.model.name=vgg11 (vgg13, vgg19, vgg11_bn, vgg13_bn, vgg16_bn, vgg19_bn)

Data: TFDS `imagenet2012` needs a manual download of the ILSVRC 2012 tar files; then, once:
  pip install 'cnnjax[prepare]' && python -m cnnjax.prepare imagenet2012 --manual_dir=DIR
Command:
  python -m cnnjax.main --config=experiments/vgg16_imagenet.py --workdir=/tmp/cnnjax/vgg16_imagenet \
      --config.parallel.strategy=jit
Expected: about 71.6% top-1 (torchvision's references: VGG-16 71.59%, VGG-16-BN 73.36%).
Size: 450k steps at batch 256; 138,357,544 parameters and 15.5 GMACs per 224x224 image
(python -m cnnjax.summary vgg16 --input_shape=224,224,3 --num_classes=1000).
Result: not run here (no ImageNet on this machine).
"""

from cnnjax.config import imagenet_config


def get_config():
  config = imagenet_config("vgg16", learning_rate=0.01, decay_epochs=(30, 60))
  config.model.stage_features = (64, 128, 256, 512, 512)  # the paper's widths, for every depth
  config.model.classifier_features = 4096
  config.model.dropout_rate = 0.5
  return config
